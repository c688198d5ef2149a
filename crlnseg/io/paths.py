"""File-name conventions of medical images: known extensions, DICOM files and case IDs.

Kept free of heavy imports so that case discovery (and ``crlnseg --help``) stays fast.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

__all__ = [
    "IMAGE_SUFFIXES",
    "H5_SUFFIXES",
    "NIFTI_SUFFIXES",
    "split_suffix",
    "is_image_file",
    "is_h5_file",
    "is_nifti",
    "channel_index",
    "strip_channel",
    "symlink_cycle",
    "points_above",
    "missing_reason",
    "DICOM_SUFFIXES",
    "is_dicom_file",
    "dicom_files",
    "holds_dicom",
]

# Longest first so ".nii.gz" wins over ".gz"-less ".nii".
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
H5_SUFFIXES = (".h5", ".hdf5")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
# DICOM files are told by content (the "DICM" magic after the 128-byte preamble); files with
# these extensions count too (old files without a preamble).
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
_DICOM_MAGIC_AT = 128

_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def split_suffix(path: Path | str) -> tuple[str, str]:
    """``"a/case_0000.nii.gz"`` -> ``("case_0000", ".nii.gz")``; else ``(stem, suffix)``."""
    name = Path(path).name
    lower = name.lower()
    for suffix in IMAGE_SUFFIXES + H5_SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], name[-len(suffix):]
    p = Path(name)
    return p.stem, p.suffix


def is_image_file(path: Path) -> bool:
    """A readable image file by extension (hidden files and temporaries excluded)."""
    return (path.is_file() and not path.name.startswith(".")
            and split_suffix(path)[1].lower() in IMAGE_SUFFIXES)


def is_h5_file(path: Path) -> bool:
    return split_suffix(path)[1].lower() in H5_SUFFIXES


def is_nifti(path: Path | str) -> bool:
    return split_suffix(path)[1].lower() in NIFTI_SUFFIXES


def is_dicom_file(path: Path) -> bool:
    """A visible regular file with the DICOM magic (or a DICOM extension); reads 132 bytes."""
    path = Path(path)
    if path.name.startswith(".") or not path.is_file() or is_image_file(path) or is_h5_file(path):
        return False
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(_DICOM_MAGIC_AT)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: Path) -> list[Path]:
    """The DICOM files directly in ``folder`` (sorted by name); [] for a non-folder."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if is_dicom_file(p))


def holds_dicom(folder: Path) -> bool:
    """Whether ``folder`` directly holds at least one DICOM file (stops at the first)."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    return any(is_dicom_file(p) for p in folder.iterdir())


def channel_index(stem: str) -> int | None:
    """The nnU-Net channel number of ``"<case>_0001"`` (1), or ``None`` without the suffix."""
    match = _CHANNEL.match(stem)
    return int(match["channel"]) if match else None


def strip_channel(stem: str) -> str:
    """``"la_003_0000"`` -> ``"la_003"``; names without a channel suffix are returned unchanged."""
    match = _CHANNEL.match(stem)
    return match["case"] if match else stem


def symlink_cycle(path: Path | str) -> Path | None:
    """The symbolic link at which resolving ``path`` goes round in a cycle (``a -> b``,
    ``b -> a``; ``x -> x``; ``d -> d/sub``), or None when it does not (ELOOP only)."""
    try:
        os.stat(path)
        return None
    except OSError as err:
        if err.errno != errno.ELOOP:
            return None
    seen: dict[str, str | None] = {}  # link -> where it leads; None while being resolved

    def walk(base: str, rest: str) -> tuple[str, str | None]:
        for name in rest.split(os.sep):
            if name in ("", "."):
                continue
            if name == "..":
                base = os.path.dirname(base)
                continue
            link = os.path.join(base, name)
            if not os.path.islink(link):
                base = link
                continue
            if link in seen:
                if seen[link] is None:
                    return link, link
                base = seen[link]  # type: ignore[assignment]
                continue
            seen[link] = None
            target = os.readlink(link)
            base, cycle = walk(os.sep if os.path.isabs(target) else base, target)
            if cycle is not None:
                return base, cycle
            seen[link] = base
        return base, None

    start = os.path.join(os.getcwd(), os.fspath(path))  # no normpath: ".." follows links
    try:
        cycle = walk(os.sep, start)[1]
    except OSError:
        return None
    if cycle is None:
        return None
    given = Path(path)
    return given if os.path.join(os.getcwd(), os.fspath(given)) == cycle else Path(cycle)


def points_above(path: Path) -> Path | None:
    """For a symbolic link to a folder that contains it (``loop -> .``, ``up -> ..``): that
    folder, a cycle for whatever descends into ``path``; else None."""
    if not path.is_symlink() or not path.is_dir():
        return None
    target = os.path.realpath(path)
    here = os.path.realpath(path.parent)
    if here == target or here.startswith(target.rstrip(os.sep) + os.sep):
        return Path(target)
    return None


def missing_reason(path: Path, nothing: str = "no such file or folder") -> str:
    """Why ``path`` cannot be opened: a symbolic link cycle or a dangling link (named), else
    ``nothing``."""
    cycle = symlink_cycle(path)
    if cycle is not None:
        return f"symbolic link cycle at {cycle}"
    if path.is_symlink():
        return f"broken symbolic link (its target {os.readlink(path)} does not exist)"
    return nothing
