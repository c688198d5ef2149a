"""DICOM series folders as cases: read with the series' geometry, discovered as cases, prepared,
segmented (NIfTI masks on the series' grid), evaluated; bad series refused in one line."""

from __future__ import annotations

import contextlib
import json
import locale
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from inference_helpers import blob_image, make_tiny_run
from typer.testing import CliRunner

from crlnseg.cli.app import app
from crlnseg.data.discovery import discover_cases, discover_single
from crlnseg.errors import DataError
from crlnseg.io import Geometry, read_case_images, read_image
from crlnseg.io.readers import check_case_headers, read_header

ROOT = Path(__file__).resolve().parents[1]
SHAPE = (20, 18, 12)  # X, Y, Z (slices)
SPACING = (0.7, 0.9, 2.5)
ORIGIN = (12.5, -30.25, 7.0)
DIRECTION = sitk.VersorTransform((0.3, 0.5, 0.8), 0.4).GetMatrix()  # oblique, row-major
STUDY_UID = "1.2.826.0.1.3680043.2.1125.7"
SERIES_UID = "1.2.826.0.1.3680043.2.1125.7.1"


def known_array(shape=SHAPE) -> np.ndarray:
    image = blob_image(shape)[0]
    return np.round(image * 10.0 - 200.0).astype(np.int16)


def write_series(folder: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN,
                 direction=DIRECTION, uid: str = SERIES_UID, skip=(), offsets=None,
                 lateral: float = 0.0, prefix: str = "IM") -> sitk.Image:
    """One file per slice of ``array`` (X, Y, Z), with the tags a scanner writes (as SimpleITK's
    DicomSeriesFromArray example); file names (no extension) in an order unrelated to the slice
    order. ``offsets``: slice positions along the normal instead of k * spacing; ``lateral``:
    each slice shifted by k * lateral mm along the row direction (a gantry tilt)."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    image.SetDirection(direction)
    d = np.asarray(direction).reshape(3, 3)
    fmt = lambda xs: "\\".join(f"{x:.10g}" for x in xs)  # noqa: E731
    tags = {"0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0008|0021": "20240101",
            "0008|0031": "120000", "0008|103e": "synthetic", "0010|0020": "anon",
            "0020|000d": STUDY_UID, "0020|000e": uid, "0020|0011": "1",
            "0020|0037": fmt([*d[:, 0], *d[:, 1]]),
            "0028|0030": fmt([spacing[1], spacing[0]]),  # row spacing (Y), column spacing (X)
            "0018|0050": f"{spacing[2]:.10g}"}
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")  # file names without an extension
    writer.KeepOriginalImageUIDOn()
    depth = array.shape[2]
    names = np.random.default_rng(len(uid)).permutation(depth)
    with _locale_kept():
        for k in range(depth):
            if k in skip:
                continue
            plane = image[:, :, k]
            for key, value in tags.items():
                plane.SetMetaData(key, value)
            along = k * spacing[2] if offsets is None else offsets[k]
            position = np.asarray(origin) + along * d[:, 2] + k * lateral * d[:, 0]
            plane.SetMetaData("0020|0032", fmt(position))
            plane.SetMetaData("0020|0013", str(k + 1))
            plane.SetMetaData("0008|0018", f"{uid}.{k + 1}")
            writer.SetFileName(str(folder / f"{prefix}{names[k]:04d}"))
            writer.Execute(plane)
    return image


@contextlib.contextmanager
def _locale_kept():
    """SimpleITK's DICOM writer leaves the process locale at "C" (ASCII text files after it)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _element(group: int, element: int, vr: str, value: bytes | str) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    if vr in ("OB", "SQ", "UN"):
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(data)) + data
    return struct.pack("<HH2sH", group, element, vr.encode(), len(data)) + data


def write_report(path: Path, modality: str = "SR", uid: str = "1.2.826.0.1.3680043.2.1125.9"
                 ) -> Path:
    """A DICOM object without pixel data (a structured report): preamble, "DICM", file meta
    and a few elements, explicit VR little endian."""
    sop_class = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta = (_element(2, 1, "OB", b"\0\1") + _element(2, 2, "UI", sop_class)
            + _element(2, 3, "UI", uid + ".1") + _element(2, 0x10, "UI", "1.2.840.10008.1.2.1"))
    meta = _element(2, 0, "UL", struct.pack("<I", len(meta))) + meta
    body = (_element(8, 0x16, "UI", sop_class) + _element(8, 0x18, "UI", uid + ".1")
            + _element(8, 0x60, "CS", modality) + _element(0x20, 0xD, "UI", STUDY_UID)
            + _element(0x20, 0xE, "UI", uid))
    path.write_bytes(bytes(128) + b"DICM" + meta + body)
    return path


def sitk_geometry(image: sitk.Image) -> Geometry:
    return Geometry(spacing=image.GetSpacing(), origin=image.GetOrigin(),
                    direction=image.GetDirection())


# -- reading --------------------------------------------------------------------------------------


def test_a_series_reads_as_the_nifti_of_the_same_image(tmp_path):
    array = known_array()
    source = write_series(tmp_path / "series", array)
    sitk.WriteImage(source, str(tmp_path / "same.nii.gz"))
    nifti = read_image(tmp_path / "same.nii.gz")
    series = read_image(tmp_path / "series")
    np.testing.assert_array_equal(series.array, array)  # (X, Y, Z), slices in position order
    np.testing.assert_array_equal(series.array, nifti.array)
    assert series.geometry.close_to(nifti.geometry)
    assert series.geometry.close_to(sitk_geometry(source))
    assert series.path == tmp_path / "series"
    header = read_header(tmp_path / "series")
    assert header.shape == SHAPE and header.geometry == series.geometry
    assert check_case_headers([tmp_path / "series"]).shape == (1, *SHAPE)
    assert read_case_images([tmp_path / "series"]).array.shape == (1, *SHAPE)
    # SimpleITK's own series reader (GDCM's file order) sees the same image.
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "series")))
    theirs = reader.Execute()
    assert series.geometry.close_to(sitk_geometry(theirs))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(theirs).transpose(2, 1, 0), array)


def test_slices_stacked_against_the_normal_read_the_same(tmp_path):
    """Positions that decrease with the instance number: the order comes from positions."""
    array = known_array((10, 8, 6))
    flipped = write_series(tmp_path / "s", array[:, :, ::-1], origin=(0, 0, 12.5),
                           direction=(1, 0, 0, 0, 1, 0, 0, 0, 1), spacing=(1, 1, 2.5),
                           offsets=[-2.5 * k for k in range(6)])
    volume = read_image(tmp_path / "s")
    np.testing.assert_array_equal(volume.array, array)
    assert volume.geometry.close_to(Geometry((1, 1, 2.5), (0, 0, 0)))
    assert flipped.GetSize() == (10, 8, 6)


# -- discovery ------------------------------------------------------------------------------------


def test_series_folders_are_cases_named_after_their_folders(tmp_path):
    data = tmp_path / "data"
    write_series(data / "case_b", known_array((8, 8, 4)))
    write_series(data / "1.2.840.7", known_array((8, 8, 4)), uid=SERIES_UID + ".2")
    (data / "notes").mkdir()  # a folder without DICOM files is no case
    cases = discover_cases(data)
    assert [c.id for c in cases] == ["1.2.840.7", "case_b"]  # the whole name, dots and all
    assert [c.images for c in cases] == [[data / "1.2.840.7"], [data / "case_b"]]
    assert all(c.label is None for c in cases)
    one = discover_cases(data / "case_b")
    assert [(c.id, c.images) for c in one] == [("case_b", [data / "case_b"])]
    assert discover_single(data / "1.2.840.7").id == "1.2.840.7"


def _labelled_dataset(root: Path) -> dict[str, sitk.Image]:
    """images/<ID>/ series folders and labels/<ID>.nii.gz on their grids."""
    sources = {}
    for i, case in enumerate(["p1", "p2"]):
        image, label = blob_image(SHAPE, seed=i)
        array = np.round(image * 10.0).astype(np.int16)
        source = write_series(root / "images" / case, array, uid=f"{SERIES_UID}.{i + 1}")
        mask = sitk.GetImageFromArray(label.transpose(2, 1, 0))
        mask.CopyInformation(source)
        (root / "labels").mkdir(exist_ok=True)
        sitk.WriteImage(mask, str(root / "labels" / f"{case}.nii.gz"))
        sources[case] = source
    return sources


def test_images_and_labels_layout_with_series_folders(tmp_path):
    _labelled_dataset(tmp_path)
    cases = discover_cases(tmp_path, require_labels=True)
    assert [(c.id, c.images, c.label) for c in cases] == [
        (cid, [tmp_path / "images" / cid], tmp_path / "labels" / f"{cid}.nii.gz")
        for cid in ("p1", "p2")]


# -- the CLI --------------------------------------------------------------------------------------


def crlnseg(*args: object) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "crlnseg", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)


def test_prepare_a_dataset_of_series(tmp_path):
    sources = _labelled_dataset(tmp_path / "data")
    done = crlnseg("prepare", tmp_path / "data", "-o", tmp_path / "cache")
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr and "Warning" not in done.stderr
    manifest = json.loads((tmp_path / "cache" / "dataset.json").read_text())
    records = {r["id"]: r for r in manifest["cases"]}
    assert sorted(records) == ["p1", "p2"]
    for case, source in sources.items():
        record = records[case]
        assert record["label"] and tuple(record["original_shape"]) == SHAPE
        found = Geometry(tuple(record["spacing"]), tuple(record["origin"]),
                         tuple(record["direction"]))
        assert found.close_to(sitk_geometry(source))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


def test_predict_on_a_series_writes_a_nifti_mask_on_its_grid(tmp_path, tiny_run):
    source = write_series(tmp_path / "scan_07", known_array())
    done = crlnseg("predict", tmp_path / "scan_07", "-o", tmp_path / "out", "-m", tiny_run,
                   "--device", "cpu")
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr and "Warning" not in done.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["scan_07.nii.gz"]
    mask = sitk.ReadImage(str(tmp_path / "out" / "scan_07.nii.gz"))
    assert mask.GetSize() == SHAPE
    assert sitk_geometry(mask).close_to(sitk_geometry(source))
    assert done.stdout.startswith("scan_07\t")
    # One series is one case, as one image file is: -o may name the mask file itself.
    single = crlnseg("predict", tmp_path / "scan_07", "-o", tmp_path / "mask.nii.gz", "-m",
                     tiny_run, "--device", "cpu")
    assert single.returncode == 0, single.stderr
    got = sitk.ReadImage(str(tmp_path / "mask.nii.gz"))
    assert sitk_geometry(got).close_to(sitk_geometry(source))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(got), sitk.GetArrayFromImage(mask))


def test_rectify_and_evaluate_take_series_folders(tmp_path, tiny_run):
    image, label = blob_image(SHAPE)
    source = write_series(tmp_path / "scans" / "c1", np.round(image * 10).astype(np.int16))
    runner = CliRunner()
    result = runner.invoke(app, ["rectify", str(tmp_path / "scans"), "-o", str(tmp_path / "r"),
                                 "-m", str(tiny_run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    rectified = sitk.ReadImage(str(tmp_path / "r" / "c1_rectified.nii.gz"))
    assert sitk_geometry(rectified).close_to(sitk_geometry(source))
    # Ground truth as a DICOM series (integer labels) against a NIfTI prediction on its grid.
    gt = write_series(tmp_path / "gt" / "c1", label.astype(np.int16), uid=SERIES_UID + ".5")
    (tmp_path / "pred").mkdir()
    pred = sitk.GetImageFromArray(label.transpose(2, 1, 0))
    pred.CopyInformation(gt)
    sitk.WriteImage(pred, str(tmp_path / "pred" / "c1.nii.gz"))
    result = runner.invoke(app, ["evaluate", str(tmp_path / "pred"), str(tmp_path / "gt"),
                                 "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["cases"]
    assert [(r["case"], r["class"], r["dice"]) for r in rows] == [("c1", 1, 1.0)]


# -- refused series -------------------------------------------------------------------------------


def _two_series(folder: Path) -> str:
    write_series(folder, known_array((8, 8, 4)), uid=SERIES_UID + ".1", prefix="A")
    write_series(folder, known_array((8, 8, 4)), uid=SERIES_UID + ".2", prefix="B")
    return (f"2 DICOM series in {folder} (UIDs {SERIES_UID}.1, {SERIES_UID}.2); put each "
            "series in its own folder")


def _missing_slice(folder: Path) -> str:
    write_series(folder, known_array((8, 8, 6)), spacing=(1, 1, 2), skip=(3,))
    return f"{folder}: unevenly spaced slices (spacing 2-4 mm) or missing slices"


def _uneven(folder: Path) -> str:
    write_series(folder, known_array((8, 8, 5)), offsets=[0, 1, 2, 5, 6])
    return f"{folder}: unevenly spaced slices (spacing 1-3 mm) or missing slices"


def _slightly_uneven(folder: Path) -> str:
    write_series(folder, known_array((8, 8, 5)), spacing=(1, 1, 2),
                 offsets=[0, 2, 4, 6.1, 8.1])  # 5 % off: no rounding of positions
    return f"{folder}: unevenly spaced slices (spacing 2-2.1 mm) or missing slices"


def _report_only(folder: Path) -> str:
    folder.mkdir(parents=True)
    write_report(folder / "report.dcm")
    return f"{folder}: DICOM files without image data (modality SR)"


def _report_beside(folder: Path) -> str:
    write_series(folder, known_array((8, 8, 4)))
    write_report(folder / "structures", modality="RTSTRUCT", uid=SERIES_UID)
    return (f"{folder}: 1 DICOM file(s) without image data (modality RTSTRUCT) beside the image "
            "series, e.g. structures; keep only the image series in this folder")


def _with_nifti(folder: Path) -> str:
    source = write_series(folder, known_array((8, 8, 4)))
    sitk.WriteImage(source, str(folder / "scan.nii.gz"))
    return (f"{folder}: both DICOM files and image files (scan.nii.gz) in one folder, which is "
            "ambiguous; keep the DICOM series in a folder of its own")


def _duplicates(folder: Path) -> str:
    write_series(folder, known_array((8, 8, 4)), offsets=[0, 2.5, 2.5, 5])
    return f"{folder}: 2 slices share a position along the slice normal"


def _tilted(folder: Path) -> str:
    write_series(folder, known_array((8, 8, 4)), lateral=0.4)
    return f"{folder}: slices are not stacked along their normal (up to 1.2 mm off it"


REFUSED = {"two series": _two_series, "missing slice": _missing_slice, "uneven": _uneven,
           "slightly uneven": _slightly_uneven, "report only": _report_only,
           "report beside": _report_beside, "dicom and nifti": _with_nifti,
           "duplicate positions": _duplicates, "gantry tilt": _tilted}


@pytest.mark.parametrize("case", list(REFUSED))
def test_bad_series_are_refused_in_one_line(tmp_path, capfd, case):
    folder = tmp_path / "series"
    expected = REFUSED[case](folder)
    capfd.readouterr()
    for read in (read_header, read_image):
        with pytest.raises(DataError) as err:
            read(folder)
        assert str(err.value).startswith(expected), str(err.value)
        assert "\n" not in str(err.value)
    assert capfd.readouterr().err == ""  # GDCM / ITK warnings are not shown


def test_a_series_beside_nifti_files_is_refused_by_discovery(tmp_path):
    expected = _with_nifti(tmp_path / "mixed")
    with pytest.raises(DataError, match="^" + expected.replace("(", r"\(").replace(")", r"\)")):
        discover_cases(tmp_path / "mixed")


@pytest.mark.parametrize("case", ["two series", "missing slice", "report only"])
def test_prepare_refuses_a_bad_series_in_one_line(tmp_path, case):
    expected = REFUSED[case](tmp_path / "data" / "bad")
    write_series(tmp_path / "data" / "good", known_array((8, 8, 4)), uid=SERIES_UID + ".9")
    done = crlnseg("prepare", tmp_path / "data", "-o", tmp_path / "cache")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "cache").exists()


def test_predict_refuses_a_bad_series_in_one_line(tmp_path, tiny_run):
    expected = _uneven(tmp_path / "scan")
    done = crlnseg("predict", tmp_path / "scan", "-o", tmp_path / "out", "-m", tiny_run,
                   "--device", "cpu")
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == [f"error: {expected}"]
    assert not (tmp_path / "out").exists()
