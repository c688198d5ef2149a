"""What planning and canonical orientation cost: ``prepare`` on the 80 LA cases and ``predict``
per case, each with and without them, alternating in one run.

    prepare  crlnseg.prepare.prepare(..., plan=True) with orientation "canonical" (the default)
             against plan=False with orientation "input", the target spacing given (so both
             resample alike), into fresh caches, ``--repeats`` times each
    predict  Predictor.predict_volume on validation cases with orientation "canonical" against
             "input" (a cpu-preset-size model with random weights: the time is what matters)

Both on the LA data as shipped (RAS: its canonical transform is the identity) and on the same
cases stored in other axis orders (``--permuted``: each case transposed and flipped, the affine
kept correct), where reorientation copies every array.

    python benchmarks/plan_overhead.py --repeats 2 --out benchmarks/results/plan_overhead.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "la"


def permuted_copy(src: Path, dst: Path, ids: list[str]) -> Path:
    """Each case stored in one of the 48 axis orders (cycled), with a correct affine."""
    import nibabel as nib

    from crlnseg.data.orientation import Transform, from_canonical

    transforms = [Transform(p, f) for p in itertools.permutations(range(3))
                  for f in itertools.product((False, True), repeat=3)]
    for sub in ("images", "labels"):
        (dst / sub).mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(ids):
        t = transforms[(7 * i + 5) % 48]
        for sub in ("images", "labels"):
            img = nib.load(str(src / sub / f"{case}.nii.gz"))
            arr = np.asarray(img.dataobj)
            m = np.zeros((4, 4))
            m[3, 3] = 1
            for k in range(3):
                m[k, t.permutation[k]] = -1.0 if t.flips[k] else 1.0
                m[k, 3] = arr.shape[k] - 1 if t.flips[k] else 0.0
            nib.save(nib.Nifti1Image(from_canonical(arr, t), img.affine @ m),
                     str(dst / sub / f"{case}.nii.gz"))
    return dst


def time_prepare(source: Path, work: Path, repeats: int) -> dict[str, list[float]]:
    from crlnseg.prepare import prepare
    from crlnseg.settings import PrepareSettings

    ways = {"plan + canonical": (PrepareSettings(), True),
            "neither": (PrepareSettings(orientation="input", target_spacing=(1.25,) * 3), False)}
    times: dict[str, list[float]] = {w: [] for w in ways}
    for r in range(repeats):
        for way, (settings, plan) in (ways.items() if r % 2 == 0 else reversed(ways.items())):
            out = work / f"cache_{len(times[way])}_{way[:4]}"
            start = time.perf_counter()
            prepare(source, out, settings, plan=plan)
            times[way].append(time.perf_counter() - start)
            shutil.rmtree(out)
    return times


def time_predict(source: Path, ids: list[str], repeats: int) -> dict[str, list[float]]:
    import torch

    from crlnseg.config import resolve_settings
    from crlnseg.inference.predictor import Predictor
    from crlnseg.io.readers import read_image
    from crlnseg.method.crln import build_model
    from crlnseg.settings import PredictSettings, PrepareSettings

    torch.manual_seed(0)
    run = resolve_settings("cpu")
    net = build_model(run).eval()
    volumes = [read_image(source / "images" / f"{c}.nii.gz") for c in ids]
    predictors = {way: Predictor(net, PredictSettings(device="cpu"), tuple(run.train.patch),
                                 PrepareSettings(orientation=o, target_spacing=(1.25,) * 3), 1,
                                 ["background", "atrium"])
                  for way, o in (("canonical", "canonical"), ("input", "input"))}
    times: dict[str, list[float]] = {w: [] for w in predictors}
    for r in range(repeats):
        order = list(predictors.items()) if r % 2 == 0 else list(reversed(predictors.items()))
        for way, predictor in order:
            for volume in volumes:
                start = time.perf_counter()
                predictor.predict_volume(volume)
                times[way].append(time.perf_counter() - start)
    return times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--predict-cases", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/plan_overhead.json"))
    args = ap.parse_args(argv)
    ids = (DATA / "cases.txt").read_text().split()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sources = {"LA as shipped": DATA,
                   "LA, other axis orders": permuted_copy(DATA, work / "permuted", ids)}
        for name, source in sources.items():
            prep = time_prepare(source, work, args.repeats)
            pred = time_predict(source, ids[64:64 + args.predict_cases], args.repeats)
            results[name] = {
                "prepare_s": {k: statistics.median(v) for k, v in prep.items()},
                "prepare_ratio": statistics.median(prep["plan + canonical"])
                / statistics.median(prep["neither"]),
                "predict_s_per_case": {k: statistics.median(v) for k, v in pred.items()},
                "predict_ratio": statistics.median(pred["canonical"])
                / statistics.median(pred["input"]),
                "raw": {"prepare": prep, "predict": pred}}
            print(name, json.dumps({k: v for k, v in results[name].items() if k != "raw"}),
                  flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
