"""The GPU script must work the first time it meets a GPU, so its CPU smoke mode runs here: every
step, the same code paths, tiny sizes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.md").read_text()
    for step in ("iteration_cpu", "throughput_cpu", "predict_cpu", "pytest_cpu",
                 "profile_crln_cpu"):
        assert f"## {step}: rc 0" in summary
        assert (out / f"{step}.log").is_file()
    result = json.loads((out / "predict_cpu.json").read_text())
    assert sorted(result["seconds"]) == sorted([
        "gaussian overlap 0.5, fp32", "uniform stride 8 8 4, fp32",
        "gaussian overlap 0.5, amp", "uniform stride 8 8 4, amp",
        "gaussian overlap 0.5, amp, NCDHW", "uniform stride 8 8 4, amp, NCDHW"])
    for per_case in result["seconds"].values():
        assert sorted(per_case) == ["40x36x36", "44x40x33"]
        assert all(len(v) == 1 and v[0] > 0 for v in per_case.values())
    assert "| crln |" in summary and '"overhead"' in summary
    assert "| phase | calls | CPU ms | kernel ms | GPU span ms |" in summary
    assert "| student_losses | 1 |" in summary


def test_gpu_check_budget_skips_steps_it_cannot_start(tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--out", str(out),
                           "--budget", "0"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    summary = (out / "summary.md").read_text()
    assert summary.count("skipped, the budget is spent") == 5


def test_a_step_past_its_limit_is_killed_with_its_children() -> None:
    import importlib.util
    import os
    import time

    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    child = ("import subprocess, sys, time; "
             "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "print(p.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    rc, out, err = gpu_check.run_step([sys.executable, "-c", child], 3, dict(os.environ))
    assert rc == 124 and "killed after 3 s" in err and time.monotonic() - start < 30
    grandchild = int(out.split()[0])
    time.sleep(0.5)
    status = Path(f"/proc/{grandchild}/status")
    # Gone, or a zombie waiting for init to reap it: either way no longer running.
    assert not status.exists() or "State:\tZ" in status.read_text()
