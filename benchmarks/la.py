"""The literature's semi-supervised Left Atrium setting, at half resolution, on the CPU.

Labelled = the first 8 (or 16) IDs of ``cases.txt``, as in the literature; since the literature's
20 test cases are withheld from this data, 16 of its 80 training cases are held out for validation
(``--fold``: 1 = cases 65-80, on which every default was decided; 2 = 49-64; 3 = 33-48) and the
unlabelled set is the rest (56 or 48 scans, where the literature has 72 or 64).
``benchmarks/la_folds.py`` combines the folds. Validation cases are never used for training or
checkpoint choice: every number comes from the LAST checkpoint. Runs are trained without
``--val`` and predicted with ``--no-tuned`` (the built-in blending), so that no choice is made on
the reported cases.
Methods ``supervised``, ``mean-teacher`` and ``crln`` share the backbone,
patch, iterations and seed; each run goes through the public CLI (``crlnseg train``, ``predict``,
``evaluate``, ``rectify``) as a user would run it. Per run it records Dice, Jaccard, HD95 and ASD
(voxels and mm), empty predictions, the wall time, and for ``crln`` the Dice of raw vs rectified
pseudo-labels on the unlabelled cases and the reliable-voxel share before/after rectification over
training (``metrics.jsonl``). Output: ``<out>/la_<L>.json`` (every number), ``la_<L>.md``
(mean +- std over seeds) and ``la_<L>.png``. Runs that an earlier invocation wrote there under the
same protocol (other methods or seeds) stay in the table, so seeds can be added one at a time.

Resumable: a finished run (``checkpoints/last.pt`` at the final iteration) is not retrained, an
unfinished one is continued with ``--resume``, and finished predictions/evaluations are reused
when they were made with the same predict flags (stamped in ``pred_<method>.flags.json``).

    python benchmarks/la.py --labelled 8 --seeds 0 1 2 --sigma 0.125   # the table of RESULTS.md
    python benchmarks/la.py --iterations 5 --limit-val 2 --limit-unlabelled 2 --out /tmp/la-smoke
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "la"
# name -> (crlnseg train --method, --set overrides, extra crlnseg predict flags). The crln-*
# variants are the paper's components one at a time (ablations); "no rectify" also predicts with
# f alone, since its M(x) was never used to rectify anything.
VARIANTS: dict[str, tuple[str, list[str], list[str]]] = {
    "supervised": ("supervised", [], []),
    "mean-teacher": ("mean-teacher", [], []),
    "crln": ("crln", [], []),
    "crln-no-rectify": ("crln", ["method.rectify=false"], ["--no-rectify"]),
    "crln-no-ps": ("crln", ["method.positive_supervision=false"], []),
    # Neither component: mean teacher plus the DIM and its relation loss on labelled crops.
    "crln-dim-only": ("crln", ["method.rectify=false", "method.positive_supervision=false"],
                      ["--no-rectify"]),
    # mu fitted on the teacher's strong view of the labelled crops, with an lr that lets it
    # converge within the cpu preset's 1000 iterations (RESULTS.md, "mu").
    "crln-strong-mu": ("crln", ["method.mu_view=strong", "method.mu_lr=0.01"], []),
}
METHODS = tuple(VARIANTS)
DEFAULT_METHODS = ("supervised", "mean-teacher", "crln")
METRICS = ("dice", "jaccard", "hd95", "asd")
COST = {"crln": 3, "mean-teacher": 2, "supervised": 1}  # relative time per iteration (by --method)
# metrics.jsonl: share of unlabelled voxels whose teacher confidence reaches the threshold.
RELIABLE_BEFORE, RELIABLE_AFTER = "confident_raw", "confident_rectified"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="folder with images/ labels/ cases.txt")
    p.add_argument("--labelled", type=int, choices=(8, 16), default=8)
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(DEFAULT_METHODS),
                   help="crln-no-rectify / crln-no-ps / crln-dim-only: crln without one or both "
                        "components (ablations)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--fold", type=int, choices=sorted(FOLDS), default=1,
                   help="validation fold: 1 = cases 65-80 (decisions were taken on it), "
                        "2 = 49-64, 3 = 33-48; outputs la_<L>[_fold<N>]")
    p.add_argument("--iterations", type=int, default=None, help="default: the preset's")
    p.add_argument("--preset", default="cpu")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every `crlnseg train` (repeatable)")
    p.add_argument("--test", type=Path, default=None,
                   help="an extra labelled folder (images/ labels/) to evaluate every run on")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--sigma", type=float, default=None,
                   help="Gaussian sigma of crlnseg predict / rectify (default: crlnseg's, "
                   "0.125; the LA tables of RESULTS.md pin it)")
    p.add_argument("--tuned", action="store_true",
                   help="predict / rectify with the blending a run chose on its validation set, "
                   "if it has one (default: --no-tuned, the built-in blending)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at the same time, each with cores/jobs threads (on a "
                        "2-core CPU, --jobs 2 finishes sooner than 2 threads per run)")
    p.add_argument("--crlnseg", default=None, help="the crlnseg executable (default: this venv's)")
    # Hidden: shrink the protocol to check the script end to end in a minute.
    p.add_argument("--limit-val", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--limit-unlabelled", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# Validation folds: cases 65-80 (fold 1, the one every default was decided on), 49-64, 33-48.
FOLDS = {1: (64, 80), 2: (48, 64), 3: (32, 48)}


def split_ids(cases: list[str], labelled: int, fold: int = 1) -> dict[str, list[str]]:
    """First ``labelled`` (the literature's) / the fold's 16 cases held out / the rest of the 80
    unlabelled (fold 1: cases 9-64, as the earlier single-split protocol)."""
    if len(cases) < 80:
        sys.exit(f"cases.txt lists {len(cases)} cases; the protocol needs 80")
    lo, hi = FOLDS[fold]
    return {"labelled": cases[:labelled],
            "unlabelled": cases[labelled:lo] + cases[hi:80],
            "validation": cases[lo:hi]}


def link_split(folder: Path, ids: list[str], data: Path, kinds: tuple[str, ...]) -> Path:
    """``folder/<kind>/<ID>.nii.gz`` symlinks to ``data/<kind>/`` for each kind; idempotent."""
    for kind in kinds:
        (folder / kind).mkdir(parents=True, exist_ok=True)
        wanted = {f"{cid}.nii.gz" for cid in ids}
        for stale in set(os.listdir(folder / kind)) - wanted:
            (folder / kind / stale).unlink()
        for name in wanted - set(os.listdir(folder / kind)):
            (folder / kind / name).symlink_to((data / kind / name).resolve())
    return folder


class RunFailed(RuntimeError):
    """A crlnseg command exited with an error (its log names the cause)."""


class Runner:
    """Runs crlnseg commands, logging each command line and its stderr next to the run folder."""

    def __init__(self, exe: str, threads: int | None = None) -> None:
        self.exe = exe
        self.env = dict(os.environ)
        if threads is not None:  # parallel jobs: one intra-op thread pool each, no oversubscription
            self.env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))

    def __call__(self, args: list[Any], log: Path, stdout: Path | None = None) -> None:
        cmd = [self.exe, *map(str, args)]
        print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as err, open(stdout or os.devnull, "w") as out:
            err.write("$ " + " ".join(cmd) + "\n")
            err.flush()
            done = subprocess.run(cmd, stdout=out, stderr=err, env=self.env)
        if done.returncode:
            tail = log.read_text().splitlines()[-5:]
            raise RunFailed(f"failed ({done.returncode}): {' '.join(cmd)} (log: {log})\n"
                            + "\n".join(tail))


def prepare(crlnseg: Runner, split: Path, cache: Path) -> Path:
    """Prepare a split once for all runs (train would otherwise prepare it in every run folder)."""
    if not (cache / "dataset.json").is_file():
        crlnseg(["prepare", split, "-o", cache, "--overwrite"], cache.parent / "prepare.log")
    return cache


def finished_iteration(run: Path) -> int | None:
    """The iteration stored in ``run/checkpoints/last.pt``, or None without a checkpoint."""
    last = run / "checkpoints" / "last.pt"
    if not last.is_file():
        return None
    from crlnseg.checkpoint import load_checkpoint  # torch: only when a run exists

    return int(load_checkpoint(last)["meta"]["iteration"])


def train(crlnseg: Runner, run: Path, method: str, seed: int, data: dict[str, Path],
          args: argparse.Namespace, iterations: int) -> float | None:
    """Train (or resume, or skip) one run; returns its training wall time in seconds."""
    timing = run / "benchmark_time.json"
    previous = json.loads(timing.read_text())["train_seconds"] if timing.exists() else None
    done = finished_iteration(run)
    if done is not None and done >= iterations:
        return previous  # finished earlier (None: finished outside this script)
    cmd = ["train", "--labelled", data["labelled_cache"], "--unlabelled", data["unlabelled_cache"],
           "-o", run, "--preset", args.preset, "--method", VARIANTS[method][0], "--seed", seed,
           "--iterations", iterations]
    for item in [*VARIANTS[method][1], *args.overrides]:
        cmd += ["--set", item]
    if done is not None:
        cmd.append("--resume")  # an interrupted benchmark continues where it stopped
    elif run.exists():
        cmd.append("--overwrite")  # a run folder without any checkpoint holds nothing to keep
    for derived in [*run.glob("pred_*"), *run.glob("eval_*"), run / "rectify_unlabelled"]:
        if derived.is_dir():  # made by an earlier, shorter run: stale once training continues
            shutil.rmtree(derived)
        elif derived.exists():
            derived.unlink()
    start = time.perf_counter()
    crlnseg(cmd, run.parent / f"{run.name}.log")
    seconds = (previous or 0.0) + time.perf_counter() - start
    timing.write_text(json.dumps({"train_seconds": seconds}))
    return seconds


def count_empty(folder: Path) -> int:
    import nibabel as nib

    return sum(int(not np.asarray(nib.load(p).dataobj).any()) for p in sorted(folder.iterdir())
               if p.name.endswith((".nii.gz", ".nii")))


def _stamp(folder: Path, flags: list[str]) -> None:
    """Record next to ``folder`` the CLI flags its outputs were made with."""
    folder.with_name(folder.name + ".flags.json").write_text(json.dumps([str(f) for f in flags]))


def _same_flags(folder: Path, flags: list[str]) -> bool:
    """Reuse outputs only when made with the same flags (e.g. ``--sigma``); unstamped: no."""
    stamp = folder.with_name(folder.name + ".flags.json")
    return stamp.is_file() and json.loads(stamp.read_text()) == [str(f) for f in flags]


def evaluate(crlnseg: Runner, run: Path, name: str, split: Path, flags: list[str]) -> dict:
    """Predict ``split/images`` with the last checkpoint, evaluate in voxels and in mm."""
    pred, log = run / f"pred_{name}", run.parent / f"{run.name}.log"
    expected = len(list((split / "images").iterdir()))
    reports = [run / f"eval_{name}_{units}.json" for units in ("voxel", "mm")]
    if (not pred.is_dir() or len(list(pred.glob("*.nii*"))) != expected
            or not _same_flags(pred, flags)):
        for report in reports:  # they score the predictions about to be replaced
            report.unlink(missing_ok=True)
        crlnseg(["predict", split / "images", "-o", pred, "-m", run, "--overwrite", *flags], log)
        _stamp(pred, flags)
    result: dict = {"empty_predictions": count_empty(pred), "cases": expected}
    for units, flag in (("voxel", ["--voxel-units"]), ("mm", [])):
        report = run / f"eval_{name}_{units}.json"
        if not report.exists():
            crlnseg(["evaluate", pred, split / "labels", "--format", "json", "-o", report, *flag],
                    log)
        data = json.loads(report.read_text())
        result[units] = {m: data["summary"]["1"][m]["mean"] for m in METRICS}
        result[units]["undefined_distances"] = data["summary"]["1"]["hd95"].get("n_undefined", 0)
        result[units + "_cases"] = data["cases"]
    return result


def rectify(crlnseg: Runner, run: Path, images: Path, labels: Path,
            flags: list[str] | tuple[str, ...] = ()) -> dict:
    """Raw vs rectified pseudo-label quality on the unlabelled cases (``rectify --labels``)."""
    out = run / "rectify_unlabelled"
    if not (out / "summary.json").exists() or not _same_flags(out, list(flags)):
        crlnseg(["rectify", images, "-o", out, "-m", run, "--labels", labels, "--overwrite",
                 *flags],
                run.parent / f"{run.name}.log")
        _stamp(out, list(flags))
    summary = json.loads((out / "summary.json").read_text())
    return {"pseudo_dice_raw": summary["mean"].get("dice_raw"),
            "pseudo_dice_rectified": summary["mean"].get("dice_rectified"),
            "reliable_raw": summary["mean"].get("reliable_raw"),
            "reliable_rectified": summary["mean"].get("reliable_rectified"),
            "mu": summary["mean"].get("mu"), "summary": str(out / "summary.json")}


def reliable_curve(run: Path) -> dict[str, list[float]]:
    """Iteration and reliable-voxel share before/after rectification, from ``metrics.jsonl``."""
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
            if line.strip()]
    keys = {"before": RELIABLE_BEFORE, "after": RELIABLE_AFTER}
    curve: dict[str, list[float]] = {"iteration": [], "before": [], "after": []}
    for row in rows:
        if all(k in row for k in keys.values()) and "iteration" in row:
            curve["iteration"].append(row["iteration"])
            for side, key in keys.items():
                curve[side].append(row[key])
    return curve



def _mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    vals = [v for v in values if v is not None]
    return (float(np.mean(vals)), float(np.std(vals))) if vals else (None, None)


def summarise(runs: list[dict], methods: list[str], names: list[str]) -> dict:
    """Mean and std over seeds of every summary number, per method and evaluation set."""
    table: dict = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        entry: dict = {"seeds": [r["seed"] for r in mine],
                       "train_seconds": _mean_std([r["train_seconds"] for r in mine])}
        for name in names:
            for units in ("voxel", "mm"):
                for m in METRICS:
                    entry[f"{name}/{m}_{units}"] = _mean_std([r[name][units][m] for r in mine])
            entry[f"{name}/empty_predictions"] = sum(r[name]["empty_predictions"] for r in mine)
        if VARIANTS[method][0] == "crln":
            for key in ("pseudo_dice_raw", "pseudo_dice_rectified"):
                entry[key] = _mean_std([r["pseudo"].get(key) for r in mine])
        table[method] = entry
    return table


def _cell(pair: tuple[float | None, float | None], scale: float = 1.0, digits: int = 2) -> str:
    mean, std = pair
    return "n/a" if mean is None else f"{scale * mean:.{digits}f} ± {scale * std:.{digits}f}"


def markdown(table: dict, names: list[str], meta: dict) -> str:
    lines = [f"LA, {meta['labelled']} labelled / {meta['unlabelled']} unlabelled, "
             f"preset `{meta['preset']}`, {meta['iterations']} iterations, seeds {meta['seeds']}; "
             "last checkpoint; mean ± std over seeds.", ""]
    for name in names:
        lines += [f"**{name}** ({meta['cases'][name]} cases)", "",
                  "| method | Dice % | Jaccard % | HD95 vox | ASD vox | HD95 mm | ASD mm "
                  "| empty | train min |", "|---|---|---|---|---|---|---|---|---|"]
        for method, e in table.items():
            lines.append(
                f"| {method} | {_cell(e[f'{name}/dice_voxel'], 100)} "
                f"| {_cell(e[f'{name}/jaccard_voxel'], 100)} | {_cell(e[f'{name}/hd95_voxel'])} "
                f"| {_cell(e[f'{name}/asd_voxel'])} | {_cell(e[f'{name}/hd95_mm'])} "
                f"| {_cell(e[f'{name}/asd_mm'])} | {e[f'{name}/empty_predictions']} "
                f"| {_cell(e['train_seconds'], 1 / 60, 1)} |")
        lines.append("")
    for method, e in table.items():
        if "pseudo_dice_raw" in e:
            lines += [f"Pseudo-labels of `{method}` on the unlabelled cases (last checkpoint, "
                      f"Dice %): raw {_cell(e['pseudo_dice_raw'], 100)}, rectified "
                      f"{_cell(e['pseudo_dice_rectified'], 100)}.", ""]
    return "\n".join(lines)


def plot(runs: list[dict], table: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    methods = list(table)
    for i, method in enumerate(methods):
        dice = [100 * r["validation"]["voxel"]["dice"] for r in runs if r["method"] == method]
        left.bar(i, np.mean(dice), yerr=np.std(dice), color=f"C{i}", alpha=0.6, capsize=4)
        left.scatter([i] * len(dice), dice, color="k", s=12, zorder=3)
    left.set_xticks(range(len(methods)), methods)
    left.set_ylabel("validation Dice % (cases 65-80)")
    left.set_title("Dice per method (bars: mean ± std, dots: seeds)")
    for r in runs:
        if r["method"] == "crln" and r["reliable"]["iteration"]:
            c = r["reliable"]
            right.plot(c["iteration"], c["before"], "C0", alpha=0.6)
            right.plot(c["iteration"], c["after"], "C3", alpha=0.6)
    right.plot([], [], "C0", label="before rectification")
    right.plot([], [], "C3", label="after rectification")
    right.set_xlabel("iteration")
    right.set_ylabel("reliable-voxel share")
    right.set_title("crln: reliable pseudo-labels (one line per seed)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sibling = Path(sys.executable).with_name("crlnseg")  # this interpreter's environment first
    exe = args.crlnseg or (str(sibling) if sibling.exists() else shutil.which("crlnseg"))
    if exe is None:
        sys.exit("crlnseg is not installed in this environment (pip install -e .)")
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if args.jobs > 1 else None
    crlnseg = Runner(exe, threads)
    cases = (args.data / "cases.txt").read_text().split()
    ids = split_ids(cases, args.labelled, args.fold)
    ids["validation"] = ids["validation"][:args.limit_val]
    ids["unlabelled"] = ids["unlabelled"][:args.limit_unlabelled]
    stem_name = f"la_{args.labelled}" + ("" if args.fold == 1 else f"_fold{args.fold}")
    root = args.out / stem_name
    stem = args.out / stem_name
    # The unlabelled folder holds images only; their labels ("truth") are kept apart, for
    # scoring pseudo-labels with rectify --labels, never for training.
    kinds = {"labelled": ("images", "labels"), "unlabelled": ("images",),
             "unlabelled_truth": ("labels",), "validation": ("images", "labels")}
    root.mkdir(parents=True, exist_ok=True)
    with open(stem.with_suffix(".lock"), "w") as lock:  # two invocations may share one output
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = {name: link_split(root / "data" / name, ids[name.removesuffix("_truth")],
                                 args.data, kind) for name, kind in kinds.items()}
        for name in ("labelled", "unlabelled"):
            data[f"{name}_cache"] = prepare(crlnseg, data[name], root / "prepared" / name)
    evals = {"validation": data["validation"]}
    if args.test is not None:
        evals["test"] = args.test
    iterations = args.iterations or _preset_iterations(args.preset)
    start = time.perf_counter()
    # Longest runs first, so parallel jobs finish together; results keep the seed/method order.
    order = [(seed, method) for seed in args.seeds for method in args.methods]
    todo = sorted(order, key=lambda job: -COST[VARIANTS[job[1]][0]])
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {job: pool.submit(run_one, crlnseg, root / "runs" / f"{job[1]}_seed{job[0]}",
                                    job[1], job[0], data, evals, args, iterations)
                   for job in todo}
        try:
            runs = [futures[job].result() for job in order]
        except RunFailed as err:
            for future in futures.values():
                future.cancel()
            sys.exit(str(err))
    names = list(evals)
    meta = {"labelled": len(ids["labelled"]), "unlabelled": len(ids["unlabelled"]),
            "preset": args.preset, "iterations": iterations, "seeds": args.seeds,
            "overrides": args.overrides, "defaults": recipe_defaults(), "splits": ids,
            "fold": args.fold,
            "cases": {n: len(list((s / "images").iterdir())) for n, s in evals.items()},
            "wall_seconds_this_invocation": time.perf_counter() - start, "jobs": args.jobs,
            "command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])])}
    with open(stem.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        runs, meta = merge_earlier(stem.with_suffix(".json"), runs, meta)
        methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
        table = summarise(runs, methods, names)
        (stem.with_suffix(".json")).write_text(json.dumps({"meta": meta, "summary": table,
                                                           "runs": runs}, indent=2) + "\n")
        text = markdown(table, names, meta)
        stem.with_suffix(".md").write_text(text + "\n")
        plot(runs, table, stem.with_suffix(".png"))
    print(text)


# What makes two invocations' runs comparable (the same protocol), so that they share a table.
PROTOCOL = ("labelled", "unlabelled", "preset", "iterations", "overrides", "defaults", "fold",
            "cases")


def recipe_defaults() -> dict:
    """The default augmentation and model settings: ``overrides`` alone do not say what a run
    trained with once a default changes."""
    from crlnseg.settings import AugmentSettings, ModelSettings

    return {"augment": AugmentSettings().model_dump(mode="json"),
            "model": ModelSettings().model_dump(mode="json")}


def merge_earlier(path: Path, runs: list[dict], meta: dict) -> tuple[list[dict], dict]:
    """``runs`` plus the runs of an earlier invocation's ``path`` under the same protocol (other
    methods or seeds; this invocation's run replaces an earlier one of the same method and seed),
    so that seeds and methods can be added one invocation at a time."""
    if not path.is_file():
        return runs, meta
    earlier = json.loads(path.read_text())
    old = earlier.get("meta", {})
    if any(old.get(k) != meta.get(k) for k in PROTOCOL):
        print(f"{path}: an earlier table with another protocol is replaced", file=sys.stderr)
        return runs, meta
    mine = {(r["method"], r["seed"]) for r in runs}
    kept = [r for r in earlier["runs"] if (r["method"], r["seed"]) not in mine]
    merged = sorted(kept + runs, key=lambda r: (r["seed"], METHODS.index(r["method"])))
    seeds = sorted({r["seed"] for r in merged})
    return merged, {**meta, "seeds": seeds,
                    "commands": [*old.get("commands", [old.get("command")]), meta["command"]]}


def run_one(crlnseg: Runner, run: Path, method: str, seed: int, data: dict[str, Path],
            evals: dict[str, Path], args: argparse.Namespace, iterations: int) -> dict:
    """Train, predict, evaluate (and rectify for crln) one method and seed."""
    sigma = [] if args.sigma is None else ["--sigma", str(args.sigma)]
    # Trained without --val, the runs carry no blending choice; --no-tuned also keeps any reused
    # run that has one (chosen on which cases?) on the built-in blending.
    sigma += [] if args.tuned else ["--no-tuned"]
    record: dict = {"method": method, "seed": seed, "run": str(run),
                    "train_seconds": train(crlnseg, run, method, seed, data, args, iterations)}
    for name, split in evals.items():
        record[name] = evaluate(crlnseg, run, name, split, VARIANTS[method][2] + sigma)
    if VARIANTS[method][0] == "crln":
        record["pseudo"] = rectify(crlnseg, run, data["unlabelled"] / "images",
                                   data["unlabelled_truth"] / "labels", sigma)
        record["reliable"] = reliable_curve(run)
    minutes = (record["train_seconds"] or 0.0) / 60
    print(f"{method} seed {seed}: validation Dice {100 * record['validation']['voxel']['dice']:.2f}"
          f" (trained in {minutes:.1f} min)", file=sys.stderr, flush=True)
    return record


def _preset_iterations(preset: str) -> int:
    from crlnseg.settings import PRESETS, RunSettings

    return int(PRESETS[preset].get("train", {}).get("iterations",
                                                    RunSettings().train.iterations))


if __name__ == "__main__":
    main()
