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
from crlnseg.data.discovery import CaseFiles, discover_cases, discover_single
from crlnseg.errors import DataError
from crlnseg.io.paths import IMAGE_SUFFIXES, channel_index, split_suffix
from crlnseg.io.readers import Header
from crlnseg.io.writers import check_not_inputs, check_outputs, file_key, make_folder, write_atomic
from crlnseg.settings import PredictSettings

__all__ = ["CaseResult", "input_cases", "plan_cases", "check_outputs", "check_not_inputs",
           "check_headers", "check_channels", "written_so_far", "predict_paths",
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
    if len(inputs) == 1:
        return [discover_single(inputs[0])], False
    cases = [discover_single(p) for p in inputs]  # each exists and is an image
    _check_distinct(inputs)
    return [_channel_case(inputs, [c.id for c in cases])], False


def _check_distinct(paths: list[Path]) -> None:
    seen: dict[tuple[int, int], Path] = {}
    for path in paths:
        other = seen.setdefault(file_key(path), path)  # type: ignore[arg-type]
        if other is not path:
            raise DataError(f"{path}: given twice as a channel file (also {other})")


def _channel_case(paths: list[Path], ids: list[str]) -> CaseFiles:
    """Explicit channel files as one case, checked as folder discovery checks them."""
    order = [channel_index(split_suffix(p)[0]) for p in paths]
    if all(i is None for i in order):  # no suffixes: the order given is the channel order
        return CaseFiles(id=ids[0], images=paths)
    if any(i is None for i in order):
        plain = paths[order.index(None)]
        raise DataError(f"{plain}: no channel suffix (_0000, _0001...) while other files have "
                        "one; name every channel file <ID>_<NNNN> or none")
    for path, case_id in zip(paths, ids, strict=True):
        if case_id != ids[0]:
            raise DataError(f"{path}: case '{case_id}' differs from '{ids[0]}' of {paths[0]}; "
                            "the channel files of one case share its ID")
    if sorted(order) != list(range(len(paths))):  # type: ignore[type-var]
        raise DataError(f"{paths[0]}: case '{ids[0]}' has channels {sorted(order)}, "  # type: ignore[type-var]
                        f"expected 0..{len(paths) - 1}")
    return CaseFiles(id=ids[0], images=[p for _, p in sorted(zip(order, paths, strict=True))])


def plan_cases(inputs: list[Path], output: Path) -> list[tuple[CaseFiles, Path]]:
    """The cases of INPUT and the mask path of each."""
    output = Path(output)
    cases, from_folder = input_cases(inputs)
    if from_folder:
        if _is_image_path(output) or (output.exists() and not output.is_dir()):
            raise DataError(f"{output}: INPUT is a folder, so OUTPUT must be a folder")
        return [(c, output / f"{c.id}{_extension(c)}") for c in cases]
    case = cases[0]
    if not _is_image_path(output) and output.suffix and not output.is_dir():
        # "a.png" would otherwise become a folder a.png/ holding a.nii.gz.
        raise DataError(f"{output}: '{output.suffix}' is not an image extension (OUTPUT is a mask "
                        f"{', '.join(IMAGE_SUFFIXES)}, or a folder)")
    target = output if _is_image_path(output) else output / f"{case.id}{_extension(case)}"
    return [(case, target)]


def check_headers(cases: list[CaseFiles], h5_spacing: tuple[float, float, float]
                  ) -> dict[str, Header]:
    """Every case's header-level checks, so that bad input stops the run before any output."""
    from crlnseg.io.readers import check_case_headers

    return {case.id: check_case_headers(case.images, h5_spacing) for case in cases}


def check_channels(headers: dict[str, Header], channels: int) -> None:
    """Every case has the model's number of channels (files, or volumes of one 4D file)."""
    for case_id, header in headers.items():
        if header.shape[0] != channels:
            raise DataError(f"case {case_id}: {header.shape[0]} channel(s) ({header.path}), but "
                            f"the model was trained on {channels} channel(s)")


def written_so_far(err: DataError, done: int, where: Path) -> DataError:
    """``err`` saying that ``done`` cases already have outputs (a rerun then needs --overwrite)."""
    if not done:
        return err
    return DataError(f"{str(err).splitlines()[0]} ({done} case(s) before it were already written "
                     f"to {where}; rerun with --overwrite to replace them)")


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
        log(f"[{i}/{len(plan)}] {case.id}")
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
