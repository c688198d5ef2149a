"""HD95 + ASD on 20 full-resolution-sized LA pairs: crlnseg (library and CLI) vs medpy, same run.

    python benchmarks/evaluate_speed.py [--cases 20] [--repeats 3] [--out FILE.json]
    python benchmarks/evaluate_speed.py --crossover

The pairs (written as NIfTI to a temporary folder outside the repository, removed at the end
unless ``--keep``). Only 2 LA cases exist at full resolution (0.625 mm), so the ground truths are
built from the half-resolution labels (1.25 mm) of the first ``--cases`` IDs of ``cases.txt``:

* ground truth: the label repeated x2 on every axis (nearest neighbour, 0.625 mm), smoothed by a
  Gaussian of sigma 1 voxel and thresholded at 0.5 (so the surface is not made of 2-voxel steps);
  volumes of 172-212 x 136-148 x 88 voxels, as the community's full-resolution files (199 x 143 x
  88 and 183 x 140 x 88 for the two cases that exist; their atrium volumes are reported next to
  those of the upsampled labels);
* prediction, seeded by the case's index: the smoothed label resampled (linear) through a smooth
  random displacement (noise on a grid of 8 voxels, Gaussian sigma 1 node, scaled to at most 6
  voxels, linearly interpolated) plus a global shift of up to 2 voxels per axis, thresholded at a
  random level in [0.35, 0.65] (under- or over-segmentation); then 1-3 false-positive balls of
  radius 4-10 voxels centred 8-30 voxels outside it, and one ball of radius 6-12 voxels removed
  around a ground-truth surface voxel (a missed part). Dice 0.88-0.92, HD95 2-4 mm, as published
  LA results at this resolution.

Timed, per pair, best of ``--repeats``: medpy 0.5.2 as users call it, ``hd95(p, g, voxelspacing)``
then ``asd(p, g, voxelspacing)``; ``crlnseg.metrics.hd95_asd`` (default: KD-tree, every core) and
the same with one thread and with the distance-transform method. Then ``crlnseg evaluate PRED GT
-o report.json`` as a subprocess (wall time, best of ``--repeats``: interpreter start, imports,
reading 40 .nii.gz files, Dice, Jaccard, HD95, ASD, the report), with ``--workers 1`` (the
default) and ``--workers 2``. Every crlnseg value is checked against medpy's (relative 1e-9) and
the largest relative difference of each side is reported.

``--crossover`` times the two ways in which :func:`crlnseg.metrics.surface_distances` can finish
a direction after its local look-up (KD-tree or distance transform) on masks whose surfaces are
dense or sparse, near or far apart (the measurement behind ``KDTREE_COST_PER_BOX``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
from scipy.ndimage import distance_transform_edt, gaussian_filter, map_coordinates, zoom

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parents[0] / "shared" / "data"
SPACING = (0.625, 0.625, 0.625)
RTOL = 1e-9


def ground_truth(label_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """The upsampled, smoothed mask and the smooth field it thresholds (for the prediction)."""
    import nibabel as nib

    label = np.asarray(nib.load(str(label_path)).dataobj) > 0
    up = label.repeat(2, 0).repeat(2, 1).repeat(2, 2).astype(np.float32)
    soft = gaussian_filter(up, 1.0)
    return soft > 0.5, soft


def _ball(shape: tuple[int, ...], center: np.ndarray, radius: float) -> np.ndarray:
    grids = np.ogrid[tuple(slice(0, s) for s in shape)]
    return sum((g - c) ** 2 for g, c in zip(grids, center, strict=True)) < radius**2


def prediction(gt: np.ndarray, soft: np.ndarray, seed: int) -> np.ndarray:
    """A realistic prediction of ``gt``: deformed, shifted, with islands and a missed part."""
    rng = np.random.default_rng(seed)
    shape = gt.shape
    coarse = tuple(-(-s // 8) + 1 for s in shape)
    coords = []
    for grid in np.indices(shape, dtype=np.float32):
        field = gaussian_filter(rng.standard_normal(coarse), 1.0)
        field *= 6.0 / np.abs(field).max()
        field = zoom(field, 8, order=1)[: shape[0], : shape[1], : shape[2]]
        coords.append(grid + field + rng.uniform(-2.0, 2.0))
    pred = map_coordinates(soft, coords, order=1, mode="constant") > rng.uniform(0.35, 0.65)
    outside = distance_transform_edt(~pred)
    near = np.argwhere((outside > 8) & (outside < 30))
    for _ in range(int(rng.integers(1, 4))):
        pred |= _ball(shape, near[rng.integers(len(near))], rng.uniform(4.0, 10.0))
    edge = np.argwhere(gt & (distance_transform_edt(gt) < 1.5))
    pred &= ~_ball(shape, edge[rng.integers(len(edge))], rng.uniform(6.0, 12.0))
    return pred


def write_pairs(ids: list[str], folder: Path) -> list[dict]:
    """``folder/{pred,gt}/<ID>.nii.gz`` (uint8, 0.625 mm); one info dict per pair."""
    import nibabel as nib

    from crlnseg.metrics import surface

    affine = np.diag([*SPACING, 1.0])
    info = []
    for side in ("pred", "gt"):
        (folder / side).mkdir(parents=True)
    for index, case in enumerate(ids):
        gt, soft = ground_truth(DATA / "la" / "labels" / f"{case}.nii.gz")
        pred = prediction(gt, soft, index)
        for side, mask in (("pred", pred), ("gt", gt)):
            nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine),
                     str(folder / side / f"{case}.nii.gz"))
        info.append({"case": case, "shape": list(gt.shape), "gt_voxels": int(gt.sum()),
                     "pred_voxels": int(pred.sum()),
                     "gt_surface_voxels": int(surface(gt).sum()),
                     "surface_voxels": int(surface(gt).sum() + surface(pred).sum())})
    return info


def originals(ids: list[str]) -> list[dict]:
    """Shape and atrium volume of the real full-resolution files among ``ids``."""
    import h5py

    from crlnseg.metrics import surface

    out = []
    for case in ids:
        path = DATA / "la_h5" / case / "mri_norm2.h5"
        if path.exists():
            with h5py.File(path, "r") as f:
                label = f["label"][:] > 0
            out.append({"case": case, "shape": list(label.shape), "voxels": int(label.sum()),
                        "surface_voxels": int(surface(label).sum())})
    return out


def best_of(repeats: int, fn: Callable[[], object]) -> tuple[float, object]:
    best, value = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        value = fn()
        best = min(best, time.perf_counter() - start)
    return best, value


def _medpy(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    from medpy.metric.binary import asd, hd95

    return hd95(pred, gt, voxelspacing=SPACING), asd(pred, gt, voxelspacing=SPACING)


DIFFERENCES: dict[str, float] = {}


def _check(ours: tuple, theirs: tuple, what: str, side: str) -> None:
    """Assert ``ours`` equals medpy's ``theirs`` to ``RTOL``; keep the largest difference."""
    ours_a, theirs_a = np.asarray(ours, dtype=float), np.asarray(theirs, dtype=float)
    np.testing.assert_allclose(ours_a, theirs_a, rtol=RTOL, atol=0.0, err_msg=what)
    relative = float(np.max(np.abs(ours_a - theirs_a) / np.abs(theirs_a)))
    DIFFERENCES[side] = max(DIFFERENCES.get(side, 0.0), relative)


def library(folder: Path, info: list[dict], repeats: int) -> dict[str, float]:
    """Per-pair times of each side, summed; values checked and stored in ``info``."""
    import nibabel as nib

    from crlnseg.metrics import hd95_asd

    sides: dict[str, Callable[[np.ndarray, np.ndarray], tuple]] = {
        "medpy": _medpy,
        "crlnseg": lambda p, g: hd95_asd(p, g, SPACING),
        "crlnseg_1_thread": lambda p, g: hd95_asd(p, g, SPACING, threads=1),
        "crlnseg_edt": lambda p, g: hd95_asd(p, g, SPACING, method="edt"),
    }
    totals = dict.fromkeys(["read", *sides], 0.0)
    for row in info:
        start = time.perf_counter()
        pred, gt = (np.asarray(nib.load(str(folder / side / f"{row['case']}.nii.gz")).dataobj)
                    .astype(bool) for side in ("pred", "gt"))
        totals["read"] += time.perf_counter() - start
        for name, fn in sides.items():
            seconds, values = best_of(repeats, partial(fn, pred, gt))
            totals[name] += seconds
            row[f"{name}_s"] = seconds
            if name == "medpy":
                row["hd95_mm"], row["asd_mm"] = values
                from medpy.metric.binary import dc

                row["dice"] = float(dc(pred, gt))
            else:
                _check(values, (row["hd95_mm"], row["asd_mm"]), f"{name}, {row['case']}", name)
        print(f"  {row['case']}: HD95 {row['hd95_mm']:.4f} mm, ASD {row['asd_mm']:.4f} mm, "
              f"medpy {row['medpy_s']:.3f} s, crlnseg {row['crlnseg_s']:.4f} s", flush=True)
    return totals


def cli(folder: Path, info: list[dict], repeats: int, workers: int) -> float:
    """Best wall time of ``crlnseg evaluate`` over the folder; its values checked."""
    report = folder / "report.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "crlnseg", "evaluate", str(folder / "pred"),
               str(folder / "gt"), "-o", str(report), "--overwrite", "--workers", str(workers)]
    seconds, _ = best_of(repeats, partial(subprocess.run, command, env=env, check=True,
                                          stderr=subprocess.DEVNULL))
    rows = {row["case"]: row for row in json.loads(report.read_text())["cases"]}
    for row in info:
        got = rows[row["case"]]
        _check((got["hd95"], got["asd"]), (row["hd95_mm"], row["asd_mm"]), f"CLI, {row['case']}",
               f"cli workers_{workers}")
    return seconds


def _finish_with(finish: str, pred: np.ndarray, ref: np.ndarray, repeats: int
                 ) -> tuple[float, list[tuple[int, int]]]:
    """Best time of ``surface_distances`` with every direction finished by ``finish``, and the
    ``(far voxels, box voxels)`` that :func:`~crlnseg.metrics.choose_method` was asked about."""
    from unittest import mock

    from crlnseg import metrics

    calls: list[tuple[int, int]] = []

    def forced(far: int, box: int) -> str:
        calls.append((far, box))
        return finish

    with mock.patch.object(metrics, "choose_method", forced):
        seconds = best_of(repeats, partial(metrics.surface_distances, pred, ref, (0.7, 0.7, 1.5),
                                           threads=1))[0]
    return seconds, calls


def crossover(repeats: int) -> list[dict]:
    """Both ways of finishing a direction (after the local look-up) on masks whose surfaces are
    more or less dense and more or less far apart, in a 120 x 120 x 80 box."""
    rng = np.random.default_rng(0)
    shape, rows = (120, 120, 80), []
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    ball = sum((g - c) ** 2 for g, c in zip(grid, (40, 60, 40), strict=True)) < 25**2
    apart_p, apart_r = np.zeros(shape, bool), np.zeros(shape, bool)
    apart_p[:60] = rng.random((60, *shape[1:])) < 0.3
    apart_r[60:] = rng.random((60, *shape[1:])) < 0.3
    cases = {"noise 0.3, two halves": (apart_p, apart_r),
             "ball, shifted 20 voxels": (ball, np.roll(ball, 20, axis=0))}
    for density in (0.3, 0.03):
        cases[f"noise {density:g}"] = (rng.random(shape) < density, rng.random(shape) < density)
    for sigma in (1.0, 4.0, 16.0):
        fields = [gaussian_filter(rng.standard_normal(shape), sigma) for _ in range(2)]
        cases[f"unrelated blobs, sigma {sigma:g}"] = tuple(f > 0.3 * f.std() for f in fields)
    for name, (pred, ref) in cases.items():
        row: dict = {"masks": name}
        for finish in ("kdtree", "edt"):
            row[f"{finish}_s"], calls = _finish_with(finish, pred, ref, repeats)
        row["far_voxels"] = [far for far, _ in calls[:2]]
        row["box_voxels"] = calls[0][1] if calls else 0
        row["box_per_far_voxel"] = row["box_voxels"] / max(1, sum(row["far_voxels"]) / 2)
        rows.append(row)
        print(f"{name}: far voxels {row['far_voxels']} of a {row['box_voxels']}-voxel box "
              f"({row['box_per_far_voxel']:.1f} box voxels per far voxel), finishing with "
              f"kdtree {row['kdtree_s']:.3f} s, edt {row['edt_s']:.3f} s", flush=True)
    return rows


def _commit() -> str:
    """The short commit, with ``+dirty`` when the tree has uncommitted changes."""
    git = ["git", "-C", str(ROOT)]
    commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return commit + ("+dirty" if dirty else "")


def _summary(result: dict, totals: dict[str, float], timed: dict[str, float]) -> None:
    pairs = result["pairs"]

    def span(key: str) -> str:
        values = [row[key] for row in pairs]
        if isinstance(values[0], int):
            return f"{min(values)}-{max(values)}"
        return f"{min(values):.4g}-{max(values):.4g}"

    print(f"{len(pairs)} pairs: GT {span('gt_voxels')} voxels, Dice {span('dice')}, "
          f"HD95 {span('hd95_mm')} mm, ASD {span('asd_mm')} mm, surfaces "
          f"{span('surface_voxels')} voxels")
    for row in result["originals"]:
        mine = next(p for p in pairs if p["case"] == row["case"])
        print(f"  {row['case']}: full-resolution file {row['shape']}, {row['voxels']} atrium "
              f"voxels, {row['surface_voxels']} on its surface; upsampled label {mine['shape']}, "
              f"{mine['gt_voxels']} voxels, {mine['gt_surface_voxels']} on its surface")
    print(f"reading the {2 * len(pairs)} files (nibabel): {totals['read']:.3f} s")
    print(f"medpy hd95 + asd: {totals['medpy']:.3f} s")
    for name, seconds in timed.items():
        print(f"{name}: {seconds:.3f} s, medpy / this = {totals['medpy'] / seconds:.1f}x, "
              f"largest relative difference to medpy {DIFFERENCES[name]:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=20, help="first N IDs of cases.txt")
    parser.add_argument("--repeats", type=int, default=3, help="timings per side (best kept)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the pairs' folder")
    parser.add_argument("--crossover", action="store_true", help="time the two methods only")
    args = parser.parse_args()
    result: dict = {"command": " ".join(["python", "benchmarks/evaluate_speed.py", *sys.argv[1:]]),
                    "date": datetime.date.today().isoformat(), "commit": _commit(),
                    "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
                    "spacing_mm": SPACING}
    if args.crossover:
        result["crossover"] = crossover(args.repeats)
    else:
        ids = (DATA / "la" / "cases.txt").read_text().split()[: args.cases]
        folder = Path(tempfile.mkdtemp(prefix="crlnseg-evaluate-speed-"))
        try:
            print(f"writing {len(ids)} pairs to {folder}", flush=True)
            info = write_pairs(ids, folder)
            result["originals"] = originals(ids)
            totals = library(folder, info, args.repeats)
            result["library_s"] = totals
            result["cli_s"] = {f"workers_{w}": cli(folder, info, args.repeats, w) for w in (1, 2)}
            result["pairs"] = info
        finally:
            if args.keep:
                print(f"pairs kept in {folder}")
            else:
                shutil.rmtree(folder)
        medpy = totals["medpy"]
        timed = {**{k: v for k, v in totals.items() if k not in ("medpy", "read")},
                 **{f"cli {k}": v for k, v in result["cli_s"].items()}}
        result["ratios"] = {f"medpy / {k}": medpy / v for k, v in timed.items()}
        result["max_relative_difference_to_medpy"] = DIFFERENCES
        _summary(result, totals, timed)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
