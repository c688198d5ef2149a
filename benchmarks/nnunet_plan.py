"""crlnseg's plan next to nnU-Net's planner (nnunetv2, ExperimentPlanner, 3d_fullres).

Two datasets: the half-resolution LA data as shipped (1.25 mm isotropic), and a thick-slice
variant of it, every case resampled to 0.8 x 0.8 mm in-plane and 5 mm slices along the scan's
S-I axis, every fifth case of ``cases.txt`` to 4 mm instead (image cubic, label nearest; the
grid covers the same extent, the affine keeps the case at its place in the world). The 4 mm
fifth makes the median slice spacing (5 mm) and its 10th percentile (4 mm) differ, so the
anisotropic target-spacing rule of both planners shows.

For each dataset the script writes nnU-Net's raw format (symlinks ``imagesTr/<ID>_0000.nii.gz``,
``labelsTr/<ID>.nii.gz``, ``dataset.json``) into a temporary folder, runs
``nnUNetv2_extract_fingerprint`` and ``nnUNetv2_plan_experiment -pl ExperimentPlanner`` with
``nnUNet_raw`` / ``nnUNet_preprocessed`` / ``nnUNet_results`` there (no preprocessing), reads
``nnUNetPlans.json`` and runs ``crlnseg plan --json`` for ``--device cpu`` and ``cuda`` on the
same files. It prints both plans side by side in crlnseg's X Y Z axis order (nnU-Net's own order,
with its coarsest axis first, is kept in the JSON too) and writes them to
``benchmarks/results/nnunet_plan.json``.

nnU-Net lives in its own virtual environment, never in crlnseg's (the planner needs no GPU):

    python3 -m venv --system-site-packages /tmp/nnunet-venv
    /tmp/nnunet-venv/bin/pip install nnunetv2

From the repository root, ``--crlnseg`` naming the executable of crlnseg's own environment (it
runs this checkout's code: the script puts the repository first on its PYTHONPATH):

    nice /tmp/nnunet-venv/bin/python benchmarks/nnunet_plan.py --crlnseg /work/venv/bin/crlnseg
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "la"
LABELS = {"background": 0, "left atrium": 1}
IN_PLANE, SLICE, SLICE_EVERY_FIFTH = 0.8, 5.0, 4.0
# crlnseg does not plan the batch: every run takes the train.batch_labelled and
# train.batch_unlabelled defaults unless a preset or option sets them.
CRLNSEG_BATCH = "2 labelled + 2 unlabelled (not planned: train.batch_labelled / batch_unlabelled)"


def thick_case(image: np.ndarray, label: np.ndarray, affine: np.ndarray, slice_mm: float
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The case on a 0.8 x 0.8 x ``slice_mm`` grid over the same extent (S-I axis thick)."""
    from scipy.ndimage import affine_transform

    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = affine[:3, :3] / spacing
    new = np.full(3, IN_PLANE)
    new[int(np.argmax(np.abs(direction[2])))] = slice_mm  # the array axis closest to world S-I
    shape = np.maximum(1, np.round(np.array(image.shape) * spacing / new)).astype(int)
    # Output voxel i samples input coordinate i * new / old + (new / old - 1) / 2: voxel centres
    # of a grid whose outer faces are the original grid's, so the header spacing is exact.
    scale = new / spacing
    offset = (scale - 1) / 2
    img = affine_transform(image.astype(np.float32), scale, offset, output_shape=tuple(shape),
                           order=3, mode="nearest")
    lab = affine_transform(label, scale, offset, output_shape=tuple(shape), order=0,
                           mode="nearest")
    out = np.eye(4)
    out[:3, :3] = direction * new
    out[:3, 3] = affine[:3, 3] + direction @ ((new - spacing) / 2)
    return img.astype(np.float32), lab.astype(np.uint8), out


def build_thick(data: Path, out: Path, ids: list[str]) -> Path:
    import nibabel as nib

    done = out / ".done"
    if done.is_file():
        return out
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for i, case in enumerate(ids):
        img_n = nib.load(str(data / "images" / f"{case}.nii.gz"))
        lab_n = nib.load(str(data / "labels" / f"{case}.nii.gz"))
        slice_mm = SLICE_EVERY_FIFTH if i % 5 == 0 else SLICE
        image, label, affine = thick_case(np.asarray(img_n.dataobj, np.float32),
                                          np.asarray(lab_n.dataobj, np.uint8), img_n.affine,
                                          slice_mm)
        for sub, arr in (("images", image), ("labels", label)):
            nifti = nib.Nifti1Image(arr, affine)
            nifti.header.set_qform(affine, code=1)
            nifti.header.set_sform(affine, code=1)
            nib.save(nifti, str(out / sub / f"{case}.nii.gz"))
    done.write_text("")
    return out


def nnunet_raw(raw: Path, dataset: str, data: Path, ids: list[str]) -> Path:
    folder = raw / dataset
    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for case in ids:
        for src, dst in ((data / "images" / f"{case}.nii.gz",
                          folder / "imagesTr" / f"{case}_0000.nii.gz"),
                         (data / "labels" / f"{case}.nii.gz",
                          folder / "labelsTr" / f"{case}.nii.gz")):
            if not dst.exists():
                dst.symlink_to(src.resolve())
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "MRI"}, "labels": LABELS, "numTraining": len(ids),
        "file_ending": ".nii.gz"}, indent=1))
    return folder


def nnunet_tool(name: str) -> str:
    """nnU-Net's console script of the interpreter running this file (its own venv)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        raise SystemExit(f"{name} not found: run this file with the python of nnU-Net's venv")
    return found


def nnunet_plan(work: Path, dataset_id: int, dataset: str, processes: int) -> dict:
    env = {**os.environ, "nnUNet_raw": str(work / "nnUNet_raw"),
           "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"),
           "nnUNet_results": str(work / "nnUNet_results")}
    log = work / f"{dataset}.log"
    with log.open("w") as f:
        for cmd in ([nnunet_tool("nnUNetv2_extract_fingerprint"), "-d", str(dataset_id),
                     "-np", str(processes), "--verify_dataset_integrity", "--clean", "--no_pbar"],
                    [nnunet_tool("nnUNetv2_plan_experiment"), "-d", str(dataset_id),
                     "-pl", "ExperimentPlanner"]):
            if subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"{Path(cmd[0]).name} failed: see {log}")
    pre = work / "nnUNet_preprocessed" / dataset
    return {"plans": json.loads((pre / "nnUNetPlans.json").read_text()),
            "fingerprint": json.loads((pre / "dataset_fingerprint.json").read_text())}


def crlnseg_plan(crlnseg: str, folder: Path, device: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([crlnseg, "plan", str(folder), "--json", "--device", device], env=env,
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"crlnseg plan failed:\n{proc.stderr}")
    return json.loads(proc.stdout)


def nnunet_axes(data: Path, ids: list[str], transpose_forward: list[int]) -> list[int]:
    """For crlnseg's axes X, Y, Z, the axis of nnU-Net's plan that holds each.

    nnU-Net reads NIfTI through SimpleITK: its array axes are the file's (i, j, k) reversed,
    then ``transpose_forward`` puts the coarsest axis first. crlnseg orders axes by the world
    (RAS) axis the file's axis runs along; every case here shares one axis order.
    """
    import nibabel as nib

    orders = {tuple(int(np.argmax(np.abs(nib.load(str(data / "images" / f"{c}.nii.gz")).affine
                                          [:3, j]))) for j in range(3)) for c in ids}
    if len(orders) != 1:
        raise SystemExit(f"cases of {data} differ in axis order {orders}: nnU-Net does not "
                         "reorient, so its plan has no single X Y Z order")
    world_of_file_axis = orders.pop()
    world_of_plan_axis = [world_of_file_axis[2 - a] for a in transpose_forward]
    return [world_of_plan_axis.index(w) for w in range(3)]


def crlnseg_median_shape(data: Path, ids: list[str], target: list[float]) -> list[float]:
    """crlnseg's median shape at the target (the plan prints it rounded): per case the header's
    shape x spacing / target in X Y Z order, not rounded, then the per-axis median."""
    import nibabel as nib

    shapes = []
    for case in ids:
        header = nib.load(str(data / "images" / f"{case}.nii.gz")).header
        world = [int(np.argmax(np.abs(header.get_best_affine()[:3, j]))) for j in range(3)]
        size = np.array(header.get_data_shape()[:3]) * np.array(header.get_zooms()[:3])
        shapes.append([size[world.index(w)] / target[w] for w in range(3)])
    return [round(float(v), 3) for v in np.median(shapes, axis=0)]


def side_by_side(cpu: dict, cuda: dict, nn: dict, axes: list[int],
                 median_shape: list[float]) -> dict:
    fullres = nn["plans"]["configurations"]["3d_fullres"]
    arch = fullres["architecture"]["arch_kwargs"]

    def xyz(values: list) -> list:
        return [values[a] for a in axes]

    def value(p: dict, key: str):
        return p["plan"][key]["value"]

    pools = [xyz(s) for s in arch["strides"][1:]]  # stage 0 never pools
    return {
        "target spacing (mm)": {"crlnseg": value(cpu, "prepare.target_spacing"),
                                "nnU-Net": xyz([round(v, 6) for v in fullres["spacing"]])},
        "median shape at target": {
            "crlnseg": median_shape,
            "nnU-Net": xyz(fullres["median_image_size_in_voxels"])},
        "patch": {"crlnseg cpu": value(cpu, "train.patch"),
                  "crlnseg cuda": value(cuda, "train.patch"),
                  "nnU-Net 3d_fullres": xyz(fullres["patch_size"])},
        "pooling per level": {"crlnseg": value(cpu, "model.strides"), "nnU-Net": pools},
        "poolings per axis": {
            "crlnseg": [sum(level[a] == 2 for level in value(cpu, "model.strides"))
                        for a in range(3)],
            "nnU-Net": [sum(level[a] == 2 for level in pools) for a in range(3)]},
        "conv kernels per level": {"crlnseg": value(cpu, "model.kernels"),
                                   "nnU-Net": [xyz(k) for k in arch["kernel_sizes"]]},
        "normalisation": {"crlnseg": value(cpu, "prepare.normalize"),
                          "nnU-Net": {"schemes": fullres["normalization_schemes"],
                                      "use_mask_for_norm": fullres["use_mask_for_norm"]}},
        "batch size": {"crlnseg": CRLNSEG_BATCH, "nnU-Net": fullres["batch_size"]},
        "nnU-Net 3d_lowres planned": "3d_lowres" in nn["plans"]["configurations"],
    }


def show(v) -> str:
    if isinstance(v, list) and v and isinstance(v[0], list):
        return ", ".join(show(x) for x in v)
    if isinstance(v, list):
        return " x ".join(f"{x:g}" if isinstance(x, float) else str(x) for x in v)
    if isinstance(v, dict):
        return "; ".join(f"{k} {show(x)}" for k, x in v.items())
    return str(v)


def git_commit() -> str:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    return git("rev-parse", "--short", "HEAD") + (" (modified)" if git("status", "--porcelain",
                                                                        "crlnseg") else "")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--crlnseg", default="crlnseg", help="crlnseg executable")
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" /
                    "nnunet_plan.json")
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the nnU-Net folders and the thick-slice data here (default: a "
                         "temporary folder, removed at the end)")
    ap.add_argument("--processes", type=int, default=2, help="nnU-Net fingerprint workers")
    args = ap.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="nnunet-plan-"))
    work.mkdir(parents=True, exist_ok=True)
    ids = (args.data / "cases.txt").read_text().split()
    datasets = {
        "la": (901, "Dataset901_LA", args.data,
               "LA half resolution as shipped (1.25 mm isotropic)"),
        "la_thick": (902, "Dataset902_LAThick", None,
                     f"LA resampled to {IN_PLANE:g} x {IN_PLANE:g} mm in-plane, {SLICE:g} mm "
                     f"slices ({SLICE_EVERY_FIFTH:g} mm for every fifth case)"),
    }
    result = {"date": time.strftime("%Y-%m-%d"),
              "machine": f"{os.cpu_count()}-core {platform.machine()} CPU",
              "crlnseg_commit": git_commit(), "nnunetv2": metadata.version("nnunetv2"),
              "command": "nice /tmp/nnunet-venv/bin/python benchmarks/nnunet_plan.py "
                         f"--crlnseg {args.crlnseg}",
              "axis_order": "crlnseg's X Y Z (canonical RAS); nnU-Net's values permuted to it",
              "datasets": {}}
    try:
        for key, (dataset_id, name, data, about) in datasets.items():
            data = data or build_thick(args.data, work / "la_thick", ids)
            nnunet_raw(work / "nnUNet_raw", name, data, ids)
            nn = nnunet_plan(work, dataset_id, name, args.processes)
            cpu, cuda = (crlnseg_plan(args.crlnseg, data, d) for d in ("cpu", "cuda"))
            axes = nnunet_axes(data, ids, nn["plans"]["transpose_forward"])
            shape = crlnseg_median_shape(data, ids, cpu["plan"]["prepare.target_spacing"]["value"])
            rows = side_by_side(cpu, cuda, nn, axes, shape)
            fullres = nn["plans"]["configurations"]["3d_fullres"]
            result["datasets"][key] = {
                "about": about, "cases": len(ids), "side_by_side": rows,
                "crlnseg": {"cpu": cpu, "cuda": cuda},
                "nnunet": {"transpose_forward": nn["plans"]["transpose_forward"],
                           "nnunet_axis_of_xyz": axes,
                           "original_median_spacing_after_transp":
                               nn["plans"]["original_median_spacing_after_transp"],
                           "original_median_shape_after_transp":
                               nn["plans"]["original_median_shape_after_transp"],
                           "median_relative_size_after_cropping":
                               nn["fingerprint"]["median_relative_size_after_cropping"],
                           "3d_fullres": fullres,
                           "3d_lowres": nn["plans"]["configurations"].get("3d_lowres")}}
            print(f"\n{key}: {about}")
            for row, values in rows.items():
                if isinstance(values, dict):
                    for who, v in values.items():
                        print(f"  {row:<26} {who:<20} {show(v)}")
                else:
                    print(f"  {row:<26} {'':<20} {values}")
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
