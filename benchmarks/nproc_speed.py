"""Data-parallel training on the CPU: iteration time and weights of two source trees, same run.

Runs ``crlnseg train --device cpu --nproc N`` (cpu preset, CRLN, half-resolution LA: the first 8
IDs of ``cases.txt`` labelled, the next 16 unlabelled) once per tree and repeat, trees
alternating, each with its own ``PYTHONPATH``. Reports the median ``it_per_s`` of the
``metrics.jsonl`` windows after the first (start-up excluded) per tree, their ratio, and the
largest absolute difference between the trees' final student and teacher weights (same seed: a
different gradient reduction shows up here).

    git worktree add --detach /tmp/crlnseg-old <commit>
    python benchmarks/nproc_speed.py --trees /tmp/crlnseg-old . --iterations 40 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "la"


def _link_cases(ids: list[str], folder: Path, labels: bool) -> Path:
    (folder / "images").mkdir(parents=True)
    if labels:
        (folder / "labels").mkdir()
    for case in ids:
        (folder / "images" / f"{case}.nii.gz").symlink_to(DATA / "images" / f"{case}.nii.gz")
        if labels:
            (folder / "labels" / f"{case}.nii.gz").symlink_to(DATA / "labels" / f"{case}.nii.gz")
    return folder


def _prepare(tree: Path, raw: Path, out: Path) -> Path:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    subprocess.run([sys.executable, "-m", "crlnseg", "prepare", str(raw), "-o", str(out)],
                   env=env, check=True, stdout=subprocess.DEVNULL)
    return out


def _train(tree: Path, lab: Path, unl: Path, run: Path, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "crlnseg", "train", "--labelled", str(lab), "--unlabelled",
           str(unl), "-o", str(run), "--preset", "cpu", "--device", "cpu", "--nproc",
           str(args.nproc), "--iterations", str(args.iterations), "--log-every",
           str(args.log_every), "--seed", "0"]
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x]
    rates = [x["it_per_s"] for x in lines if "it_per_s" in x][1:]
    return {"tree": str(tree), "wall_s": wall, "it_per_s": statistics.median(rates),
            "windows": rates}


def _max_difference(a: Path, b: Path) -> dict[str, float]:
    import torch

    sa = torch.load(a / "checkpoints" / "last.pt", weights_only=True)["state"]
    sb = torch.load(b / "checkpoints" / "last.pt", weights_only=True)["state"]
    out = {}
    for part in ("student", "teacher"):
        out[part] = max(float((sa[part][k].double() - sb[part][k].double()).abs().max())
                        for k in sa[part] if sa[part][k].is_floating_point())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trees", nargs=2, type=Path, required=True, metavar=("A", "B"))
    ap.add_argument("--iterations", type=int, default=40)
    ap.add_argument("--log-every", type=int, default=5)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/nproc_speed.json"))
    args = ap.parse_args()
    trees = [t.resolve() for t in args.trees]
    ids = (DATA / "cases.txt").read_text().split()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        lab = _prepare(trees[1], _link_cases(ids[:8], work / "raw_l", True), work / "lab")
        unl = _prepare(trees[1], _link_cases(ids[8:24], work / "raw_u", False), work / "unl")
        runs: list[dict] = []
        first: dict[int, Path] = {}
        for r in range(args.repeats):
            order = [0, 1] if r % 2 == 0 else [1, 0]
            for i in order:
                run = work / f"run_{i}_{r}"
                runs.append({**_train(trees[i], lab, unl, run, args), "repeat": r})
                first.setdefault(i, run)
                print(f"repeat {r} tree {trees[i]}: {runs[-1]['it_per_s']:.3f} it/s",
                      file=sys.stderr)
        diff = _max_difference(first[0], first[1])
    rate = {str(t): statistics.median(x["it_per_s"] for x in runs if x["tree"] == str(t))
            for t in trees}
    result = {"iterations": args.iterations, "nproc": args.nproc, "runs": runs,
              "median_it_per_s": rate, "ratio_b_over_a": rate[str(trees[1])] / rate[str(trees[0])],
              "max_abs_weight_difference": diff, "cpu_count": os.cpu_count(),
              "date": time.strftime("%Y-%m-%d")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| tree | median it/s |\n|---|---|\n" + "\n".join(
        f"| {t} | {v:.3f} |" for t, v in rate.items()))
    print(f"ratio B/A {result['ratio_b_over_a']:.3f}; max |weight difference| student "
          f"{diff['student']:.2e}, teacher {diff['teacher']:.2e}")


if __name__ == "__main__":
    main()
