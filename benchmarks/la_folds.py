"""The LA benchmark over its validation folds: per fold, the mean with a 95 % interval over
seeds x folds, and per-case paired differences between methods.

Reads ``la_<L>.json`` (fold 1, cases 65-80), ``la_<L>_fold2.json`` (49-64) and
``la_<L>_fold3.json`` (33-48) written by ``benchmarks/la.py --fold N``. Fold 1 chose every
default (blending sigma, post-processing candidates, settings); ``--report-folds`` (default 2 3)
are the folds nobody tuned on, whose means are the headline. Intervals: a t-interval over the
(seed, fold) runs' mean Dice; paired differences: per case and seed, CRLN minus each other
method (baselines and ablations), with a bootstrap 95 % interval over those pairs (10 000
resamples, seed 0) and the share of pairs CRLN wins; and each ablation minus mean teacher.

    python benchmarks/la_folds.py --labelled 8 --out benchmarks/results

``--compare DIR`` also pairs each method with the same method's runs in ``DIR`` (per fold, seed
and case): what a change of recipe did on the folds nobody tuned on.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from scipy import stats

FOLD_CASES = {1: "65-80", 2: "49-64", 3: "33-48"}


def load(folder: Path, labelled: int) -> dict[int, dict]:
    found = {}
    for fold in FOLD_CASES:
        path = folder / (f"la_{labelled}.json" if fold == 1 else f"la_{labelled}_fold{fold}.json")
        if path.is_file():
            found[fold] = json.loads(path.read_text())
    return found


def per_case(run: dict) -> dict[str, float]:
    return {c["case"]: c["dice"] for c in run["validation"]["voxel_cases"] if c["class"] == 1}


# A t-interval over two runs is wider than the Dice scale itself (t = 12.7): below three runs the
# table gives the mean and the number of runs instead.
MIN_RUNS_FOR_INTERVAL = 3


def interval(values: list[float]) -> tuple[float, float, float] | None:
    v = np.asarray(values, float)
    if v.size == 0:
        return None
    if v.size < MIN_RUNS_FOR_INTERVAL:
        return float(v.mean()), float("nan"), float("nan")
    half = stats.t.ppf(0.975, v.size - 1) * v.std(ddof=1) / np.sqrt(v.size)
    return float(v.mean()), float(v.mean() - half), float(v.mean() + half)


def paired(a: list[dict], b: list[dict]) -> dict:
    """CRLN (``a``) minus a baseline (``b``), per (fold, seed, case) present in both."""
    index = {(r["fold"], r["seed"]): per_case(r) for r in b}
    diffs = []
    for r in a:
        other = index.get((r["fold"], r["seed"]))
        if other:
            mine = per_case(r)
            diffs += [mine[c] - other[c] for c in mine if c in other]
    if not diffs:
        return {}
    d = np.asarray(diffs)
    rng = np.random.default_rng(0)
    boot = rng.choice(d, (10_000, d.size)).mean(axis=1)
    return {"mean": float(d.mean()), "ci95": [float(np.percentile(boot, 2.5)),
                                               float(np.percentile(boot, 97.5))],
            "wins": int((d > 0).sum()), "pairs": int(d.size)}


def loss_weight(run: dict) -> float | None:
    """Mean over training of the pseudo-label loss weight: the share of unlabelled voxels whose
    teacher confidence reaches the threshold, after rectification where the run rectifies."""
    curve = run.get("reliable") or {}
    before = curve.get("before", [])
    after = curve.get("after") or [None] * len(before)
    # Before rectification starts (the warm-up) and without it, the loss uses the raw share.
    values = [a if a is not None else b for a, b in zip(after, before, strict=True)]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def pseudo_labels(runs: list[dict], methods: list[str]) -> dict:
    """Per method: the unlabelled cases' pseudo-label Dice (%) raw and rectified at the last
    checkpoint, their paired difference over runs, and the mean training loss weight."""
    out = {}
    for m in methods:
        mine = [r for r in runs if r["method"] == m and r.get("pseudo")]
        if not mine:
            continue
        raw = np.array([100 * r["pseudo"]["pseudo_dice_raw"] for r in mine])
        rect = np.array([100 * r["pseudo"]["pseudo_dice_rectified"] for r in mine])
        weights = [w for r in mine if (w := loss_weight(r)) is not None]
        out[m] = {"runs": len(mine), "raw": float(raw.mean()), "rectified": float(rect.mean()),
                  "gain": float((rect - raw).mean()), "gain_runs": int((rect > raw).sum()),
                  "loss_weight": float(np.mean(weights)) if weights else None}
    return out


def combine(found: dict[int, dict], report: list[int]) -> dict:
    methods = list(dict.fromkeys(r["method"] for f in found.values() for r in f["runs"]))
    runs = [{**r, "fold": fold} for fold, f in found.items() for r in f["runs"]]
    out: dict = {"folds": {}, "methods": methods, "report_folds": report}
    for fold in found:
        out["folds"][fold] = {m: interval([100 * r["validation"]["voxel"]["dice"] for r in runs
                                           if r["method"] == m and r["fold"] == fold])
                              for m in methods}
        out["folds"][fold]["seeds"] = sorted({r["seed"] for r in runs if r["fold"] == fold})
    chosen = [r for r in runs if r["fold"] in report]
    out["report"] = {m: interval([100 * r["validation"]["voxel"]["dice"] for r in chosen
                                  if r["method"] == m]) for m in methods}
    out["runs_per_method"] = {m: sum(r["method"] == m for r in chosen) for m in methods}
    crln = [r for r in chosen if r["method"] == "crln"]
    # Every other method: the baselines, and the ablations (CRLN minus an ablation > 0 means
    # the part it removes helps).
    out["paired"] = {base: paired(crln, [r for r in chosen if r["method"] == base])
                     for base in methods if base != "crln"}
    # Each CRLN variant minus mean teacher: what the parts a variant keeps buy over the teacher
    # alone (crln-dim-only keeps the DIM's relation loss only).
    out["pseudo_labels"] = pseudo_labels(chosen, methods)
    teacher = [r for r in chosen if r["method"] == "mean-teacher"]
    out["over_mean_teacher"] = {
        m: paired([r for r in chosen if r["method"] == m], teacher)
        for m in methods if m.startswith("crln-") and teacher}
    return out


def markdown(res: dict, labelled: int) -> str:
    def cell(t):
        if t is None:
            return "-"
        mean, lo, hi = t
        return f"{mean:.2f}" + ("" if np.isnan(lo) else f" [{lo:.2f}, {hi:.2f}]")

    methods = res["methods"]
    lines = [f"LA, {labelled} labelled, Dice % (mean [95 % interval over runs]); fold 1 chose "
             "the defaults.", "", "| fold (cases) | seeds | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for fold, row in sorted(res["folds"].items()):
        lines.append(f"| {fold} ({FOLD_CASES[fold]}) | {len(row['seeds'])} | "
                     + " | ".join(cell(row.get(m)) for m in methods) + " |")
    folds = ", ".join(str(f) for f in res["report_folds"])
    runs = res["runs_per_method"].get("crln", 0)
    def report_cell(m: str) -> str:
        if not res["report"][m]:
            return "-"
        n = res["runs_per_method"][m]
        note = f" ({n} run{'s' * (n != 1)})" if n != runs else ""
        return f"**{cell(res['report'][m])}**" + note

    lines.append(f"| **folds {folds}** | {runs} run{'s' * (runs != 1)} | "
                 + " | ".join(report_cell(m) for m in methods) + " |")
    lines += ["", f"Paired per case and seed on folds {folds} (CRLN minus baseline, Dice points, "
              "bootstrap 95 % interval; case-seed pairs CRLN wins):", ""]
    for base, p in res["paired"].items():
        if p:
            lines.append(f"- vs {base}: {100 * p['mean']:+.2f} [{100 * p['ci95'][0]:+.2f}, "
                         f"{100 * p['ci95'][1]:+.2f}], CRLN better on {p['wins']} of "
                         f"{p['pairs']}")
    over = {m: p for m, p in res.get("over_mean_teacher", {}).items() if p}
    if over:
        lines += ["", f"Each CRLN variant minus mean-teacher on folds {folds}, paired per case "
                  "and seed (what the parts it keeps buy over the teacher alone):", ""]
        lines += [f"- {m}: {100 * p['mean']:+.2f} [{100 * p['ci95'][0]:+.2f}, "
                  f"{100 * p['ci95'][1]:+.2f}], better on {p['wins']} of {p['pairs']}"
                  for m, p in over.items()]
    pseudo = res.get("pseudo_labels", {})
    if pseudo:
        lines += ["", f"Pseudo-labels of the unlabelled cases on folds {folds}, last checkpoint "
                  "(Dice %, mean over runs; gain = rectified minus raw, runs it helps); loss "
                  "weight = share of unlabelled voxels at the confidence threshold, mean over "
                  "training (rectified where the method trains on rectified labels):", "",
                  "| method | runs | raw | rectified | gain | loss weight |",
                  "|---|---|---|---|---|---|"]
        for m, q in pseudo.items():
            w = "-" if q["loss_weight"] is None else f"{q['loss_weight']:.3f}"
            lines.append(f"| {m} | {q['runs']} | {q['raw']:.2f} | {q['rectified']:.2f} | "
                         f"{q['gain']:+.2f} ({q['gain_runs']}/{q['runs']}) | {w} |")
    return "\n".join(lines)


def compare(found: dict[int, dict], earlier: dict[int, dict], report: list[int]) -> dict:
    """Per method, these runs minus the same method's runs in ``earlier`` (another recipe or
    code state), paired per (fold, seed, case) on the report folds."""
    def runs(f: dict[int, dict]) -> list[dict]:
        return [{**r, "fold": fold} for fold, x in f.items() if fold in report for r in x["runs"]]

    now, before = runs(found), runs(earlier)
    methods = dict.fromkeys(r["method"] for r in now)
    return {m: paired([r for r in now if r["method"] == m],
                      [r for r in before if r["method"] == m]) for m in methods}


def compare_markdown(changes: dict, earlier: Path) -> str:
    lines = [f"Change per method against `{earlier}`, paired per case and seed (Dice points, "
             "bootstrap 95 % interval; case-seed pairs that gain):", ""]
    lines += [f"- {m}: {100 * p['mean']:+.2f} [{100 * p['ci95'][0]:+.2f}, "
              f"{100 * p['ci95'][1]:+.2f}], better on {p['wins']} of {p['pairs']}"
              for m, p in changes.items() if p]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labelled", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--report-folds", type=int, nargs="+", default=[2, 3])
    ap.add_argument("--compare", type=Path, metavar="DIR",
                    help="also pair each method with its runs in DIR (an earlier recipe)")
    args = ap.parse_args(argv)
    found = load(args.out, args.labelled)
    report = [f for f in args.report_folds if f in found]
    if not report:
        raise SystemExit(f"no results for folds {args.report_folds} in {args.out}")
    res = combine(found, report)
    text = markdown(res, args.labelled)
    if args.compare:
        res["compare"] = {"earlier": str(args.compare),
                          "change": compare(found, load(args.compare, args.labelled), report)}
        text += "\n\n" + compare_markdown(res["compare"]["change"], args.compare)
    (args.out / f"la_{args.labelled}_folds.json").write_text(json.dumps(res, indent=1) + "\n")
    (args.out / f"la_{args.labelled}_folds.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
