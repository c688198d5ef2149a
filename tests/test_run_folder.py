"""The run folder and rectify's outputs: refused commands change nothing, metrics.jsonl survives a
kill, rectify keeps its outputs out of its inputs and checks label values up front."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from inference_helpers import blob_image, make_tiny_run, write_nifti
from test_train import TINY, _write_split, data  # noqa: F401 - data: the fixture
from typer.testing import CliRunner

from crlnseg.checkpoint import load_checkpoint
from crlnseg.cli.app import app
from crlnseg.errors import DataError
from crlnseg.train.logging import read_metrics
from crlnseg.train.plot import plot_training

ROOT = Path(__file__).resolve().parents[1]


def _invoke(command: str, args: list[str]):
    result = CliRunner().invoke(app, [command, *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def _errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error:")]


def _refused(result, words: str) -> None:
    assert result.exit_code == 2, result.output
    errors = _errors(result.stderr)
    assert len(errors) == 1 and words in errors[0], result.stderr
    assert "Traceback" not in result.output


def _snapshot(folder: Path) -> dict[str, str]:
    """Every name under ``folder`` (hidden ones too) with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() else "folder" for p in sorted(folder.rglob("*"))}


def _training_lines(run: Path) -> list[int]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["iteration"] for x in lines if "val_dice" not in x]


# -- a refused --resume ------------------------------------------------------------------------

def test_a_refused_resume_leaves_the_run_folder_byte_identical(data, tmp_path):  # noqa: F811
    lab, unl = tmp_path / "lab", tmp_path / "unl"
    shutil.copytree(data["lab"], lab)
    shutil.copytree(data["unl"], unl)
    out = tmp_path / "run"
    args = ["--labelled", str(lab), "--unlabelled", str(unl), "-o", str(out), *TINY]
    assert _invoke("train", [*args, "--iterations", "2"]).exit_code == 0
    resume = [*args, "--resume", "--iterations", "3"]

    def refused(extra: list[str], words: str, labelled: Path = lab,
                unlabelled: Path = unl) -> None:
        before = _snapshot(out)
        result = _invoke("train", [*resume, *extra, "--labelled", str(labelled),
                                   "--unlabelled", str(unlabelled)])
        _refused(result, words)
        assert _snapshot(out) == before

    # (a) another raw unlabelled folder: it used to replace RUN/prepared/unlabelled first
    other = _write_split(tmp_path / "unl2", 3, False, 7)
    refused([], "--unlabelled is not the data the run was trained on (2 case(s) before, 3 now)",
            unlabelled=other)
    # (c) another number of processes
    refused(["--device", "cpu", "--nproc", "2"], "trained with 1 process(es), now 2")
    # (d) a setting a resume may not change, while a source file's stamp changed (its case
    # would be prepared again)
    image = lab / "images" / "case0.nii.gz"
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    refused(["--base-filters", "8"], "--resume: model.base_filters was 4, now 8")
    # ...the same file again, unchanged settings: resumed (the case is prepared again)
    result = _invoke("train", resume)
    assert result.exit_code == 0, result.output
    assert load_checkpoint(out / "checkpoints" / "last.pt")["meta"]["iteration"] == 3
    # (b) the same case IDs with other contents
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    noise = np.random.default_rng(9).normal(3.0, 1.0, (24, 20, 18)).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, affine), lab / "images" / "case1.nii.gz")
    refused(["--iterations", "4"], "--labelled is not the data the run was trained on (same case "
            "IDs, other contents)")


# -- metrics.jsonl -----------------------------------------------------------------------------

@pytest.mark.slow
def test_metrics_after_a_kill_and_resume_hold_each_iteration_once(data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    tiny = [x.replace("checkpoint_every=2", "checkpoint_every=5") for x in TINY]
    args = ["--labelled", str(data["plab"]), "--unlabelled", str(data["punl"]), "-o", str(out),
            *tiny]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-m", "crlnseg", "train", *args, "--iterations",
                             "200"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    metrics, last = out / "metrics.jsonl", out / "checkpoints" / "last.pt"
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            logged = [json.loads(x)["iteration"] for x in metrics.read_text().splitlines()
                      if x.endswith("}")] if metrics.is_file() else []
            if last.is_file() and logged and max(logged) >= 8:
                break
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up, no final checkpoint
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    done = int(load_checkpoint(last)["meta"]["iteration"])
    assert done % 5 == 0 and max(_training_lines(out)) > done  # lines after the checkpoint
    result = _invoke("train", [*args, "--resume", "--iterations", str(done + 3)])
    assert result.exit_code == 0, result.output
    assert _training_lines(out) == list(range(1, done + 4))
    assert load_checkpoint(last)["meta"]["iteration"] == done + 3


def test_a_half_written_last_line_is_dropped_with_a_warning(data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ["--labelled", str(data["plab"]), "--unlabelled", str(data["punl"]), "-o", str(out),
            *TINY]
    assert _invoke("train", [*args, "--iterations", "2"]).exit_code == 0
    metrics = out / "metrics.jsonl"
    with open(metrics, "a") as handle:
        handle.write('{"iteration": 9, "lo')  # power lost while writing
    rows = read_metrics(metrics)
    assert [r["iteration"] for r in rows] == [1, 2]
    assert plot_training(rows, tmp_path / "plot.png")
    (out / "training.png").unlink()
    result = _invoke("train", [*args, "--resume", "--iterations", "3"])
    assert result.exit_code == 0, result.output
    warnings = [x for x in result.stderr.splitlines() if "incomplete" in x]
    assert len(warnings) == 1 and str(metrics) in warnings[0] and "line 3" in warnings[0]
    assert _training_lines(out) == [1, 2, 3]  # every line whole again
    assert (out / "training.png").is_file()


def test_a_damaged_line_before_the_last_refuses_the_resume(data, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    args = ["--labelled", str(data["plab"]), "--unlabelled", str(data["punl"]), "-o", str(out),
            *TINY]
    assert _invoke("train", [*args, "--iterations", "2"]).exit_code == 0
    metrics = out / "metrics.jsonl"
    first, second = metrics.read_text().splitlines()
    metrics.write_text(f"{first}\nnot json\n{second}\n")
    with pytest.raises(DataError, match="line 2 is not a metrics line"):
        read_metrics(metrics)
    before = _snapshot(out)
    result = _invoke("train", [*args, "--resume", "--iterations", "3"])
    _refused(result, f"{metrics}: line 2 is not a metrics line")
    assert _snapshot(out) == before


def test_a_damaged_metrics_file_does_not_stop_training(data, tmp_path, monkeypatch):  # noqa: F811
    import crlnseg.train.loop as loop

    out = tmp_path / "run"
    real = loop.train_step

    def damaging(state, *args, **kwargs):
        record = real(state, *args, **kwargs)
        if state.iteration == 2:  # a line before the last becomes unreadable
            metrics = out / "metrics.jsonl"
            metrics.write_text("#\n" + metrics.read_text())
        return record

    monkeypatch.setattr(loop, "train_step", damaging)
    result = _invoke("train", ["--labelled", str(data["plab"]), "--unlabelled",
                               str(data["punl"]), "-o", str(out), "--iterations", "2", *TINY])
    assert result.exit_code == 0, result.output
    warnings = [x for x in result.stderr.splitlines() if "training.png not redrawn" in x]
    assert len(warnings) == 1 and "line 1" in warnings[0], result.stderr
    assert load_checkpoint(out / "checkpoints" / "last.pt")["meta"]["iteration"] == 2


# -- rectify -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


def _cases(root: Path, labels: list[np.ndarray | None] | None = None) -> tuple[Path, Path]:
    """Two cases a, b in ``root/images`` and their labels (``labels`` replaces them) in
    ``root/gt``."""
    for i, name in enumerate(["a", "b"]):
        image, label = blob_image(seed=i)
        write_nifti(root / "images" / f"{name}.nii.gz", image)
        chosen = label if labels is None or labels[i] is None else labels[i]
        write_nifti(root / "gt" / f"{name}.nii.gz", chosen)
    return root / "images", root / "gt"


@pytest.mark.parametrize("where", ["images", "images/pseudo", "gt", "gt/pseudo/deeper"])
def test_rectify_output_in_an_input_folder_is_refused(tmp_path, tiny_run, where):
    images, gt = _cases(tmp_path)
    before = _snapshot(tmp_path)
    out = tmp_path / where
    result = _invoke("rectify", [str(images), "-o", str(out), "-m", str(tiny_run), "--labels",
                                 str(gt), "--device", "cpu", "--overwrite"])
    what = "input" if where.startswith("images") else "--labels"
    inside = "is" if "/" not in where else "is inside"
    _refused(result, f"-o {out}: {inside} the {what} folder")
    assert "outside its inputs" in result.stderr
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize("values, words", [
    ((0, 255), "label values [0, 255], but the model's classes are 0..1 (masks stored as "
               "0/255? convert them to 0/1)"),
    ((0, 1, 2), "label values [0, 1, 2], but the model's classes are 0..1"),
])
def test_rectify_refuses_label_values_the_model_lacks(tmp_path, tiny_run, values, words):
    label = blob_image(seed=1)[1].astype(np.uint8) * values[1]
    if len(values) == 3:
        label[:3] = values[2]
    images, gt = _cases(tmp_path, [None, label])  # the second case's label: every output of
    out = tmp_path / "pseudo"                         # the first would come before it
    result = _invoke("rectify", [str(images), "-o", str(out), "-m", str(tiny_run), "--labels",
                                 str(gt), "--device", "cpu"])
    _refused(result, f"{gt / 'b.nii.gz'}: {words}")
    if len(values) == 2:
        assert "convert them to 0/1" in result.stderr
    assert not out.exists()


def test_rectify_dice_over_no_reliable_voxel_is_null(tmp_path, tiny_run):
    images, gt = _cases(tmp_path)
    write_nifti(images / "b.nii.gz", np.zeros((20, 18, 12), np.float32))  # another confidence
    base = [str(images), "-m", str(tiny_run), "--labels", str(gt), "--device", "cpu"]
    assert _invoke("rectify", [*base, "-o", str(tmp_path / "first")]).exit_code == 0
    peak = {c: float(np.asarray(nib.load(tmp_path / "first" / f"{c}_confidence.nii.gz")
                                .dataobj).max()) for c in "ab"}
    low, high = sorted(peak, key=peak.get)
    assert peak[high] - peak[low] > 1e-4
    threshold = (peak[low] + peak[high]) / 2  # no voxel of `low` reaches it, some of `high`
    out = tmp_path / "second"
    result = _invoke("rectify", [*base, "-o", str(out), "--threshold", str(threshold)])
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "summary.json").read_text())
    rows = {r["case"]: r for r in summary["cases"]}
    assert rows[low]["reliable_rectified"] == 0.0 and rows[high]["reliable_rectified"] > 0
    assert rows[low]["dice_rectified_reliable"] is None
    assert isinstance(rows[high]["dice_rectified_reliable"], float)
    assert summary["mean"]["dice_rectified_reliable"] == pytest.approx(
        rows[high]["dice_rectified_reliable"])  # the mean skips the null
    with open(out / "summary.csv") as handle:
        cells = {r["case"]: r for r in csv.DictReader(handle)}
    assert cells[low]["dice_rectified_reliable"] == ""
    assert float(cells[high]["dice_rectified_reliable"]) == pytest.approx(
        rows[high]["dice_rectified_reliable"])
