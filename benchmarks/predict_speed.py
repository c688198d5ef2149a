"""Sliding-window protocols of ``crlnseg predict``: speed, Dice and peak memory.

1. Same run, same cases: Gaussian blending at overlap 0.5 (crlnseg's default) against the
   literature's uniform stride 18 x 18 x 4 (and, with ``--scaled-stride``, 9 x 9 x 2: the same
   physical stride on the half-resolution LA data). Seconds per case and Dice against the labels.
   Targets: Gaussian <= 0.25x the time of stride 18 x 18 x 4, Dice loss <= 0.5 points.
2. Peak memory (max RSS of a subprocess running ``crlnseg predict``) on a synthetic random
   512 x 512 x 300 volume, next to the size of the blending buffers.
3. With ``--full-resolution-model RUN`` (a run trained with 112 x 112 x 80 patches, e.g. the
   ``la8`` preset): seconds per case of both protocols on the two full-resolution HDF5 LA cases,
   the setting in which the literature defined its stride (timing only: no labels are scored).

    python benchmarks/predict_speed.py -m RUN                   # cases 65-80 of cases.txt
    python benchmarks/predict_speed.py -m RUN --cases 4 --memory-shape 0 0 0  # no memory test
    python benchmarks/predict_speed.py --quick-train /tmp/run   # train a small cpu-preset run first
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "la"
CRLNSEG = Path(sys.executable).with_name("crlnseg")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-m", "--model", type=Path, help="run folder or checkpoint")
    p.add_argument("--data", type=Path, default=DATA, help="images/ labels/ cases.txt")
    p.add_argument("--cases", type=int, default=6, help="how many of cases 65-80 to predict")
    p.add_argument("--stride", type=int, nargs=3, default=(18, 18, 4))
    p.add_argument("--scaled-stride", type=int, nargs=3, default=None,
                   help="an extra uniform row, e.g. 9 9 2 (18 18 4 at half resolution)")
    p.add_argument("--overlap", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--sigma", type=float, default=None,
                   help="Gaussian sigma of the Gaussian protocol (default: crlnseg predict's)")
    p.add_argument("--keep-largest", action="store_true",
                   help="every protocol keeps the largest connected component of each class "
                   "(crlnseg predict --keep-largest; the literature's optional LA "
                   "post-processing)")
    p.add_argument("--memory-shape", type=int, nargs=3, default=(512, 512, 300),
                   help="0 0 0 skips the memory test")
    p.add_argument("--memory-overlap", type=float, default=0.5)
    p.add_argument("--memory-model", type=Path, default=None,
                   help="run for the memory test (default -m); a small-compute run keeps the "
                   "test short on a CPU: the buffers do not depend on the network")
    p.add_argument("--quick-train", type=Path, default=None,
                   help="train a cpu-preset run here first (--iterations) and use it")
    p.add_argument("--iterations", type=int, default=300)
    p.add_argument("--full-resolution-model", type=Path, default=None,
                   help="time both protocols on ../la_h5 with this run (112 x 112 x 80 patches)")
    p.add_argument("--json", type=Path, default=None, help="also write every number here")
    return p.parse_args(argv)


def quick_train(run: Path, data: Path, iterations: int) -> Path:
    """A cpu-preset CRLN run on the first 8 labelled and 16 unlabelled LA cases."""
    if (run / "checkpoints" / "last.pt").exists():
        return run
    ids = (data / "cases.txt").read_text().split()
    tmp = Path(tempfile.mkdtemp(prefix="predict_speed_"))
    for name, chosen, with_labels in (("lab", ids[:8], True), ("unl", ids[8:24], False)):
        for sub in ("images", "labels") if with_labels else ("images",):
            (tmp / name / sub).mkdir(parents=True)
            for cid in chosen:
                (tmp / name / sub / f"{cid}.nii.gz").symlink_to(data / sub / f"{cid}.nii.gz")
    subprocess.run([str(CRLNSEG), "train", "--labelled", str(tmp / "lab"), "--unlabelled",
                    str(tmp / "unl" / "images"), "-o", str(run), "--preset", "cpu",
                    "--iterations", str(iterations), "--device", "cpu"], check=True)
    return run


def gaussian_protocol(args: argparse.Namespace) -> tuple[str, Any]:
    """(name, PredictSettings) of Gaussian blending at ``--overlap`` (``--sigma`` if given)."""
    from crlnseg.settings import PredictSettings

    sigma = {} if args.sigma is None else {"sigma_scale": args.sigma}
    return (f"gaussian overlap {args.overlap:g}",
            PredictSettings(mode="gaussian", overlap=args.overlap, batch_size=args.batch_size,
                            device="cpu", keep_largest=args.keep_largest, **sigma))


def uniform_protocol(args: argparse.Namespace, stride) -> tuple[str, Any]:
    """(name, PredictSettings) of uniform blending at ``stride`` (the literature's protocol)."""
    from crlnseg.settings import PredictSettings

    return (f"uniform stride {' '.join(map(str, stride))}",
            PredictSettings(mode="uniform", stride=tuple(stride), batch_size=args.batch_size,
                            device="cpu", keep_largest=args.keep_largest))


def compare_protocols(args: argparse.Namespace) -> dict:
    import torch

    from crlnseg.inference.predictor import Predictor
    from crlnseg.inference.sliding_window import pad_to_patch, patch_origins
    from crlnseg.io import read_case_images, read_label
    from crlnseg.metrics import dice

    torch.set_num_threads(2)
    protocols = dict([gaussian_protocol(args), uniform_protocol(args, args.stride)]
                     + ([uniform_protocol(args, args.scaled_stride)] if args.scaled_stride else []))
    predictors = {k: Predictor.from_run(args.model, "last", s) for k, s in protocols.items()}
    ids = (args.data / "cases.txt").read_text().split()[64:64 + args.cases]
    rows: dict[str, dict[str, list[float]]] = {k: {"seconds": [], "dice": [], "patches": []}
                                                for k in protocols}
    for i, cid in enumerate(ids):
        volume = read_case_images([args.data / "images" / f"{cid}.nii.gz"])
        label = read_label(args.data / "labels" / f"{cid}.nii.gz", reference=volume).array
        order = list(protocols) if i % 2 == 0 else list(reversed(protocols))  # fair to noise
        for name in order:
            p = predictors[name]
            start = time.perf_counter()
            mask = p.predict_volume(volume).mask
            rows[name]["seconds"].append(time.perf_counter() - start)
            rows[name]["dice"].append(100.0 * dice(mask, label))
            padded = pad_to_patch(torch.zeros((1, *volume.spatial_shape)), p.patch)[0]
            rows[name]["patches"].append(len(patch_origins(
                padded.shape[1:], p.patch, p.settings.overlap, p.settings.stride)))
        print(cid, {k: round(v["seconds"][-1], 2) for k, v in rows.items()}, file=sys.stderr)
    patch = next(iter(predictors.values())).patch
    return {"cases": ids, "patch": list(patch), "keep_largest": args.keep_largest,
            "protocols": rows}


def time_full_resolution(args: argparse.Namespace, h5_root: Path) -> dict:
    """Seconds per case of Gaussian overlap vs uniform stride on the full-resolution cases."""
    import torch

    from crlnseg.inference.predictor import Predictor
    from crlnseg.io import read_case_images

    torch.set_num_threads(2)
    protocols = dict([gaussian_protocol(args), uniform_protocol(args, args.stride)])
    predictors = {k: Predictor.from_run(args.full_resolution_model, "last", s)
                  for k, s in protocols.items()}
    rows: dict[str, list[float]] = {k: [] for k in protocols}
    paths = sorted(h5_root.glob("*/mri_norm2.h5"))
    for i, path in enumerate(paths):
        volume = read_case_images([path], (0.625, 0.625, 0.625))
        for name in (list(protocols) if i % 2 == 0 else list(reversed(protocols))):
            start = time.perf_counter()
            predictors[name].predict_volume(volume)
            rows[name].append(time.perf_counter() - start)
        print(path.parent.name, {k: round(v[-1], 2) for k, v in rows.items()}, file=sys.stderr)
    patch = next(iter(predictors.values())).patch
    return {"model": str(args.full_resolution_model), "patch": list(patch),
            "cases": [p.parent.name for p in paths], "seconds": rows}


def full_resolution_counts(h5_root: Path, patch=(112, 112, 80), overlap=0.5,
                           stride=(18, 18, 4)) -> dict:
    """Patch counts of both protocols on the full-resolution HDF5 LA cases (no network run)."""
    import h5py

    from crlnseg.inference.sliding_window import patch_origins

    counts = {}
    for path in sorted(h5_root.glob("*/mri_norm2.h5")):
        with h5py.File(path, "r") as f:
            shape = tuple(int(n) for n in f["image"].shape)
        counts[path.parent.name] = {"shape": list(shape),
                                    "gaussian": len(patch_origins(shape, patch, overlap)),
                                    "uniform": len(patch_origins(shape, patch, stride=stride))}
    return {"patch": list(patch), "cases": counts}


def peak_memory(args: argparse.Namespace) -> dict:
    """Max RSS of ``crlnseg predict`` on a random volume, and of reading the volume alone."""
    import nibabel as nib

    shape = tuple(args.memory_shape)
    with tempfile.TemporaryDirectory(prefix="predict_mem_") as tmp:
        src = Path(tmp) / "random.nii"
        rng = np.random.default_rng(0)
        image = rng.normal(0, 100, shape).astype(np.int16)
        nib.save(nib.Nifti1Image(image, np.diag([0.625, 0.625, 0.625, 1.0])), str(src))
        del image
        model = args.memory_model or args.model
        cmd = [str(CRLNSEG), "predict", str(src), "-o", str(Path(tmp) / "mask.nii.gz"), "-m",
               str(model), "--device", "cpu", "--overlap", str(args.memory_overlap)]
        probe = ("import resource,sys; from crlnseg.io import read_case_images; "
                 "v = read_case_images([sys.argv[1]]); "
                 "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
        read_only = int(subprocess.run([sys.executable, "-c", probe, str(src)], check=True,
                                       capture_output=True, text=True).stdout)
        start = time.perf_counter()
        wrapper = ("import resource,subprocess,sys; subprocess.run(sys.argv[1:], check=True); "
                   "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
        out = subprocess.run([sys.executable, "-c", wrapper, *cmd], check=True,
                             capture_output=True, text=True)
        seconds = time.perf_counter() - start
    voxels = int(np.prod(shape))
    batch = activation_peak(args.model, args.batch_size)
    return {"batch_activation": batch, "shape": list(shape), "overlap": args.memory_overlap,
            "seconds": seconds, "max_rss_mb": int(out.stdout.split()[-1]) / 1024,
            "read_only_max_rss_mb": read_only / 1024, "float32_volume_mb": voxels * 4 / 2**20,
            "command": " ".join(cmd)}


def activation_peak(model: Path, batch_size: int) -> dict:
    """Max RSS of one batch of patches through the run's network (loaded model as baseline)."""
    probe = """
import resource, sys, torch
from crlnseg.inference.predictor import Predictor
from crlnseg.settings import PredictSettings
n = int(sys.argv[2])
p = Predictor.from_run(sys.argv[1], "last", PredictSettings(device="cpu", batch_size=n))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
with torch.inference_mode():
    p._patch_fn("rectified")(torch.randn(n, p.channels, *p.patch))
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, *p.patch)
"""
    out = subprocess.run([sys.executable, "-c", probe, str(model), str(batch_size)], check=True,
                         capture_output=True, text=True).stdout.split()
    before, after = int(out[0]) / 1024, int(out[1]) / 1024
    return {"model": str(model), "patch": [int(v) for v in out[2:5]], "batch_size": batch_size,
            "loaded_mb": before, "after_batch_mb": after, "activation_mb": after - before}


def report(result: dict) -> None:
    if "protocols" in result:
        rows = result["protocols"]
        base = next(k for k in rows if k.startswith("uniform"))
        t0 = float(np.mean(rows[base]["seconds"]))
        d0 = float(np.mean(rows[base]["dice"]))
        post = ", largest component kept" if result.get("keep_largest") else ""
        print(f"cases: {', '.join(result['cases'])}; patch {result['patch']}{post}")
        print("| protocol | patches / case | s / case | time vs stride | Dice (%) | Dice diff |")
        print("|---|---|---|---|---|---|")
        for name, r in rows.items():
            t, d = float(np.mean(r["seconds"])), float(np.mean(r["dice"]))
            print(f"| {name} | {np.mean(r['patches']):.1f} | {t:.2f} | {t / t0:.2f}x | "
                  f"{d:.2f} +- {np.std(r['dice']):.2f} | {d - d0:+.2f} |")
    for cid, c in result.get("full_resolution", {}).get("cases", {}).items():
        print(f"full resolution {cid} {c['shape']}, patch 112 112 80: {c['gaussian']} patches "
              f"(Gaussian) vs {c['uniform']} (stride) = {c['gaussian'] / c['uniform']:.2f}x")
    if "full_resolution_time" in result:
        f = result["full_resolution_time"]
        base = float(np.mean(next(v for k, v in f["seconds"].items() if k.startswith("uniform"))))
        for name, secs in f["seconds"].items():
            print(f"full resolution, patch {f['patch']}, {name}: "
                  f"{', '.join(f'{s:.1f}' for s in secs)} s per case (mean {np.mean(secs):.1f} s, "
                  f"{np.mean(secs) / base:.2f}x the stride protocol)")
    if "memory" in result:
        m = result["memory"]
        print(f"memory {m['shape']} overlap {m['overlap']}: max RSS {m['max_rss_mb']:.0f} MB "
              f"(reading the image alone {m['read_only_max_rss_mb']:.0f} MB; one float32 "
              f"volume {m['float32_volume_mb']:.0f} MB), {m['seconds']:.0f} s, run {m['command']}")
        b = m["batch_activation"]
        print(f"one batch of {b['batch_size']} x {b['patch']} through {b['model']}: "
              f"+{b['activation_mb']:.0f} MB over the loaded model ({b['loaded_mb']:.0f} MB)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.quick_train:
        args.model = quick_train(args.quick_train, args.data, args.iterations)
    if args.model is None:
        sys.exit("give -m RUN or --quick-train DIR")
    result: dict = {"model": str(args.model)}
    if args.cases > 0:
        result.update(compare_protocols(args))
    h5_root = args.data.parent / "la_h5"
    if h5_root.is_dir():
        result["full_resolution"] = full_resolution_counts(h5_root, overlap=args.overlap,
                                                           stride=tuple(args.stride))
    if args.full_resolution_model is not None and h5_root.is_dir():
        result["full_resolution_time"] = time_full_resolution(args, h5_root)
    if all(args.memory_shape):
        result["memory"] = peak_memory(args)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
