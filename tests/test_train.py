"""`crlnseg train` end to end on tiny synthetic volumes (CPU, a few iterations each)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crlnseg.checkpoint import load_checkpoint
from crlnseg.cli.app import app
from crlnseg.inference.choice import variant_name
from crlnseg.inference.model import load_inference_model

# Tiny everything: 16^3 crops of 24 x 20 x 18 volumes, 2-filter-wide... 4-filter V-Net.
TINY = ["--preset", "cpu", "--patch", "16", "16", "16", "--base-filters", "4",
        "--batch-labelled", "1", "--batch-unlabelled", "1",
        "--set", "model.prototypes_per_class=2", "--set", "model.prototype_dim=4",
        "--set", "method.anchors=4", "--set", "method.negatives=4",
        "--set", "train.num_workers=0", "--set", "train.log_every=1",
        "--set", "train.checkpoint_every=2", "--set", "train.val_every=2"]


def _write_split(root: Path, n: int, labels: bool, seed: int, max_class: int = 1) -> Path:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    if labels:
        (root / "labels").mkdir()
    for i in range(n):
        shape = (24, 20, 18)
        label = np.zeros(shape, np.uint8)
        c = rng.integers(6, 12, 3)
        label[c[0] - 4:c[0] + 4, c[1] - 3:c[1] + 4, c[2] - 3:c[2] + 3] = 1
        label[c[0] - 1:c[0] + 1, c[1] - 1:c[1] + 1, c[2] - 1:c[2] + 1] = max_class
        image = (label * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32)
        affine = np.diag([1.5, 1.5, 2.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"case{i}.nii.gz")
        if labels:
            nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"case{i}.nii.gz")
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """Raw splits, and the same splits prepared (most tests pass prepared folders: faster)."""
    from crlnseg.prepare import prepare_dataset
    from crlnseg.settings import PrepareSettings

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("data")
    raw = {"lab": _write_split(root / "lab", 2, True, 0),
           "unl": _write_split(root / "unl", 2, False, 1),
           "val": _write_split(root / "val", 2, True, 2)}
    out = dict(raw)
    for key, folder in raw.items():
        out[f"p{key}"] = root / f"p{key}"
        prepare_dataset(folder, out[f"p{key}"], PrepareSettings())
    return out


def _run(args: list[str], data: dict[str, Path] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["train", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def _base(data, out, iterations=2, val=False) -> list[str]:
    args = ["--labelled", str(data["plab"]), "--unlabelled", str(data["punl"]), "-o", str(out),
            "--iterations", str(iterations), *TINY]
    return args + (["--val", str(data["pval"])] if val else [])


@pytest.mark.parametrize("method", ["crln", "mean-teacher", "supervised"])
def test_each_method_trains_through_the_cli(data, tmp_path, method):
    out = tmp_path / "run"
    extra = ["--batch-labelled", "2"] if method == "supervised" else []
    code, output = _run([*_base(data, out, val=method == "crln"), "--method", method, *extra])
    assert code == 0, output
    summary = json.loads(output.strip().splitlines()[-1])
    assert summary["iteration"] == 2
    for name in ("settings.json", "environment.json", "metrics.jsonl", "training.png",
                 "checkpoints/last.pt", "checkpoints/iter_2.pt"):
        assert (out / name).is_file(), name
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    assert [x["iteration"] for x in steps] == [1, 2]
    assert all(np.isfinite(x["loss"]) and x["lr"] > 0 and x["it_per_s"] > 0 for x in steps)
    saved = json.loads((out / "settings.json").read_text())
    assert saved["method"]["method"] == method and saved["model"]["num_classes"] == 2
    model, settings, meta = load_inference_model(out)
    assert not model.training and meta["iteration"] == 2 and meta["classes"] == [0, 1]
    if method == "crln":
        assert (out / "checkpoints/best.pt").is_file()
        assert 0 <= summary["val_dice"] <= 1 and 0 <= summary["val_dice_largest"] <= 1
        val = [x for x in lines if "val_dice" in x]
        assert val and val[-1]["val_dice_largest"] == summary["val_dice_largest"]
        # The blending/post-processing chosen on validation reaches the checkpoint for predict.
        choice = val[-1]["val_choice"]
        assert summary["inference"] == meta["inference"] == choice and choice["iteration"] == 2
        # best.pt is selected on the chosen blending's Dice, what predict delivers
        assert summary["best_val_dice"] == choice["dice"] == val[-1]["val_dice_tuned"]
        assert choice["val_dice"]["sigma 1/8"] == pytest.approx(summary["val_dice"], abs=1e-6)
        assert max(choice["val_dice"].values()) == choice["val_dice"][variant_name(
            choice["sigma_scale"], choice["keep_largest"])]
        assert steps[-1]["loss_relation"] is not None
    else:
        assert not (out / "checkpoints/best.pt").exists() and steps[-1]["loss_relation"] is None
        assert summary["inference"] is None and meta["inference"] is None


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    state = load_checkpoint(path)["state"]
    out = {f"student.{k}": v for k, v in state["student"].items()}
    out.update({f"teacher.{k}": v for k, v in state["teacher"].items()})
    for i, s in state["optimizer"]["state"].items():
        out.update({f"opt.{i}.{k}": v for k, v in s.items() if isinstance(v, torch.Tensor)})
    return out


def test_resume_after_sigterm_equals_uninterrupted(data, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert _run(_base(data, straight, iterations=4))[0] == 0

    import crlnseg.train.loop as ts

    real = ts.train_step

    def stepping_then_sigterm(state, *args, **kwargs):
        record = real(state, *args, **kwargs)
        if state.iteration == 1:  # the signal arrives during iteration 1 (0-based)
            os.kill(os.getpid(), signal.SIGTERM)
        return record

    monkeypatch.setattr(ts, "train_step", stepping_then_sigterm)
    broken = tmp_path / "broken"
    code, output = _run(_base(data, broken, iterations=4))
    assert code == 128 + signal.SIGTERM, output
    assert load_checkpoint(broken / "checkpoints/last.pt")["meta"]["iteration"] == 1
    monkeypatch.setattr(ts, "train_step", real)
    code, output = _run(["--labelled", str(data["plab"]), "--unlabelled", str(data["punl"]),
                         "-o", str(broken), "--resume"])
    assert code == 0, output
    a, b = _tensors(straight / "checkpoints/last.pt"), _tensors(broken / "checkpoints/last.pt")
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]
    assert load_checkpoint(broken / "checkpoints/last.pt")["meta"]["iteration"] == 4


def test_resume_refuses_changed_settings_and_extends(data, tmp_path):
    out = tmp_path / "run"
    assert _run(_base(data, out, iterations=2))[0] == 0
    common = ["--labelled", str(data["plab"]), "--unlabelled", str(data["punl"]), "-o", str(out)]
    code, output = _run([*common])
    assert code == 2 and "--resume" in output and "--overwrite" in output
    code, output = _run([*common, "--resume", "--base-filters", "8"])
    assert code == 2 and "model.base_filters" in output
    code, output = _run([*common, "--resume", "--iterations", "1"])
    assert code == 2 and "fewer" in output
    code, output = _run([*common, "--resume", "--iterations", "3"])
    assert code == 0, output
    assert load_checkpoint(out / "checkpoints/last.pt")["meta"]["iteration"] == 3
    code, output = _run([*_base(data, out, iterations=1), "--overwrite"])
    assert code == 0 and not (out / "checkpoints/iter_2.pt").exists()


def test_raw_folders_are_prepared_into_the_run_and_reused(data, tmp_path):
    out = tmp_path / "run"
    args = ["--labelled", str(data["lab"]), "--unlabelled", str(data["unl"]), "-o", str(out),
            "--iterations", "1", *TINY]
    assert _run(args)[0] == 0
    cached = out / "prepared" / "labelled" / "dataset.json"
    stamp = cached.stat().st_mtime_ns
    assert _run([*args, "--overwrite"])[0] == 0
    assert cached.stat().st_mtime_ns == stamp  # nothing prepared twice


def _edit_prepared(src: Path, dst: Path, edit) -> Path:
    import shutil

    from crlnseg.data.manifest import load_manifest, save_manifest

    shutil.copytree(src, dst)
    manifest = load_manifest(dst)
    edit(manifest, dst)
    save_manifest(manifest, dst)
    return dst


def _two_channels(manifest, folder):
    for case in manifest.cases:
        path = folder / case.image_file
        np.save(path, np.concatenate([np.load(path)] * 2))
    manifest.channels = 2


@pytest.mark.parametrize("problem, message", [
    ("empty", "no cases found"),
    ("no_label", "has no label"),
    ("label_values", "label values [2] outside the classes 0..1"),
    ("channels", "channel"),
    ("patch", "larger than every volume"),
    ("no_unlabelled", "--unlabelled is required"),
    ("missing_resume", "nothing to resume"),
    ("batch_norm", "BatchNorm"),
])
def test_bad_input_is_one_line_and_exit_2(data, tmp_path, problem, message):
    out = tmp_path / "run"
    args = _base(data, out, iterations=1)
    if problem == "empty":
        (tmp_path / "empty").mkdir()
        args[1] = str(tmp_path / "empty")
    elif problem == "no_label":
        args[1] = str(data["unl"])
    elif problem == "label_values":
        args[1] = str(_write_split(tmp_path / "three", 1, True, 3, max_class=2))
        args += ["--set", "model.num_classes=2"]
    elif problem == "channels":
        args[3] = str(_edit_prepared(data["punl"], tmp_path / "unl2", _two_channels))
    elif problem == "patch":
        args += ["--patch", "48", "16", "16"]  # 32 pads the 24-voxel X by < one stride
    elif problem == "no_unlabelled":
        args = args[:2] + args[4:]
    elif problem == "missing_resume":
        args += ["--resume"]
    elif problem == "batch_norm":
        args += ["--method", "supervised"]
    code, output = _run(args)
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], output
    assert not out.exists()  # nothing half-written


def test_out_of_memory_becomes_a_run_failure():
    from crlnseg.errors import RunFailure
    from crlnseg.settings import RunSettings
    from crlnseg.train.loop import _out_of_memory_hint
    from crlnseg.train.parallel import Dist

    with pytest.raises(RunFailure, match="smaller --patch"):
        with _out_of_memory_hint(RunSettings(), Dist(), 3):
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    with pytest.raises(ValueError):
        with _out_of_memory_hint(RunSettings(), Dist(), 3):
            raise ValueError("other")


@pytest.mark.slow
def test_two_cpu_processes_leave_identical_weights(data, tmp_path, monkeypatch):
    monkeypatch.setenv("CRLNSEG_DEBUG_RANK_STATE", str(tmp_path))
    out = tmp_path / "run"
    code, output = _run([*_base(data, out, iterations=2, val=True), "--device", "cpu",
                         "--nproc", "2"])
    assert code == 0, output
    # Validation is split over the ranks and gathered; the parent reads it back from the log.
    summary = json.loads(output.strip().splitlines()[-1])
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()
           if "val_dice" in x][-1]
    assert sorted(val["val_per_case"]) == sorted(p.stem.removesuffix(".nii")
                                                 for p in (data["val"] / "images").glob("*"))
    assert (summary["val_dice"], summary["val_dice_largest"]) == (val["val_dice"],
                                                                  val["val_dice_largest"])
    assert summary["inference"] == val["val_choice"]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    for part in ("student", "teacher"):
        for key, value in r0[part].items():
            assert torch.equal(value, r1[part][key]), f"{part}.{key} differs between ranks"
    saved = load_checkpoint(out / "checkpoints/last.pt")
    assert saved["meta"]["world_size"] == 2
    assert torch.equal(saved["state"]["teacher"]["mu_raw"], r0["teacher"]["mu_raw"])


@pytest.mark.slow
def test_sigterm_to_a_real_process_then_resume(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "crlnseg", "train", *_base(data, out, iterations=200)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.is_file() and metrics.read_text().strip()) and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    done = load_checkpoint(out / "checkpoints/last.pt")["meta"]["iteration"]
    assert 1 <= done < 200 and b"--resume" in err
    code, output = _run(["--labelled", str(data["plab"]), "--unlabelled", str(data["punl"]),
                         "-o", str(out), "--resume", "--iterations", str(done + 1)])
    assert code == 0, output
    assert load_checkpoint(out / "checkpoints/last.pt")["meta"]["iteration"] == done + 1


def test_last_validation_ignores_lines_of_an_earlier_invocation():
    from crlnseg.train.launch import last_validation

    history = [{"iteration": 2, "loss": 1.0}, {"iteration": 2, "val_dice": 0.5},
               {"iteration": 4, "val_dice": 0.6, "val_dice_largest": 0.65},
               {"iteration": 6, "loss": 0.8}]
    assert last_validation(history, 0) == (0.6, 0.65)
    assert last_validation(history, 4) == (None, None)  # resumed at 4, no validation since
    assert last_validation(history[:2], 0) == (0.5, None)  # a log from before val_dice_largest


def test_non_consecutive_label_values_are_refused(data, tmp_path):
    # Masks stored as 0/255 used to build a 256-class model without a word.
    lab = _write_split(tmp_path / "byte", 1, True, 4, max_class=255)
    args = ["--labelled", str(lab), "--unlabelled", str(data["punl"]), "-o", str(tmp_path / "r"),
            "--iterations", "1", *TINY]
    code, output = _run(args)
    assert code == 2 and "not consecutive" in output and "0/255" in output, output
    assert [line for line in output.splitlines() if "error" in line][0].startswith("error:")
    assert not (tmp_path / "r").exists()  # nothing left behind
    code, output = _run(args + ["--set", "model.num_classes=256", "--overwrite"])
    assert code == 0, output  # explicitly asked for


def test_unwritable_run_folder_exit_2(data, tmp_path):
    (tmp_path / "plain").write_text("x")
    out = tmp_path / "plain" / "run"
    code, output = _run(_base(data, out, iterations=1))
    assert code == 2, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {out}: cannot write (Not a directory)"], output


def _digest(path: Path) -> str:
    """Content hash of a file or a folder (names and bytes)."""
    import hashlib

    h = hashlib.sha256()
    for p in sorted([path, *path.rglob("*")] if path.is_dir() else [path]):
        h.update(str(p.relative_to(path.parent)).encode())
        if p.is_file():
            h.update(p.read_bytes())
    return h.hexdigest()


def _errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error:")]


@pytest.mark.parametrize("kind, code, words", [
    ("failure", 1, ["RuntimeError: model could not be built"]),
    ("sigint", 130, ["interrupted before the first checkpoint", "no checkpoint was saved"]),
    ("sigterm", 143, ["terminated before the first checkpoint", "no checkpoint was saved"]),
])
@pytest.mark.parametrize("where", ["new", "empty", "overwrite"])
def test_a_run_that_fails_before_its_first_checkpoint_leaves_nothing(data, tmp_path, monkeypatch,
                                                                     kind, code, words, where):
    # settings.json, environment.json and checkpoints/ used to stay, blocking both a retry
    # ("already holds a run") and --resume ("nothing to resume").
    import crlnseg.train.loop as ts
    from crlnseg.errors import Terminated

    out = tmp_path / "parent" / "run"
    if where == "empty":
        out.mkdir(parents=True)
    elif where == "overwrite":
        assert _run(_base(data, out, iterations=1))[0] == 0
        before = {p.name: _digest(p) for p in out.iterdir() if p.name != "prepared"}
    raised = {"failure": RuntimeError("model could not be built"), "sigint": KeyboardInterrupt(),
              "sigterm": Terminated()}[kind]

    def broken(*args, **kwargs):
        raise raised

    monkeypatch.setattr(ts, "init_state", broken)
    args = _base(data, out, iterations=2) + (["--overwrite"] if where == "overwrite" else [])
    got, output = _run(args)
    assert got == code, output
    assert len(_errors(output)) == 1 and all(w in _errors(output)[0] for w in words), output
    if where == "new":
        assert not (tmp_path / "parent").exists()  # the folders this run created are gone
    elif where == "empty":
        assert out.is_dir() and not any(out.iterdir()), list(out.iterdir())
    else:  # the overwritten run is back as it was, and --resume continues it
        assert sorted(p.name for p in out.iterdir()) == sorted(before), list(out.iterdir())
        assert {name: _digest(out / name) for name in before} == before
        if kind != "failure":
            assert "put back the run it was overwriting" in _errors(output)[0], output
        monkeypatch.undo()
        assert _run([*_base(data, out, iterations=2), "--resume"])[0] == 0
        return
    monkeypatch.undo()
    assert _run(_base(data, out, iterations=1))[0] == 0  # the plain retry works


def test_overwrite_failing_before_a_checkpoint_keeps_the_users_files(data, tmp_path,
                                                                      monkeypatch):
    import crlnseg.train.loop as ts

    out = tmp_path / "run"
    assert _run(_base(data, out, iterations=1))[0] == 0
    (out / "predictions").mkdir()
    (out / "predictions" / "case0.nii.gz").write_text("mine")

    def broken(*args, **kwargs):
        raise RuntimeError("model could not be built")

    monkeypatch.setattr(ts, "init_state", broken)
    last = _digest(out / "checkpoints")
    assert _run([*_base(data, out, iterations=1), "--overwrite"])[0] == 1
    monkeypatch.undo()
    assert (out / "predictions" / "case0.nii.gz").read_text() == "mine"
    assert _digest(out / "checkpoints") == last and not (out / ".crlnseg-previous").exists()
    code, output = _run(_base(data, out, iterations=1))  # the old run, whole
    assert code == 2 and "already holds a run; use --resume" in output, output
    assert _run([*_base(data, out, iterations=2), "--overwrite"])[0] == 0
    assert (out / "predictions" / "case0.nii.gz").read_text() == "mine"
    assert _digest(out / "checkpoints") != last and not (out / ".crlnseg-previous").exists()


@pytest.mark.parametrize("state", ["set aside", "half set aside", "new run started"])
def test_an_overwrite_killed_outright_gets_its_old_run_back(data, tmp_path, state):
    # SIGKILL leaves no clean-up: the old run waits in .crlnseg-previous. The next crlnseg train
    # on the folder puts it back (the killed run saved no checkpoint), so --resume continues it.
    from crlnseg.train.overwrite import PREVIOUS, set_aside
    from crlnseg.train.run_dir import OUTPUTS

    out = tmp_path / "run"
    assert _run(_base(data, out, iterations=1))[0] == 0
    before = {p.name: _digest(p) for p in out.iterdir() if p.name != "prepared"}
    if state == "half set aside":  # killed inside the moves: checkpoints go first
        (out / PREVIOUS).mkdir()
        (out / "checkpoints").rename(out / PREVIOUS / "checkpoints")
    else:
        set_aside(out, OUTPUTS)
        if state == "new run started":  # what the killed run wrote before its first checkpoint
            (out / "checkpoints").mkdir()
            (out / "settings.json").write_text("{}")
    code, output = _run(_base(data, out, iterations=1))
    assert code == 2 and "already holds a run; use --resume" in output, output
    assert not (out / PREVIOUS).exists()
    assert {p.name: _digest(p) for p in out.iterdir() if p.name != "prepared"} == before
    assert _run([*_base(data, out, iterations=2), "--resume"])[0] == 0


def test_a_set_aside_run_left_after_a_checkpoint_is_dropped(data, tmp_path):
    # Killed between the new run's first checkpoint and removing the old run: the next train on
    # the folder (here one that is refused) drops the old one and leaves the new run alone.
    from crlnseg.train.overwrite import PREVIOUS

    out = tmp_path / "run"
    assert _run(_base(data, out, iterations=1))[0] == 0
    last = _digest(out / "checkpoints")
    (out / PREVIOUS / "checkpoints").mkdir(parents=True)
    (out / PREVIOUS / "settings.json").write_text("{}")
    code, output = _run(_base(data, out, iterations=1))
    assert code == 2 and "already holds a run; use --resume" in output, output
    assert not (out / PREVIOUS).exists() and _digest(out / "checkpoints") == last


def test_a_live_overwrite_is_not_disturbed_by_another_train(data, tmp_path):
    # While the process that set the old run aside still runs (no checkpoint yet), another
    # crlnseg train on the folder must not take the old run back from under it.
    import subprocess as sp

    from crlnseg.train import overwrite
    from crlnseg.train.overwrite import LOCK, PREVIOUS, set_aside
    from crlnseg.train.run_dir import OUTPUTS

    out = tmp_path / "run"
    assert _run(_base(data, out, iterations=1))[0] == 0
    set_aside(out, OUTPUTS)
    overwrite._release(out / PREVIOUS)  # the lock now belongs to the process below
    holder = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
              "fcntl.flock(fd, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(60)")
    owner = sp.Popen([sys.executable, "-c", holder, str(out / PREVIOUS / LOCK)], stdout=sp.PIPE,
                     text=True)
    try:
        assert owner.stdout.readline().strip() == "locked"
        for extra in ([], ["--resume"], ["--overwrite"]):
            code, output = _run([*_base(data, out, iterations=1), *extra])
            assert code == 2 and "in use: another crlnseg train is replacing" in output, output
            assert (out / PREVIOUS / "checkpoints").is_dir() and not (out / "checkpoints").exists()
    finally:
        owner.kill()
        owner.wait()
    code, output = _run(_base(data, out, iterations=1))  # its owner gone: the old run comes back
    assert code == 2 and "already holds a run; use --resume" in output, output
    assert (out / "checkpoints" / "last.pt").is_file() and not (out / PREVIOUS).exists()


def test_restore_moves_checkpoints_back_last(tmp_path, monkeypatch):
    from crlnseg.train.overwrite import PREVIOUS, restore, set_aside
    from crlnseg.train.run_dir import OUTPUTS

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for name in OUTPUTS[1:]:
        (out / name).write_text(name)
    set_aside(out, OUTPUTS)
    order = []
    rename = Path.rename

    def recording(self, target):
        order.append(self.name)
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", recording)
    assert restore(out)
    assert order[-1] == "checkpoints" and sorted(order) == sorted(OUTPUTS)
    assert not (out / PREVIOUS).exists()


def test_a_stop_request_during_the_set_aside_waits_for_the_moves(tmp_path, monkeypatch):
    import signal as sig

    from crlnseg.train.overwrite import PREVIOUS, set_aside
    from crlnseg.train.run_dir import OUTPUTS

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    for name in OUTPUTS[1:]:
        (out / name).write_text(name)
    seen = []
    previous = sig.signal(sig.SIGTERM, lambda signum, frame: seen.append(
        sorted(p.name for p in (out / PREVIOUS).iterdir())))
    rename = Path.rename

    def stopped_midway(self, target):
        if self.name == "checkpoints":
            os.kill(os.getpid(), sig.SIGTERM)  # a scheduler's one SIGTERM, mid-move
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", stopped_midway)
    try:
        set_aside(out, OUTPUTS)
    finally:
        handler = sig.getsignal(sig.SIGTERM)
        sig.signal(sig.SIGTERM, previous)
    # Delivered once, after every move, to the handler that was there before.
    assert len(seen) == 1 and set(OUTPUTS) <= set(seen[0]), seen
    assert handler is not previous and callable(handler)


def test_interrupt_while_preparing_says_no_checkpoint_was_saved(data, tmp_path, monkeypatch):
    import crlnseg.train.plan as prep

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prep, "prepare_dataset", interrupted)
    out = tmp_path / "run"
    args = ["--labelled", str(data["lab"]), "--unlabelled", str(data["punl"]), "-o", str(out),
            "--iterations", "1", *TINY]
    code, output = _run(args)
    assert code == 130 and "no checkpoint was saved" in output and not out.exists(), output


@pytest.mark.slow
def test_sigint_to_two_cpu_processes_before_the_first_checkpoint(data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "crlnseg", "train", *_base(data, out, iterations=200),
           "--device", "cpu", "--nproc", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 120
    while not (out / "settings.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"no checkpoint was saved" in err and not out.exists(), err.decode()


@pytest.mark.parametrize("content", ["settings", "checkpoints", "other"])
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_crlnseg_did_not_write_is_never_used_or_cleared(data, tmp_path, content,
                                                                 overwrite):
    out = tmp_path / "mine"
    (out / "checkpoints").mkdir(parents=True)
    files = {"settings": {"settings.json": '{"lr": 0.1}'},
             "checkpoints": {"checkpoints/my_model.pth": "weights"},
             "other": {"notes.txt": "mine"}}[content]
    for name, text in files.items():
        (out / name).write_text(text)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    code, output = _run(_base(data, out, iterations=1) + (["--overwrite"] if overwrite else []))
    assert code == 2 and len(_errors(output)) == 1, output
    assert "is not a crlnseg run folder" in output and "already holds a run" not in output
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert all((out / name).read_text() == text for name, text in files.items())
    code, output = _run(_base(data, out, iterations=1) + ["--resume"])
    assert code == 2 and "not a crlnseg run" in output, output


@pytest.mark.parametrize("inside", ["plab", "lab", "pval", "unl"])
@pytest.mark.parametrize("nested", [False, True])
def test_the_run_folder_must_be_outside_every_input(data, tmp_path, inside, nested):
    folder = data[inside]
    out = folder / "run" if nested else folder
    before = sorted(folder.rglob("*"))
    args = ["--labelled", str(data["plab"] if inside != "lab" else data["lab"]),
            "--unlabelled", str(data["unl"] if inside == "unl" else data["punl"]),
            "-o", str(out), "--iterations", "1", *TINY, "--overwrite"]
    if inside == "pval":
        args += ["--val", str(data["pval"])]
    code, output = _run(args)
    assert code == 2 and len(_errors(output)) == 1, output
    assert "outside its inputs" in output, output
    assert sorted(folder.rglob("*")) == before


def test_overwrite_restarts_with_new_prepare_settings(data, tmp_path):
    # RUN/prepared/ used to be kept: "prepared with different settings; use --overwrite".
    out = tmp_path / "run"
    args = ["--labelled", str(data["lab"]), "--unlabelled", str(data["unl"]), "-o", str(out),
            "--iterations", "1", *TINY]
    assert _run(args)[0] == 0
    code, output = _run([*args, "--overwrite", "--set", "prepare.normalize=minmax"])
    assert code == 0, output
    for name in ("labelled", "unlabelled"):
        cached = json.loads((out / "prepared" / name / "dataset.json").read_text())
        assert cached["settings"]["normalize"] == "minmax"
    assert json.loads((out / "settings.json").read_text())["prepare"]["normalize"] == "minmax"
    code, output = _run([*args, "--resume", "--iterations", "2", "--set",
                         "prepare.normalize=zscore"])
    assert code == 2 and "--resume: prepare.normalize" in output, output



def test_resume_after_a_failed_overwrite_re_prepares_its_own_cache(data, tmp_path):
    # The failed --overwrite re-prepared RUN/prepared with minmax before a later check failed;
    # --resume then refused ("prepared with different settings; use --overwrite").
    out = tmp_path / "run"
    args = ["--labelled", str(data["lab"]), "--unlabelled", str(data["unl"]), "-o", str(out),
            "--iterations", "1", *TINY]
    assert _run(args)[0] == 0
    code, output = _run([*args, "--overwrite", "--set", "prepare.normalize=minmax",
                         "--patch", "64", "64", "64"])  # larger than the images: refused
    assert code == 2 and (out / "checkpoints" / "last.pt").is_file(), output
    code, output = _run([*args, "--resume", "--iterations", "2"])
    assert code == 0, output
    cached = json.loads((out / "prepared" / "labelled" / "dataset.json").read_text())
    assert cached["settings"]["normalize"] == "zscore"


def test_dot_dot_in_the_run_folder_cannot_remove_a_users_folder(data, tmp_path):
    # "missing/../b" looked new, so a failing run removed b, a user's folder, as its own.
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "mydata.txt").write_text("precious")
    out = tmp_path / "missing" / ".." / "b"
    code, output = _run([*_base(data, out, iterations=1), "--patch", "64", "64", "64"])
    assert code == 2, output
    assert (tmp_path / "b" / "mydata.txt").read_text() == "precious"


@pytest.mark.parametrize("option, value, words", [
    ("--seed", "-1", ["train.seed"]),
    ("--seed", "18446744073709551616", ["train.seed"]),
    ("--nproc", "0", ["--nproc 0", "at least 1"]),
    ("--nproc", "-2", ["--nproc -2", "at least 1"]),
    ("--gpus", "-1", ["--gpus -1"]),
])
def test_bad_process_and_seed_options_are_refused_up_front(data, tmp_path, option, value,
                                                           words):
    out = tmp_path / "run"
    code, output = _run([*_base(data, out, iterations=1), option, value])
    assert code == 2 and len(_errors(output)) == 1, output
    assert all(w in _errors(output)[0] for w in words), output
    assert not out.exists()


def test_bad_set_and_config_exit_2(data, tmp_path):
    out = tmp_path / "run"
    code, output = _run([*_base(data, out, iterations=1), "--set", "train.patch=[16,16,16"])
    assert code == 2 and len(_errors(output)) == 1 and "--set" in output, output
    latin = tmp_path / "s.yaml"
    latin.write_bytes(b"train:\n  iterations: 1 # \xe9\n")
    for config, words in ((latin, "not UTF-8"), (tmp_path, "is a folder")):
        code, output = _run([*_base(data, out, iterations=1), "--config", str(config)])
        assert code == 2 and len(_errors(output)) == 1 and words in output, output
    assert not out.exists()


def test_resume_refuses_other_data_processes_and_overwrite(data, tmp_path):
    out = tmp_path / "run"
    assert _run(_base(data, out, iterations=2))[0] == 0
    meta = load_checkpoint(out / "checkpoints/last.pt")["meta"]
    assert meta["data"]["labelled"]["cases"] == ["case0", "case1"] and meta["world_size"] == 1
    last = (out / "checkpoints/last.pt").stat().st_mtime_ns
    resume = ["-o", str(out), "--resume", "--iterations", "3"]
    code, output = _run(["--labelled", str(data["pval"]), "--unlabelled", str(data["punl"]),
                         *resume])
    assert code == 2 and "--resume: --labelled is not the data" in output, output
    code, output = _run(["--labelled", str(data["plab"]), "--unlabelled", str(data["pval"]),
                         *resume])
    assert code == 2 and "--resume: --unlabelled is not the data" in output, output
    code, output = _run(["--labelled", str(data["plab"]), "--unlabelled", str(data["punl"]),
                         *resume, "--device", "cpu", "--nproc", "2"])
    assert code == 2 and "trained with 1 process(es), now 2" in output, output
    code, output = _run(["--labelled", str(data["plab"]), "--unlabelled", str(data["punl"]),
                         *resume, "--val", str(data["pval"])])  # trained without --val
    assert code == 2 and "--resume: --val is not the data" in output, output
    code, output = _run([*_base(data, out, iterations=3), "--resume", "--overwrite"])
    assert code == 2 and "--resume and --overwrite" in output, output
    assert (out / "checkpoints/last.pt").stat().st_mtime_ns == last
    # the raw folder the prepared data came from is the same data
    code, output = _run(["--labelled", str(data["lab"]), "--unlabelled", str(data["punl"]),
                         *resume])
    assert code == 0, output


def test_missing_unlabelled_folder_is_refused_with_supervised(data, tmp_path):
    out = tmp_path / "run"
    args = [*_base(data, out, iterations=1), "--method", "supervised", "--batch-labelled", "2"]
    args[3] = str(tmp_path / "nowhere")
    code, output = _run(args)
    assert code == 2 and f"--unlabelled {tmp_path / 'nowhere'}: no such" in output, output
    assert not out.exists()


def test_a_run_without_checkpoint_suggests_overwrite(data, tmp_path):
    out = tmp_path / "run"
    assert _run(_base(data, out, iterations=1))[0] == 0
    import shutil

    shutil.rmtree(out / "checkpoints")  # as an older crlnseg left a failed run
    code, output = _run(_base(data, out, iterations=1))
    assert code == 2 and "saved no checkpoint; use --overwrite" in output, output
    assert _run([*_base(data, out, iterations=1), "--overwrite"])[0] == 0


def test_setting_a_run_aside_is_all_or_nothing(tmp_path, monkeypatch):
    import errno

    from crlnseg.errors import OutputExistsError
    from crlnseg.train.overwrite import PREVIOUS, set_aside
    from crlnseg.train.run_dir import OUTPUTS

    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_text("weights")
    (out / "settings.json").write_text("{}")
    (out / "metrics.jsonl").write_text("{}\n")
    before = {p.name: _digest(p) for p in out.iterdir()}
    calls = []
    rename = Path.rename

    def flaky(self, target):
        calls.append(self.name)
        if len(calls) == 2:  # the second move fails (a busy mount, say)
            raise OSError(errno.EBUSY, "Device or resource busy")
        return rename(self, target)

    monkeypatch.setattr(Path, "rename", flaky)
    with pytest.raises(OutputExistsError, match="cannot set the old run aside.*busy"):
        set_aside(out, OUTPUTS)
    assert calls[0] == "checkpoints"  # checkpoints move first
    assert not (out / PREVIOUS).exists()
    assert {p.name: _digest(p) for p in out.iterdir()} == before


def test_a_ranks_crlnseg_error_keeps_its_kind_in_the_launcher():
    import torch.multiprocessing as mp

    from crlnseg.errors import DataError, RunFailure
    from crlnseg.train.launch import _child_error

    def raised(last_line: str) -> Exception:
        text = ("\n\n-- Process 1 terminated with the following error:\n"
                f"Traceback (most recent call last):\n  ...\n{last_line}\n")
        return mp.ProcessRaisedException(text, 1, 123)

    full = _child_error(raised("crlnseg.errors.RunFailure: cannot write /x/last.pt: no space"))
    assert type(full) is RunFailure and str(full) == "cannot write /x/last.pt: no space"
    bad = _child_error(raised("crlnseg.errors.DataError: case 3: label shape differs"))
    assert type(bad) is DataError and bad.exit_code == 2
    other = _child_error(raised("ValueError: boom"))
    assert type(other) is RunFailure and "a training process failed: ValueError: boom" in str(other)
