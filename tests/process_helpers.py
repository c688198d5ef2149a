"""Run the CLI of this source tree in a real process and signal it mid-run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def terminate_when(args: list[str], ready: Callable[[], bool], sig: int = signal.SIGTERM,
                   timeout: float = 60.0) -> tuple[int, str]:
    """Start ``crlnseg ARGS``, send ``sig`` once ``ready()`` holds; (exit status, stderr)."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "crlnseg", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"never ready: {proc.poll()} {proc.stderr.read().decode()}")
            time.sleep(0.005)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, err.decode()


def hidden(folder: Path) -> list[str]:
    """Hidden entries (temporaries) of ``folder``."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) \
        if folder.is_dir() else []
