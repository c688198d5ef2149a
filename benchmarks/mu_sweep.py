"""Which mu makes rectified pseudo-labels best, and which mu do the labelled crops ask for?

For each CRLN run (its last checkpoint, EMA teacher, eval mode):

1. On the unlabelled cases whose labels the LA benchmark keeps apart: Dice % of
   argmax softmax(f + (1 - mu) M) for a grid of mu (Gaussian sliding window as ``crlnseg
   rectify``, sigma 1/8 as in the LA tables), and of M alone. mu = 1 is the raw pseudo-label.
2. On the labelled cases: the loss mu is trained on, 0.5 (CE + Dice)(f + (1 - mu) M, y), over
   random training-size crops (4 per case, seeded), on the crops as they are (the "weak" view mu
   is fitted on by default) and on a strong view of them (``method.mu_view = "strong"``).

    R=benchmarks/results/la_8
    python benchmarks/mu_sweep.py $R/runs/crln_seed0 $R/runs/crln_seed1 $R/runs/crln_seed2 \\
        --data $R/data
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

GRID = (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", type=Path, nargs="+")
    p.add_argument("--data", type=Path, required=True,
                   help="la.py's data folder: labelled/, unlabelled/, unlabelled_truth/")
    p.add_argument("--crops", type=int, default=4, help="labelled crops per case")
    p.add_argument("--json", type=Path, default=None)
    return p.parse_args(argv)


def _label_of(image: Path, labels: Path) -> Path:
    """The label file of an image file, as ``crlnseg rectify --labels`` finds it."""
    from crlnseg.io.paths import split_suffix, strip_channel
    from crlnseg.rectify import find_label

    return find_label(labels, strip_channel(split_suffix(image)[0]))


def unlabelled_dice(predictor, data: Path) -> dict[str, float]:
    import torch

    from crlnseg.data.preprocessing import preprocess, restore
    from crlnseg.inference.sliding_window import sliding_window
    from crlnseg.io import read_case_images, read_label
    from crlnseg.metrics import dice

    def heads(x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        out = predictor.model(x, with_relation=True, embed="none")
        f, m = out.logits.float(), out.relation.float()
        return torch.cat([torch.softmax(f + (1 - mu) * m, 1) for mu in GRID]
                         + [torch.softmax(m, 1)], 1)

    names = [f"mu={mu:g}" for mu in GRID] + ["M alone"]
    scores: dict[str, list[float]] = {k: [] for k in names}
    for path in sorted((data / "unlabelled" / "images").iterdir()):
        volume = read_case_images([path])
        label = read_label(_label_of(path, data / "unlabelled_truth" / "labels"),
                           reference=volume).array
        case = preprocess(volume, None, predictor.prepare)
        x = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
        with torch.inference_mode():
            probs = sliding_window(x, heads, predictor.patch, 2 * len(names), overlap=0.5,
                                   batch_size=2, sigma_scale=1 / 8).numpy()
        probs = restore(probs, case.info, probabilities=True)
        for i, name in enumerate(names):
            scores[name].append(100 * dice(probs[2 * i + 1] > 0.5, label == 1))
    return {k: float(np.mean(v)) for k, v in scores.items()}


def labelled_losses(predictor, data: Path, crops: int) -> dict[str, dict[str, float]]:
    import torch

    from crlnseg.data.preprocessing import preprocess
    from crlnseg.data.views import apply_strong, draw_strong_params
    from crlnseg.io import read_case_images, read_label
    from crlnseg.method.losses import segmentation_loss
    from crlnseg.settings import AugmentSettings

    g = torch.Generator().manual_seed(0)
    patch = tuple(predictor.patch)
    pairs = []
    for path in sorted((data / "labelled" / "images").iterdir()):
        volume = read_case_images([path])
        label = read_label(_label_of(path, data / "labelled" / "labels"), reference=volume)
        case = preprocess(volume, label, predictor.prepare)
        x = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
        y = torch.from_numpy(np.asarray(case.label).astype(np.int64))
        for _ in range(crops):
            start = [int(torch.randint(0, max(1, n - q + 1), (1,), generator=g))
                     for n, q in zip(x.shape[1:], patch, strict=True)]
            box = tuple(slice(a, a + q) for a, q in zip(start, patch, strict=True))
            if tuple(x[(slice(None), *box)].shape[1:]) == patch:
                pairs.append((x[(slice(None), *box)], y[box]))
    losses: dict[str, dict[float, list[float]]] = {v: {mu: [] for mu in GRID}
                                                   for v in ("weak", "strong")}
    for i in range(0, len(pairs) - 1, 2):
        xb = torch.stack([pairs[i][0], pairs[i + 1][0]])
        yb = torch.stack([pairs[i][1], pairs[i + 1][1]])
        params = draw_strong_params(2, g, AugmentSettings(), patch[0] == patch[1])
        xs, ys, _ = apply_strong(xb, yb, torch.ones(yb.shape), params)
        with torch.no_grad():
            for view, xx, yy in (("weak", xb, yb), ("strong", xs, ys.long())):
                out = predictor.model(xx.contiguous(memory_format=torch.channels_last_3d),
                                      with_relation=True, embed="none")
                f, m = out.logits.float(), out.relation.float()
                for mu in GRID:
                    losses[view][mu].append(float(0.5 * segmentation_loss(f + (1 - mu) * m, yy)))
    return {view: {f"mu={mu:g}": float(np.mean(v)) for mu, v in d.items()}
            for view, d in losses.items()}


def main(argv: list[str] | None = None) -> None:
    import torch

    from crlnseg.inference.predictor import Predictor
    from crlnseg.settings import PredictSettings

    args = parse_args(argv)
    torch.set_num_threads(1)
    results = {}
    for run in args.runs:
        predictor = Predictor.from_run(run, "last", PredictSettings(device="cpu"))
        results[run.name] = {"mu": predictor.mu,
                             "unlabelled_dice": unlabelled_dice(predictor, args.data),
                             "labelled_loss": labelled_losses(predictor, args.data, args.crops)}
        print(run.name, json.dumps(results[run.name]), file=sys.stderr, flush=True)
    cols = [f"mu={mu:g}" for mu in GRID]
    print("| run | learned mu | quantity | " + " | ".join(cols) + " | M alone |")
    print("|---|---|---|" + "---|" * (len(cols) + 1))
    for name, r in results.items():
        d = r["unlabelled_dice"]
        print(f"| {name} | {r['mu']:.3f} | Dice % unlabelled | "
              + " | ".join(f"{d[c]:.2f}" for c in cols) + f" | {d['M alone']:.2f} |")
        for view in ("weak", "strong"):
            lo = r["labelled_loss"][view]
            print(f"| | | mu loss, labelled {view} view | "
                  + " | ".join(f"{lo[c]:.4f}" for c in cols) + " | |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
