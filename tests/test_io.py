"""Image I/O: geometry round trips (oblique, anisotropic) through SimpleITK and nibabel, errors."""

from __future__ import annotations

import errno
import gzip
import os
import shutil
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from crlnseg.errors import DataError, OutputExistsError, RunFailure
from crlnseg.io import read_case_images, read_h5_case, read_image, read_label, write_image, writers
from crlnseg.io.writers import check_outputs, write_atomic

SHAPE = (12, 10, 8)


def oblique_affine() -> np.ndarray:
    """RAS affine: rotation about two axes, anisotropic voxels, non-zero origin."""
    a, b = 0.3, 0.2
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag([0.7, 1.1, 2.5])
    affine[:3, 3] = [10.5, -20.25, 33.0]
    return affine


def write_nifti_reference(path: Path) -> np.ndarray:
    """int16 with an intensity slope (as the LA files), qform and sform set."""
    rng = np.random.default_rng(0)
    data = rng.integers(0, 1000, SHAPE).astype(np.int16)
    image = nib.Nifti1Image(data, oblique_affine())
    image.header.set_slope_inter(0.001, 0.0)
    image.header.set_qform(oblique_affine(), code=1)
    nib.save(image, path)
    return data * 0.001


def write_sitk_reference(path: Path) -> None:
    rng = np.random.default_rng(1)
    image = sitk.GetImageFromArray(rng.random(SHAPE[::-1]).astype(np.float32))
    image.SetSpacing((0.7, 1.1, 2.5))
    image.SetOrigin((-10.5, 20.25, 33.0))
    rotation = sitk.VersorTransform((0.3, 0.5, 0.8), 0.4).GetMatrix()
    image.SetDirection(rotation)
    sitk.WriteImage(image, str(path))


def test_nifti_mask_round_trip_sitk_and_nibabel(tmp_path: Path) -> None:
    ref_path, out = tmp_path / "ref.nii.gz", tmp_path / "mask.nii.gz"
    values = write_nifti_reference(ref_path)
    ref = read_image(ref_path)
    assert ref.array.shape == SHAPE  # (X, Y, Z), not SimpleITK's (Z, Y, X)
    np.testing.assert_allclose(ref.array, values, atol=1e-6)
    mask = (ref.array > 0.5).astype(np.uint8)
    write_image(mask, ref, out)
    # SimpleITK sees exactly the reference's geometry.
    a, b = sitk.ReadImage(str(ref_path)), sitk.ReadImage(str(out))
    assert a.GetSpacing() == b.GetSpacing()
    assert a.GetOrigin() == b.GetOrigin()
    assert a.GetDirection() == b.GetDirection()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(b).transpose(2, 1, 0), mask)
    # nibabel sees the same affine, qform and sform (codes included), and no intensity scaling.
    h0, h1 = nib.load(ref_path).header, nib.load(out).header
    for key in ("qform_code", "sform_code", "quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                "qoffset_y", "qoffset_z", "srow_x", "srow_y", "srow_z", "pixdim"):
        np.testing.assert_array_equal(h0[key], h1[key], err_msg=key)
    loaded = nib.load(out)
    np.testing.assert_allclose(loaded.affine, oblique_affine(), atol=1e-5)
    assert loaded.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(loaded.dataobj), mask)
    back = read_image(out)
    assert back.geometry == ref.geometry


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_sitk_formats_round_trip(tmp_path: Path, suffix: str) -> None:
    ref_path = tmp_path / f"ref{suffix}"
    write_sitk_reference(ref_path)
    ref = read_image(ref_path)
    assert ref.header is None and ref.array.dtype == np.float32
    mask = (ref.array > 0.5).astype(np.uint8)
    for out in (tmp_path / f"mask{suffix}", tmp_path / "mask.nii.gz"):
        write_image(mask, ref, out)
        back = sitk.ReadImage(str(out))
        ref_img = sitk.ReadImage(str(ref_path))
        np.testing.assert_allclose(back.GetSpacing(), ref_img.GetSpacing(), atol=1e-6)
        np.testing.assert_allclose(back.GetOrigin(), ref_img.GetOrigin(), atol=1e-5)
        np.testing.assert_allclose(back.GetDirection(), ref_img.GetDirection(), atol=1e-6)
        assert read_image(out).geometry.close_to(ref.geometry, 1e-5)
        np.testing.assert_array_equal(read_image(out).array, mask)
    # nibabel agrees with SimpleITK on the NIfTI written from a non-NIfTI reference (LPS -> RAS).
    affine = nib.load(tmp_path / "mask.nii.gz").affine
    direction = np.asarray(ref.geometry.direction).reshape(3, 3)
    lps_to_ras = np.diag([-1.0, -1.0, 1.0])
    expected = lps_to_ras @ direction @ np.diag(ref.geometry.spacing)
    np.testing.assert_allclose(affine[:3, :3], expected, atol=1e-5)
    np.testing.assert_allclose(affine[:3, 3], lps_to_ras @ np.asarray(ref.geometry.origin),
                               atol=1e-4)


def test_write_is_atomic_and_refuses_overwrite(tmp_path: Path) -> None:
    ref_path = tmp_path / "ref.nii.gz"
    write_nifti_reference(ref_path)
    ref = read_image(ref_path)
    out = tmp_path / "mask.nii.gz"
    write_image(np.zeros(SHAPE, bool), ref, out)
    with pytest.raises(OutputExistsError, match="mask.nii.gz"):
        write_image(np.ones(SHAPE, np.uint8), ref, out)
    assert read_image(out).array.max() == 0
    write_image(np.ones(SHAPE, np.uint8), ref, out, overwrite=True)
    assert read_image(out).array.min() == 1
    with pytest.raises(DataError, match="does not match"):
        write_image(np.ones((3, 3, 3), np.uint8), ref, tmp_path / "other.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mask.nii.gz", "ref.nii.gz"]


@pytest.mark.parametrize(("suffix", "data", "key"), [(".mhd", ".zraw", "ElementDataFile = "),
                                                      (".nhdr", ".raw.gz", "data file: ")])
def test_header_and_data_outputs_name_their_final_data_file(tmp_path: Path, suffix: str,
                                                            data: str, key: str) -> None:
    ref_path = tmp_path / "ref.nii.gz"
    write_nifti_reference(ref_path)
    ref = read_image(ref_path)
    out = tmp_path / "out"
    out.mkdir()
    mask = np.zeros(SHAPE, np.uint8)
    mask[2:5, 3:6, 1:4] = 1
    write_image(mask, ref, out / f"m{suffix}")
    write_image(mask, ref, out / f"m{suffix}", overwrite=True)  # no orphan data file either
    assert sorted(p.name for p in out.iterdir()) == sorted([f"m{suffix}", f"m{data}"])
    header = (out / f"m{suffix}").read_text(errors="replace")
    assert f"{key}m{data}" in header
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)  # the pair stands alone: no reference to a temporary name
    np.testing.assert_array_equal(read_image(copy / f"m{suffix}").array, mask)


def test_header_and_data_output_cleans_up_and_refuses_a_foreign_data_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref_path = tmp_path / "ref.nii.gz"
    write_nifti_reference(ref_path)
    ref = read_image(ref_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "m.zraw").write_bytes(b"precious")
    with pytest.raises(OutputExistsError, match="m.zraw"):
        check_outputs([out / "m.mhd"], overwrite=False)
    with pytest.raises(OutputExistsError, match="m.zraw"):
        write_image(np.zeros(SHAPE, np.uint8), ref, out / "m.mhd")
    assert [p.name for p in out.iterdir()] == ["m.zraw"]
    assert (out / "m.zraw").read_bytes() == b"precious"

    def fail(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.os, "replace", fail)
    with pytest.raises(RunFailure, match="n.nhdr: no space left on device"):
        write_image(np.zeros(SHAPE, np.uint8), ref, out / "n.nhdr")
    assert [p.name for p in out.iterdir()] == ["m.zraw"]  # no temporary folder left


@pytest.mark.parametrize(("code", "reason"), [(errno.EACCES, "Permission denied"),
                                              (errno.EPERM, "Operation not permitted"),
                                              (errno.EROFS, "Read-only file system")])
def test_unwritable_output_is_a_one_line_output_error(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      code: int, reason: str) -> None:
    def refuse(src, dst):
        raise OSError(code, os.strerror(code), str(src))

    monkeypatch.setattr(writers.os, "replace", refuse)
    target = tmp_path / "report.json"
    with pytest.raises(OutputExistsError) as info:
        write_atomic(target, lambda tmp: tmp.write_text("{}"))
    assert str(info.value) == f"{target}: cannot write ({reason})"  # the output, not the temp
    assert list(tmp_path.iterdir()) == []


def test_runtime_write_failures_are_run_failures_or_stay_os_errors(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writers.os, "replace", full)
    with pytest.raises(RunFailure) as info:  # a full disk: exit 1, the output named
        write_atomic(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
    assert str(info.value) == (f"cannot write {tmp_path / 'a.txt'}: no space left on device "
                               "(the partial file was removed)")
    assert list(tmp_path.iterdir()) == []

    def broken(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(writers.os, "replace", broken)
    with pytest.raises(OSError, match="Input/output") as err:
        write_atomic(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
    assert not isinstance(err.value, OutputExistsError)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_in_the_way_is_refused_even_with_overwrite(tmp_path: Path) -> None:
    (tmp_path / "m.nii.gz").mkdir()
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="is a folder"):
            write_atomic(tmp_path / "m.nii.gz", lambda tmp: tmp.write_text("x"), overwrite)
        with pytest.raises(OutputExistsError, match="is a folder"):
            check_outputs([tmp_path / "m.nii.gz"], overwrite)
    (tmp_path / "plain").write_text("a file")
    with pytest.raises(OutputExistsError, match="cannot write.*plain is not a folder"):
        check_outputs([tmp_path / "plain" / "m.nii.gz"], overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.nii.gz", "plain"]


def test_written_files_follow_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.txt", lambda tmp: tmp.write_text("x"))
        ref_path = tmp_path / "ref.nii.gz"
        write_nifti_reference(ref_path)
        write_image(np.zeros(SHAPE, np.uint8), read_image(ref_path), tmp_path / "m.mhd")
    finally:
        os.umask(old)
    for name in ("a.txt", "m.mhd", "m.zraw"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o640, name


def test_probability_map_is_channels_first(tmp_path: Path) -> None:
    ref_path = tmp_path / "ref.nii.gz"
    write_nifti_reference(ref_path)
    ref = read_image(ref_path)
    probs = np.random.default_rng(0).random((3, *SHAPE)).astype(np.float32)
    write_image(probs, ref, tmp_path / "p.nii.gz")
    back = read_image(tmp_path / "p.nii.gz")
    assert back.array.shape == (3, *SHAPE) and back.array.dtype == np.float32
    np.testing.assert_array_equal(back.array, probs)
    assert back.geometry.close_to(ref.geometry, 1e-6)


def test_channel_files_stack(tmp_path: Path) -> None:
    for c in range(2):
        nib.save(nib.Nifti1Image(np.full(SHAPE, c, np.float32), oblique_affine()),
                 tmp_path / f"a_000{c}.nii.gz")
    vol = read_case_images([tmp_path / "a_0000.nii.gz", tmp_path / "a_0001.nii.gz"])
    assert vol.array.shape == (2, *SHAPE)
    assert vol.array[1].min() == 1 and vol.array[0].max() == 0
    assert read_case_images([tmp_path / "a_0000.nii.gz"]).array.shape == (1, *SHAPE)
    shifted = oblique_affine()
    shifted[0, 3] += 1.0
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.float32), shifted), tmp_path / "b.nii.gz")
    with pytest.raises(DataError, match="b.nii.gz: channel geometry"):
        read_case_images([tmp_path / "a_0000.nii.gz", tmp_path / "b.nii.gz"])
    nib.save(nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), oblique_affine()),
             tmp_path / "c.nii.gz")
    with pytest.raises(DataError, match="c.nii.gz: channel shape"):
        read_case_images([tmp_path / "a_0000.nii.gz", tmp_path / "c.nii.gz"])


def test_4d_channel_stack_and_time_series(tmp_path: Path) -> None:
    nib.save(nib.Nifti1Image(np.zeros((*SHAPE, 3), np.float32), np.eye(4)), tmp_path / "s.nii.gz")
    assert read_image(tmp_path / "s.nii.gz").array.shape == (3, *SHAPE)
    nib.save(nib.Nifti1Image(np.zeros((6, 6, 6, 40), np.float32), np.eye(4)),
             tmp_path / "t.nii.gz")
    with pytest.raises(DataError, match="40 volumes is not a channel stack"):
        read_image(tmp_path / "t.nii.gz")


def test_read_errors_are_one_line(tmp_path: Path) -> None:
    good = tmp_path / "good.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((20, 20, 20)), np.eye(4)), good)
    raw = gzip.decompress(good.read_bytes())
    truncated = tmp_path / "trunc.nii.gz"
    truncated.write_bytes(gzip.compress(raw)[:-2000])
    flat = tmp_path / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8), np.float32), np.eye(4)), flat)
    nan = tmp_path / "nan.nii.gz"
    data = np.zeros(SHAPE, np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), nan)
    for path, message in [(truncated, "holds fewer"), (flat, "expected 3D"),
                          (nan, "NaN/Inf"), (tmp_path / "missing.nii.gz", "no such file")]:
        with pytest.raises(DataError, match=message) as err:
            read_image(path)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


def test_read_label_checks(tmp_path: Path) -> None:
    ref = read_image(_save(tmp_path / "img.nii.gz", np.zeros(SHAPE, np.float32)))
    ok = read_label(_save(tmp_path / "ok.nii.gz", np.ones(SHAPE, np.float32) * 2), ref)
    assert ok.array.dtype == np.uint8 and ok.array.max() == 2
    cases = [("frac", np.full(SHAPE, 0.5, np.float32), "non-integer"),
             ("neg", np.full(SHAPE, -1, np.int16), "negative"),
             ("big", np.full(SHAPE, 300, np.int16), "at most 255"),
             ("shape", np.zeros((4, 4, 4), np.uint8), "label shape")]
    for name, data, message in cases:
        with pytest.raises(DataError, match=message):
            read_label(_save(tmp_path / f"{name}.nii.gz", data), ref)


def test_h5_case(tmp_path: Path) -> None:
    path = tmp_path / "case1" / "mri_norm2.h5"
    path.parent.mkdir()
    image = np.random.default_rng(0).random(SHAPE).astype(np.float32)
    with h5py.File(path, "w") as f:
        f["image"] = image
        f["label"] = (image > 0.5).astype(np.uint8)
    vol, lab = read_h5_case(path, spacing=(0.625, 0.625, 0.625))
    np.testing.assert_array_equal(vol.array, image)  # already x-y-z: no transpose
    assert vol.geometry.spacing == (0.625, 0.625, 0.625)
    assert lab is not None and lab.array.sum() == (image > 0.5).sum()
    assert read_image(path).array.shape == SHAPE
    (tmp_path / "bad.h5").write_bytes(b"not hdf5")
    with pytest.raises(DataError, match="bad.h5: unreadable HDF5"):
        read_h5_case(tmp_path / "bad.h5")


def _save(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


def test_label_with_a_trailing_singleton_dimension_is_3d(tmp_path: Path) -> None:
    ref = read_image(_save(tmp_path / "img.nii.gz", np.zeros(SHAPE, np.float32)))
    data = np.ones(SHAPE, np.uint8)[..., None]  # (X, Y, Z, 1), as some tools write masks
    label = read_label(_save(tmp_path / "lab.nii.gz", data), ref)
    assert label.array.shape == SHAPE
    two = np.ones(SHAPE, np.uint8)[..., None].repeat(2, axis=3)
    with pytest.raises(DataError, match=r"got 2 volumes .* \(file shape \(\d+, \d+, \d+, 2\)\)"):
        read_label(_save(tmp_path / "two.nii.gz", two), ref)


def test_headers_checked_without_reading_voxels(tmp_path: Path) -> None:
    from crlnseg.io.readers import check_case_headers, check_label_header, read_header

    image = _save(tmp_path / "img.nii.gz", np.zeros(SHAPE, np.float32))
    head = read_header(image)
    assert head.shape == SHAPE and head.geometry == read_image(image).geometry
    stacked = check_case_headers([image, _save(tmp_path / "c1.nii.gz",
                                               np.zeros(SHAPE, np.float32))])
    assert stacked.shape == (2, *SHAPE)
    with pytest.raises(DataError, match="channel shape"):
        check_case_headers([image, _save(tmp_path / "c2.nii.gz", np.zeros((4, 4, 4), np.uint8))])
    check_label_header(_save(tmp_path / "l.nii.gz", np.zeros((*SHAPE, 1), np.uint8)), stacked)
    with pytest.raises(DataError, match="label shape"):
        check_label_header(_save(tmp_path / "s.nii.gz", np.zeros((4, 4, 4), np.uint8)), stacked)
    shifted = tmp_path / "g.nii.gz"
    affine = np.eye(4)
    affine[0, 3] = 0.5
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), affine), shifted)
    with pytest.raises(DataError, match="label geometry"):
        check_label_header(shifted, stacked)
    noise = np.random.default_rng(0).random(SHAPE).astype(np.float32)  # does not compress
    whole = gzip.compress(nib.Nifti1Image(noise, np.eye(4)).to_bytes())
    truncated = tmp_path / "t.nii.gz"
    truncated.write_bytes(whole[: len(whole) // 2])
    assert read_header(truncated).shape == SHAPE  # the body is read (and refused) later
    with pytest.raises(DataError, match="corrupt"):
        read_image(truncated)
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.nii.gz: unreadable"):
        read_header(tmp_path / "bad.nii.gz")


def test_an_output_folder_that_cannot_exist_is_an_output_error() -> None:
    from crlnseg.errors import OutputExistsError
    from crlnseg.io.writers import make_folder

    with pytest.raises(OutputExistsError, match="cannot write"):
        make_folder(Path("/proc/crlnseg-cannot-exist"))  # procfs refuses new folders
