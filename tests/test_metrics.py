"""crlnseg.metrics equals medpy.metric.binary (dc, jc, hd95, asd) on many seeded random masks."""

from __future__ import annotations

import numpy as np
import pytest
from medpy.metric import binary as mb
from scipy.ndimage import gaussian_filter

from crlnseg.metrics import (
    asd,
    case_metrics,
    crop_to_union,
    dice,
    hd95,
    hd95_asd,
    jaccard,
    surface,
    surface_distances,
)

SPACINGS = [None, (0.7, 1.3, 2.9), (1.25, 1.25, 1.25), (0.4, 0.4, 3.0)]


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
    return abs(ours - theirs) <= 1e-6 * max(abs(theirs), 1e-12)


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
            full = mb.__dict__["__surface_distances"](big_p, big_r, spacing)
            np.testing.assert_allclose(to_ref, full, rtol=1e-12)
            np.testing.assert_allclose(
                to_pred, mb.__dict__["__surface_distances"](big_r, big_p, spacing), rtol=1e-12)
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
