"""HD95 + ASD of one organ-sized mask pair: crlnseg vs medpy, same run, identical values.

    python benchmarks/metrics_speed.py [--repeats 3]

The pair: a smooth, randomly deformed ellipsoid (~60 x 50 x 40 voxels) in a 256 x 256 x 128 volume
at an anisotropic spacing, and a perturbed copy (shifted, differently deformed) as the prediction.
medpy is called as users call it: ``hd95(...)`` and ``asd(...)`` separately. Peak memory of each
side is measured in its own subprocess (peak RSS above the RSS before the call, and the tracemalloc
peak of Python/numpy allocations); Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

SHAPE = (256, 256, 128)
SPACING = (0.7, 0.7, 1.5)


def organ(seed: int, center: tuple[float, float, float], radii: tuple[float, float, float]
          ) -> np.ndarray:
    """An ellipsoid whose boundary is deformed by smooth noise (a few voxels of amplitude)."""
    rng = np.random.default_rng(seed)
    grid = np.ogrid[tuple(slice(0, s) for s in SHAPE)]
    r = sum(((g - c) / a) ** 2 for g, c, a in zip(grid, center, radii, strict=True))
    noise = gaussian_filter(rng.standard_normal((32, 32, 16)), sigma=2.0)
    noise = np.kron(noise / np.abs(noise).max(), np.ones((8, 8, 8)))  # smooth at organ scale
    return np.sqrt(r) + 0.15 * noise < 1.0


def masks() -> tuple[np.ndarray, np.ndarray]:
    ref = organ(0, (128.0, 120.0, 64.0), (30.0, 25.0, 20.0))
    pred = organ(1, (129.5, 118.0, 65.0), (29.0, 26.0, 19.5))
    return pred, ref


def compute(side: str, pred: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    if side == "crlnseg":
        from crlnseg.metrics import hd95_asd

        return hd95_asd(pred, ref, SPACING)  # type: ignore[return-value]
    from medpy.metric.binary import asd, hd95

    return hd95(pred, ref, voxelspacing=SPACING), asd(pred, ref, voxelspacing=SPACING)


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_worker(side: str, path: str) -> None:
    """Child process: load the masks and import, then measure one computation's peak memory.

    RSS: the peak resident set (VmHWM) above the resident set before the call, with the peak reset
    first (``/proc/self/clear_refs``: ru_maxrss would carry the parent's peak across exec).
    tracemalloc: peak of Python/numpy allocations in a second, traced call.
    """
    data = np.load(path)
    pred, ref = data["pred"], data["ref"]
    small = (slice(112, 144), slice(104, 136), slice(56, 72))  # inside both organs
    compute(side, pred[small], ref[small])  # imports and first-call set-up
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_mb("VmRSS")
    compute(side, pred, ref)
    rss = _status_mb("VmHWM") - base
    tracemalloc.start()
    compute(side, pred, ref)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    print(json.dumps({"tracemalloc_peak_mb": peak / 2**20, "rss_peak_extra_mb": rss}))


def timed(side: str, pred: np.ndarray, ref: np.ndarray, repeats: int
          ) -> tuple[float, tuple[float, float]]:
    best, values = float("inf"), (0.0, 0.0)
    for _ in range(repeats):
        start = time.perf_counter()
        values = compute(side, pred, ref)
        best = min(best, time.perf_counter() - start)
    return best, values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timings per side (best kept)")
    parser.add_argument("--memory-worker", nargs=2, metavar=("SIDE", "NPZ"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(*args.memory_worker)
        return
    pred, ref = masks()
    extent = [int(np.ptp(np.nonzero(ref.any(axis=tuple(a for a in range(3) if a != ax)))[0])) + 1
              for ax in range(3)]
    print(f"volume {SHAPE}, spacing {SPACING} mm; GT extent {extent} voxels, "
          f"{int(ref.sum())} GT / {int(pred.sum())} predicted voxels")
    ours_s, ours = timed("crlnseg", pred, ref, args.repeats)
    theirs_s, theirs = timed("medpy", pred, ref, args.repeats)
    for a, b in zip(ours, theirs, strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (ours, theirs)
    print(f"HD95 {ours[0]:.6f} mm, ASD {ours[1]:.6f} mm (crlnseg) == "
          f"HD95 {theirs[0]:.6f} mm, ASD {theirs[1]:.6f} mm (medpy)")
    print(f"time (best of {args.repeats}): crlnseg {ours_s:.3f} s, medpy {theirs_s:.3f} s, "
          f"speed-up {theirs_s / ours_s:.1f}x")
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "masks.npz")
        np.savez(path, pred=pred, ref=ref)
        for side in ("crlnseg", "medpy"):
            out = subprocess.run([sys.executable, __file__, "--memory-worker", side, path],
                                 capture_output=True, text=True, check=True).stdout
            mem = json.loads(out)
            print(f"peak memory {side}: tracemalloc {mem['tracemalloc_peak_mb']:.1f} MB, "
                  f"peak RSS +{mem['rss_peak_extra_mb']:.1f} MB")


if __name__ == "__main__":
    main()
