"""Headers no grid can have (spacing not positive and finite, direction not orthonormal) are
refused in one line naming the file, in the header read and in the full read, for NIfTI and
SimpleITK formats; reader libraries print nothing on the terminal."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from inference_helpers import blob_image, make_tiny_run
from pydantic import ValidationError

from crlnseg.errors import DataError
from crlnseg.io import read_h5_case, read_image, write_image
from crlnseg.io.readers import check_case_headers, read_header
from crlnseg.settings import PrepareSettings

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (12, 10, 8)
SPACING = (0.8, 0.9, 1.5)
NAN, INF = float("nan"), float("inf")


def nifti(path: Path, **fields) -> Path:
    """A small NIfTI (qform and sform: diag SPACING) whose header ``fields`` are then set as
    given, behind nibabel's back (it refuses to write most of them). ``pixdim<i>`` sets one
    pixdim entry; ``srow_x`` etc. and the codes are header fields."""
    affine = np.diag([*SPACING, 1.0])
    image = nib.Nifti1Image(blob_image(SHAPE)[0], affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    plain = path.with_name(path.name.removesuffix(".gz"))
    nib.save(image, plain)
    data = bytearray(plain.read_bytes())
    header = nib.Nifti1Header(bytes(data[:348]), check=False)
    for key, value in fields.items():
        if key.startswith("pixdim"):
            pixdim = header["pixdim"].copy()
            pixdim[int(key[6:])] = value
            header["pixdim"] = pixdim
        else:
            header[key] = value
    data[:348] = header.binaryblock
    if path.name.endswith(".gz"):
        plain.unlink()
        path.write_bytes(gzip.compress(bytes(data)))
    else:
        plain.write_bytes(bytes(data))
    return path


def metaimage(path: Path, spacing: str = "0.8 0.9 1.5",
              matrix: str = "1 0 0 0 1 0 0 0 1") -> Path:
    """A MetaImage written as text: SimpleITK refuses to write a zero or negative spacing."""
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"CompressedData = False\nTransformMatrix = {matrix}\nOffset = 0 0 0\n"
              f"ElementSpacing = {spacing}\nDimSize = {' '.join(map(str, SHAPE))}\n"
              "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n")
    body = np.ascontiguousarray(blob_image(SHAPE)[0].transpose(2, 1, 0)).tobytes()
    path.write_bytes(header.encode() + body)
    return path


def sitk_image(path: Path, spacing=SPACING, direction=(1, 0, 0, 0, 1, 0, 0, 0, 1)) -> Path:
    image = sitk.GetImageFromArray(blob_image(SHAPE)[0].transpose(2, 1, 0))
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


SPACING_PROBLEM = "mm is not positive and finite; fix the header"
NIFTI_CASES = {  # name: (header fields, the message after "<path>: ")
    "negative pixdim": ({"pixdim1": -0.8}, f"spacing (-0.8, 0.9, 1.5) {SPACING_PROBLEM}"),
    "zero pixdim": ({"pixdim3": 0.0}, f"spacing (0.8, 0.9, 0) {SPACING_PROBLEM}"),
    "NaN pixdim": ({"pixdim2": NAN}, f"spacing (0.8, nan, 1.5) {SPACING_PROBLEM}"),
    "infinite pixdim": ({"pixdim2": INF}, f"spacing (0.8, inf, 1.5) {SPACING_PROBLEM}"),
    "all pixdim zero, no codes": ({"pixdim1": 0.0, "pixdim2": 0.0, "pixdim3": 0.0,
                                   "qform_code": 0, "sform_code": 0},
                                  f"spacing (0, 0, 0) {SPACING_PROBLEM}"),
    "zero column in the sform": ({"qform_code": 0, "srow_x": [0, 0, 0, 0]},
                                 "a singular affine: a zero or dependent column"),
    "sheared sform": ({"qform_code": 0, "srow_x": [0.8, 0.45, 0, 0]},
                      "a sheared affine: columns not orthogonal"),
    "NaN in the sform": ({"srow_y": [0, NAN, 0, 0]}, "has NaN/Inf values"),
    "quaternion that is no rotation": ({"sform_code": 0, "quatern_b": 2.0},
                                       "qform quaternion (2, 0, 0)"),
}
MHA_CASES = {  # name: (writer, the message after "<path>: ")
    "negative spacing": (lambda p: metaimage(p, spacing="0.8 -0.9 1.5"),
                         f"spacing (0.8, -0.9, 1.5) {SPACING_PROBLEM}"),
    "zero spacing": (lambda p: metaimage(p, spacing="0 0.9 1.5"),
                     f"spacing (0, 0.9, 1.5) {SPACING_PROBLEM}"),
    "NaN spacing": (lambda p: sitk_image(p, spacing=(0.8, NAN, 1.5)), SPACING_PROBLEM),
    "sheared direction": (lambda p: sitk_image(p, direction=(1, 0.5, 0, 0, 1, 0, 0, 0, 1)),
                          "a sheared affine: columns not orthogonal"),
    "zero column": (lambda p: metaimage(p, matrix="0 0 0 0 1 0 0 0 1"),
                    "a singular affine: a zero or dependent column"),
    "scaled direction": (lambda p: metaimage(p, matrix="2 0 0 0 1 0 0 0 1"),
                         "columns not of unit length"),
}


def _refused_quietly(path: Path, text: str, capfd) -> None:
    """Header read, case check and full read each refuse ``path`` with ``text``; nothing is
    printed on file descriptor 2 and no Python warning is issued."""
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for read in (read_header, read_image, lambda p: check_case_headers([p])):
            with pytest.raises(DataError) as err:
                read(path)
            message = str(err.value)
            assert message.startswith(f"{path}: ") and text in message, message
            assert "\n" not in message
    assert [str(w.message) for w in caught] == []
    assert capfd.readouterr().err == ""


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("case", list(NIFTI_CASES))
def test_nifti_headers_that_no_grid_can_have_are_refused(tmp_path, capfd, case, suffix):
    fields, text = NIFTI_CASES[case]
    _refused_quietly(nifti(tmp_path / f"bad{suffix}", **fields), text, capfd)


@pytest.mark.parametrize("case", list(MHA_CASES))
def test_metaimage_headers_that_no_grid_can_have_are_refused(tmp_path, capfd, case):
    write, text = MHA_CASES[case]
    _refused_quietly(write(tmp_path / "bad.mha"), text, capfd)


def test_the_spacing_message_is_exactly_the_documented_one(tmp_path):
    path = nifti(tmp_path / "a.nii.gz", pixdim1=-0.8)
    with pytest.raises(DataError) as err:
        read_header(path)
    assert str(err.value) == (f"{path}: spacing (-0.8, 0.9, 1.5) mm is not positive and finite; "
                              "fix the header")


def test_harmless_oddities_are_read_without_a_word(tmp_path, capfd):
    """qfac 0 (old writers), sform scales that differ from pixdim (ITK: "unexpected scales in
    sform"), a sheared sform beside a valid qform (SimpleITK uses the qform): read, silently."""
    paths = [nifti(tmp_path / "qfac.nii.gz", pixdim0=0.0),
             nifti(tmp_path / "scales.nii.gz", qform_code=0, srow_x=[1.6, 0, 0, 0]),
             nifti(tmp_path / "shear.nii.gz", srow_x=[0.8, 0.45, 0, 0])]
    capfd.readouterr()
    for path in paths:
        volume = read_image(path)
        assert volume.array.shape == SHAPE
        np.testing.assert_allclose(volume.geometry.spacing, SPACING, rtol=1e-6)
        assert read_header(path).geometry == volume.geometry
    assert capfd.readouterr().err == ""


def test_a_qfac_of_minus_two_keeps_the_mask_on_the_image_grid(tmp_path):
    """SimpleITK reads qfac -2 as -1, nibabel's loader would set it to 1: the mask, written from
    the image's header, must land where SimpleITK sees the image."""
    path = nifti(tmp_path / "img.nii.gz", sform_code=0, pixdim0=-2.0)
    image = read_image(path)
    assert image.geometry.direction[8] == pytest.approx(-1.0)  # z flipped by qfac -1
    write_image(np.ones(SHAPE, np.uint8), image, tmp_path / "mask.nii.gz")
    assert read_image(tmp_path / "mask.nii.gz").geometry.close_to(image.geometry)


def test_hdf5_spacing_is_checked_too(tmp_path):
    path = tmp_path / "case.h5"
    with h5py.File(path, "w") as f:
        f["image"] = np.zeros(SHAPE, np.float32)
    for bad in [(0.0, 1.0, 1.0), (1.0, NAN, 1.0), (-1.0, 1.0, 1.0), (1.0, 1.0, INF)]:
        with pytest.raises(DataError, match="is not positive and finite; fix h5_spacing"):
            read_h5_case(path, bad)
        with pytest.raises(DataError, match=f"^{path}: spacing"):
            read_header(path, bad)
        with pytest.raises(ValidationError, match="positive and finite"):
            PrepareSettings(h5_spacing=bad)
        with pytest.raises(ValidationError, match="positive and finite"):
            PrepareSettings(target_spacing=bad)
    assert read_h5_case(path, (0.5, 0.5, 2.0))[0].geometry.spacing == (0.5, 0.5, 2.0)


# -- the CLI, in a real process: what reaches the terminal ---------------------------------------


def crlnseg(*args: object) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "crlnseg", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def _one_line(done: subprocess.CompletedProcess, path: Path, text: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: {path}: ") and text in lines[0], lines


@pytest.mark.parametrize("make", ["negative pixdim", "zero column in the sform",
                                  "mha sheared direction"])
def test_prepare_refuses_the_header_in_one_line(tmp_path, make):
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    if make.startswith("mha "):
        write, text = MHA_CASES[make[4:]]
        bad = write(data / "images" / "b.mha")
    else:
        fields, text = NIFTI_CASES[make]
        bad = nifti(data / "images" / "b.nii.gz", **fields)
    nifti(data / "images" / "a.nii.gz")  # a sound case beside it
    done = crlnseg("prepare", data, "-o", tmp_path / "cache")
    _one_line(done, bad, text)
    assert not (tmp_path / "cache").exists()


def test_prepare_refuses_a_bad_h5_spacing_option(tmp_path):
    done = crlnseg("prepare", tmp_path, "-o", tmp_path / "cache", "--h5-spacing", "nan", "1", "1")
    assert done.returncode == 2
    assert len(done.stderr.splitlines()) == 1 and "positive and finite" in done.stderr


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


@pytest.mark.parametrize("make", ["NaN pixdim", "sheared sform", "mha negative spacing"])
def test_predict_refuses_the_header_in_one_line(tmp_path, tiny_run, make):
    if make.startswith("mha "):
        write, text = MHA_CASES[make[4:]]
        bad = write(tmp_path / "scan.mha")
    else:
        fields, text = NIFTI_CASES[make]
        bad = nifti(tmp_path / "scan.nii.gz", **fields)
    out = tmp_path / "out"
    done = crlnseg("predict", bad, "-o", out, "-m", tiny_run, "--device", "cpu")
    _one_line(done, bad, text)
    assert not out.exists()
