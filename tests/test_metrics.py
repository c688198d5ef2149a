"""crlnseg.metrics equals medpy.metric.binary (dc, jc, hd95, asd) on many seeded random masks.

Both surface-distance methods (KD-tree and distance transform) are checked, each forced, and the
automatic choice; values must agree with medpy to 1e-9 relative (in practice to the last bit).
"""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
from medpy.metric import binary as mb
from scipy.ndimage import binary_erosion, gaussian_filter, generate_binary_structure

from crlnseg import metrics
from crlnseg.metrics import (
    asd,
    case_metrics,
    choose_method,
    crop_to_union,
    dice,
    hd95,
    hd95_asd,
    jaccard,
    surface,
    surface_distances,
)

SPACINGS = [None, (0.7, 1.3, 2.9), (1.25, 1.25, 1.25), (0.4, 0.4, 3.0)]
METHODS = ("kdtree", "edt", "auto")
RTOL = 1e-9
MEDPY_DISTANCES = mb.__dict__["__surface_distances"]


def _blob(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    noise = gaussian_filter(rng.standard_normal(shape), sigma=rng.uniform(1.0, 3.0))
    return noise > np.quantile(noise, rng.uniform(0.6, 0.97))


def _thin(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A one-voxel-thick line or plane (every voxel is surface)."""
    mask = np.zeros(shape, bool)
    axis = int(rng.integers(len(shape)))
    index = [slice(None)] * len(shape)
    index[axis] = int(rng.integers(shape[axis]))
    if rng.random() < 0.5:  # a line: fix a second axis too
        other = (axis + 1) % len(shape)
        index[other] = int(rng.integers(shape[other]))
    mask[tuple(index)] = True
    return mask


def _voxels(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A few single voxels, some on the array border."""
    mask = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 4))):
        mask[tuple(int(rng.integers(s)) for s in shape)] = True
    mask[(0,) * len(shape)] |= rng.random() < 0.5
    return mask


def _border(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A box touching one or more faces of the array (border voxels are surface in medpy)."""
    mask = np.zeros(shape, bool)
    lo = [int(rng.integers(0, 2)) * int(rng.integers(0, s // 2)) for s in shape]
    hi = [int(rng.integers(lo_ + 1, s + 1)) if rng.random() < 0.5 else s
          for lo_, s in zip(lo, shape, strict=True)]
    mask[tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))] = True
    return mask


def _random(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.random(shape) < rng.uniform(0.01, 0.4)


MAKERS = [_blob, _thin, _voxels, _border, _random]


def _pairs(seed: int, count: int, ndim: int = 3):
    rng = np.random.default_rng(seed)
    for _ in range(count):
        shape = tuple(int(s) for s in rng.integers(4, 22, size=ndim))
        pred = MAKERS[int(rng.integers(len(MAKERS)))](rng, shape)
        ref = MAKERS[int(rng.integers(len(MAKERS)))](rng, shape)
        if rng.random() < 0.3:  # a perturbed copy: the realistic, overlapping case
            ref = pred ^ (rng.random(shape) < 0.05)
        if pred.any() and ref.any():
            yield pred, ref


def _close(ours: float, theirs: float) -> bool:
    return abs(ours - theirs) <= RTOL * max(abs(theirs), 1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_equals_medpy_on_random_masks(seed: int) -> None:
    checked = 0
    for pred, ref in _pairs(seed, 40):
        assert _close(dice(pred, ref), mb.dc(pred, ref))
        assert _close(jaccard(pred, ref), mb.jc(pred, ref))
        for spacing in SPACINGS:
            h, a = hd95_asd(pred, ref, spacing)
            assert _close(h, mb.hd95(pred, ref, voxelspacing=spacing)), (spacing, pred.shape)
            assert _close(a, mb.asd(pred, ref, voxelspacing=spacing)), (spacing, pred.shape)
            # asd is one-directional: swapping the masks gives medpy's other direction.
            assert _close(asd(ref, pred, spacing), mb.asd(ref, pred, voxelspacing=spacing))
        checked += 1
    assert checked >= 25


def test_equals_medpy_in_2d_and_with_integer_labels() -> None:
    for pred, ref in _pairs(7, 20, ndim=2):
        assert _close(hd95(pred, ref, (0.5, 2.0)), mb.hd95(pred, ref, voxelspacing=(0.5, 2.0)))
        assert _close(asd(pred, ref), mb.asd(pred, ref))
    pred, ref = next(_pairs(8, 5))
    assert dice(pred.astype(np.uint8) * 3, ref.astype(np.int16)) == mb.dc(pred, ref)


def test_crop_changes_nothing_and_padding_changes_nothing() -> None:
    rng = np.random.default_rng(11)
    for pred, ref in _pairs(12, 15):
        # Embedding in a larger background must not change any distance (the border rule only
        # affects voxels on the array border, which the embedding moves inside).
        pad = [(int(rng.integers(0, 6)), int(rng.integers(0, 6))) for _ in range(3)]
        big_p, big_r = np.pad(pred, pad), np.pad(ref, pad)
        for spacing in (None, (0.7, 1.3, 2.9)):
            to_ref, to_pred = surface_distances(big_p, big_r, spacing)
            full = MEDPY_DISTANCES(big_p, big_r, spacing)
            np.testing.assert_allclose(to_ref, full, rtol=1e-12)
            np.testing.assert_allclose(to_pred, MEDPY_DISTANCES(big_r, big_p, spacing), rtol=1e-12)
        # The cropped surfaces are exactly the full surfaces, for margins 0, 1 and 3.
        for margin in (0, 1, 3):
            cp, cr = crop_to_union(big_p, big_r, margin)
            assert np.count_nonzero(surface(cp)) == np.count_nonzero(surface(big_p))
            assert np.count_nonzero(surface(cr)) == np.count_nonzero(surface(big_r))


def test_crop_is_tight_and_clipped() -> None:
    mask = np.zeros((10, 12, 14), bool)
    mask[0, 5, 6] = True
    mask[3, 7, 13] = True
    p, r = crop_to_union(mask, np.zeros_like(mask), margin=1)
    assert p.shape == (5, 5, 9) and r.shape == p.shape and p.sum() == 2


def test_border_voxels_are_surface() -> None:
    full = np.ones((5, 5, 5), bool)
    assert surface(full).sum() == 5**3 - 3**3  # only the array border is surface


def test_known_distances() -> None:
    pred = np.zeros((1, 1, 30), bool)
    ref = np.zeros_like(pred)
    pred[0, 0, 3] = True
    ref[0, 0, 10] = True
    assert hd95_asd(pred, ref) == (7.0, 7.0)
    assert hd95_asd(pred, ref, (1.0, 1.0, 0.5)) == (3.5, 3.5)


def test_empty_masks() -> None:
    empty = np.zeros((6, 6, 6), bool)
    full = empty.copy()
    full[2:4, 2:4, 2:4] = True
    assert (dice(empty, empty), jaccard(empty, empty)) == (1.0, 1.0)
    assert hd95_asd(empty, empty) == (0.0, 0.0)
    for pred, ref in ((empty, full), (full, empty)):
        assert (dice(pred, ref), jaccard(pred, ref)) == (0.0, 0.0)
        assert hd95_asd(pred, ref, (1, 2, 3)) == (None, None)
        assert hd95(pred, ref) is None and asd(pred, ref) is None
    with pytest.raises(ValueError, match="non-empty"):
        surface_distances(empty, full)


def test_case_metrics_per_class() -> None:
    rng = np.random.default_rng(3)
    ref = rng.integers(0, 3, size=(12, 10, 8))
    pred = np.where(rng.random(ref.shape) < 0.1, 0, ref)
    rows = case_metrics(pred, ref, [1, 2, 5], spacing=(1.0, 2.0, 0.5))
    assert [row["class"] for row in rows] == [1, 2, 5]
    for row in rows[:2]:
        p, r = pred == row["class"], ref == row["class"]
        assert _close(row["dice"], mb.dc(p, r)) and _close(row["jaccard"], mb.jc(p, r))
        assert _close(row["hd95"], mb.hd95(p, r, voxelspacing=(1.0, 2.0, 0.5)))
        assert _close(row["asd"], mb.asd(p, r, voxelspacing=(1.0, 2.0, 0.5)))
    assert rows[2] == {"class": 5, "dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}
    with pytest.raises(ValueError, match="shapes differ"):
        case_metrics(pred[:-1], ref, [1])


def _assert_equals_medpy(pred: np.ndarray, ref: np.ndarray, spacing, method: str) -> None:
    """Per-voxel distances (same C order as medpy), HD95 and ASD of one method."""
    to_ref, to_pred = surface_distances(pred, ref, spacing, method=method)
    np.testing.assert_allclose(to_ref, MEDPY_DISTANCES(pred, ref, spacing), rtol=RTOL, atol=0)
    np.testing.assert_allclose(to_pred, MEDPY_DISTANCES(ref, pred, spacing), rtol=RTOL, atol=0)
    h, a = hd95_asd(pred, ref, spacing, method=method)
    np.testing.assert_allclose([h, a], [mb.hd95(pred, ref, voxelspacing=spacing),
                                        mb.asd(pred, ref, voxelspacing=spacing)],
                               rtol=RTOL, atol=0, err_msg=f"{method}, spacing {spacing}")


@pytest.mark.parametrize("method", METHODS)
def test_each_method_equals_medpy_on_blobs_with_anisotropic_spacing(method: str) -> None:
    rng = np.random.default_rng(21)
    for _ in range(12):
        shape = tuple(int(s) for s in rng.integers(8, 40, size=3))
        pred, ref = _blob(rng, shape), _blob(rng, shape)
        if rng.random() < 0.5:  # a deformed copy: surfaces close together, as for a prediction
            ref = gaussian_filter(pred.astype(float), 1.5) > rng.uniform(0.3, 0.7)
        if not (pred.any() and ref.any()):
            continue
        for spacing in ((0.7, 1.3, 2.9), (0.4, 0.4, 3.0), (1 / 3, 1 / 7, 0.9), None):
            _assert_equals_medpy(pred, ref, spacing, method)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_on_one_voxel_and_border_masks(method: str) -> None:
    shape = (9, 7, 5)
    one, corner, other = (np.zeros(shape, bool) for _ in range(3))
    one[4, 3, 2] = True
    corner[0, 0, 0] = True
    other[8, 6, 4] = True
    full = np.ones(shape, bool)  # every border voxel is surface
    slab = np.zeros(shape, bool)
    slab[:, :, 3:] = True  # touches five faces
    rng = np.random.default_rng(5)
    for pred, ref in ((one, one), (one, corner), (corner, other), (one, full), (full, slab),
                      (slab, corner), (_border(rng, shape), _border(rng, shape))):
        for spacing in (None, (0.7, 1.3, 2.9)):
            _assert_equals_medpy(pred, ref, spacing, method)
    assert hd95_asd(one, one, method=method) == (0.0, 0.0)
    assert hd95_asd(one, corner, (1.0, 2.0, 3.0), method=method)[1] == pytest.approx(
        float(np.sqrt(16 + 36 + 36)), rel=1e-15)
    empty = np.zeros(shape, bool)
    assert hd95_asd(empty, empty, method=method) == (0.0, 0.0)
    assert hd95_asd(one, empty, method=method) == (None, None)


def test_both_methods_on_thin_and_noise_masks_in_1d_2d_3d() -> None:
    for ndim, seed in ((1, 30), (2, 31), (3, 32)):
        for pred, ref in _pairs(seed, 15, ndim=ndim):
            for method in ("kdtree", "edt"):
                _assert_equals_medpy(pred, ref, (0.6, 1.7, 2.3)[:ndim], method)


def test_surface_equals_scipy_erosion() -> None:
    rng = np.random.default_rng(40)
    for shape in ((0,), (1,), (5,), (1, 6), (4, 0, 3), (4, 1, 3), (7, 8, 9), (2, 3, 4, 5)):
        for density in (0.2, 0.7, 1.0):
            mask = rng.random(shape) < density
            structure = generate_binary_structure(mask.ndim, 1)
            expected = mask ^ binary_erosion(mask, structure=structure, iterations=1)
            np.testing.assert_array_equal(surface(mask), expected)


def test_automatic_choice_and_threads() -> None:
    assert choose_method(1_000, 100_000) == "kdtree"  # a prediction: few voxels far off
    assert choose_method(90_000, 100_000) == "edt"  # unrelated dense surfaces: most far off
    rng = np.random.default_rng(50)
    apart_p, apart_r = np.zeros((24, 20, 20), bool), np.zeros((24, 20, 20), bool)
    apart_p[:9] = rng.random((9, 20, 20)) < 0.7  # dense surfaces, all far from each other
    apart_r[15:] = rng.random((9, 20, 20)) < 0.7
    grid = np.ogrid[:48, :44, :44]
    ball = sum((g - 22) ** 2 for g in grid) < 20**2
    spacing = (0.7, 1.3, 2.9)
    cases = (((apart_p, apart_r), "edt"), ((ball, np.roll(ball, 6, axis=0)), "kdtree"))
    for (pred, ref), finish in cases:
        with mock.patch.object(metrics, "choose_method", wraps=metrics.choose_method) as spy:
            auto = surface_distances(pred, ref, spacing)
        choices = [metrics.choose_method(*call.args) for call in spy.call_args_list]
        assert choices and set(choices) == {finish}
        _assert_equals_medpy(pred, ref, spacing, "auto")
        for method, threads in (("kdtree", 1), ("kdtree", 3), ("edt", -1)):
            with mock.patch.object(metrics, "POINTS_PER_THREAD", 1):  # threads even for few
                forced = surface_distances(pred, ref, spacing, method, threads)
            for a, b in zip(auto, forced, strict=True):
                np.testing.assert_allclose(a, b, rtol=RTOL, atol=0)
    with pytest.raises(ValueError, match="method"):
        surface_distances(ball, ball, method="fast")
