"""Time ``crlnseg prepare`` on the 80 LA cases (workers 1 vs 2, re-run) and the 2 HDF5 cases.

Run by hand: ``/work/venv/bin/python benchmarks/prepare_la.py``. Each command is a fresh process
(what users run), into a new temporary folder; the re-run reuses the workers-2 cache.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CRLNSEG = [sys.executable, "-m", "crlnseg"]


def timed(args: list[str]) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(CRLNSEG + args, capture_output=True, text=True, check=True)
    return time.perf_counter() - start, done.stdout.strip()


def main() -> None:
    if not (DATA / "la").is_dir():
        sys.exit(f"{DATA}: shared data not found")
    work = Path(tempfile.mkdtemp(prefix="prepare_bench_"))
    try:
        runs = [
            ("LA 80, --workers 1", ["prepare", str(DATA / "la"), "-o", str(work / "w1")]),
            ("LA 80, --workers 2", ["prepare", str(DATA / "la"), "-o", str(work / "w2"),
                                    "--workers", "2"]),
            ("LA 80, --workers 2, re-run (all skipped)",
             ["prepare", str(DATA / "la"), "-o", str(work / "w2"), "--workers", "2"]),
            ("LA h5 2 cases, --h5-spacing 0.625", ["prepare", str(DATA / "la_h5"), "-o",
                                                   str(work / "h5"), "--h5-spacing", "0.625",
                                                   "0.625", "0.625"]),
        ]
        print("| run | wall time (s) | stdout |\n|---|---|---|")
        for name, args in runs:
            seconds, out = timed(args)
            print(f"| {name} | {seconds:.2f} | `{out}` |", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
