"""Find the cases of a dataset folder: which image files (channels) and which label make a case.

Layouts, detected in this order:

(b) nnU-Net / MSD: ``imagesTr/`` (+ ``labelsTr/``) and/or ``imagesTs/``; channel files
    ``<ID>_0000.nii.gz``, ``<ID>_0001.nii.gz``... (``dataset.json`` is optional and not needed).
(a) ``images/`` + ``labels/`` with the same file names (labels optional per case).
(c) a flat folder of images (unlabelled) and/or flat HDF5 files.
(d) a folder of HDF5 cases ``<ID>/mri_norm2.h5`` (datasets ``image`` and ``label``); a case folder
    holding one ``.h5`` file is itself accepted. The label lives inside the file, so
    ``CaseFiles.label`` is the ``.h5`` path itself (see :attr:`CaseFiles.label_in_image`).
(e) a folder whose files are one DICOM series (one case, named after the folder), and a folder of
    such folders ``<ID>/`` (as (d)). Under ``images/``, series folders ``images/<ID>/`` are cases
    too, their labels ``labels/<ID>.nii.gz`` (or a series folder ``labels/<ID>/``). The series
    folder itself stands for the image file (``CaseFiles.images == [folder]``). A folder holding
    DICOM files and image files side by side is refused as ambiguous.

Case IDs come from file names without extension and channel suffix (a series folder's whole name:
DICOM folders are often named after UIDs such as ``1.2.840.1``); results are sorted by ID.
A symbolic link whose target is missing is an error, never skipped: splits are often folders of
links, and a silently smaller split would go unnoticed. So is a symbolic link cycle (``a -> b``,
``b -> a``), and a folder link that leads back to a folder containing it where discovery would
descend into it.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from crlnseg.errors import DataError
from crlnseg.io.paths import (
    H5_SUFFIXES,
    IMAGE_SUFFIXES,
    channel_index,
    holds_dicom,
    is_h5_file,
    is_image_file,
    missing_reason,
    points_above,
    split_suffix,
    strip_channel,
)

__all__ = ["CaseFiles", "discover_cases", "discover_single", "h5_has_label"]


@dataclass
class CaseFiles:
    id: str
    images: list[Path]  # one file per channel, in channel order
    label: Path | None = None  # for HDF5 cases: the .h5 file itself (label stored inside)

    @property
    def label_in_image(self) -> bool:
        """True when the label is a dataset inside the image file (HDF5 cases)."""
        return self.label is not None and self.label in self.images


def discover_cases(folder: Path, require_labels: bool = False,
                   channels: bool = True) -> list[CaseFiles]:
    """All cases under ``folder`` (sorted by ID); :class:`DataError` if none or inconsistent.

    ``channels=False`` reads no channel suffix outside nnU-Net folders (each file is one case):
    masks have no channels, and ``patient_0001.nii.gz`` is then case ``patient_0001``.
    """
    folder = Path(folder)
    if folder.is_file():
        cases = [discover_single(folder)]
    elif not folder.is_dir():
        raise DataError(f"{folder}: {missing_reason(folder)}")
    elif (folder / "imagesTr").is_dir() or (folder / "imagesTs").is_dir():
        _refuse_loops(folder, "imagesTr", "labelsTr", "imagesTs")
        cases = _nnunet(folder)
    elif (folder / "images").is_dir():
        _refuse_loops(folder, "images", "labels")
        cases = _paired(folder / "images", folder / "labels", channels)
    else:
        cases = _dicom_folder(folder) or _flat(folder, channels) or _case_folders(folder)
    if not cases:
        raise DataError(f"{folder}: no cases found (expected images/ + labels/, imagesTr/, "
                        "image files, <ID>/mri_norm2.h5 folders, or DICOM series folders)")
    _check_channels(cases)
    if require_labels:
        missing = [c.id for c in cases if c.label is None]
        if missing:
            raise DataError(f"{folder}: {len(missing)} case(s) without a label, e.g. {missing[0]}")
    return sorted(cases, key=lambda c: c.id)


def discover_single(path: Path, channels: bool = True) -> CaseFiles:
    """One image file (or one HDF5 case file, or one DICOM series folder) as a case; the ID comes
    from its name (without an nnU-Net channel suffix unless ``channels`` is False: masks have no
    channels)."""
    path = Path(path)
    if path.is_dir() and holds_dicom(path):
        return _dicom_folder(path)[0]
    if not path.is_file():
        raise DataError(f"{path}: {missing_reason(path)}")
    if is_h5_file(path):
        return _h5_case(path)
    if not is_image_file(path):
        raise DataError(f"{path}: not a supported image (.nii, .nii.gz, .nrrd, .mha, .mhd, .h5)")
    stem = split_suffix(path)[0]
    return CaseFiles(id=strip_channel(stem) if channels else stem, images=[path])


def h5_has_label(path: Path) -> bool:
    """Whether an HDF5 case file holds a ``label`` dataset."""
    import h5py

    try:
        with h5py.File(path, "r") as f:
            return "label" in f
    except OSError as err:
        raise DataError(f"{path}: unreadable HDF5 file ({err})") from None


def _h5_case(path: Path) -> CaseFiles:
    # Community layout <ID>/mri_norm2.h5: the folder names the case; otherwise the file does.
    stem = split_suffix(path)[0]
    case_id = path.parent.name if stem == "mri_norm2" else stem
    return CaseFiles(id=case_id, images=[path], label=path if h5_has_label(path) else None)


def _dicom_folder(folder: Path) -> list[CaseFiles]:
    """``[case]`` for a folder of DICOM files (ID: the folder's name), else ``[]``; DataError when
    image or HDF5 files lie beside them."""
    if not holds_dicom(folder):
        return []
    others = [p for p in _entries(folder) if is_image_file(p) or (p.is_file() and is_h5_file(p))]
    if others:
        raise DataError(f"{folder}: both DICOM files and image files ({others[0].name}) in one "
                        "folder, which is ambiguous; keep the DICOM series in a folder of its own")
    name = folder.name or Path(os.path.abspath(folder)).name
    return [CaseFiles(id=name, images=[folder])]


def _series_folders(folder: Path) -> list[Path]:
    """The sub-folders of ``folder`` holding DICOM files (each one series)."""
    if not folder.is_dir():
        return []
    return [p for p in _entries(folder) if p.is_dir() and holds_dicom(p)]


def _refuse_loops(folder: Path, *names: str) -> None:
    """A layout folder (or case folder) that is a dangling link, a link cycle or a link back to a
    folder containing it is an error (never skipped: its cases would silently go missing)."""
    for name in names:
        sub = folder / name
        if sub.is_symlink() and not sub.exists():
            raise DataError(f"{sub}: {missing_reason(sub)}")
        above = points_above(sub)
        if above is not None:
            raise DataError(f"{sub}: symbolic link cycle at {sub} (it leads back to {above}, "
                            "a folder that contains it)")


def _entries(folder: Path) -> list[Path]:
    """The visible entries of ``folder``; DataError on a dangling link that may be a case."""
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    for path in entries:
        suffix = split_suffix(path)[1].lower()
        if (suffix in IMAGE_SUFFIXES + H5_SUFFIXES or not suffix) and not path.exists():
            raise DataError(f"{path}: {missing_reason(path)}")
    return entries


def _files(folder: Path) -> list[Path]:
    return [p for p in _entries(folder) if is_image_file(p)] if folder.is_dir() else []


def _group_images(files: list[Path], split_channels: bool) -> dict[str, list[Path]]:
    """Case ID -> channel files; channel suffixes are honoured when ``split_channels``."""
    by_case: dict[str, dict[int, Path]] = defaultdict(dict)
    for path in files:
        stem = split_suffix(path)[0]
        channel = channel_index(stem) if split_channels else None
        case_id = strip_channel(stem) if channel is not None else stem
        key = channel if channel is not None else 0
        if key in by_case[case_id]:
            raise DataError(f"{path}: duplicate case ID '{case_id}' (also {by_case[case_id][key]})")
        by_case[case_id][key] = path
    result = {}
    for case_id, channels in by_case.items():
        if sorted(channels) != list(range(len(channels))):
            raise DataError(f"{channels[min(channels)]}: case '{case_id}' has channels "
                            f"{sorted(channels)}, expected 0..{len(channels) - 1}")
        result[case_id] = [channels[i] for i in range(len(channels))]
    return result


def _match_labels(images: dict[str, list[Path]], labels: list[Path]) -> dict[str, Path]:
    """Label file per case ID; a label whose case has no image is an error."""
    matched: dict[str, Path] = {}
    for path in labels:
        stem = path.name if path.is_dir() else split_suffix(path)[0]
        case_id = stem if stem in images else strip_channel(stem)
        if case_id not in images:
            raise DataError(f"{path}: label without image (no case '{case_id}')")
        if case_id in matched:
            raise DataError(f"{path}: duplicate label for case '{case_id}' "
                            f"(also {matched[case_id]})")
        matched[case_id] = path
    return matched


def _has_channels(files: list[Path]) -> bool:
    return bool(files) and all(channel_index(split_suffix(p)[0]) is not None for p in files)


def _paired(images_dir: Path, labels_dir: Path, channels: bool = True) -> list[CaseFiles]:
    files = _files(images_dir)
    split = channels and _has_channels(files)
    images = _group_images(files, split_channels=split)
    for series in _series_folders(images_dir):
        case = _dicom_folder(series)[0]
        if case.id in images:
            raise DataError(f"{series}: duplicate case ID '{case.id}' (also {images[case.id][0]})")
        images[case.id] = case.images
    labels = _match_labels(images, _files(labels_dir) + _series_folders(labels_dir))
    return [CaseFiles(cid, paths, labels.get(cid)) for cid, paths in images.items()]


def _nnunet(folder: Path) -> list[CaseFiles]:
    train = _group_images(_files(folder / "imagesTr"), split_channels=True)
    test = _group_images(_files(folder / "imagesTs"), split_channels=True)
    for case_id in sorted(train.keys() & test.keys()):
        raise DataError(f"{test[case_id][0]}: duplicate case ID '{case_id}' "
                        f"(also {train[case_id][0]})")
    labels = _match_labels(train, _files(folder / "labelsTr"))
    cases = [CaseFiles(cid, paths, labels.get(cid)) for cid, paths in train.items()]
    return cases + [CaseFiles(cid, paths, None) for cid, paths in test.items()]


def _flat(folder: Path, channels: bool = True) -> list[CaseFiles]:
    files = _files(folder)
    split = channels and _has_channels(files)
    cases = [CaseFiles(cid, paths) for cid, paths in _group_images(files, split).items()]
    cases += [_h5_case(p) for p in _entries(folder) if p.is_file() and is_h5_file(p)]
    return _unique(cases)


def _case_folders(folder: Path) -> list[CaseFiles]:
    """Case folders: ``<ID>/mri_norm2.h5`` (one HDF5 file each) or ``<ID>/`` DICOM series."""
    cases = []
    for sub in (p for p in _entries(folder) if p.is_dir()):
        _refuse_loops(folder, sub.name)
        found = [p for p in _entries(sub) if p.is_file() and is_h5_file(p)]
        if len(found) > 1:
            raise DataError(f"{sub}: {len(found)} HDF5 files in one case folder, expected one")
        cases += [_h5_case(found[0])] if found else _dicom_folder(sub)
    return _unique(cases)


def _unique(cases: list[CaseFiles]) -> list[CaseFiles]:
    seen: dict[str, CaseFiles] = {}
    for case in cases:
        if case.id in seen:
            raise DataError(f"{case.images[0]}: duplicate case ID '{case.id}' "
                            f"(also {seen[case.id].images[0]})")
        seen[case.id] = case
    return cases


def _check_channels(cases: list[CaseFiles]) -> None:
    counts = {len(c.images) for c in cases}
    if len(counts) > 1:
        first = cases[0]
        odd = next(c for c in cases if len(c.images) != len(first.images))
        raise DataError(f"{odd.images[0]}: case '{odd.id}' has {len(odd.images)} channel file(s) "
                        f"but case '{first.id}' has {len(first.images)}")
