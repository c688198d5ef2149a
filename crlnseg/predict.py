"""``crlnseg predict``: segment scans with a trained run, masks on the inputs' exact grids.

INPUT is one image, the channel files of one case (nnU-Net ``_0000``, ``_0001``... suffixes of one
case ID, channels exactly 0..C-1, ordered by suffix; files without suffixes are taken in the order
given), or a folder of cases (any layout :func:`discover_cases` knows). OUTPUT is then a mask file
(an image extension), or a folder receiving ``<ID><ext>`` per case, ``<ext>`` being the input's
own extension (``img.mha`` gives ``img.mha``; HDF5 inputs give ``.nii.gz``).
``save_probabilities`` also writes ``<ID>_probabilities.npz`` (``probabilities`` float16
(C, X, Y, Z) on the input grid, ``classes``), as nnU-Net does.

Everything checkable is checked before anything is written: outputs (exist without
``overwrite``, folder not writable, same file as an input) and every input's header (readable,
3D, channel shapes and geometry). Each file is written atomically. One summary line per case goes
to stdout: ``<case>\\t<seconds>\\t<class>=<voxels>...`` (tab-separated).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crlnseg.console import log
from crlnseg.data.discovery import CaseFiles
from crlnseg.errors import DataError
from crlnseg.inference.cases import (
    check_channels,
    check_headers,
    input_cases,
    is_image_path,
    output_extension,
    written_so_far,
)
from crlnseg.io.paths import IMAGE_SUFFIXES, split_suffix
from crlnseg.io.writers import check_not_inputs, check_outputs, make_folder, write_atomic
from crlnseg.settings import PredictSettings

__all__ = ["CaseResult", "plan_cases", "predict_paths", "summary_line", "probabilities_path",
           "save_probabilities"]


@dataclass
class CaseResult:
    case: str
    output: Path
    seconds: float
    voxels: dict[str, int]


def plan_cases(inputs: list[Path], output: Path) -> list[tuple[CaseFiles, Path]]:
    """The cases of INPUT and the mask path of each."""
    output = Path(output)
    cases, from_folder = input_cases(inputs)
    if from_folder:
        if is_image_path(output) or (output.exists() and not output.is_dir()):
            raise DataError(f"{output}: INPUT is a folder, so OUTPUT must be a folder")
        return [(c, output / f"{c.id}{output_extension(c)}") for c in cases]
    case = cases[0]
    if not is_image_path(output) and output.suffix and not output.is_dir():
        # "a.png" would otherwise become a folder a.png/ holding a.nii.gz.
        raise DataError(f"{output}: '{output.suffix}' is not an image extension (OUTPUT is a mask "
                        f"{', '.join(IMAGE_SUFFIXES)}, or a folder)")
    target = output if is_image_path(output) else output / f"{case.id}{output_extension(case)}"
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
    check_not_inputs(outputs, [p for case, _ in plan for p in case.images])
    check_outputs(outputs, overwrite)
    predictor = Predictor.from_run(model, which, settings or PredictSettings())
    for note in (predictor.choice_note, predictor.relation_note()):
        if note:
            log(note)
    check_channels(check_headers([case for case, _ in plan], predictor.prepare.h5_spacing),
                   predictor.channels)
    results = []
    for i, (case, target) in enumerate(plan, 1):
        log(f"case {i}/{len(plan)}: {case.id}")
        try:
            volume = read_case_images(case.images, predictor.prepare.h5_spacing)
        except DataError as err:  # a body corrupt behind a sound header
            raise written_so_far(err, i - 1, Path(output)) from None
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
