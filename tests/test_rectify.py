"""`crlnseg rectify`: pseudo-label files, summary columns, Dice bookkeeping, previews."""

from __future__ import annotations

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from inference_helpers import StandIn, blob_image, make_tiny_run, write_nifti
from typer.testing import CliRunner

from crlnseg.cli.app import app
from crlnseg.inference.predictor import Predictor, RectifiedPrediction
from crlnseg.io import Geometry, Volume
from crlnseg.metrics import mean_foreground_dice as mean_dice
from crlnseg.rectify import COLUMNS, DICE_COLUMNS, KINDS, case_row
from crlnseg.settings import PredictSettings, PrepareSettings

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


def test_a_run_without_relation_map_says_so_and_reports_no_mu():
    image, label = blob_image((22, 18, 12), seed=4)
    predictor = Predictor(StandIn(has_relation=False), PredictSettings(device="cpu"), (8, 8, 8),
                          PrepareSettings(), channels=1, classes=["bg", "fg"],
                          meta={"method": "supervised"})
    pred = predictor.rectify_volume(Volume(image, Geometry()))
    assert pred.mu is None and "(supervised) has no relationship map" in predictor.relation_note()
    np.testing.assert_array_equal(pred.raw, pred.rectified)
    assert case_row("c", pred, 0.97, 2, label)["mu"] is None


def test_rectify_on_a_supervised_run_writes_a_summary_with_null_mu(tmp_path):
    # mu None in the summary's mean crashed rectify after every case file was written.
    run = make_tiny_run(tmp_path / "run", method="supervised")
    src = write_nifti(tmp_path / "in" / "a.nii.gz", blob_image((20, 18, 12))[0])
    result = runner.invoke(app, ["rectify", str(src.parent), "-o", str(tmp_path / "pl"),
                                 "-m", str(run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "(supervised) has no relationship map" in result.stderr
    summary = json.loads((tmp_path / "pl" / "summary.json").read_text())
    assert summary["cases"][0]["mu"] is None and summary["mean"]["mu"] is None


def test_rectify_volume_blends_both_heads_in_one_pass():
    image, label = blob_image((22, 18, 12), seed=4)
    predictor = Predictor(StandIn(mu=0.5), PredictSettings(device="cpu"), (8, 8, 8),
                          PrepareSettings(), channels=1, classes=["bg", "fg"])
    pred = predictor.rectify_volume(Volume(image, Geometry()))
    assert pred.mu == pytest.approx(0.5)
    raw_only = Predictor(StandIn(), PredictSettings(device="cpu", rectify=False), (8, 8, 8),
                         PrepareSettings(), 1, ["bg", "fg"]).predict_volume(Volume(image))
    rect_only = Predictor(StandIn(), PredictSettings(device="cpu"), (8, 8, 8),
                          PrepareSettings(), 1, ["bg", "fg"]).predict_volume(Volume(image))
    np.testing.assert_array_equal(pred.raw, raw_only.mask)
    np.testing.assert_array_equal(pred.rectified, rect_only.mask)
    assert pred.confidence.dtype == np.float32
    assert 0.5 <= pred.confidence.min() and pred.confidence.max() <= 1.0
    # The prior pushes background voxels towards the foreground: less confident there.
    background = (pred.raw == 0) & (label == 0)
    assert pred.confidence[background].mean() < pred.raw_confidence[background].mean()


def test_case_row_dice_over_all_and_reliable_voxels():
    label = np.zeros((4, 4, 4), np.uint8)
    label[:2] = 1                                   # 32 foreground voxels
    raw = label.copy()
    raw[2] = 1                                      # 16 false positives
    conf = np.ones(label.shape, np.float32)
    conf[2] = 0.6                                   # ...which are unreliable
    pred = RectifiedPrediction(raw=raw, rectified=label.copy(), raw_confidence=conf,
                               confidence=np.full(label.shape, 0.99, np.float32), mu=0.3,
                               seconds=1.0)
    row = case_row("c", pred, 0.97, 2, label)
    assert list(row) == COLUMNS + DICE_COLUMNS
    assert row["dice_raw"] == pytest.approx(2 * 32 / (48 + 32))
    assert row["dice_raw_reliable"] == pytest.approx(1.0)
    assert row["dice_rectified"] == row["dice_rectified_reliable"] == pytest.approx(1.0)
    assert row["reliable_raw"] == pytest.approx(48 / 64) and row["reliable_rectified"] == 1.0
    # Multi-class: the mean over foreground classes.
    three = label.copy()
    three[3] = 2
    assert mean_dice(three, label, 3) == pytest.approx((1.0 + 0.0) / 2)


def test_rectify_writes_every_file_and_the_summary(tmp_path, tiny_run):
    shapes = [(20, 18, 12), (17, 21, 16), (24, 16, 14)]
    for i, shape in enumerate(shapes):
        image, label = blob_image(shape, seed=i)
        write_nifti(tmp_path / "images" / f"u{i}.nii.gz", image)
        write_nifti(tmp_path / "gt" / f"u{i}.nii.gz", label)
    out = tmp_path / "pseudo"
    args = ["rectify", str(tmp_path / "images"), "-o", str(out), "-m", str(tiny_run),
            "--labels", str(tmp_path / "gt"), "--threshold", "0.6", "--preview",
            "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    for i, shape in enumerate(shapes):
        ref = sitk.ReadImage(str(tmp_path / "images" / f"u{i}.nii.gz"))
        for kind in KINDS:
            got = sitk.ReadImage(str(out / f"u{i}_{kind}.nii.gz"))
            assert got.GetSize() == shape
            np.testing.assert_allclose(got.GetDirection(), ref.GetDirection(), atol=1e-6)
            np.testing.assert_allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-6)
            np.testing.assert_allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-6)
        conf = np.asarray(nib.load(str(out / f"u{i}_confidence.nii.gz")).dataobj)
        reliable = np.asarray(nib.load(str(out / f"u{i}_reliable.nii.gz")).dataobj)
        assert conf.dtype == np.float32 and reliable.dtype == np.uint8
        np.testing.assert_array_equal(reliable, conf >= 0.6)
        assert (out / "preview" / f"u{i}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "summary.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == COLUMNS + DICE_COLUMNS
    assert [r["case"] for r in rows] == ["u0", "u1", "u2"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == 0.6 and len(summary["cases"]) == 3
    assert summary["cases"][0]["mu"] == pytest.approx(0.25)
    for row in summary["cases"]:
        for column in ["reliable_raw", "reliable_rectified"] + DICE_COLUMNS:
            assert 0.0 <= row[column] <= 1.0
    assert set(summary["mean"]) == set(COLUMNS[1:] + DICE_COLUMNS)

    # Nothing is replaced without --overwrite, and the refusal happens before any writing.
    (out / "summary.csv").unlink()
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "--overwrite" in again.stderr
    assert not (out / "summary.csv").exists()


def test_rectify_single_image_without_labels(tmp_path, tiny_run):
    src = write_nifti(tmp_path / "one.nii.gz", blob_image()[0])
    out = tmp_path / "o"
    result = runner.invoke(app, ["rectify", str(src), "-o", str(out), "-m", str(tiny_run),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"one_{k}.nii.gz" for k in KINDS] + ["summary.csv", "summary.json"])
    header = (out / "summary.csv").read_text().splitlines()[0]
    assert header.split(",") == COLUMNS
    base = ["rectify", str(src), "-o", str(tmp_path / "p"), "-m", str(tiny_run), "--labels"]
    missing = runner.invoke(app, [*base, str(tmp_path / "nowhere")])
    assert missing.exit_code == 2 and "--labels" in missing.stderr
    assert "nowhere: no such folder" in missing.stderr
    (tmp_path / "gt").mkdir()
    unlabelled = runner.invoke(app, [*base, str(tmp_path / "gt")])
    assert unlabelled.exit_code == 2 and "no label for case one" in unlabelled.stderr
    assert not (tmp_path / "p").exists()


def _rectify_fails(args: list[str], text: str) -> None:
    result = runner.invoke(app, ["rectify", *args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_rectify_labels_found_whatever_the_extension_case(tmp_path, tiny_run):
    image, label = blob_image(seed=1)
    write_nifti(tmp_path / "images" / "a.nii.gz", image)
    write_nifti(tmp_path / "gt" / "a.NII.GZ", label)  # e.g. copied from a FAT/Windows share
    out = tmp_path / "o"
    result = runner.invoke(app, ["rectify", str(tmp_path / "images"), "-o", str(out), "-m",
                                 str(tiny_run), "--labels", str(tmp_path / "gt"),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "dice_raw" in (out / "summary.csv").read_text()


def test_rectify_output_that_is_a_file_or_an_input_is_refused(tmp_path, tiny_run):
    image, label = blob_image(seed=1)
    src = write_nifti(tmp_path / "images" / "a.nii.gz", image)
    write_nifti(tmp_path / "gt" / "a.nii.gz", label)
    run = ["-m", str(tiny_run)]
    _rectify_fails([str(src), "-o", str(src), *run], "is a file, not a folder")
    # OUT/a_rectified.nii.gz would be... the label itself: never replaced, even with --overwrite.
    gt = tmp_path / "gt" / "a.nii.gz"
    link = tmp_path / "o" / "a_rectified.nii.gz"
    link.parent.mkdir()
    link.symlink_to(gt)
    before = gt.read_bytes()
    _rectify_fails([str(src), "-o", str(tmp_path / "o"), *run, "--labels", str(tmp_path / "gt"),
                    "--overwrite"], "output is the input")
    assert gt.read_bytes() == before and link.is_symlink()


def test_bad_label_is_found_before_any_output(tmp_path, tiny_run):
    for i, name in enumerate(["a", "b"]):
        image, label = blob_image(seed=i)
        write_nifti(tmp_path / "images" / f"{name}.nii.gz", image)
        write_nifti(tmp_path / "gt" / f"{name}.nii.gz", label if name == "a" else label[:-2])
    out = tmp_path / "o"
    _rectify_fails([str(tmp_path / "images"), "-o", str(out), "-m", str(tiny_run),
                    "--labels", str(tmp_path / "gt")], "b.nii.gz: label shape")
    assert not out.exists()


def test_corrupt_body_mid_run_says_what_was_written(tmp_path, tiny_run):
    for i, name in enumerate(["a", "b"]):
        write_nifti(tmp_path / "images" / f"{name}.nii.gz", blob_image(seed=i)[0])
    whole = (tmp_path / "images" / "b.nii.gz").read_bytes()
    (tmp_path / "images" / "b.nii.gz").write_bytes(whole[: len(whole) // 2])  # header intact
    out = tmp_path / "o"
    _rectify_fails([str(tmp_path / "images"), "-o", str(out), "-m", str(tiny_run)],
                   "1 case(s) before it were already written")
