"""Does the blending choice made on validation cases carry over to other cases?

``crlnseg train --val`` scores four candidates on its validation cases (Gaussian sigma 1/8 or 1/3,
with or without keeping the largest connected component: ``crlnseg.inference.choice``) and
``crlnseg predict`` then uses the best. This script applies the same rule
(:func:`crlnseg.inference.choice.choose`) to per-run scores that ``benchmarks/blending.py``
measured on one case set, and reports the chosen variant on another, next to the built-in default
(sigma 1/8, no post-processing) and the literature's uniform stride 18 x 18 x 4 (with and without
the post-processing). Inputs: four ``blending.py --json`` files, without and with
``--keep-largest``, for the choice cases and for the report cases:

    R=benchmarks/results/la_8/runs
    for c in 64:80 8:64; do for k in "" --keep-largest; do
      python benchmarks/blending.py $R/crln_seed{0,1,2} --cases $c $k \\
          --json crln_${c/:/_}${k:+_lcc}.json
    done; done
    python benchmarks/choice_check.py --choose crln_64_80.json crln_64_80_lcc.json \\
        --report crln_8_64.json crln_8_64_lcc.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from crlnseg.inference.choice import candidates, choose, variant_name

STRIDE = "uniform, stride 18 18 4"


def blending_key(sigma: float | None) -> str:
    """blending.py's name of a Gaussian variant at overlap 0.5."""
    return f"gaussian 1/{round(1 / sigma)}, overlap 0.5" if sigma else "uniform, overlap 0.5"


def by_run(result: dict) -> dict[str, dict[str, float]]:
    """blending.py's mean Dice per variant, keyed by run folder name."""
    return {Path(run).name: means for run, means in result["means"].items()}


def scores(plain: dict, largest: dict, run: str) -> dict[tuple[float | None, bool], float]:
    """Mean Dice of every candidate of ``crlnseg.inference.choice`` for one run."""
    return {(s, k): by_run(largest if k else plain)[run][blending_key(s)]
            for s, k in candidates(gaussian=True)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--choose", type=Path, nargs=2, required=True, metavar=("PLAIN", "LARGEST"),
                   help="blending.py JSONs of the cases the choice is made on")
    p.add_argument("--report", type=Path, nargs=2, required=True, metavar=("PLAIN", "LARGEST"),
                   help="blending.py JSONs of the cases it is reported on")
    args = p.parse_args(argv)
    choose_on, report_on = ([json.loads(f.read_text()) for f in pair]
                            for pair in (args.choose, args.report))
    flags = [r.get("keep_largest", False) for r in (*choose_on, *report_on)]
    if flags != [False, True, False, True]:
        sys.exit("each pair is PLAIN (without --keep-largest) then LARGEST (with it)")
    rows = []
    for run in by_run(report_on[0]):
        chosen = choose(scores(*choose_on, run))
        key = (chosen["sigma_scale"], chosen["keep_largest"])
        report = scores(*report_on, run)
        rows.append((run, variant_name(*key), report[key], report[(1 / 8, False)],
                     by_run(report_on[0])[run][STRIDE], by_run(report_on[1])[run][STRIDE]))
    print(f"Chosen on {len(choose_on[0]['cases'])} cases, reported on "
          f"{len(report_on[0]['cases'])} (Dice %)\n")
    print("| run | chosen | chosen: Dice | default (sigma 1/8) | stride 18 18 4 | "
          "stride 18 18 4 + largest | chosen - stride | chosen - (stride + largest) |")
    print("|---|---|---|---|---|---|---|---|")
    for name, variant, got, default, stride, stride_l in rows:
        print(f"| {name} | {variant} | {got:.2f} | {default:.2f} | {stride:.2f} | {stride_l:.2f} "
              f"| {got - stride:+.2f} | {got - stride_l:+.2f} |")
    mean = np.mean([r[2:] for r in rows], axis=0)
    print(f"| mean | | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} | {mean[3]:.2f} "
          f"| {mean[0] - mean[2]:+.2f} | {mean[0] - mean[3]:+.2f} |")


if __name__ == "__main__":
    main()
