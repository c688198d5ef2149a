"""What a header claims against what the file holds: refuse a file whose header promises more
voxels than its bytes can hold before anything is allocated, and recognise the libraries' short
reads as a truncated file."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

from crlnseg.errors import DataError
from crlnseg.io.paths import split_suffix

__all__ = ["MAX_DEFLATE_RATIO", "SHORT_READ", "dims", "claims_more", "claimed_bytes",
           "check_claimed_size", "stored_bytes"]

# Deflate (gzip, zlib) never shrinks data more than ~1032:1: a compressed file of N bytes holds
# at most this many times N bytes of voxels.
MAX_DEFLATE_RATIO = 1032


# Short reads: nibabel ("Expected 32000 bytes, got 4352 bytes"), Teem's NRRD raw reader ("fread
# got only 750 4-sized things, not 1000"), MetaIO ("data not read completely", on stderr).
SHORT_READ = re.compile(r"Expected \d+ bytes, got \d+ bytes|fread got only|"
                         r"not read completely", re.IGNORECASE)


def dims(shape: Sequence[int]) -> str:
    return " x ".join(str(int(n)) for n in shape)


def claims_more(path: Path, shape: Sequence[int]) -> str:
    return (f"{path}: the header claims {dims(shape)} voxels but the file holds fewer "
            "(truncated or corrupt file)")


def claimed_bytes(reader) -> int:
    """Voxel bytes the header of ``reader`` (a SimpleITK reader after ReadImageInformation)
    describes: voxels x components x bytes per component (a lower bound if the type is odd)."""
    import SimpleITK as sitk

    kind = sitk.GetPixelIDValueAsString(reader.GetPixelID())
    bits = re.search(r"(\d+)-bit", kind)
    item = (int(bits.group(1)) // 8 if bits else 1) * (2 if "complex" in kind else 1)
    return math.prod(int(n) for n in reader.GetSize()) * reader.GetNumberOfComponents() * item


def check_claimed_size(path: Path, reader) -> None:
    """Refuse a header whose voxels cannot fit in the file(s), before anything is allocated.

    Uncompressed NIfTI: exactly (offset + data size). Other files: at most the deflate ratio times
    the bytes on disk (header file plus a separate data file it names), so an absurd size
    (100000^3) or a few-kB file claiming gigabytes is caught; a truncation within that bound is
    caught when reading.
    """
    try:
        size = path.stat().st_size
    except OSError:
        return
    if split_suffix(path)[1].lower() == ".nii":
        import nibabel as nib

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                header = nib.load(str(path)).header
                shape = tuple(int(n) for n in header.get_data_shape())
                end = int(header.get_data_offset()) + (math.prod(shape)
                                                       * header.get_data_dtype().itemsize)
        except Exception:  # noqa: BLE001 - nibabel cannot tell; reading will
            return
        if end > size:
            raise DataError(claims_more(path, shape))
        return
    available = stored_bytes(path, size)
    if available is not None and claimed_bytes(reader) > MAX_DEFLATE_RATIO * available:
        raise DataError(claims_more(path, reader.GetSize()))


def stored_bytes(path: Path, size: int) -> int | None:
    """Bytes on disk that can hold ``path``'s voxels: the file, plus the data file a MetaImage or
    NRRD header names; None when that is not known (file lists, patterns, bzip2 encoding)."""
    suffix = split_suffix(path)[1].lower()
    if suffix not in (".mha", ".mhd", ".nrrd", ".nhdr"):
        return size
    try:
        with open(path, "rb") as f:
            head = f.read(65536).decode("latin-1")
    except OSError:
        return None
    if suffix in (".nrrd", ".nhdr"):
        if re.search(r"^encoding:\s*(bz2|bzip2)\s*$", head, re.MULTILINE | re.IGNORECASE):
            return None  # bzip2 can shrink data far more than deflate
        found = re.search(r"^data ?file:\s*(.+?)\s*$", head, re.MULTILINE | re.IGNORECASE)
    else:
        found = re.search(r"^ElementDataFile\s*=\s*(.+?)\s*$", head, re.MULTILINE)
    if found is None or found.group(1).upper() == "LOCAL":
        return size if suffix in (".mha", ".nrrd") else None
    name = found.group(1)
    if name.upper().startswith("LIST") or "%" in name or " " in name:
        return None
    try:
        return size + (path.parent / name).stat().st_size
    except OSError:
        return None  # a missing data file: the reader says so

