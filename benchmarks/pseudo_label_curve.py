"""Dice of raw vs rectified pseudo-labels over training, from a run's periodic checkpoints.

The paper shows the quality of pseudo-labels as training goes on; ``crlnseg rectify --labels``
scores one checkpoint. This script scores every ``checkpoints/iter_<N>.pt`` of each run on the
unlabelled cases whose labels are known (as ``benchmarks/la.py`` keeps them apart), with the same
preprocessing, sliding window and restoration as ``crlnseg rectify``, and adds the Dice of the
relationship map M(x) on its own (argmax softmax(M)). What rectification changes in training:
the voxels whose pseudo-label it flips (fixes: the flip makes them right; breaks: it makes them
wrong; per foreground voxel of the truth), and the share of voxels whose confidence reaches
``method.confidence_threshold`` (0.97), which scales each unlabelled image's pseudo-label loss.

    python benchmarks/pseudo_label_curve.py benchmarks/results/la_8/runs/crln_seed{0,1,2} \\
        --images benchmarks/results/la_8/data/unlabelled/images \\
        --labels benchmarks/results/la_8/data/unlabelled_truth/labels --every 2
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    found = [(int(m.group(1)), p) for p in (run / "checkpoints").glob("iter_*.pt")
             if (m := re.fullmatch(r"iter_(\d+)\.pt", p.name))]
    return sorted(found)


def score(run: Path, checkpoint: Path, images: list[Path], labels: Path,
          sigma: float | None = None, threshold: float = 0.97) -> dict:
    """Mean Dice over ``images`` of argmax softmax(f) (raw), softmax(f + (1 - mu) M) (rectified,
    as ``crlnseg rectify`` computes them) and softmax(M) alone, from one sliding-window pass."""
    import torch

    from crlnseg.data.preprocessing import preprocess, restore
    from crlnseg.inference.predictor import Predictor
    from crlnseg.inference.sliding_window import sliding_window
    from crlnseg.io import read_case_images, read_label
    from crlnseg.method.rectification import rectify
    from crlnseg.metrics import mean_foreground_dice as mean_dice
    from crlnseg.rectify import find_label
    from crlnseg.settings import PredictSettings

    extra = {} if sigma is None else {"sigma_scale": sigma}
    predictor = Predictor.from_run(run, str(checkpoint), PredictSettings(device="cpu", **extra))
    c, mu, s = len(predictor.classes), predictor.mu, predictor.settings

    def heads(x: torch.Tensor) -> torch.Tensor:
        if predictor.channels_last:  # the layout the predictor put the model in
            x = x.contiguous(memory_format=torch.channels_last_3d)
        out = predictor.model(x, with_relation=True, embed="none")
        f, m = out.logits.float(), out.relation.float()
        return torch.cat([torch.softmax(f, 1), torch.softmax(rectify(f, m, mu), 1),
                          torch.softmax(m, 1)], 1)

    dice: dict[str, list[float]] = {"raw": [], "rectified": [], "relation": []}
    changes: dict[str, list[float]] = {"flips": [], "fixes": [], "breaks": [],
                                       "reliable_raw": [], "reliable_rectified": []}
    better = 0
    for path in images:
        volume = read_case_images([path], predictor.prepare.h5_spacing)
        label = read_label(find_label(labels, path.name.split(".")[0]), reference=volume).array
        case = preprocess(volume, None, predictor.prepare)
        image = torch.from_numpy(np.ascontiguousarray(case.image, dtype=np.float32))
        with torch.inference_mode():
            probs = sliding_window(image, heads, predictor.patch, 3 * c, blend=s.mode,
                                   overlap=s.overlap, stride=s.stride, batch_size=s.batch_size,
                                   sigma_scale=s.sigma_scale)
        probs = restore(probs.numpy(), case.info, probabilities=True)
        for i, name in enumerate(dice):
            dice[name].append(mean_dice(probs[i * c:(i + 1) * c].argmax(0), label, c))
        better += dice["rectified"][-1] > dice["raw"][-1]
        for name, value in flip_stats(probs[:c], probs[c:2 * c], label, threshold).items():
            changes[name].append(value)
    return {"mu": mu, **{f"dice_{k}": float(np.mean(v)) for k, v in dice.items()},
            **{k: float(np.mean(v)) for k, v in changes.items()},
            "cases_rectified_better": better, "cases": len(images)}


def flip_stats(raw: np.ndarray, rectified: np.ndarray, label: np.ndarray,
               threshold: float) -> dict[str, float]:
    """Flipped / fixed / broken voxels per foreground voxel of ``label``, and the share of
    voxels at or above ``threshold`` before and after rectification; probabilities (C, ...)."""
    a, b = raw.argmax(0), rectified.argmax(0)
    flips = a != b
    foreground = max(int((label > 0).sum()), 1)
    return {"flips": float(flips.sum()) / foreground,
            "fixes": float((flips & (b == label)).sum()) / foreground,
            "breaks": float((flips & (a == label)).sum()) / foreground,
            "reliable_raw": float((raw.max(0) >= threshold).mean()),
            "reliable_rectified": float((rectified.max(0) >= threshold).mean())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--labels", type=Path, required=True)
    p.add_argument("--every", type=int, default=1, help="score every k-th case (sorted by name)")
    p.add_argument("--iterations", type=int, nargs="+", default=None,
                   help="only these checkpoints (default: every iter_<N>.pt)")
    p.add_argument("--sigma", type=float, default=None,
                   help="Gaussian sigma (default: crlnseg's; RESULTS.md's curves used 0.125)")
    p.add_argument("--threshold", type=float, default=0.97,
                   help="confidence of a reliable voxel (method.confidence_threshold)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    images = sorted(q for q in args.images.iterdir() if q.name.endswith((".nii.gz", ".nii")))
    images = images[::args.every]
    result: dict = {}
    print("| run | iteration | mu | Dice raw % | Dice rectified % | difference | cases better "
          "| Dice M(x) alone % | flips / fixes / breaks % of foreground "
          "| reliable share raw -> rectified |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for run in args.runs:
        result[run.name] = {}
        for iteration, ckpt in checkpoints(run):
            if args.iterations and iteration not in args.iterations:
                continue
            r = score(run, ckpt, images, args.labels, args.sigma, args.threshold)
            result[run.name][iteration] = r
            print(f"| {run.name} | {iteration} | {r['mu']:.3f} | {100 * r['dice_raw']:.2f} | "
                  f"{100 * r['dice_rectified']:.2f} | "
                  f"{100 * (r['dice_rectified'] - r['dice_raw']):+.2f} | "
                  f"{r['cases_rectified_better']}/{r['cases']} | {100 * r['dice_relation']:.2f} | "
                  f"{100 * r['flips']:.2f} / {100 * r['fixes']:.2f} / {100 * r['breaks']:.2f} | "
                  f"{r['reliable_raw']:.3f} -> {r['reliable_rectified']:.3f} |",
                  flush=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{len(images)} cases scored per checkpoint", file=sys.stderr)


if __name__ == "__main__":
    main()
