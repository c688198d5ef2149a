"""The examples run as documented (README, "Python API"), so they do not rot between releases."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_example_runs_every_stage(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    work = tmp_path / "work"
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "api_example.py"), str(work),
                           "2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "test Dice" in done.stdout and "pseudo-label Dice raw" in done.stdout
    assert any((work / "predictions").glob("*.nii.gz"))
