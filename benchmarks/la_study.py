"""Two studies on the LA benchmark, each a series of ``benchmarks/la.py`` runs and one table.

``recipe``: nnU-Net's training recipe inside crlnseg, one ingredient at a time (nnU-Net's
values), supervised and CRLN, on fold 1 (cases 65-80: the fold that takes decisions) with seeds
0 and 1. Each ingredient is compared with the baseline (the paper's views alone) of the same seed.

``budget``: does CRLN's margin over supervised training grow with training? The cpu preset at
1000, 2000 and 4000 iterations, on fold 2 (cases 49-64, a fold nobody tuned on), seeds 0 and 1;
1000 iterations is the fold's own table (``<out>/la_8_fold2.json``) unless ``budget/1000`` exists.

Every variant is a ``la.py`` invocation into ``<out>/<study>/<variant>/`` (resumable: finished
runs are reused), so an interrupted study continues where it stopped; ``--summarise`` only
rebuilds the table from what is there. Output: ``<out>/la_8_<study>.json`` and ``.md``.

    python benchmarks/la_study.py recipe --variants baseline spatial mirror --jobs 2
    python benchmarks/la_study.py budget --variants 2000 4000 --methods supervised crln
    python benchmarks/la_study.py recipe --summarise
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from la_folds import per_case  # beside this script

HERE = Path(__file__).resolve().parent
# nnU-Net v2's values (nnUNetTrainer.get_training_transforms and its network defaults). Elastic
# deformation is off in nnU-Net v2 (0.2 in v1), so it is listed but not in the default series.
INTENSITY = ["augment.gaussian_noise_p=0.1", "augment.blur_p=0.2", "augment.brightness_p=0.15",
             "augment.contrast_p=0.15", "augment.gamma_inverted_p=0.1", "augment.gamma_p=0.3"]
# Both studies train on the paper's views alone (the intensity augmentation, now a default, off),
# as their tables were measured: each ingredient is compared with that baseline.
PAPER_VIEWS = [item.split("=")[0] + "=0" for item in INTENSITY]
RECIPE: dict[str, list[str]] = {
    "baseline": PAPER_VIEWS,
    "spatial": [*PAPER_VIEWS, "augment.rotation_p=0.2", "augment.scale_p=0.2"],
    "mirror": [*PAPER_VIEWS, "augment.mirror_p=0.5,0.5,0.5"],
    "intensity": INTENSITY,
    "deep-supervision": [*PAPER_VIEWS, "model.deep_supervision=true"],
    "instance-norm-leaky-relu": [*PAPER_VIEWS, "model.norm=instance",
                                 "model.activation=leaky_relu"],
    "elastic": [*PAPER_VIEWS, "augment.elastic_p=0.2"],
}
RECIPE_SERIES = [name for name in RECIPE if name != "elastic"]
BUDGETS = ["1000", "2000", "4000"]
# variants: what a plain invocation runs; known: what it may run and the table shows.
STUDIES = {"recipe": {"fold": 1, "variants": RECIPE_SERIES, "known": list(RECIPE)},
           "budget": {"fold": 2, "variants": BUDGETS, "known": BUDGETS}}


def la_argv(study: str, variant: str, args: argparse.Namespace) -> list[str]:
    fold = STUDIES[study]["fold"]
    argv = ["--labelled", "8", "--fold", str(fold), "--seeds", *map(str, args.seeds),
            "--methods", *args.methods, "--jobs", str(args.jobs), "--sigma", "0.125",
            "--out", str(args.out / study / variant)]
    for item in RECIPE[variant] if study == "recipe" else PAPER_VIEWS:
        argv += ["--set", item]
    if study == "budget":
        argv += ["--iterations", variant]
    return argv


def result_file(out: Path, study: str, variant: str) -> Path:
    fold = STUDIES[study]["fold"]
    name = "la_8.json" if fold == 1 else f"la_8_fold{fold}.json"
    if study == "budget" and variant == "1000" and not (out / study / variant / name).is_file():
        return out / name  # the preset's budget: the fold's own table (same code for training)
    return out / study / variant / name


def _dice(run: dict) -> float:
    return 100 * run["validation"]["voxel"]["dice"]


def paired_cases(a: list[dict], b: list[dict]) -> dict | None:
    """Mean per (seed, case) difference a - b in Dice points, pairs a wins, pairs."""
    index = {r["seed"]: per_case(r) for r in b}
    diffs = [mine[c] - index[r["seed"]][c] for r in a if r["seed"] in index
             for mine in [per_case(r)] for c in mine if c in index[r["seed"]]]
    if not diffs:
        return None
    d = 100 * np.asarray(diffs)
    return {"mean": float(d.mean()), "wins": int((d > 0).sum()), "pairs": int(d.size)}


def variant_runs(path: Path) -> list[dict] | None:
    """The runs of a variant's table, plus those of ``earlier/<same name>`` beside it: a table of
    the same recipe from an earlier code state, which la.py keeps apart because its settings
    were spelled differently (before a default existed, rather than switched off). A run of the
    current table replaces an earlier one of the same method and seed."""
    earlier = path.parent / "earlier" / path.name
    if not path.is_file() and not earlier.is_file():
        return None
    runs = json.loads(path.read_text())["runs"] if path.is_file() else []
    if earlier.is_file():
        mine = {(r["method"], r["seed"]) for r in runs}
        runs = runs + [r for r in json.loads(earlier.read_text())["runs"]
                       if (r["method"], r["seed"]) not in mine]
    return runs


def summarise(study: str, out: Path) -> dict:
    rows: dict = {}
    for variant in STUDIES[study]["known"]:
        runs = variant_runs(result_file(out, study, variant))
        if runs is not None:
            rows[variant] = runs
    table: dict = {}
    for variant, runs in rows.items():
        entry: dict = {}
        for method in dict.fromkeys(r["method"] for r in runs):
            mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
            cell = {"seeds": {str(r["seed"]): _dice(r) for r in mine},
                    "dice": float(np.mean([_dice(r) for r in mine])),
                    "train_minutes": float(np.mean([(r["train_seconds"] or np.nan) / 60
                                                    for r in mine]))}
            base = [r for r in rows.get("baseline", []) if r["method"] == method]
            if study == "recipe" and variant != "baseline" and base:
                cell["vs_baseline"] = paired_cases(mine, base)
            entry[method] = cell
        table[variant] = entry
    if study == "budget":  # margins over the seeds every budget has, so rows compare
        both = [{r["seed"] for r in runs if r["method"] == m} for runs in rows.values()
                for m in ("crln", "supervised")]
        common = set.intersection(*both) if both else set()
        for variant, runs in rows.items():
            got = paired_cases(*([r for r in runs if r["method"] == m and r["seed"] in common]
                                 for m in ("crln", "supervised")))
            table[variant]["margin"] = got and {**got, "seeds": sorted(common)}
    return table


def markdown(study: str, table: dict) -> str:
    methods = list(dict.fromkeys(m for e in table.values() for m in e if m != "margin"))
    if study == "recipe":
        head = ["Recipe on fold 1 (cases 65-80), 8 labelled, cpu preset, 1000 iterations; Dice % "
                "(mean over the row's seeds; each seed in brackets); change = per case and seed "
                "vs the baseline of the same seed (pairs that gain).", "",
                "| ingredient | " + " | ".join(f"{m} | change" for m in methods)
                + " | train min (" + ", ".join(methods) + ") |",
                "|---|" + "---|---|" * len(methods) + "---|"]
    else:
        head = ["Iteration budget on fold 2 (cases 49-64), 8 labelled, cpu preset; Dice % "
                "(mean over the row's seeds; each seed in brackets); margin = CRLN minus "
                "supervised per case and seed, over the seeds every row has (pairs CRLN wins).",
                "",
                "| iterations | " + " | ".join(methods) + " | margin | train min |",
                "|---|" + "---|" * len(methods) + "---|---|"]
    lines = list(head)
    for variant, entry in table.items():
        cells = []
        for m in methods:
            c = entry.get(m)
            if c is None:
                cells += ["-"] + (["-"] if study == "recipe" else [])
                continue
            seeds = ", ".join(f"s{k} {v:.2f}" for k, v in c["seeds"].items())
            cells.append(f"{c['dice']:.2f} ({seeds})")
            if study == "recipe":
                v = c.get("vs_baseline")
                cells.append(f"{v['mean']:+.2f} ({v['wins']}/{v['pairs']})" if v else "-")
        if study == "budget":
            v = entry.get("margin")
            cells.append(f"{v['mean']:+.2f} ({v['wins']}/{v['pairs']})" if v else "-")
        minutes = ", ".join(f"{entry[m]['train_minutes']:.1f}" for m in methods if m in entry)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {minutes} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=sorted(STUDIES))
    ap.add_argument("--variants", nargs="+", default=None,
                    help="recipe: " + " ".join(RECIPE) + "; budget: " + " ".join(BUDGETS))
    ap.add_argument("--methods", nargs="+", default=["supervised", "crln"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE / "results")
    ap.add_argument("--summarise", action="store_true", help="only rebuild the table")
    args = ap.parse_args(argv)
    variants = args.variants or STUDIES[args.study]["variants"]
    unknown = [v for v in variants if v not in STUDIES[args.study]["known"]]
    if unknown:
        ap.error(f"unknown {args.study} variants: {' '.join(unknown)}")
    if not args.summarise:
        for variant in variants:
            cmd = [sys.executable, str(HERE / "la.py"), *la_argv(args.study, variant, args)]
            print("$ " + " ".join(cmd), file=sys.stderr, flush=True)
            if subprocess.run(cmd).returncode:
                sys.exit(f"{args.study} {variant}: la.py failed")
            write(args.study, args.out)  # after each variant, so the table grows as runs finish
    print(write(args.study, args.out))


def write(study: str, out: Path) -> str:
    table = summarise(study, out)
    (out / f"la_8_{study}.json").write_text(json.dumps(table, indent=1) + "\n")
    text = markdown(study, table)
    (out / f"la_8_{study}.md").write_text(text + "\n")
    return text


if __name__ == "__main__":
    main()
