"""``crlnseg predict``: segment scans with a trained run, masks on the inputs' exact grids.

INPUT is one image, the channel files of one case (nnU-Net ``_0000``, ``_0001``... suffixes,
ordered by suffix), or a folder of cases (any layout :func:`discover_cases` knows); OUTPUT is then
a mask file, or a folder receiving ``<ID><ext>`` per case with the input's extension (HDF5 inputs
give ``.nii.gz``). ``save_probabilities`` also writes ``<ID>_probabilities.npz`` (``probabilities``
float16 (C, X, Y, Z) on the input grid, ``classes``), as nnU-Net does.

Every output is checked before anything is written (exists without ``overwrite``, folder not
writable); each file is written atomically. One summary line per case goes to stdout:
``<case>\\t<seconds>\\t<class>=<voxels>...`` (tab-separated).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crlnseg.console import log
from crlnseg.data.discovery import CaseFiles, discover_cases, discover_single
from crlnseg.errors import DataError
from crlnseg.io.paths import IMAGE_SUFFIXES, channel_index, split_suffix, strip_channel
from crlnseg.io.writers import check_outputs, make_folder, write_atomic
from crlnseg.settings import PredictSettings

__all__ = ["CaseResult", "input_cases", "plan_cases", "check_outputs", "predict_paths",
           "summary_line", "probabilities_path", "save_probabilities"]


@dataclass
class CaseResult:
    case: str
    output: Path
    seconds: float
    voxels: dict[str, int]


def _is_image_path(path: Path) -> bool:
    return split_suffix(path)[1].lower() in IMAGE_SUFFIXES


def _extension(case: CaseFiles) -> str:
    ext = split_suffix(case.images[0])[1]
    return ext if ext.lower() in IMAGE_SUFFIXES else ".nii.gz"


def input_cases(inputs: list[Path]) -> tuple[list[CaseFiles], bool]:
    """The cases of INPUT and whether INPUT was a folder (else one case: one or more files)."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise DataError("no input given")
    if len(inputs) == 1 and inputs[0].is_dir():
        return discover_cases(inputs[0]), True
    for path in inputs:
        if not path.is_file():
            raise DataError(f"{path}: no such file or folder")
    if len(inputs) == 1:
        return [discover_single(inputs[0])], False
    order = [channel_index(split_suffix(p)[0]) for p in inputs]
    if all(i is not None for i in order):  # nnU-Net channel suffixes give the channel order
        inputs = [p for _, p in sorted(zip(order, inputs, strict=True))]
    return [CaseFiles(id=strip_channel(split_suffix(inputs[0])[0]), images=inputs)], False


def plan_cases(inputs: list[Path], output: Path) -> list[tuple[CaseFiles, Path]]:
    """The cases of INPUT and the mask path of each."""
    output = Path(output)
    cases, from_folder = input_cases(inputs)
    if from_folder:
        if _is_image_path(output) or (output.exists() and not output.is_dir()):
            raise DataError(f"{output}: INPUT is a folder, so OUTPUT must be a folder")
        return [(c, output / f"{c.id}{_extension(c)}") for c in cases]
    case = cases[0]
    target = output if _is_image_path(output) else output / f"{case.id}{_extension(case)}"
    return [(case, target)]


def probabilities_path(mask_path: Path) -> Path:
    return mask_path.with_name(f"{split_suffix(mask_path)[0]}_probabilities.npz")


def save_probabilities(probs: np.ndarray, classes: list[str], path: Path,
                       overwrite: bool = False) -> None:
    """``probabilities`` (float16) and ``classes`` in one ``.npz``, written atomically."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, probabilities=probs.astype(np.float16),
                                classes=np.array(classes))

    write_atomic(path, write, overwrite)


def summary_line(result: CaseResult) -> str:
    counts = "\t".join(f"{name}={n}" for name, n in result.voxels.items())
    return f"{result.case}\t{result.seconds:.2f}\t{counts}"


def predict_paths(inputs: list[Path], output: Path, model: Path,
                  settings: PredictSettings | None = None, which: str = "last",
                  probabilities: bool = False, overwrite: bool = False) -> list[CaseResult]:
    """Segment every case of ``inputs``; prints one summary line per case on stdout."""
    from crlnseg.inference.predictor import Predictor
    from crlnseg.io import read_case_images, write_image

    plan = plan_cases(inputs, Path(output))
    outputs = [p for _, p in plan] + ([probabilities_path(p) for _, p in plan]
                                      if probabilities else [])
    check_outputs(outputs, overwrite)
    predictor = Predictor.from_run(model, which, settings or PredictSettings())
    if predictor.choice_note:
        log(predictor.choice_note)
    for case, _ in plan:
        if len(case.images) > 1 and len(case.images) != predictor.channels:
            raise DataError(f"case {case.id}: {len(case.images)} channel files, but the model "
                            f"was trained on {predictor.channels} channel(s)")
    results = []
    for i, (case, target) in enumerate(plan, 1):
        log(f"[{i}/{len(plan)}] {case.id}")
        volume = read_case_images(case.images, predictor.prepare.h5_spacing)
        pred = predictor.predict_volume(volume, save_probabilities=probabilities)
        make_folder(target.parent)
        write_image(pred.mask, volume, target, overwrite=overwrite)
        if pred.probabilities is not None:
            save_probabilities(pred.probabilities, predictor.classes, probabilities_path(target),
                               overwrite)
        counts = np.bincount(pred.mask.ravel(), minlength=len(predictor.classes))
        voxels = dict(zip(predictor.classes, map(int, counts), strict=True))
        result = CaseResult(case.id, target, pred.seconds, voxels)
        print(summary_line(result), file=sys.stdout, flush=True)
        results.append(result)
    return results
