"""Which Gaussian sigma should ``crlnseg predict`` blend with? Dice of blending variants.

For each run and case, the overlap-0.5 patches are predicted once (rectified softmax of the EMA
teacher, as ``crlnseg predict``) and blended with Gaussian importance maps of several sigmas
(a share of the patch side; nnU-Net and MONAI use 1/8) and with uniform weights; the literature's
uniform stride 18 x 18 x 4 (about 3x the patches on half-resolution LA) is the reference. Dice in
% against the labels, on the preprocessed grid (half-resolution LA needs no resampling).

Choose on cases the runs were not validated on (their unlabelled cases 9-64, whose labels the
benchmark keeps apart), then report on the validation cases 65-80:

    R=benchmarks/results/la_8/runs
    python benchmarks/blending.py $R/crln_seed0 $R/crln_seed1 $R/crln_seed2 --cases 8:64 \\
        --json /tmp/blend_selection.json
    python benchmarks/blending.py $R/crln_seed0 $R/crln_seed1 $R/crln_seed2 --cases 64:80

``--keep-largest`` scores every variant after keeping the largest connected component of each
class, as ``crlnseg predict --keep-largest`` does. Each row also gives a 95 % bootstrap interval
of its difference to the reference over the cases.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "la"
SIGMAS = (1 / 8, 1 / 6, 1 / 4, 1 / 3, 1 / 2)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+", help="run folders (their last checkpoint)")
    p.add_argument("--data", type=Path, default=DATA, help="images/ labels/ cases.txt")
    p.add_argument("--cases", default="64:80", help="slice of cases.txt, e.g. 8:64 or 64:80")
    p.add_argument("--stride", type=int, nargs=3, default=(18, 18, 4))
    p.add_argument("--flat-z", action="store_true",
                   help="also Gaussian in-plane weights that are uniform along Z")
    p.add_argument("--keep-largest", action="store_true",
                   help="score every variant after keeping the largest connected component of "
                   "each class (crlnseg predict --keep-largest)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    return p.parse_args(argv)


def blend_variants(run: Path, ids: list[str], data: Path, stride: tuple[int, int, int],
                   flat_z: bool = False, keep_largest: bool = False) -> dict[str, dict[str, float]]:
    """Per case: Dice % of each blending variant of the same overlap-0.5 patch outputs."""
    import torch

    from crlnseg.data.preprocessing import preprocess
    from crlnseg.inference.postprocess import keep_largest_component
    from crlnseg.inference.predictor import Predictor
    from crlnseg.inference.sliding_window import (
        gaussian_importance_map,
        pad_to_patch,
        patch_origins,
        sliding_window,
    )
    from crlnseg.io import read_case_images, read_label
    from crlnseg.metrics import dice
    from crlnseg.settings import PredictSettings

    predictor = Predictor.from_run(run, "last", PredictSettings(device="cpu", batch_size=2))
    fn, patch = predictor._patch_fn("rectified"), predictor.patch
    weights = {f"gaussian 1/{round(1 / s)}": gaussian_importance_map(patch, s) for s in SIGMAS}
    weights["uniform"] = torch.ones(patch)
    if flat_z:  # Gaussian in-plane, uniform along Z (the axis where the dense stride helps most)
        for sigma in (1 / 3, 1 / 2):
            plane = gaussian_importance_map((*patch[:2], 1), sigma)
            weights[f"gaussian 1/{round(1 / sigma)} in-plane, flat Z"] = plane.expand(patch)

    def score(probs: torch.Tensor, label: np.ndarray) -> float:
        mask = probs.argmax(0).numpy().astype(np.uint8)
        if keep_largest:
            mask = keep_largest_component(mask, list(range(1, probs.shape[0])))
        return 100 * dice(mask, label)

    rows: dict[str, dict[str, float]] = {}
    for cid in ids:
        volume = read_case_images([data / "images" / f"{cid}.nii.gz"])
        label = read_label(data / "labels" / f"{cid}.nii.gz", reference=volume).array
        case = preprocess(volume, None, predictor.prepare)
        if case.image.shape[-3:] != label.shape:
            raise SystemExit(f"{cid}: preprocessing changes the grid; this script compares on it")
        x = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
        padded, crop = pad_to_patch(x, patch)
        shape = padded.shape[-3:]
        boxes = [tuple(slice(o, o + q) for o, q in zip(origin, patch, strict=True))
                 for origin in patch_origins(shape, patch, 0.5)]
        row: dict[str, float] = {}
        with torch.inference_mode():
            outputs = [o for i in range(0, len(boxes), 2) for o in
                       fn(torch.stack([padded[(slice(None), *b)] for b in boxes[i:i + 2]]))]
            for name, w in weights.items():
                acc = torch.zeros((outputs[0].shape[0], *shape))
                total = torch.zeros(shape)
                for box, o in zip(boxes, outputs, strict=True):
                    acc[(slice(None), *box)] += o * w
                    total[box] += w
                blended = (acc / total)[(slice(None), *crop)]
                row[f"{name}, overlap 0.5"] = score(blended, label)
            ref = sliding_window(x, fn, patch, outputs[0].shape[0], blend="uniform",
                                 stride=stride, batch_size=2)
            row[f"uniform, stride {' '.join(map(str, stride))}"] = score(ref, label)
        rows[cid] = row
        print(run.name, cid, {k.split(",")[0]: round(v, 1) for k, v in row.items()},
              file=sys.stderr, flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    first, last = (int(v) for v in args.cases.split(":"))
    ids = (args.data / "cases.txt").read_text().split()[first:last]
    results = {str(run): blend_variants(run, ids, args.data, tuple(args.stride), args.flat_z,
                                        args.keep_largest) for run in args.runs}
    variants = list(next(iter(next(iter(results.values())).values())))
    ref = variants[-1]
    means = {run: {v: float(np.mean([r[v] for r in rows.values()])) for v in variants}
             for run, rows in results.items()}
    post = ", largest component kept" if args.keep_largest else ""
    print(f"Dice % over cases {args.cases} of cases.txt ({len(ids)} cases){post}\n")
    print("| variant | " + " | ".join(Path(r).name for r in results)
          + " | mean | vs reference | 95 % interval over cases |")
    print("|---|" + "---|" * (len(results) + 3))
    intervals = {v: case_interval(results, v, ref) for v in variants}
    for v in variants:
        per_run = [means[r][v] for r in results]
        gap = np.mean(per_run) - np.mean([means[r][ref] for r in results])
        low, high = intervals[v]
        print(f"| {v} | " + " | ".join(f"{d:.2f}" for d in per_run)
              + f" | {np.mean(per_run):.2f} | {gap:+.2f} | {low:+.2f} to {high:+.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"cases": ids, "keep_largest": args.keep_largest,
                                         "means": means, "intervals_vs_reference": intervals,
                                         "per_case": results}, indent=1))


def case_interval(results: dict[str, dict[str, dict[str, float]]], variant: str, ref: str,
                  draws: int = 10000) -> tuple[float, float]:
    """95 % bootstrap interval of the mean difference variant - ref, resampling cases (each
    case's difference averaged over the runs first: the cases, not the runs, are the sample)."""
    cases = list(next(iter(results.values())))
    diff = np.array([np.mean([rows[c][variant] - rows[c][ref] for rows in results.values()])
                     for c in cases])
    rng = np.random.default_rng(0)
    means = diff[rng.integers(0, len(diff), (draws, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


if __name__ == "__main__":
    main()
