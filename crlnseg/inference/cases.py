"""The inputs of ``predict`` and ``rectify``: which cases, their channel files, the extension of
their outputs, and the checks that stop a run before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

from crlnseg.data.discovery import CaseFiles, discover_cases, discover_single
from crlnseg.errors import DataError
from crlnseg.io.paths import IMAGE_SUFFIXES, channel_index, split_suffix
from crlnseg.io.readers import Header, check_case_headers
from crlnseg.io.writers import file_key

__all__ = ["is_image_path", "output_extension", "input_cases", "check_headers",
           "check_channel_count", "check_channels", "written_so_far"]


def is_image_path(path: Path) -> bool:
    return split_suffix(path)[1].lower() in IMAGE_SUFFIXES


def output_extension(case: CaseFiles) -> str:
    """Outputs keep the input's own image extension; HDF5 inputs and DICOM series folders give
    NIfTI."""
    if case.images[0].is_dir():  # a DICOM series (a folder named "1.2.840.5" has no extension)
        return ".nii.gz"
    ext = split_suffix(case.images[0])[1]
    return ext if ext.lower() in IMAGE_SUFFIXES else ".nii.gz"


def input_cases(inputs: list[Path]) -> tuple[list[CaseFiles], bool]:
    """The cases of INPUT and whether INPUT was a folder of cases (else one case: one or more
    files, or one DICOM series folder)."""
    inputs = [Path(p) for p in inputs]
    if not inputs:
        raise DataError("no input given")
    if len(inputs) == 1 and inputs[0].is_dir():
        cases = discover_cases(inputs[0])
        # A folder holding one DICOM series is one case, as one image file is.
        series = len(cases) == 1 and cases[0].images[0].is_dir() and os.path.samefile(
            cases[0].images[0], inputs[0])
        return cases, not series
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


def check_headers(cases: list[CaseFiles], h5_spacing: tuple[float, float, float]
                  ) -> dict[str, Header]:
    """Every case's header-level checks, so that bad input stops the run before any output."""
    return {case.id: check_case_headers(case.images, h5_spacing) for case in cases}


def check_channel_count(found: int, expected: int, where: object) -> None:
    """A case must have the model's number of channels (files, or volumes of one 4D file)."""
    if found != expected:
        raise DataError(f"{where}: {found} channel(s), but the model was trained on "
                        f"{expected} channel(s)")


def check_channels(headers: dict[str, Header], channels: int) -> None:
    """Every case's channel count, from its header."""
    for case_id, header in headers.items():
        check_channel_count(header.shape[0], channels, f"case {case_id} ({header.path})")


def written_so_far(err: DataError, done: int, where: Path) -> DataError:
    """``err`` saying that ``done`` cases already have outputs (a rerun then needs --overwrite)."""
    if not done:
        return err
    return DataError(f"{str(err).splitlines()[0]} ({done} case(s) before it were already written "
                     f"to {where}; rerun with --overwrite to replace them)")
