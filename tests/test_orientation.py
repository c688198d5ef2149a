"""Canonical orientation: the closest RAS axis order, exact round trips through ``predict``."""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from inference_helpers import blob_image, make_tiny_run, oblique_affine, write_nifti
from typer.testing import CliRunner

from crlnseg.cli.app import app
from crlnseg.data.orientation import Transform, canonical_transform, from_canonical, to_canonical
from crlnseg.data.preprocessing import preprocess
from crlnseg.io import Geometry, Volume
from crlnseg.settings import PrepareSettings

runner = CliRunner()
TRANSFORMS = [Transform(p, f) for p in itertools.permutations(range(3))
              for f in itertools.product((False, True), repeat=3)]
SHAPE = (20, 17, 12)  # canonical (R-L, A-P, S-I); distinct sizes catch a wrong permutation
SPACING = (0.9, 1.3, 2.5)


def voxel_map(t: Transform, canonical_shape) -> np.ndarray:
    """4x4 matrix: input voxel index -> canonical voxel index, for input = from_canonical(A, t)."""
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for k in range(3):
        m[k, t.permutation[k]] = -1.0 if t.flips[k] else 1.0
        m[k, 3] = canonical_shape[k] - 1 if t.flips[k] else 0.0
    return m


def lps_direction(affine: np.ndarray) -> np.ndarray:
    """ITK's direction (LPS, columns = array axes) of a RAS affine."""
    d = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    return (np.diag([-1.0, -1.0, 1.0]) @ d).ravel()


def test_48_transforms_are_distinct_and_inverted_exactly():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(2, *SHAPE)).astype(np.float32)
    seen = set()
    for t in TRANSFORMS:
        b = from_canonical(a, t)
        seen.add(b.tobytes() + bytes(str(b.shape), "ascii"))
        np.testing.assert_array_equal(to_canonical(b, t), a)
    assert len(seen) == 48


@pytest.mark.parametrize("t", TRANSFORMS, ids=str)
def test_axis_aligned_direction_gives_its_transform(t):
    affine = np.diag([*SPACING, 1.0]) @ voxel_map(t, SHAPE)
    assert canonical_transform(lps_direction(affine)) == t


def test_oblique_directions_match_nibabel():
    rng = np.random.default_rng(1)
    for _ in range(200):
        q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
        # Small rotations of each of the 48 axis-aligned frames: clear-cut cases.
        t = TRANSFORMS[rng.integers(48)]
        frame = voxel_map(t, SHAPE)[:3, :3]
        angle = rng.uniform(-0.5, 0.5)
        skew = q @ np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                             [0, 0, 1]]) @ q.T
        affine = np.eye(4)
        affine[:3, :3] = skew @ frame
        ornt = nib.orientations.io_orientation(affine)  # per input axis: world axis, sign
        got = canonical_transform(lps_direction(affine))
        for axis, (world, sign) in enumerate(ornt):
            assert got.permutation[int(world)] == axis
            assert got.flips[int(world)] == (sign < 0)


def test_every_input_order_gives_the_same_preprocessed_case():
    image, label = blob_image(SHAPE)
    settings = PrepareSettings(target_spacing=(1.0, 1.0, 1.5))
    ref = None
    for t in TRANSFORMS:
        affine = np.diag([*SPACING, 1.0]) @ voxel_map(t, SHAPE)
        geometry = Geometry(spacing=tuple(float(SPACING[p]) for p in np.argsort(t.permutation)),
                            direction=tuple(lps_direction(affine)))
        case = preprocess(Volume(from_canonical(image, t), geometry),
                          Volume(from_canonical(label, t), geometry), settings)
        assert case.info.spacing == SPACING
        if ref is None:
            ref = case
        np.testing.assert_array_equal(case.image, ref.image)
        np.testing.assert_array_equal(case.label, ref.label)
    assert PrepareSettings(orientation="input").orientation == "input"


def test_input_order_kept_when_asked():
    image, _ = blob_image(SHAPE)
    t = TRANSFORMS[-1]
    affine = np.diag([*SPACING, 1.0]) @ voxel_map(t, SHAPE)
    vol = Volume(from_canonical(image, t), Geometry(spacing=(1.0, 1.0, 1.0),
                                                    direction=tuple(lps_direction(affine))))
    kept = preprocess(vol, None, PrepareSettings(orientation="input", normalize="none"))
    np.testing.assert_array_equal(kept.image[0], vol.array)
    assert kept.info.orientation == Transform((0, 1, 2), (False,) * 3).to_dict()


@pytest.fixture(scope="module")
def resampling_run(tmp_path_factory):
    # Resampling on the way in and back out: the round trip covers restore, not only the copy.
    return make_tiny_run(tmp_path_factory.mktemp("run"),
                         prepare={"target_spacing": (1.1, 1.1, 1.6)})


def test_predict_round_trip_for_48_orders_and_an_oblique_direction(tmp_path, resampling_run):
    """Each stored order of one scan gives, read back with SimpleITK and nibabel, the input's own
    header and the reference mask in the input's own array order."""
    image, _ = blob_image(SHAPE, seed=4)
    base = np.diag([*SPACING, 1.0])
    base[:3, 3] = (12.5, -30.25, 7.0)
    cases = {}
    for i, t in enumerate(TRANSFORMS):
        cases[f"o{i:02d}"] = (t, base @ voxel_map(t, SHAPE))
    obl = oblique_affine(SPACING)  # closest canonical frame: identity
    t_obl = Transform((2, 0, 1), (True, False, True))
    cases["oblique"] = (Transform((0, 1, 2), (False,) * 3), obl)
    cases["oblique_stored"] = (t_obl, obl @ voxel_map(t_obl, SHAPE))
    src = tmp_path / "scans"
    for name, (t, affine) in cases.items():
        write_nifti(src / f"{name}.nii.gz", from_canonical(image, t), affine)
    out = tmp_path / "masks"
    result = runner.invoke(app, ["predict", str(src), "-o", str(out), "-m", str(resampling_run),
                                 "--device", "cpu", "--save-probabilities"])
    assert result.exit_code == 0, result.output

    def canonical(name):  # (mask, probabilities) in canonical order
        t = cases[name][0]
        mask = np.asarray(nib.load(str(out / f"{name}.nii.gz")).dataobj)
        with np.load(out / f"{name}_probabilities.npz") as f:
            probs = f["probabilities"]
        assert probs.shape[1:] == mask.shape
        return to_canonical(mask, t), to_canonical(probs, t)

    ref_mask, ref_probs = canonical("o00")
    # An untrained model: its probabilities vary over the scan, so a wrong order would show.
    assert ref_probs[1].max() - ref_probs[1].min() > 1e-2
    for name in cases:
        if not name.startswith("oblique"):
            mask, probs = canonical(name)
            np.testing.assert_array_equal(mask, ref_mask, err_msg=name)
            np.testing.assert_array_equal(probs, ref_probs, err_msg=name)
    for got, want in zip(canonical("oblique_stored"), canonical("oblique"), strict=True):
        np.testing.assert_array_equal(got, want)
    for name, (_, affine) in cases.items():
        src_path, out_path = str(src / f"{name}.nii.gz"), str(out / f"{name}.nii.gz")
        src_n, got_n = nib.load(src_path), nib.load(out_path)
        assert got_n.shape == src_n.shape
        np.testing.assert_allclose(got_n.affine, affine, atol=1e-5)
        a, b = sitk.ReadImage(src_path), sitk.ReadImage(out_path)
        assert a.GetSize() == b.GetSize()
        np.testing.assert_allclose(b.GetSpacing(), a.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(b.GetOrigin(), a.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(b.GetDirection(), a.GetDirection(), atol=1e-6)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(b).transpose(2, 1, 0),
                                      np.asarray(got_n.dataobj))


def test_without_canonical_orientation_the_orders_disagree(tmp_path):
    """The round trip test above can fail: keeping each file's order changes the masks."""
    run = make_tiny_run(tmp_path / "run", prepare={"orientation": "input"})
    image, _ = blob_image(SHAPE, seed=4)
    probs = []
    for t in (TRANSFORMS[0], TRANSFORMS[-1]):
        path = write_nifti(tmp_path / f"{t.permutation}{t.flips}.nii.gz", from_canonical(image, t),
                           np.diag([*SPACING, 1.0]) @ voxel_map(t, SHAPE))
        out = tmp_path / f"mask_{len(probs)}.nii.gz"
        result = runner.invoke(app, ["predict", str(path), "-o", str(out), "-m", str(run),
                                     "--device", "cpu", "--save-probabilities"])
        assert result.exit_code == 0, result.output
        with np.load(tmp_path / f"mask_{len(probs)}_probabilities.npz") as f:
            probs.append(to_canonical(f["probabilities"], t))
    assert np.abs(probs[0].astype(np.float32) - probs[1]).max() > 1e-3


def test_fingerprint_headers_read_as_simpleitk_reads_them(tmp_path):
    """The plan reads NIfTI headers itself (faster); every axis order, an oblique direction,
    a negative qfac and a qform-only file give what SimpleITK's reader gives."""
    from crlnseg.data.fingerprint import _nifti_grid
    from crlnseg.io.readers import read_header

    image, _ = blob_image(SHAPE)
    base = np.diag([*SPACING, 1.0])
    paths = [write_nifti(tmp_path / f"o{i}.nii.gz", from_canonical(image, t),
                         base @ voxel_map(t, SHAPE)) for i, t in enumerate(TRANSFORMS)]
    paths.append(write_nifti(tmp_path / "oblique.nii.gz", image, oblique_affine(SPACING)))
    qonly = nib.Nifti1Image(image, base @ voxel_map(TRANSFORMS[5], SHAPE))
    qonly.header.set_sform(None, code=0)
    qonly.header.set_qform(base @ voxel_map(TRANSFORMS[5], SHAPE), code=1)
    nib.save(qonly, str(tmp_path / "qform_only.nii.gz"))
    paths.append(tmp_path / "qform_only.nii.gz")
    for path in paths:
        fast = _nifti_grid(path)
        assert fast is not None, path.name
        header = read_header(path)
        assert fast[0] == header.spatial_shape
        np.testing.assert_allclose(fast[1], header.geometry.spacing, rtol=1e-6)
        assert canonical_transform(fast[2]) == canonical_transform(header.geometry.direction)
    # Near 45 degrees the choice is left to SimpleITK's reading.
    a = np.deg2rad(45.0)
    diagonal = np.eye(4)
    diagonal[:2, :2] = [[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]]
    assert _nifti_grid(write_nifti(tmp_path / "diag.nii.gz", image, diagonal)) is None
