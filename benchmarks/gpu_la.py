"""CRLN against supervised training on one GPU: the la8-size model, half-resolution LA, 3 folds.

The ``la8`` preset (V-Net, 16 base filters, R 16, F 64, xi 0.6) on ``../shared/data/la`` with
many more iterations than a CPU allows (the CPU tables of RESULTS.md ran 1000 with the smaller
``cpu`` model). Three disjoint validation folds, as positions in ``cases.txt``: 65-80 (the
split of ``benchmarks/la.py``), 49-64 and 33-48. Labelled: the first 8 IDs in every fold;
unlabelled: cases 9-64 less the fold's (56, 40, 40). Fold ``k`` (0, 1, 2) trains both methods
with seed ``--seed + k``: the supervised runs see the same 8 scans in every fold, so one seed
for all would train the same model three times. Every number comes from the LAST checkpoint
(no ``--val``, predicted with ``--no-tuned``), through the public CLI (``python -m crlnseg
plan / prepare / train / predict / evaluate``) as a user would run it.

Patch: ``crlnseg plan --device cuda`` on fold 65-80's training scans gives 96 x 80 x 48 (the
patch that covers the most of the median shape 96 x 72 x 44 within the la8 patch's voxel
budget); la8's own 112 x 112 x 80 is larger than every half-resolution scan (44 slices).
``--patch`` replaces it.

Concurrent by default (``--jobs 6``): the six trainings share the GPU. One la8 CRLN process
leaves the GPU idle much of the time: at 112 x 112 x 80 an iteration is 78 ms of wall time
for 49 ms of device work, with 26 host synchronisations (RESULTS.md, "CRLN iteration", GPU);
at 96 x 80 x 48 the device work shrinks with the voxels, the host's share does not, and a
supervised iteration is lighter still. Other processes' kernels fill those gaps, so six at once
should finish sooner than one after another; 16 CPU cores feed six trainers and their loaders.
``--jobs 1`` runs them one after another, longest (CRLN) first at any ``--jobs``.

Iterations (one count for every run): ``--iterations N``, or measured. Measured: the same
trainings, ``--jobs`` at a time, run ``--calibration-iterations`` (60) iterations first; the
speed of each (iterations/s of ``metrics.jsonl`` past the first 20) and its start-up time
(wall time less iterations / speed) size N so that all six finish ``--reserve`` seconds (60:
prediction and evaluation) before ``--budget`` (540 s from the script's start), with 10 %
to spare. Should they still run late, they are stopped there (SIGTERM: crlnseg saves
``last.pt``), predicted as they are and marked ``stopped_at_deadline`` with the iterations
they reached. Without measuring, ``--iterations 1500`` fits: at 13.9 it/s (la8 CRLN with AMP
at 112 x 112 x 80 on an H100, README; the smaller patch is faster) three CRLN trainings one
after another take 3 x 1500 / 13.9 = 324 s and the supervised ones about a third of that
(6.3 against 23.0 minutes on the CPU, RESULTS.md), 432 s before any gain from running
concurrently.

Output, all under ``--out``: ``gpu_la.json`` (per fold and method: mean and per-case Dice, mean
HD95 / ASD in mm, train seconds, iterations; the card, torch, crlnseg commit, plan, speeds;
rewritten after each stage, so a run cut short still leaves what it got), ``gpu_la.md`` (Dice
per fold and method) and ``gpu_la.log``; links, caches, run folders, predictions and each
command's log under ``--work`` (default ``<out>/work``).

On a GPU machine whose Python lacks some of crlnseg's dependencies (wheels fetched first with
``benchmarks/gpu_wheels.sh`` into ``.whl``), with the data at DATA (``cases.txt``, ``images/``,
``labels/``) when it is not beside the checkout, and the results in OUT:

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_la.py --data DATA --out OUT --work /tmp/gpu_la \\
        --commit COMMIT

(``--commit``: the crlnseg commit to record where the copy has no ``.git``). Check the script on
the CPU first, in under a minute on two cores (``tests/test_gpu_la_script.py`` does, on
generated scans):

    python benchmarks/gpu_la.py --device cpu --iterations 2 --limit-val 2 --limit-unlabelled 2 \\
        --patch 32 32 16 --set model.base_filters=2 --set model.prototypes_per_class=2 \\
        --set model.prototype_dim=4 --set train.num_workers=0 --out /tmp/gpu_la_smoke
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from la import DATA, RunFailed, Runner, finished_iteration, link_split

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# Validation folds: 1-based positions in cases.txt, inclusive.
FOLDS: dict[str, tuple[int, int]] = {"65-80": (65, 80), "49-64": (49, 64), "33-48": (33, 48)}
LABELLED = 8
POOL = (9, 64)  # the unlabelled scans, less the fold's
METHODS = ("crln", "supervised")  # longest first: the order trainings start in
PRESET = "la8"
SKIP = 20  # iterations before the measured speed: cuDNN's choice of kernels, allocator growth
SAFETY = 0.9  # speeds come from 40 iterations; a larger error is what the deadline stop is for
GRACE = 60.0  # seconds a stopped training gets to write last.pt before it is killed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=DATA, help="folder with images/ labels/ cases.txt")
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu_la",
                   help="gpu_la.json, gpu_la.md, gpu_la.log")
    p.add_argument("--work", type=Path, default=None,
                   help="links, caches, runs, predictions, logs (default: OUT/work)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--iterations", type=int, default=None,
                   help="per training (default: measured to fit --budget)")
    p.add_argument("--budget", type=float, default=540.0,
                   help="seconds from the start for everything (default 540: a 600 s limit less "
                        "installing the wheels and a margin)")
    p.add_argument("--reserve", type=float, default=60.0,
                   help="seconds kept after training for prediction and evaluation")
    p.add_argument("--calibration-iterations", type=int, default=60)
    p.add_argument("--jobs", type=int, default=len(FOLDS) * len(METHODS),
                   help="trainings at a time on the one device (default: all six; 1: one "
                        "after another)")
    p.add_argument("--folds", nargs="+", choices=list(FOLDS), default=list(FOLDS))
    p.add_argument("--seed", type=int, default=0, help="fold k trains with seed SEED + k")
    p.add_argument("--patch", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                   help="default: crlnseg plan's for the device")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="passed to every crlnseg train (repeatable)")
    p.add_argument("--limit-val", type=int, default=None, help="validation cases per fold")
    p.add_argument("--limit-unlabelled", type=int, default=None,
                   help="unlabelled cases per fold")
    p.add_argument("--commit", default=None,
                   help="crlnseg commit to record where the checkout has no .git")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    if args.iterations is not None and args.iterations < 1:
        p.error("--iterations must be at least 1")
    if args.calibration_iterations <= SKIP:
        p.error(f"--calibration-iterations must exceed {SKIP} (the iterations not measured)")
    return args


class Log:
    """Timestamped lines (seconds since the start) to stderr and ``gpu_la.log``."""

    def __init__(self, path: Path, start: float) -> None:
        self.start = start
        self.handle: TextIO = open(path, "w", encoding="utf-8")  # noqa: SIM115 - whole run

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.start:7.1f} s] {message}"
        print(line, file=sys.stderr, flush=True)
        self.handle.write(line + "\n")
        self.handle.flush()


class Crlnseg(Runner):
    """``python -m crlnseg ARGS`` of this checkout, whatever crlnseg is installed."""

    def __init__(self, threads: int) -> None:
        super().__init__(sys.executable, threads)
        self.env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT),
                                                               os.environ.get("PYTHONPATH")]))
        self.env["PYTHONUNBUFFERED"] = "1"

    def command(self, args: list[Any]) -> list[str]:
        return [self.exe, "-m", "crlnseg", *map(str, args)]

    def __call__(self, args: list[Any], log: Path, stdout: Path | None = None) -> None:
        super().__call__(["-m", "crlnseg", *args], log, stdout)


def fold_ids(cases: list[str], fold: str, limit_val: int | None = None,
             limit_unlabelled: int | None = None) -> dict[str, list[str]]:
    """Labelled / unlabelled / validation IDs of ``fold`` (a key of :data:`FOLDS`)."""
    if len(cases) < 80:
        sys.exit(f"cases.txt lists {len(cases)} cases; the protocol needs 80")
    first, last = FOLDS[fold]
    validation = cases[first - 1:last]
    unlabelled = [c for c in cases[POOL[0] - 1:POOL[1]] if c not in validation]
    return {"labelled": cases[:LABELLED], "unlabelled": unlabelled[:limit_unlabelled],
            "validation": validation[:limit_val]}


@dataclass
class Training:
    """One ``crlnseg train`` process."""

    fold: str
    method: str
    seed: int
    run: Path
    labelled: Path
    unlabelled: Path | None
    proc: subprocess.Popen | None = None
    stderr: TextIO | None = None
    started: float = 0.0
    seconds: float | None = None
    returncode: int | None = None
    stopped: bool = False

    @property
    def name(self) -> str:
        return f"{self.method}_fold{self.fold}"

    @property
    def log(self) -> Path:
        return self.run.parent / f"{self.run.name}.log"

    def command(self, iterations: int, patch: list[int], args: argparse.Namespace,
                log_every: int | None) -> list[Any]:
        cmd: list[Any] = ["train", "--labelled", self.labelled]
        if self.unlabelled is not None:  # supervised training never reads unlabelled scans
            cmd += ["--unlabelled", self.unlabelled]
        cmd += ["-o", self.run, "--preset", PRESET, "--method", self.method, "--seed", self.seed,
                "--iterations", iterations, "--patch", *patch, "--device", args.device,
                # last.pt alone: a periodic copy of a ~150 MB state is nothing to report on
                "--set", f"train.checkpoint_every={iterations}"]
        if log_every is not None:
            cmd += ["--log-every", log_every]
        for item in args.overrides:
            cmd += ["--set", item]
        if self.run.exists():
            cmd.append("--overwrite")
        return cmd


def run_trainings(trainings: list[Training], iterations: int, patch: list[int],
                  args: argparse.Namespace, crlnseg: Crlnseg, log: Log, deadline: float,
                  log_every: int | None = None) -> None:
    """Run ``trainings`` ``args.jobs`` at a time in list order; at ``deadline`` stop those still
    running (SIGTERM: crlnseg saves ``last.pt``) and start no more."""
    queue, running = list(trainings), []
    while queue or running:
        now = time.perf_counter()
        while queue and len(running) < args.jobs and now < deadline:
            t = queue.pop(0)
            t.run.parent.mkdir(parents=True, exist_ok=True)
            cmd = crlnseg.command(t.command(iterations, patch, args, log_every))
            log("$ " + " ".join(cmd))
            with open(t.log, "w", encoding="utf-8") as err:
                err.write("$ " + " ".join(cmd) + "\n")
            t.stderr = open(t.log, "a", encoding="utf-8")  # noqa: SIM115 - closed at the exit
            t.started = time.perf_counter()
            # Own session: the loader workers go with the trainer if it has to be killed.
            t.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=t.stderr,
                                      env=crlnseg.env, start_new_session=True)
            running.append(t)
        if queue and now >= deadline:
            for t in queue:
                log(f"{t.name}: not started, the deadline has passed")
            queue.clear()
        for t in list(running):
            assert t.proc is not None
            rc = t.proc.poll()
            if rc is None:
                if now >= deadline and not t.stopped:
                    log(f"{t.name}: still training at the deadline; stopping it")
                    t.proc.send_signal(signal.SIGTERM)
                    t.stopped = True
                elif t.stopped and now >= deadline + GRACE:
                    os.killpg(t.proc.pid, signal.SIGKILL)
                continue
            t.returncode, t.seconds = rc, time.perf_counter() - t.started
            running.remove(t)
            if t.stderr is not None:
                t.stderr.close()
            state = "done" if rc == 0 else f"exit {rc}"
            log(f"{t.name}: {state} after {t.seconds:.1f} s")
        time.sleep(0.2)


def measured_speed(run: Path, skip: int = SKIP) -> float | None:
    """Iterations per second over the ``metrics.jsonl`` windows past iteration ``skip``."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("it_per_s")]
    iterations = seconds = 0.0
    previous = 0
    for row in rows:
        window = row["iteration"] - previous
        previous = row["iteration"]
        if row["iteration"] - window >= skip:
            iterations += window
            seconds += window / row["it_per_s"]
    return iterations / seconds if seconds > 0 else None


def schedule_seconds(durations: list[float], slots: int) -> float:
    """Wall time of jobs of ``durations`` run ``slots`` at a time, each starting when a slot
    frees up, in list order."""
    free = [0.0] * max(1, min(slots, len(durations)))
    end = 0.0
    for d in durations:
        start = heapq.heappop(free)
        heapq.heappush(free, start + d)
        end = max(end, start + d)
    return end


def size_iterations(speeds: list[float], startup: float, slots: int, seconds: float) -> int:
    """The most iterations per training (a multiple of 10 from 100 up) that the trainings of
    ``speeds`` (it/s, list order), each after ``startup`` seconds, finish in ``seconds``."""
    def fits(n: int) -> bool:
        return schedule_seconds([startup + n / s for s in speeds], slots) <= seconds

    lo, hi = 0, 1
    while fits(hi) and hi < 10**7:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo // 10 * 10 if lo >= 100 else lo


def calibrate(trainings: list[Training], patch: list[int], args: argparse.Namespace,
              crlnseg: Crlnseg, log: Log, work: Path, deadline: float) -> dict[str, Any]:
    """Run the first ``--jobs`` trainings (and the first of any method they leave out) for
    ``--calibration-iterations``, ``--jobs`` at a time: speed per training and start-up time."""
    picked = trainings[:args.jobs]
    picked += [next(t for t in trainings if t.method == m) for m in METHODS
               if m not in {t.method for t in picked} and any(t.method == m for t in trainings)]
    probes = [Training(t.fold, t.method, t.seed, work / "calibration" / t.name, t.labelled,
                       t.unlabelled) for t in picked]
    n = args.calibration_iterations
    log(f"calibration: {len(probes)} trainings of {n} iterations, {args.jobs} at a time")
    run_trainings(probes, n, patch, args, crlnseg, log, deadline, log_every=10)
    result: dict[str, Any] = {"iterations": n, "skipped": SKIP, "runs": {}}
    for t in probes:
        if t.returncode != 0:
            raise RunFailed(f"calibration training {t.name} failed (exit {t.returncode}; log: "
                            f"{t.log})\n" + "\n".join(t.log.read_text().splitlines()[-5:]))
        speed = measured_speed(t.run)
        if speed is None:
            raise RunFailed(f"{t.run / 'metrics.jsonl'}: no speed past iteration {SKIP}")
        assert t.seconds is not None
        result["runs"][t.name] = {"it_per_s": speed, "seconds": t.seconds,
                                  "startup_seconds": max(0.0, t.seconds - n / speed)}
    for method in METHODS:
        speeds = [r["it_per_s"] for name, r in result["runs"].items() if name.startswith(method)]
        if speeds:
            result[f"{method}_it_per_s"] = statistics.median(speeds)
    result["startup_seconds"] = max(r["startup_seconds"] for r in result["runs"].values())
    return result


def evaluate(crlnseg: Crlnseg, t: Training, validation: Path, device: str) -> dict[str, Any]:
    """Predict the fold's validation scans with the last checkpoint; Dice and distances (mm)."""
    pred, report = t.run / "pred_validation", t.run / "eval_validation.json"
    crlnseg(["predict", validation / "images", "-o", pred, "-m", t.run, "--no-tuned",
             "--device", device, "--overwrite"], t.log)
    crlnseg(["evaluate", pred, validation / "labels", "--format", "json", "-o", report,
             "--overwrite"], t.log)
    data = json.loads(report.read_text())
    summary = data["summary"]["1"]
    return {"dice_mean": summary["dice"]["mean"],
            "dice_per_case": {c["case"]: c["dice"] for c in data["cases"] if c["class"] == 1},
            "hd95_mean_mm": summary["hd95"]["mean"], "asd_mean_mm": summary["asd"]["mean"],
            "undefined_distances": summary["hd95"].get("n_undefined", 0),
            "cases": summary["dice"]["n"]}


def git_commit(given: str | None) -> dict[str, Any]:
    if given:
        return {"commit": given, "source": "--commit"}
    try:
        head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain",
                                "--untracked-files=no"], capture_output=True, text=True,
                               check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "source": "no git checkout and no --commit"}
    return {"commit": head, "source": "git", "modified_tracked_files": bool(dirty)}


def device_info(device: str) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"device": device, "torch": torch.__version__,
                            "python": platform.python_version(), "cpu_cores": os.cpu_count()}
    if device == "cuda":
        if not torch.cuda.is_available():
            sys.exit("--device cuda, but torch sees no CUDA device")
        info.update(card=torch.cuda.get_device_name(0), cuda=torch.version.cuda,
                    cards=torch.cuda.device_count())
    else:
        info["card"] = "cpu"
    return info


def prepare(crlnseg: Crlnseg, source: Path, cache: Path) -> Path:
    """``crlnseg prepare`` into ``cache``: cases prepared before are reused, the manifest
    follows ``source`` (a rerun with other limits gets the right cases)."""
    crlnseg(["prepare", source, "-o", cache, "--overwrite"], cache.parent / "prepare.log")
    return cache


def planned_patch(crlnseg: Crlnseg, labelled: Path, unlabelled: Path, device: str,
                  work: Path) -> dict[str, Any]:
    """``crlnseg plan``'s patch for ``device`` from the labelled and unlabelled scans."""
    out = work / "plan.json"
    crlnseg(["plan", labelled, unlabelled, "--device", device, "--json"], work / "plan.log", out)
    plan = json.loads(out.read_text())
    entry = plan["plan"]["train.patch"]
    return {"patch": list(entry["value"]), "reason": entry["reason"],
            "source": f"crlnseg plan --device {device}",
            "median_shape": plan["fingerprint"]["shape_median"]}


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [f"la8-size model ({meta['preset']}), half-resolution LA, patch "
             f"{' x '.join(map(str, meta['patch']))}, {meta['iterations']} iterations "
             f"({meta['iterations_source']}), {meta['device']['card']}, torch "
             f"{meta['device']['torch']}, crlnseg {meta['crlnseg_commit']['commit']}; last "
             "checkpoint, validation Dice %.", "",
             "| fold (cases) | " + " | ".join(METHODS) + " |",
             "|---|" + "---|" * len(METHODS)]
    for fold, entry in result["folds"].items():
        cells = []
        for method in METHODS:
            r = entry["methods"].get(method, {})
            if r.get("dice_mean") is None:
                cells.append(r.get("error", "n/a").splitlines()[0][:40])
                continue
            late = " (stopped at the deadline)" if r.get("stopped_at_deadline") else ""
            cells.append(f"{100 * r['dice_mean']:.2f}, {r['iterations']} it, "
                         f"{r['train_seconds']:.0f} s{late}")
        lines.append(f"| {fold} | " + " | ".join(cells) + " |")
    means = [result["summary"].get(m, {}).get("dice_mean_over_folds") for m in METHODS]
    lines.append("| mean | " + " | ".join("n/a" if v is None else f"{100 * v:.2f}"
                                           for v in means) + " |")
    return "\n".join(lines) + "\n"


def summarise(folds: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for method in METHODS:
        dice = [f["methods"][method]["dice_mean"] for f in folds.values()
                if f["methods"].get(method, {}).get("dice_mean") is not None]
        if dice:
            summary[method] = {"dice_mean_over_folds": statistics.fmean(dice),
                               "dice_std_over_folds": statistics.pstdev(dice),
                               "folds": len(dice)}
    return summary


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    out = args.out.resolve()
    work = (args.work or out / "work").resolve()
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    log = Log(out / "gpu_la.log", start)
    json_path = out / "gpu_la.json"
    cases = (args.data / "cases.txt").read_text().split()
    splits = {f: fold_ids(cases, f, args.limit_val, args.limit_unlabelled) for f in args.folds}
    slots = min(args.jobs, len(args.folds) * len(METHODS))
    crlnseg = Crlnseg(threads=max(1, (os.cpu_count() or 1) // slots))

    # Links to the data, one labelled set for every fold; unlabelled scans without labels.
    data = work / "data"
    labelled_raw = link_split(data / "labelled", splits[args.folds[0]]["labelled"], args.data,
                              ("images", "labels"))
    raw: dict[str, dict[str, Path]] = {}
    for fold, ids in splits.items():
        raw[fold] = {"unlabelled": link_split(data / f"fold{fold}" / "unlabelled",
                                              ids["unlabelled"], args.data, ("images",)),
                     "validation": link_split(data / f"fold{fold}" / "validation",
                                              ids["validation"], args.data, ("images", "labels"))}
    meta: dict[str, Any] = {
        "command": " ".join([Path(sys.argv[0]).name, *(sys.argv[1:] if argv is None else argv)]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": device_info(args.device),
        "crlnseg_commit": git_commit(args.commit), "preset": PRESET, "data": str(args.data),
        "overrides": args.overrides, "jobs": slots, "budget_seconds": args.budget,
        "reserve_seconds": args.reserve}
    result: dict[str, Any] = {"meta": meta, "folds": {}, "summary": {}}
    log(f"{meta['device']['card']}, torch {meta['device']['torch']}, crlnseg "
        f"{meta['crlnseg_commit']['commit']}; folds {', '.join(args.folds)}; {slots} at a time")
    write_json(json_path, result)

    try:
        with ThreadPoolExecutor(max_workers=len(args.folds) + 2) as pool:
            plan = None if args.patch else pool.submit(
                planned_patch, crlnseg, labelled_raw, raw[args.folds[0]]["unlabelled"],
                args.device, work)
            labelled = pool.submit(prepare, crlnseg, labelled_raw, work / "prepared" / "labelled")
            unlabelled = {f: pool.submit(prepare, crlnseg, raw[f]["unlabelled"],
                                         work / "prepared" / f"fold{f}" / "unlabelled")
                          for f in args.folds}
            planned = plan.result() if plan else {"patch": args.patch, "source": "--patch"}
            caches = {"labelled": labelled.result(),
                      **{f: u.result() for f, u in unlabelled.items()}}
    except RunFailed as err:
        log(str(err))
        return 1
    patch = [int(v) for v in planned["patch"]]
    meta.update(patch=patch, patch_plan=planned)
    log(f"patch {' x '.join(map(str, patch))} ({planned['source']}); data prepared")

    seeds = {fold: args.seed + list(FOLDS).index(fold) for fold in args.folds}
    trainings = [Training(fold, method, seeds[fold], work / "runs" / f"{method}_fold{fold}",
                          caches["labelled"], caches[fold] if method == "crln" else None)
                 for method in METHODS for fold in args.folds]
    for fold in args.folds:
        ids = splits[fold]
        result["folds"][fold] = {"seed": seeds[fold], "labelled": ids["labelled"],
                                 "unlabelled": len(ids["unlabelled"]),
                                 "validation": ids["validation"], "methods": {}}
    deadline = start + args.budget - args.reserve
    if args.iterations is not None:
        iterations, source = args.iterations, "--iterations"
    else:
        try:
            calibration = calibrate(trainings, patch, args, crlnseg, log, work, deadline)
        except RunFailed as err:
            log(str(err))
            meta["calibration_error"] = str(err)
            write_json(json_path, result)
            return 1
        speeds = [calibration[f"{t.method}_it_per_s"] for t in trainings]
        left = deadline - time.perf_counter()
        iterations = size_iterations(speeds, calibration["startup_seconds"], slots,
                                     SAFETY * left)
        source = "measured"
        meta["calibration"] = calibration
        log("calibration: " + ", ".join(f"{m} {calibration[f'{m}_it_per_s']:.2f} it/s"
                                         for m in METHODS if f"{m}_it_per_s" in calibration)
            + f" ({slots} at a time), start-up {calibration['startup_seconds']:.1f} s; "
            f"{left:.0f} s left for training: {iterations} iterations")
        if iterations < 1:
            log("no time left to train")
            write_json(json_path, result)
            return 1
    meta.update(iterations=iterations, iterations_source=source)
    write_json(json_path, result)

    train_start = time.perf_counter()
    run_trainings(trainings, iterations, patch, args, crlnseg, log, deadline)
    meta["training_wall_seconds"] = time.perf_counter() - train_start
    failed = 0
    for t in trainings:
        entry: dict[str, Any] = {"run": str(t.run), "seed": t.seed, "train_seconds": t.seconds,
                                 "iterations_planned": iterations, "returncode": t.returncode,
                                 "stopped_at_deadline": t.stopped,
                                 "it_per_s": measured_speed(t.run)}
        try:
            done = finished_iteration(t.run) if t.returncode is not None else None
        except Exception as err:  # noqa: BLE001 - a damaged last.pt is that run's failure
            log(f"{t.name}: {err}")
            done = None
        entry["iterations"] = done
        if done is None or (t.returncode != 0 and not t.stopped):
            entry["error"] = (f"training exit {t.returncode}, log {t.log}" if t.proc
                              else "not started before the deadline")
            failed += 1
        result["folds"][t.fold]["methods"][t.method] = entry
    write_json(json_path, result)

    todo = [t for t in trainings if "error" not in result["folds"][t.fold]["methods"][t.method]]
    with ThreadPoolExecutor(max_workers=slots) as pool:
        futures = {t.name: (t, pool.submit(evaluate, crlnseg, t, raw[t.fold]["validation"],
                                           args.device)) for t in todo}
        for t, future in futures.values():
            entry = result["folds"][t.fold]["methods"][t.method]
            try:
                entry.update(future.result())
            except RunFailed as err:
                entry["error"] = str(err)
                failed += 1
                log(str(err))
                continue
            log(f"{t.name}: validation Dice {100 * entry['dice_mean']:.2f} % "
                f"({entry['iterations']} iterations, trained in {t.seconds:.0f} s)")
    result["summary"] = summarise(result["folds"])
    meta["wall_seconds"] = time.perf_counter() - start
    write_json(json_path, result)
    (out / "gpu_la.md").write_text(markdown(result))
    log(f"done in {meta['wall_seconds']:.0f} s: {json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
