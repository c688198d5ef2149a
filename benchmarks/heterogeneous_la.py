"""Any orientation, any spacing: CRLN on a "heterogeneous LA" against the unmodified LA data.

Each of the 80 half-resolution LA cases gets a random stored orientation (one of the 48 axis
orders and flips, with the affine that keeps it at its place in the world) and is resampled to a
random spacing (in-plane 0.9-1.6 mm, slice 1.25-3 mm along the scan's S-I axis; image cubic,
label nearest). The same split as ``benchmarks/la.py`` (labelled = the first 8 of ``cases.txt``,
unlabelled 9-64, validation 65-80), the same seed and the ``cpu`` preset's model and schedule
(its patch only where nothing is planned) are trained three ways,
each predicted on its own validation scans and scored on their own grids against their own labels:

    unmodified    the LA data as shipped, crlnseg's defaults (plan, canonical orientation)
    planned       the heterogeneous data, crlnseg's defaults
    unplanned     the heterogeneous data with each case kept at its own spacing and array order
                  (``prepare.orientation=input``, ``train.plan=false``, the cpu preset's
                  64 x 64 x 32 patch: the behaviour without planning or reorientation)

    python benchmarks/heterogeneous_la.py --out benchmarks/results/heterogeneous_la --seeds 0
    python benchmarks/heterogeneous_la.py --iterations 4 --limit 10 --out /tmp/het-smoke
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "la"
# The cpu preset's model and schedule; its patch only where nothing plans one.
WAYS = {"unmodified": [], "planned": [],
        "unplanned": ["--set", "prepare.orientation=input", "--set", "train.plan=false",
                      "--patch", "64", "64", "32"]}


def cpu_config(folder: Path) -> Path:
    """The ``cpu`` preset without its patch, so that the plan chooses the patch."""
    from crlnseg.settings import PRESETS

    config = json.loads(json.dumps(PRESETS["cpu"]))
    del config["train"]["patch"]
    path = folder / "cpu_without_patch.json"
    path.write_text(json.dumps(config))
    return path


def heterogeneous_case(image, label, affine, rng):
    """(image, label, affine) stored in a random axis order at a random spacing."""
    from scipy.ndimage import zoom

    from crlnseg.data.orientation import Transform, from_canonical

    spacing = np.abs(np.diag(affine)[:3])
    new = np.array([rng.uniform(0.9, 1.6), rng.uniform(0.9, 1.6), rng.uniform(1.25, 3.0)])
    shape = np.maximum(1, np.round(np.array(image.shape) * spacing / new)).astype(int)
    factors = shape / np.array(image.shape)
    img = zoom(image, factors, order=3, mode="nearest", grid_mode=True).astype(np.float32)
    lab = zoom(label, factors, order=0, mode="nearest", grid_mode=True).astype(np.uint8)
    # The resampled grid covers the same extent: its corner voxel centre moves by half a voxel.
    origin = affine[:3, 3] + np.sign(np.diag(affine)[:3]) * (new - spacing) / 2
    canonical = np.eye(4)
    canonical[:3, :3] = np.diag(np.sign(np.diag(affine)[:3]) * new)
    canonical[:3, 3] = origin
    perms = list(itertools.permutations(range(3)))
    t = Transform(perms[rng.integers(6)], tuple(bool(b) for b in rng.integers(0, 2, 3)))
    m = np.zeros((4, 4))
    m[3, 3] = 1.0
    for k in range(3):  # input voxel -> canonical voxel
        m[k, t.permutation[k]] = -1.0 if t.flips[k] else 1.0
        m[k, 3] = shape[k] - 1 if t.flips[k] else 0.0
    return from_canonical(img, t), from_canonical(lab, t), canonical @ m, t


def build(out: Path, ids: list[str], seed: int) -> Path:
    import nibabel as nib

    done = out / ".done"
    if done.is_file():
        return out
    rng = np.random.default_rng(seed)
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    record = {}
    for case in ids:
        img_n = nib.load(str(DATA / "images" / f"{case}.nii.gz"))
        lab_n = nib.load(str(DATA / "labels" / f"{case}.nii.gz"))
        image, label, affine, t = heterogeneous_case(
            np.asarray(img_n.dataobj, np.float32), np.asarray(lab_n.dataobj, np.uint8),
            img_n.affine, rng)
        for sub, arr in (("images", image), ("labels", label)):
            nifti = nib.Nifti1Image(arr, affine)
            nifti.header.set_qform(affine, code=1)
            nifti.header.set_sform(affine, code=1)
            nib.save(nifti, str(out / sub / f"{case}.nii.gz"))
        record[case] = {"spacing": [float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)],
                        "permutation": list(t.permutation), "flips": list(t.flips)}
    (out / "cases.json").write_text(json.dumps(record, indent=1))
    done.write_text("")
    return out


def link(folder: Path, data: Path, ids: list[str], labels: bool) -> Path:
    for sub in ("images", "labels") if labels else ("images",):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        for case in ids:
            dst = folder / sub / f"{case}.nii.gz"
            if not dst.exists():
                dst.symlink_to(data / sub / f"{case}.nii.gz")
    return folder


def crlnseg(args: list[str], log: Path) -> None:
    with log.open("a") as f:
        proc = subprocess.run([sys.executable, "-m", "crlnseg", *map(str, args)], stdout=f,
                              stderr=subprocess.STDOUT)
    if proc.returncode:
        raise SystemExit(f"crlnseg {' '.join(map(str, args[:2]))} failed: see {log}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/heterogeneous_la"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/crlnseg-heterogeneous-la"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--iterations", type=int, default=1000)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N unlabelled")
    ap.add_argument("--ways", nargs="+", default=list(WAYS), choices=list(WAYS))
    args = ap.parse_args(argv)
    ids = (DATA / "cases.txt").read_text().split()
    split = {"labelled": ids[:8], "unlabelled": ids[8:64][:args.limit], "val": ids[64:]}
    het = build(args.work / "data", ids, seed=2026)
    args.out.mkdir(parents=True, exist_ok=True)
    config = cpu_config(args.work)
    results = {}
    result_file = args.out / "results.json"
    if result_file.is_file():
        results = json.loads(result_file.read_text())
    for seed in args.seeds:
        for way in args.ways:
            key = f"{way}/seed{seed}"
            if key in results and results[key].get("iterations") == args.iterations:
                continue
            data = DATA if way == "unmodified" else het
            root = args.work / way
            folders = {name: link(root / "splits" / name, data, case_ids, name != "unlabelled")
                       for name, case_ids in split.items()}
            run, log = root / f"run_seed{seed}", root / f"seed{seed}.log"
            start = time.perf_counter()
            crlnseg(["train", "--labelled", folders["labelled"], "--unlabelled",
                     folders["unlabelled"], "-o", run, "--config", config, "--seed", seed,
                     "--iterations", args.iterations, "--device", "cpu", "--overwrite",
                     *WAYS[way]], log)
            train_s = time.perf_counter() - start
            pred = root / f"pred_seed{seed}"
            crlnseg(["predict", folders["val"] / "images", "-o", pred, "-m", run, "--no-tuned",
                     "--device", "cpu", "--overwrite"], log)
            report = root / f"eval_seed{seed}.json"
            crlnseg(["evaluate", pred, folders["val"] / "labels", "-o", report, "--overwrite"],
                    log)
            ev = json.loads(report.read_text())
            settings = json.loads((run / "settings.json").read_text())
            results[key] = {"way": way, "seed": seed, "iterations": args.iterations,
                            "dice": ev["summary"]["1"]["dice"]["mean"],
                            "hd95": ev["summary"]["1"]["hd95"]["mean"],
                            "per_case": {c["case"]: c["dice"] for c in ev["cases"]},
                            "train_s": train_s,
                            "target_spacing": settings["prepare"]["target_spacing"],
                            "strides": settings["model"]["strides"],
                            "patch": settings["train"]["patch"]}
            result_file.write_text(json.dumps(results, indent=1))
            print(json.dumps(results[key]), flush=True)


if __name__ == "__main__":
    main()
