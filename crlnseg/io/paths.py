"""File-name conventions of medical images: known extensions and case IDs.

Kept free of heavy imports so that case discovery (and ``crlnseg --help``) stays fast.
"""

from __future__ import annotations

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
]

# Longest first so ".nii.gz" wins over ".gz"-less ".nii".
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
H5_SUFFIXES = (".h5", ".hdf5")
NIFTI_SUFFIXES = (".nii.gz", ".nii")

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


def channel_index(stem: str) -> int | None:
    """The nnU-Net channel number of ``"<case>_0001"`` (1), or ``None`` without the suffix."""
    match = _CHANNEL.match(stem)
    return int(match["channel"]) if match else None


def strip_channel(stem: str) -> str:
    """``"la_003_0000"`` -> ``"la_003"``; names without a channel suffix are returned unchanged."""
    match = _CHANNEL.match(stem)
    return match["case"] if match else stem
