"""`crlnseg evaluate` on folders of small NIfTI masks: schema, formats, checks, options."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from medpy.metric import binary as mb
from typer.testing import CliRunner

from crlnseg import evaluate as evaluate_module
from crlnseg.errors import DataError
from crlnseg.evaluate import (
    EvaluateSettings,
    _labels,
    bootstrap_ci,
    evaluate,
    query_threads,
    summarize,
)

SPACING = (0.8, 1.2, 2.5)
SHAPE = (14, 12, 10)
METRIC_STATS = {"mean", "std", "median", "n", "ci95"}


def _write(path: Path, array: np.ndarray, spacing=SPACING, origin=(1.0, -2.0, 3.0)) -> Path:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose()))  # (X,Y,Z) -> ITK
    image.SetSpacing(spacing)
    image.SetOrigin(origin)
    sitk.WriteImage(image, str(path))
    return path


def _masks(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    gt = np.zeros(SHAPE, np.uint8)
    lo = rng.integers(1, 5, size=3)
    gt[lo[0]:lo[0] + 7, lo[1]:lo[1] + 6, lo[2]:lo[2] + 5] = 1
    gt[lo[0]:lo[0] + 3, lo[1]:lo[1] + 3, lo[2]:lo[2] + 3] = 2
    pred = np.where(rng.random(SHAPE) < 0.08, 0, gt).astype(np.uint8)
    pred[tuple(rng.integers(0, s) for s in SHAPE)] = 1
    return pred, gt


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path, dict]:
    pred_dir, gt_dir = tmp_path / "pred", tmp_path / "gt"
    pred_dir.mkdir()
    gt_dir.mkdir()
    arrays = {}
    for i in range(3):
        pred, gt = _masks(i)
        if i == 2:
            pred[pred == 2] = 0  # class 2 missed entirely: distances undefined
        arrays[f"case{i}"] = (pred, gt)
        _write(pred_dir / f"case{i}.nii.gz", pred)
        _write(gt_dir / f"case{i}.nii.gz", gt)
    return pred_dir, gt_dir, arrays


def _cli(*args: str):
    from crlnseg.cli.app import app

    return CliRunner().invoke(app, ["evaluate", *map(str, args)])


def test_json_schema_and_values_equal_medpy(folders) -> None:
    pred_dir, gt_dir, arrays = folders
    result = _cli(pred_dir, gt_dir)  # stdout is not a terminal: JSON by default
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"units", "cases", "summary"} and report["units"] == "mm"
    assert len(report["cases"]) == 6  # 3 cases x classes {1, 2}
    for row in report["cases"]:
        assert set(row) == {"case", "class", "dice", "jaccard", "hd95", "asd"}
        pred, gt = (a == row["class"] for a in arrays[row["case"]])
        assert row["dice"] == pytest.approx(mb.dc(pred, gt), rel=1e-6)
        assert row["jaccard"] == pytest.approx(mb.jc(pred, gt), rel=1e-6)
        if pred.any():
            assert row["hd95"] == pytest.approx(mb.hd95(pred, gt, SPACING), rel=1e-6)
            assert row["asd"] == pytest.approx(mb.asd(pred, gt, SPACING), rel=1e-6)
        else:
            assert row["hd95"] is None and row["asd"] is None
    assert set(report["summary"]) == {"1", "2"}
    for per_class in report["summary"].values():
        assert set(per_class) == {"dice", "jaccard", "hd95", "asd"}
        for metric in ("dice", "jaccard"):
            assert set(per_class[metric]) == METRIC_STATS and per_class[metric]["ci95"] is None
        for metric in ("hd95", "asd"):
            assert set(per_class[metric]) == METRIC_STATS | {"n_undefined"}
    hd = report["summary"]["2"]["hd95"]
    defined = [r["hd95"] for r in report["cases"] if r["class"] == 2 and r["hd95"] is not None]
    assert (hd["n"], hd["n_undefined"]) == (2, 1)
    assert hd["mean"] == pytest.approx(np.mean(defined))  # undefined values are not zeros
    assert report["summary"]["2"]["dice"]["n"] == 3
    assert report["summary"]["2"]["dice"]["std"] == pytest.approx(
        np.std([r["dice"] for r in report["cases"] if r["class"] == 2]))


def test_csv_classes_voxel_units_and_output_file(folders, tmp_path: Path) -> None:
    pred_dir, gt_dir, arrays = folders
    out = tmp_path / "report.csv"
    result = _cli(pred_dir, gt_dir, "--classes", "2", "--voxel-units", "-o", out)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert out.read_text().splitlines()[0] == "case,class,dice,jaccard,hd95,asd"
    assert [(r["case"], r["class"]) for r in rows] == [("case0", "2"), ("case1", "2"),
                                                       ("case2", "2")]
    assert rows[2]["hd95"] == "" and rows[2]["asd"] == ""
    pred, gt = (a == 2 for a in arrays["case0"])
    assert float(rows[0]["hd95"]) == pytest.approx(mb.hd95(pred, gt), rel=1e-6)
    again = _cli(pred_dir, gt_dir, "-o", out)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert _cli(pred_dir, gt_dir, "-o", out, "--overwrite").exit_code == 0
    assert out.read_text().startswith("case,class")  # the suffix chose CSV


def test_table_format_and_two_files(folders) -> None:
    pred_dir, gt_dir, _ = folders
    result = _cli(pred_dir / "case0.nii.gz", gt_dir / "case0.nii.gz", "--format", "table")
    assert result.exit_code == 0, result.output
    assert "case0" in result.stdout and "Summary" in result.stdout
    report = json.loads(_cli(pred_dir / "case0.nii.gz", gt_dir / "case0.nii.gz").stdout)
    assert {r["case"] for r in report["cases"]} == {"case0"}


def _one_line_exit_2(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()
             and not line.startswith("evaluating")]
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    for needle in needles:
        assert needle in lines[0]
    assert result.stdout == ""


def test_refuses_shape_geometry_missing_non_integer_unreadable(folders) -> None:
    pred_dir, gt_dir, arrays = folders
    _write(pred_dir / "case1.nii.gz", np.zeros((14, 12, 9), np.uint8))
    _one_line_exit_2(_cli(pred_dir, gt_dir), "case1", "shape")
    _write(pred_dir / "case1.nii.gz", arrays["case1"][0], spacing=(0.8, 1.2, 2.6))
    _one_line_exit_2(_cli(pred_dir, gt_dir), "case1", "geometry")
    _write(pred_dir / "case1.nii.gz", arrays["case1"][0].astype(np.float32) * 0.5)
    _one_line_exit_2(_cli(pred_dir, gt_dir), "case1", "non-integer")
    (pred_dir / "case1.nii.gz").write_bytes(b"not a nifti file")
    _one_line_exit_2(_cli(pred_dir, gt_dir), "case1")
    (pred_dir / "case1.nii.gz").unlink()
    _write(pred_dir / "extra.nii.gz", arrays["case0"][0])
    _one_line_exit_2(_cli(pred_dir, gt_dir), "case1", "extra", "--allow-missing")


def test_float_masks_with_integer_values_are_accepted(folders) -> None:
    pred_dir, gt_dir, arrays = folders
    _write(pred_dir / "case1.nii.gz", arrays["case1"][0].astype(np.float32))
    assert _cli(pred_dir, gt_dir).exit_code == 0


def test_allow_missing_scores_failures(folders) -> None:
    pred_dir, gt_dir, _ = folders
    (pred_dir / "case1.nii.gz").unlink()
    report = json.loads(_cli(pred_dir, gt_dir, "--allow-missing").stdout)
    missing = [r for r in report["cases"] if r["case"] == "case1"]
    assert len(missing) == 2
    assert all(r["dice"] == 0 and r["jaccard"] == 0 and r["hd95"] is None for r in missing)
    assert report["summary"]["1"]["dice"]["n"] == 3
    assert report["summary"]["1"]["hd95"]["n_undefined"] == 1


def test_bootstrap_is_seeded_and_workers_agree(folders) -> None:
    pred_dir, gt_dir, _ = folders
    first = _cli(pred_dir, gt_dir, "--bootstrap", "200", "--seed", "3").stdout
    assert first == _cli(pred_dir, gt_dir, "--bootstrap", "200", "--seed", "3",
                         "--workers", "2").stdout
    summary = json.loads(first)["summary"]["1"]["dice"]
    low, high = summary["ci95"]
    assert low <= summary["mean"] <= high and low < high
    values = np.random.default_rng(0).random(20)
    assert bootstrap_ci(values, 200, 3) == bootstrap_ci(values, 200, 3)
    assert bootstrap_ci(values, 200, 3) != bootstrap_ci(values, 200, 4)


def test_threads_change_nothing_and_default_to_the_cores_per_process(folders, monkeypatch
                                                                      ) -> None:
    pred_dir, gt_dir, _ = folders
    assert _cli(pred_dir, gt_dir, "--threads", "1").stdout == _cli(pred_dir, gt_dir).stdout
    _one_line_exit_2(_cli(pred_dir, gt_dir, "--threads", "0"), "threads")
    monkeypatch.setattr(evaluate_module, "usable_cores", lambda: 8)
    assert query_threads(EvaluateSettings(), 10) == 8
    assert query_threads(EvaluateSettings(workers=3), 10) == 2
    assert query_threads(EvaluateSettings(workers=4), 2) == 4  # 2 cases: 2 processes
    assert query_threads(EvaluateSettings(workers=16), 20) == 1
    assert query_threads(EvaluateSettings(workers=2, threads=5), 20) == 5


def test_labels_found_with_and_without_the_per_label_comparison() -> None:
    mask = np.zeros((4, 5, 6), np.int32)
    assert _labels(mask) == [] and _labels(mask[:0]) == []
    mask[0, 0, 0], mask[1, 2, 3] = 3, 1
    assert _labels(mask) == [1, 3] and _labels(mask.astype(np.uint8), few=2) == [1, 3]
    mask[2, 2, 2] = 40_000
    assert _labels(mask) == [1, 3, 40_000]


def test_bootstrap_ci_matches_a_direct_resampling() -> None:
    values = np.array([0.2, 0.5, 0.9, 0.4])
    rng = np.random.default_rng(5)
    means = values[rng.integers(0, 4, size=(300, 4))].mean(axis=1)
    assert bootstrap_ci(values, 300, 5) == pytest.approx(list(np.percentile(means, [2.5, 97.5])))


def test_summary_of_all_undefined_and_both_empty_rows() -> None:
    rows = [{"case": "a", "class": 1, "dice": 0.0, "jaccard": 0.0, "hd95": None, "asd": None}]
    hd = summarize(rows, [1], bootstrap=10)["1"]["hd95"]
    assert hd == {"mean": None, "std": None, "median": None, "n": 0, "ci95": None,
                  "n_undefined": 1}


def test_default_classes_are_the_union_over_gt(tmp_path: Path) -> None:
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    pred_dir.mkdir()
    gt_dir.mkdir()
    a = np.zeros(SHAPE, np.uint8)
    a[2:6, 2:6, 2:6] = 1
    b = np.zeros(SHAPE, np.uint8)
    b[3:8, 3:8, 3:8] = 3
    _write(gt_dir / "a.nii.gz", a)
    _write(pred_dir / "a.nii.gz", a)
    _write(gt_dir / "b.nii.gz", b)
    noisy = b.copy()
    noisy[0, 0, 0] = 7  # a label no GT has: not reported
    _write(pred_dir / "b.nii.gz", noisy)
    report = evaluate(pred_dir, gt_dir, EvaluateSettings())
    assert sorted({r["class"] for r in report.rows}) == [1, 3]
    a3 = next(r for r in report.rows if (r["case"], r["class"]) == ("a", 3))
    assert a3 == {"case": "a", "class": 3, "dice": 1.0, "jaccard": 1.0, "hd95": 0.0, "asd": 0.0}


def test_library_errors_name_the_case(folders) -> None:
    pred_dir, gt_dir, _ = folders
    with pytest.raises(DataError, match="two mask files or two folders"):
        evaluate(pred_dir / "case0.nii.gz", gt_dir, EvaluateSettings())
    with pytest.raises(DataError, match="does not exist"):
        evaluate(pred_dir / "nope", gt_dir, EvaluateSettings())


def test_all_empty_ground_truth_needs_classes(tmp_path: Path) -> None:
    empty = np.zeros(SHAPE, np.uint8)
    _write(tmp_path / "p.nii.gz", empty)
    _write(tmp_path / "g.nii.gz", empty)
    with pytest.raises(DataError, match="--classes"):
        evaluate(tmp_path / "p.nii.gz", tmp_path / "g.nii.gz", EvaluateSettings())
    report = evaluate(tmp_path / "p.nii.gz", tmp_path / "g.nii.gz", EvaluateSettings(classes=[1]))
    assert report.rows == [{"case": "g", "class": 1, "dice": 1.0, "jaccard": 1.0, "hd95": 0.0,
                            "asd": 0.0}]


def test_output_that_is_an_input_mask_is_refused_even_with_overwrite(folders) -> None:
    pred_dir, gt_dir, _ = folders
    gt = gt_dir / "case0.nii.gz"
    before = gt.read_bytes()
    _one_line_exit_2(_cli(pred_dir / "case0.nii.gz", gt, "-o", gt, "--overwrite"),
                     "input files are never overwritten")
    _one_line_exit_2(_cli(pred_dir, gt_dir, "-o", gt_dir / "case1.nii.gz", "--overwrite"),
                     "input files are never overwritten")
    assert gt.read_bytes() == before


def test_output_location_is_checked_before_any_metric(folders, tmp_path: Path) -> None:
    pred_dir, gt_dir, _ = folders
    _write(pred_dir / "case1.nii.gz", np.zeros((14, 12, 9), np.uint8))  # would fail in metrics
    _one_line_exit_2(_cli(pred_dir, gt_dir, "-o", tmp_path / "nope" / "r.json"), "does not exist")
    _one_line_exit_2(_cli(pred_dir, gt_dir, "-o", tmp_path, "--overwrite"), "is a folder")


def test_numbered_masks_are_cases_not_channels(tmp_path: Path) -> None:
    pred_dir, gt_dir = tmp_path / "p", tmp_path / "g"
    pred_dir.mkdir()
    gt_dir.mkdir()
    for i in (1, 2, 3):
        pred, gt = _masks(i)
        _write(pred_dir / f"patient_{i:04d}.nii.gz", pred)
        _write(gt_dir / f"patient_{i:04d}.nii.gz", gt)
    report = evaluate(pred_dir, gt_dir, EvaluateSettings())
    assert sorted({r["case"] for r in report.rows}) == ["patient_0001", "patient_0002",
                                                       "patient_0003"]
    # Two single files: the case is named after the GT file, suffix and all.
    one = evaluate(pred_dir / "patient_0002.nii.gz", gt_dir / "patient_0002.nii.gz",
                   EvaluateSettings())
    assert {r["case"] for r in one.rows} == {"patient_0002"}
    (tmp_path / "gone.nii.gz").symlink_to(tmp_path / "nowhere.nii.gz")
    with pytest.raises(DataError, match="broken symbolic link"):
        evaluate(tmp_path / "gone.nii.gz", gt_dir / "patient_0002.nii.gz", EvaluateSettings())


def test_negative_labels_and_classes_are_refused(folders) -> None:
    pred_dir, gt_dir, arrays = folders
    _one_line_exit_2(_cli(pred_dir, gt_dir, "--classes=-1"), "--classes")
    negative = arrays["case1"][1].astype(np.int16)
    negative[0, 0, 0] = -1
    _write(gt_dir / "case1.nii.gz", negative)
    _one_line_exit_2(_cli(pred_dir, gt_dir), "case1", "negative labels")


def test_mask_with_a_trailing_singleton_dimension_is_3d(folders, tmp_path: Path) -> None:
    import nibabel as nib

    pred_dir, gt_dir, _ = folders
    gt = nib.load(str(gt_dir / "case0.nii.gz"))
    xyz1 = tmp_path / "gt_xyz1.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(gt.dataobj)[..., None], gt.affine), str(xyz1))
    flat = evaluate(pred_dir / "case0.nii.gz", gt_dir / "case0.nii.gz", EvaluateSettings())
    assert evaluate(pred_dir / "case0.nii.gz", xyz1, EvaluateSettings()).summary == flat.summary


def test_geometry_tolerance_is_the_one_of_prepare(folders) -> None:
    from crlnseg.io.readers import GEOMETRY_TOL

    pred_dir, gt_dir, arrays = folders
    # An origin rounded differently by another tool: prepare accepts it, so must evaluate.
    _write(gt_dir / "case1.nii.gz", arrays["case1"][1], origin=(1.0 + GEOMETRY_TOL / 2, -2.0, 3.0))
    assert _cli(pred_dir, gt_dir).exit_code == 0
    _write(gt_dir / "case1.nii.gz", arrays["case1"][1], origin=(1.0 + GEOMETRY_TOL * 2, -2.0, 3.0))
    _one_line_exit_2(_cli(pred_dir, gt_dir), "case1", "geometry")


def test_table_shows_case_ids_verbatim(tmp_path: Path) -> None:
    pred, gt = _masks(0)
    _write(tmp_path / "p.nii.gz", pred)
    _write(tmp_path / "s[red]x.nii.gz", gt)
    result = _cli(tmp_path / "p.nii.gz", tmp_path / "s[red]x.nii.gz", "--format", "table")
    assert result.exit_code == 0, result.output
    assert "s[red]x" in result.stdout


def test_output_folder_in_the_way_is_refused_with_or_without_overwrite(folders,
                                                                        tmp_path: Path) -> None:
    pred_dir, gt_dir, _ = folders
    (tmp_path / "r.json").mkdir()
    for extra in ([], ["--overwrite"]):
        result = _cli(pred_dir, gt_dir, "-o", tmp_path / "r.json", *extra)
        _one_line_exit_2(result, str(tmp_path / "r.json"), "is a folder")


def test_unwritable_output_exit_2(folders, tmp_path: Path, monkeypatch) -> None:
    import errno
    import os

    from crlnseg.io import writers

    pred_dir, gt_dir, _ = folders
    (tmp_path / "plain").write_text("a file")
    _one_line_exit_2(_cli(pred_dir, gt_dir, "-o", tmp_path / "plain" / "r.json"),
                     str(tmp_path / "plain" / "r.json"), "cannot write")

    def read_only(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src))

    monkeypatch.setattr(writers.os, "replace", read_only)
    target = tmp_path / "r.json"
    _one_line_exit_2(_cli(pred_dir, gt_dir, "-o", target),
                     f"{target}: cannot write (Read-only file system)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "plain", "pred"]  # no temporary


def test_report_file_follows_the_umask(folders, tmp_path: Path) -> None:
    import os

    pred_dir, gt_dir, _ = folders
    old = os.umask(0o022)
    try:
        assert _cli(pred_dir, gt_dir, "-o", tmp_path / "r.json").exit_code == 0
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
