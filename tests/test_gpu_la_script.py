"""``benchmarks/gpu_la.py`` gets one try on a GPU within a fixed time, so its CPU smoke mode runs
here end to end (generated scans, a tiny model, 2 iterations), and the parts that only a run
without ``--iterations`` takes (speed measured, iterations sized, trainings stopped at the
deadline) run against a stand-in trainer."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPT = BENCHMARKS / "gpu_la.py"
TINY = ["--set", "model.base_filters=2", "--set", "model.prototypes_per_class=2",
        "--set", "model.prototype_dim=4", "--set", "train.num_workers=0"]


def _module(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the script imports la.py beside it
    spec = importlib.util.spec_from_file_location("gpu_la", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_la", module)  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _write_cases(folder: Path, n: int = 80, shape: tuple[int, int, int] = (32, 32, 16)) -> None:
    """``n`` small scans in the LA layout: a bright ball in noise, labelled."""
    import nibabel as nib

    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    grid = np.indices(shape).astype(np.float32)
    affine = np.diag([1.25, 1.25, 1.25, 1.0])
    ids = [f"CASE{i:02d}" for i in range(n)]
    for cid in ids:
        centre = np.array(shape) / 2 + rng.uniform(-3, 3, 3)
        ball = (((grid - centre[:, None, None, None]) / 6.0) ** 2).sum(axis=0) < 1
        image = (100 * ball + rng.normal(0, 20, shape)).astype(np.int16)
        nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"{cid}.nii.gz")
        nib.save(nib.Nifti1Image(ball.astype(np.uint8), affine),
                 folder / "labels" / f"{cid}.nii.gz")
    (folder / "cases.txt").write_text("\n".join(ids) + "\n")


@pytest.mark.slow
def test_cpu_smoke_run_writes_every_fold_and_method(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    _write_cases(data)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--iterations", "2",
                           "--limit-val", "2", "--limit-unlabelled", "2", "--data", str(data),
                           "--out", str(out), *TINY],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "out"]  # nothing elsewhere
    assert {"gpu_la.json", "gpu_la.md", "gpu_la.log", "work"} <= {p.name for p in out.iterdir()}
    result = json.loads((out / "gpu_la.json").read_text())
    meta = result["meta"]
    assert meta["device"]["card"] == "cpu" and meta["device"]["torch"]
    assert "commit" in meta["crlnseg_commit"]
    assert meta["iterations"] == 2 and meta["iterations_source"] == "--iterations"
    assert meta["patch"] == [32, 32, 16] and meta["patch_plan"]["source"].startswith("crlnseg plan")
    assert list(result["folds"]) == ["65-80", "49-64", "33-48"]
    ids = (data / "cases.txt").read_text().split()
    seen: set[str] = set()
    for k, (fold, entry) in enumerate(result["folds"].items()):
        first = int(fold.split("-")[0])
        assert entry["validation"] == ids[first - 1:first + 1]  # --limit-val 2
        assert entry["labelled"] == ids[:8] and entry["unlabelled"] == 2 and entry["seed"] == k
        assert not seen & set(entry["validation"])  # the folds are disjoint
        seen |= set(entry["validation"])
        assert sorted(entry["methods"]) == ["crln", "supervised"]
        for method in entry["methods"].values():
            assert "error" not in method
            assert 0.0 <= method["dice_mean"] <= 1.0 and math.isfinite(method["dice_mean"])
            assert sorted(method["dice_per_case"]) == sorted(entry["validation"])
            assert all(0.0 <= d <= 1.0 for d in method["dice_per_case"].values())
            assert method["iterations"] == 2 and method["train_seconds"] > 0
            assert not method["stopped_at_deadline"]
    for method in ("crln", "supervised"):
        assert result["summary"][method]["folds"] == 3
    table = (out / "gpu_la.md").read_text()
    assert "| 65-80 |" in table and "| mean |" in table
    assert "crln_fold33-48: validation Dice" in (out / "gpu_la.log").read_text()


def test_folds_keep_labelled_and_validation_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_la = _module(monkeypatch)
    cases = [f"c{i}" for i in range(1, 81)]
    folds = {f: gpu_la.fold_ids(cases, f) for f in gpu_la.FOLDS}
    assert [len(f["unlabelled"]) for f in folds.values()] == [56, 40, 40]
    assert folds["65-80"]["validation"] == cases[64:80]
    assert folds["33-48"]["unlabelled"] == cases[8:32] + cases[48:64]
    for f in folds.values():
        assert f["labelled"] == cases[:8]
        assert not set(f["validation"]) & (set(f["unlabelled"]) | set(f["labelled"]))


def test_schedule_and_sizing(monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_la = _module(monkeypatch)
    assert gpu_la.schedule_seconds([3, 3, 3, 1, 1, 1], 6) == 3
    assert gpu_la.schedule_seconds([3, 3, 3, 1, 1, 1], 1) == 12
    assert gpu_la.schedule_seconds([3, 3, 3, 1, 1, 1], 2) == 6  # longest first: 3+3, 3+1+1+1
    # Six at once: the slowest (1 it/s after 10 s) decides; 110 s allow 100 iterations.
    assert gpu_la.size_iterations([1.0, 2.0, 3.0], 10.0, 6, 110.0) == 100
    assert gpu_la.size_iterations([1.0, 1.0], 10.0, 1, 230.0) == 100  # one after the other
    assert gpu_la.size_iterations([10.0], 0.0, 1, 5.5) == 55  # under 100: not rounded
    assert gpu_la.size_iterations([1.0], 20.0, 1, 10.0) == 0


def test_speed_skips_the_first_windows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_la = _module(monkeypatch)
    rows = [{"iteration": 10, "it_per_s": 1.0}, {"iteration": 20, "it_per_s": 2.0},
            {"iteration": 30, "it_per_s": 4.0}, {"iteration": 40, "it_per_s": 8.0 / 3},
            {"iteration": 40, "val_dice": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert gpu_la.measured_speed(tmp_path, skip=20) == pytest.approx(20 / (10 / 4 + 10 / (8 / 3)))
    assert gpu_la.measured_speed(tmp_path / "missing") is None


# A stand-in for ``crlnseg train``: writes metrics.jsonl at a fixed speed, stops on SIGTERM.
FAKE_TRAIN = textwrap.dedent("""
    import json, signal, sys, time
    from pathlib import Path
    argv = sys.argv[1:]
    value = lambda flag, default=None: argv[argv.index(flag) + 1] if flag in argv else default
    run, total = Path(value("-o")), int(value("--iterations"))
    every = int(value("--log-every", 5))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    run.mkdir(parents=True, exist_ok=True)
    rate = 400.0 if value("--method") == "supervised" else 200.0
    for done in range(every, total + 1, every):
        time.sleep(every / rate)
        with open(run / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"iteration": done, "it_per_s": rate}) + "\\n")
""")


def _fake_runner(gpu_la: ModuleType, script: Path) -> Any:
    class Fake(gpu_la.Crlnseg):
        def command(self, args: list[Any]) -> list[str]:
            return [sys.executable, str(script), *map(str, args[1:])]

    return Fake(threads=1)


def _trainings(gpu_la: ModuleType, root: Path) -> list[Any]:
    return [gpu_la.Training(fold, method, k, root / f"{method}_{fold}", root / "lab",
                            root / "unl" if method == "crln" else None)
            for method in gpu_la.METHODS for k, fold in enumerate(gpu_la.FOLDS)]


def test_calibration_measures_each_method(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gpu_la = _module(monkeypatch)
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    log = gpu_la.Log(tmp_path / "log.txt", 0.0)
    for jobs, calibrated in ((6, 6), (1, 2)):
        args = gpu_la.parse_args(["--device", "cpu", "--jobs", str(jobs),
                                  "--calibration-iterations", "40"])
        work = tmp_path / f"jobs{jobs}"
        result = gpu_la.calibrate(_trainings(gpu_la, work), [32, 32, 16], args,
                                  _fake_runner(gpu_la, script), log, work, math.inf)
        assert len(result["runs"]) == calibrated
        assert result["crln_it_per_s"] == pytest.approx(200.0)
        assert result["supervised_it_per_s"] == pytest.approx(400.0)
        assert result["startup_seconds"] >= 0.0


def test_trainings_past_the_deadline_are_stopped(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    gpu_la = _module(monkeypatch)
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    args = gpu_la.parse_args(["--device", "cpu", "--jobs", "2"])
    trainings = _trainings(gpu_la, tmp_path)
    start = time.perf_counter()
    gpu_la.run_trainings(trainings, 10**6, [32, 32, 16], args, _fake_runner(gpu_la, script),
                         gpu_la.Log(tmp_path / "log.txt", start), start + 2.0)
    assert time.perf_counter() - start < 30
    started, queued = trainings[:2], trainings[2:]
    assert all(t.stopped and t.returncode == 143 for t in started)
    assert all(t.proc is None for t in queued)  # none started after the deadline
    assert "not started, the deadline has passed" in (tmp_path / "log.txt").read_text()
