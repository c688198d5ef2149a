"""`crlnseg prepare`: the cache, bad inputs (exit 2, one line, nothing left), re-runs, workers."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from crlnseg.cli.app import app
from crlnseg.data.manifest import FORMAT_VERSION, is_prepared, load_manifest
from crlnseg.data.preprocessing import preprocess, restore
from crlnseg.errors import DataError
from crlnseg.io import Geometry, Volume
from crlnseg.settings import PrepareSettings

runner = CliRunner()
SHAPE = (16, 14, 12)
AFFINE = np.diag([1.5, 1.5, 3.0, 1.0])


def scan(seed: int, shape: tuple[int, ...] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """A bright blob on noise, zero border (for --crop-nonzero) and its label."""
    rng = np.random.default_rng(seed)
    image = np.zeros(shape, np.float32)
    image[2:-2, 2:-2, 1:-1] = rng.normal(100, 10, (shape[0] - 4, shape[1] - 4, shape[2] - 2))
    grid = np.indices(shape).astype(float)
    centre = np.array(shape)[:, None, None, None] / 2
    blob = ((grid - centre) ** 2).sum(0) < 16
    image[blob] += 200
    return image, blob.astype(np.uint8)


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


def dataset(root: Path, n: int = 3) -> Path:
    for i in range(n):
        image, label = scan(i)
        save(root / "images" / f"case{i}.nii.gz", image)
        save(root / "labels" / f"case{i}.nii.gz", label)
    return root


def prepare(*args: str | Path):
    return runner.invoke(app, ["prepare", *map(str, args)])


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_prepare_writes_memory_mappable_cache(tmp_path: Path) -> None:
    src, out = dataset(tmp_path / "src"), tmp_path / "out"
    result = prepare(src, "-o", out, "--target-spacing", "3", "3", "3", "--crop-nonzero")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.strip() == f"prepared 3 cases -> {out} (3 new, 0 already prepared)"
    assert is_prepared(out) and leftovers(tmp_path) == []
    manifest = load_manifest(out)
    assert manifest.ids == ["case0", "case1", "case2"]
    assert manifest.channels == 1 and manifest.classes == [0, 1]
    case = manifest.case("case0")
    assert case.original_shape == SHAPE and case.crop_box == ((2, 14), (2, 12), (1, 11))
    assert case.shape == (6, 5, 10) and case.target_spacing == (3.0, 3.0, 3.0)
    image, label = manifest.image("case0"), manifest.label("case0")
    assert isinstance(image, np.memmap) and image.dtype == np.float32
    assert image.shape == (1, *case.shape) and label.shape == case.shape
    assert label.dtype == np.uint8 and set(np.unique(label)) == {0, 1}
    assert abs(float(image.mean())) < 0.05 and abs(float(image.std()) - 1) < 0.05
    data = json.loads((out / "dataset.json").read_text())
    assert data["format_version"] == FORMAT_VERSION
    assert data["settings"]["target_spacing"] == [3.0, 3.0, 3.0]
    fg = data["fingerprint"]["intensity_foreground"][0]
    assert 250 < fg["mean"] < 350 and data["fingerprint"]["labelled"] == 3


def bad_dataset(root: Path, kind: str) -> Path:
    """A dataset with one problem; returns the file that the error must name."""
    if kind == "empty":
        root.mkdir(parents=True)
        return root
    dataset(root, n=2)
    img, lab = root / "images" / "case1.nii.gz", root / "labels" / "case1.nii.gz"
    if kind == "truncated":
        img.write_bytes(gzip.compress(gzip.decompress(img.read_bytes()))[:-300])
        return img
    if kind == "2d":
        save(img, np.ones((16, 14), np.float32))
        return img
    if kind == "shape":
        save(lab, np.zeros((16, 14, 10), np.uint8))
        return lab
    if kind == "geometry":
        save(lab, scan(1)[1], np.diag([1.5, 1.5, 2.0, 1.0]))
        return lab
    if kind == "non_integer":
        save(lab, scan(1)[1] * 0.5)
        return lab
    if kind == "negative":
        save(lab, scan(1)[1].astype(np.int16) - 1)
        return lab
    if kind == "nan":
        image = scan(1)[0]
        image[3, 3, 3] = np.nan
        save(img, image)
        return img
    if kind == "label_without_image":
        return save(root / "labels" / "orphan.nii.gz", scan(1)[1])
    if kind == "duplicate":
        return save(root / "images" / "case1.nii", scan(1)[0])
    raise AssertionError(kind)


BAD = {"truncated": "corrupt", "2d": "expected 3D", "shape": "label shape",
       "geometry": "label geometry", "non_integer": "non-integer", "negative": "negative",
       "nan": "NaN", "empty": "no cases found", "label_without_image": "label without image",
       "duplicate": "duplicate case ID"}


@pytest.mark.parametrize("kind", sorted(BAD))
def test_bad_input_exit_2_one_line_nothing_written(tmp_path: Path, kind: str) -> None:
    src, out = tmp_path / "src", tmp_path / "work" / "out"
    named = bad_dataset(src, kind)
    result = prepare(src, "-o", out)
    assert result.exit_code == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and BAD[kind] in lines[0] and str(named) in lines[0], lines
    assert result.stdout == ""
    assert not out.exists() and not (tmp_path / "work").exists()  # parents it made are gone


def test_keep_going_prepares_the_rest(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    bad_dataset(src, "non_integer")
    result = prepare(src, "-o", out, "--keep-going")
    assert result.exit_code == 0, result.stderr
    assert "1 failed" in result.stdout
    assert "case1" in result.stderr and "non-integer" in result.stderr
    manifest = load_manifest(out)
    assert manifest.ids == ["case0"] and manifest.failed[0]["id"] == "case1"
    assert leftovers(tmp_path) == []
    # Every case bad: nothing to write, exit 2.
    src2 = tmp_path / "src2"
    save(src2 / "a.nii.gz", np.ones((8, 8), np.float32))
    result = prepare(src2, "-o", tmp_path / "out2", "--keep-going")
    assert result.exit_code == 2 and not (tmp_path / "out2").exists()


def test_nnunet_two_channels(tmp_path: Path) -> None:
    src, out = tmp_path / "Dataset001_X", tmp_path / "out"
    for i in range(2):
        image, label = scan(i)
        save(src / "imagesTr" / f"x_{i:03d}_0000.nii.gz", image)
        save(src / "imagesTr" / f"x_{i:03d}_0001.nii.gz", -image)
        save(src / "labelsTr" / f"x_{i:03d}.nii.gz", label * 2)
    save(src / "imagesTs" / "x_009_0000.nii.gz", scan(9)[0])
    save(src / "imagesTs" / "x_009_0001.nii.gz", scan(9)[0])
    (src / "dataset.json").write_text('{"channel_names": {"0": "T1", "1": "T2"}}')
    result = prepare(src, "-o", out, "--normalize", "minmax")
    assert result.exit_code == 0, result.stderr
    manifest = load_manifest(out)
    assert manifest.channels == 2 and manifest.classes == [0, 2]
    image = manifest.image("x_000", mmap=False)
    assert image.shape == (2, *SHAPE) and image.min() == 0 and image.max() == 1
    np.testing.assert_allclose(image[0], 1 - image[1], atol=1e-6)
    assert manifest.label("x_009") is None and manifest.case("x_009").label is None


def test_rerun_skips_and_settings_change_needs_overwrite(tmp_path: Path) -> None:
    src, out = dataset(tmp_path / "src"), tmp_path / "out"
    assert prepare(src, "-o", out).exit_code == 0
    before = (out / "cases" / "case0_image.npy").stat().st_mtime_ns
    result = prepare(src, "-o", out)
    assert result.exit_code == 0 and "(0 new, 3 already prepared)" in result.stdout
    assert (out / "cases" / "case0_image.npy").stat().st_mtime_ns == before
    changed = src / "images" / "case2.nii.gz"
    save(changed, scan(7)[0])
    os.utime(changed, ns=(1, 1))
    result = prepare(src, "-o", out)
    assert "(1 new, 2 already prepared)" in result.stdout, result.stderr
    assert load_manifest(out).case("case2").sources[0].mtime_ns == 1
    result = prepare(src, "-o", out, "--normalize", "none")
    assert result.exit_code == 2 and "different settings" in result.stderr
    assert load_manifest(out).settings.normalize == "zscore"
    result = prepare(src, "-o", out, "--normalize", "none", "--overwrite")
    assert result.exit_code == 0 and "(3 new, 0 already prepared)" in result.stdout
    assert load_manifest(out).image("case0").max() > 250  # raw intensities
    assert leftovers(tmp_path) == []


def test_refuses_foreign_output_folder(tmp_path: Path) -> None:
    src, out = dataset(tmp_path / "src"), tmp_path / "mine"
    out.mkdir()
    (out / "thesis.txt").write_text("precious")
    result = prepare(src, "-o", out, "--overwrite")
    assert result.exit_code == 2 and "not a crlnseg cache" in result.stderr
    assert (out / "thesis.txt").read_text() == "precious"
    assert prepare(src, "-o", src / "images" / "cache").exit_code == 2


def test_workers_give_identical_results(tmp_path: Path) -> None:
    src = dataset(tmp_path / "src", n=4)
    args = ["--target-spacing", "2", "2", "2", "--crop-nonzero"]
    assert prepare(src, "-o", tmp_path / "one", *args).exit_code == 0
    result = prepare(src, "-o", tmp_path / "two", *args, "--workers", "2")
    assert result.exit_code == 0, result.stderr
    one, two = load_manifest(tmp_path / "one"), load_manifest(tmp_path / "two")
    assert one.model_dump() == two.model_dump()
    for cid in one.ids:
        np.testing.assert_array_equal(one.image(cid), two.image(cid))
        np.testing.assert_array_equal(one.label(cid), two.label(cid))


def test_hdf5_cases(tmp_path: Path) -> None:
    src, out = tmp_path / "h5", tmp_path / "out"
    for i in range(2):
        image, label = scan(i)
        (src / f"P{i}").mkdir(parents=True)
        with h5py.File(src / f"P{i}" / "mri_norm2.h5", "w") as f:
            f["image"], f["label"] = image, label
    result = prepare(src, "-o", out, "--h5-spacing", "0.625", "0.625", "0.625")
    assert result.exit_code == 0, result.stderr
    manifest = load_manifest(out)
    assert manifest.ids == ["P0", "P1"] and manifest.case("P0").spacing == (0.625,) * 3
    np.testing.assert_array_equal(manifest.label("P1"), scan(1)[1])


def test_version_mismatch_is_a_clear_error(tmp_path: Path) -> None:
    src, out = dataset(tmp_path / "src", n=1), tmp_path / "out"
    assert prepare(src, "-o", out).exit_code == 0
    data = json.loads((out / "dataset.json").read_text())
    data["format_version"] = 99
    (out / "dataset.json").write_text(json.dumps(data))
    with pytest.raises(DataError, match="format version 99"):
        load_manifest(out)


@pytest.mark.parametrize("settings", [
    PrepareSettings(),
    PrepareSettings(crop_nonzero=True),
    PrepareSettings(crop_nonzero=True, target_spacing=(3.0, 2.0, 1.5), interpolation="linear"),
])
def test_restore_maps_back_to_the_input_grid(settings: PrepareSettings) -> None:
    image, label = scan(3)
    geometry = Geometry(spacing=(1.5, 1.5, 3.0))
    case = preprocess(Volume(image, geometry), Volume(label, geometry), settings)
    back = restore(case.label, case.info)
    assert back.shape == SHAPE and back.dtype == np.uint8
    dice = 2 * (back & label).sum() / (back.sum() + label.sum())
    assert dice > (0.999 if settings.target_spacing is None else 0.85)
    probs = np.stack([1.0 - case.label, case.label]).astype(np.float32)
    restored = restore(probs, case.info)
    assert restored.shape == (2, *SHAPE)
    np.testing.assert_allclose(restored.sum(0), 1.0, atol=1e-5)
    assert (restored[0][:2] == 1).all()  # outside the crop box: background


def test_ct_normalisation_clips_then_zscores() -> None:
    image = np.linspace(-2000, 2000, 16 * 14 * 12, dtype=np.float32).reshape(SHAPE)
    settings = PrepareSettings(normalize="ct", ct_window=(-100.0, 300.0), orientation="input")
    out = preprocess(Volume(image), None, settings).image[0]
    clipped = np.clip(image, -100, 300)
    np.testing.assert_allclose(out, (clipped - clipped.mean()) / clipped.std(), atol=1e-4)


def test_real_data(shared_data: Path, tmp_path: Path) -> None:
    from crlnseg.prepare import prepare_dataset

    ids = (shared_data / "la" / "cases.txt").read_text().split()[:3]
    la = prepare_dataset(shared_data / "la", tmp_path / "la", PrepareSettings(), case_ids=ids)
    assert sorted(la.ids) == sorted(ids) and la.classes == [0, 1]
    assert la.image(ids[0]).shape[1:3] == tuple(la.case(ids[0]).original_shape[:2])
    h5 = prepare_dataset(shared_data / "la_h5", tmp_path / "h5",
                         PrepareSettings(h5_spacing=(0.625, 0.625, 0.625)))
    assert len(h5.ids) == 2 and all(h5.label(i) is not None for i in h5.ids)


@pytest.mark.parametrize("option", [["--ct-window", "5", "1"], ["--target-spacing", "0", "1", "1"],
                                    ["--normalize", "max"]])
def test_invalid_options_exit_2(tmp_path: Path, option: list[str]) -> None:
    src, out = dataset(tmp_path / "src", n=1), tmp_path / "out"
    result = prepare(src, "-o", out, *option)
    assert result.exit_code == 2 and option[0] in result.stderr and not out.exists()


def test_sigterm_removes_the_staging_folder_and_exits_143(tmp_path: Path) -> None:
    from process_helpers import terminate_when

    source = tmp_path / "src"
    image, label = scan(0, (24, 24, 16))
    for i in range(150):  # enough cases that preparing is still going when the signal comes
        save(source / "images" / f"case{i:03d}.nii.gz", image)
        save(source / "labels" / f"case{i:03d}.nii.gz", label)
    out = tmp_path / "prep"
    code, err = terminate_when(["prepare", str(source), "-o", str(out)],
                               lambda: any(p.name.startswith(".prep.tmp-")
                                           for p in tmp_path.iterdir()))
    assert code == 128 + 15, err
    assert err.strip().splitlines()[-1] == "error: terminated" and "Traceback" not in err
    assert leftovers(tmp_path) == [] and not out.exists()


def test_unwritable_output_exit_2_one_line_naming_it(tmp_path: Path, monkeypatch) -> None:
    import errno

    source = dataset(tmp_path / "src", n=1)
    (tmp_path / "plain").write_text("a file, not a folder")
    out = tmp_path / "plain" / "prep"  # root may write anywhere, but not under a file
    result = prepare(source, "-o", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {out}: cannot write (Not a directory)"

    def denied(path, mode=0o777):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(os, "mkdir", denied)
    out = tmp_path / "prep"
    result = prepare(source, "-o", out)
    assert result.exit_code == 2, result.output
    # The output is named, not the hidden staging folder that could not be made.
    assert result.stderr.strip() == f"error: {out}: cannot write (Permission denied)"
    assert leftovers(tmp_path) == [] and not out.exists()


def test_cache_folder_follows_the_umask(tmp_path: Path) -> None:
    source = dataset(tmp_path / "src", n=1)
    old = os.umask(0o027)
    try:
        assert prepare(source, "-o", tmp_path / "prep").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "prep").stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0o700
    assert (tmp_path / "prep" / "dataset.json").stat().st_mode & 0o777 == 0o640
