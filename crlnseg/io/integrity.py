"""What a header claims: refuse a file whose header promises more voxels than its bytes can hold
before anything is allocated, recognise the libraries' short reads as a truncated file, and refuse
a geometry no grid can have (spacing not positive and finite, direction not orthonormal), which
the readers would otherwise pass on as is or silently replace (a zero or NaN NIfTI pixdim reads as
1 mm in SimpleITK and nibabel; a negative one as negative in SimpleITK, its absolute value in
nibabel)."""

from __future__ import annotations

import contextlib
import logging
import math
import re
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from crlnseg.errors import DataError
from crlnseg.io.paths import is_nifti, split_suffix

__all__ = ["MAX_DEFLATE_RATIO", "SHORT_READ", "ORTHONORMAL_TOL", "dims", "claims_more",
           "claimed_bytes", "check_claimed_size", "stored_bytes", "check_geometry",
           "check_nifti_header", "raw_nifti_header", "quiet_nibabel", "numbers", "sitk_reason",
           "first_line"]

# Largest deviation of a direction matrix's D^T D from the identity (unit, orthogonal columns).
ORTHONORMAL_TOL = 1e-3

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
            with quiet_nibabel():
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



def numbers(values: Sequence[float]) -> str:
    """``(0.7, -1, nan)``: a header's numbers as they read."""
    return "(" + ", ".join(f"{float(v):g}" for v in values) + ")"


def check_geometry(path: Path, spacing: Sequence[float], origin: Sequence[float] = (0, 0, 0),
                   direction: Sequence[float] = (1, 0, 0, 0, 1, 0, 0, 0, 1),
                   fix: str = "fix the header") -> None:
    """Refuse a spacing that is not positive and finite, a non-finite origin, a direction
    (row-major 3x3) that is not orthonormal (NaN, a zero, non-unit or non-orthogonal column)."""
    sp = np.asarray(spacing, dtype=float)
    if not (np.isfinite(sp).all() and (sp > 0).all()):
        raise DataError(f"{path}: spacing {numbers(sp)} mm is not positive and finite; {fix}")
    if not np.isfinite(np.asarray(origin, dtype=float)).all():
        raise DataError(f"{path}: origin {numbers(origin)} is not finite; {fix}")
    matrix = np.asarray(direction, dtype=float).reshape(3, 3)
    if not _orthonormal(matrix):
        raise DataError(f"{path}: direction {numbers(matrix.ravel())} is not orthonormal "
                        f"({_why_not(matrix)}); {fix}")


def _orthonormal(matrix: np.ndarray) -> bool:
    if not np.isfinite(matrix).all():
        return False
    return bool(np.abs(matrix.T @ matrix - np.eye(3)).max() <= ORTHONORMAL_TOL)


def _why_not(matrix: np.ndarray) -> str:
    """What is wrong with a matrix whose columns should be orthogonal: NaN, singular, sheared."""
    if not np.isfinite(matrix).all():
        return "NaN/Inf values"
    norms = np.linalg.norm(matrix, axis=0)
    if norms.min() <= 1e-6 * max(norms.max(), 1e-30) or abs(np.linalg.det(matrix)) <= 1e-12:
        return "a singular affine: a zero or dependent column"
    unit = matrix / norms
    if np.abs(unit.T @ unit - np.eye(3)).max() > ORTHONORMAL_TOL:
        return "a sheared affine: columns not orthogonal"
    return "columns not of unit length"


@contextlib.contextmanager
def quiet_nibabel() -> Iterator[None]:
    """Neither nibabel's warnings nor what its header checks log ("pixdim[1,2,3] should be
    positive...") reach the terminal; the header checks here say what matters."""
    logger = logging.getLogger("nibabel.global")
    level = logger.level
    logger.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def raw_nifti_header(path: Path):  # -> nibabel.Nifti1Header | nibabel.Nifti2Header | None
    """The NIfTI header as written (nibabel's loader repairs some fields before one sees them:
    negative or zero pixdim, qfac), or None when nibabel cannot parse it."""
    import nibabel as nib
    from nibabel.openers import ImageOpener

    try:
        with quiet_nibabel(), ImageOpener(str(path), "rb") as f:
            block = f.read(540)
            for klass in (nib.Nifti1Header, nib.Nifti2Header):
                if klass.may_contain_header(block):
                    size = klass.template_dtype.itemsize
                    return klass(block[:size], check=False)
    except Exception:  # noqa: BLE001 - an unreadable header: the image reader reports it
        return None
    return None


def check_nifti_header(path: Path) -> None:
    """The geometry fields of a NIfTI header as written: pixdim (SimpleITK's spacing) positive
    and finite; an sform (when set) finite, and orthonormal when no qform stands in for it (as
    SimpleITK then uses the sform); a qform (when set) a finite rotation."""
    if not is_nifti(path):
        return
    header = raw_nifti_header(path)
    if header is None:
        return
    spatial = int(min(max(int(header["dim"][0]), 1), 3))
    pixdim = np.asarray(header["pixdim"][1:1 + spatial], dtype=float)
    if not (np.isfinite(pixdim).all() and (pixdim > 0).all()):
        raise DataError(f"{path}: spacing {numbers(pixdim)} mm is not positive and finite; "
                        "fix the header")
    qform, sform = int(header["qform_code"]), int(header["sform_code"])
    if sform > 0:
        rows = np.array([header["srow_x"], header["srow_y"], header["srow_z"]], dtype=float)
        if not np.isfinite(rows).all():
            raise DataError(f"{path}: sform {numbers(rows.ravel())} has NaN/Inf values; "
                            "fix the header")
        norms = np.linalg.norm(rows[:, :3], axis=0)
        if qform == 0 and not _orthonormal(rows[:, :3] / np.where(norms > 0, norms, 1.0)):
            raise DataError(f"{path}: direction of the sform {numbers(rows[:, :3].ravel())} is "
                            f"not orthonormal ({_why_not(rows[:, :3])}) and no qform is set; "
                            "fix the header")
    if qform > 0:
        fields = [float(header[k]) for k in ("quatern_b", "quatern_c", "quatern_d", "qoffset_x",
                                             "qoffset_y", "qoffset_z")]
        bcd = fields[:3]
        if not np.isfinite(fields).all() or sum(b * b for b in bcd) > 1 + 3 * 1.2e-7:
            raise DataError(f"{path}: qform quaternion {numbers(bcd)} and offset "
                            f"{numbers(fields[3:])} are not a finite rotation; fix the header")


def sitk_reason(err: Exception) -> str:
    """The most telling line of a SimpleITK message (they span many lines: "sitk::ERROR: ...")."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for line in lines:
        if "ERROR" in line or "error" in line.lower():
            return line.split("ERROR:")[-1].strip()[:200]
    return (lines[-1] if lines else type(err).__name__)[:200]


def first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]
