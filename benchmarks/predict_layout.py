"""``crlnseg predict`` on the CPU with the channels-last 3-D layout (its CPU default) against the
contiguous layout: seconds per case and the largest probability difference, same process, layouts
alternated per case (two repeats each, median).

    OMP_NUM_THREADS=1 python benchmarks/predict_layout.py benchmarks/results/la_8/runs/crln_seed0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from crlnseg.inference.predictor import Predictor
from crlnseg.io import read_case_images
from crlnseg.settings import PredictSettings

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "la"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path)
    p.add_argument("--data", type=Path, default=DATA)
    p.add_argument("--cases", default="64:68", help="slice of cases.txt")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    first, last = (int(v) for v in args.cases.split(":"))
    ids = (args.data / "cases.txt").read_text().split()[first:last]
    predictor = Predictor.from_run(args.run, "last", PredictSettings(device="cpu", tuned=False))
    times: dict[bool, list[float]] = {True: [], False: []}
    diff = 0.0
    for cid in ids:
        volume = read_case_images([args.data / "images" / f"{cid}.nii.gz"])
        probs = {}
        for layout in (True, False, True, False):
            predictor.channels_last = layout
            predictor.model.to(memory_format=torch.channels_last_3d if layout
                               else torch.contiguous_format)
            start = time.perf_counter()
            probs[layout] = predictor.predict_volume(volume, save_probabilities=True).probabilities
            times[layout].append(time.perf_counter() - start)
        diff = max(diff, float(np.abs(probs[True] - probs[False]).max()))
    cl, plain = np.median(times[True]), np.median(times[False])
    print(f"{len(ids)} cases, {args.threads} thread(s): channels-last {cl:.3f} s/case, "
          f"contiguous {plain:.3f} s/case, {plain / cl:.2f}x faster; largest probability "
          f"difference {diff:.1e}")


if __name__ == "__main__":
    main()
