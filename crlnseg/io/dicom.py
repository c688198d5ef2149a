"""DICOM series: a folder holding the slices of one series is one image.

The series is found with GDCM (through SimpleITK: ``ImageSeriesReader.GetGDCMSeriesIDs``) and its
slices' headers are read one by one (``ImageFileReader.ReadImageInformation``: position,
orientation, pixel spacing, size) before any voxel. Slices are ordered by their position along the
slice normal; the geometry is ITK's (LPS): in-plane spacing from the pixel spacing, slice spacing
from the first and last positions, origin at the first slice, direction (row, column, normal).
A folder is refused, in one line naming it, when it holds several series, DICOM files without
image data (reports, RTSTRUCT...) beside or instead of the images, image files of another format
as well, slices of different sizes or orientations, slices that share a position, missing or
unevenly spaced slices (a gap over :data:`GAP_FACTOR` times the median spacing, or a spread of the
spacing over :data:`SPACING_SPREAD` of it), or slices not stacked along their normal (a gantry
tilt: the grid would be sheared). What GDCM and ITK print on stderr is not shown, and the process
locale is kept as it was (some GDCM/ITK code paths reset it to "C", which would turn Python's
default text encoding into ASCII).
"""

from __future__ import annotations

import contextlib
import locale
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crlnseg.errors import DataError
from crlnseg.io import integrity
from crlnseg.io.paths import dicom_files, is_h5_file, is_image_file, missing_reason
from crlnseg.io.volume import Geometry, Volume

__all__ = ["Series", "scan_series", "read_series", "GAP_FACTOR", "SPACING_SPREAD"]

GAP_FACTOR = 1.5  # a slice gap above this many median spacings: a missing slice
SPACING_SPREAD = 0.01  # slice spacings varying by more than this share of the median: uneven
_MIN_SPREAD_MM = 0.01  # below this the positions' decimal rounding, not the scanner, varies
_SAME_POSITION_MM = 1e-4
_POSITION, _ORIENTATION, _MODALITY = "0020|0032", "0020|0037", "0008|0060"


@dataclass(frozen=True)
class Series:
    folder: Path
    files: list[Path]  # in slice order (along the normal)
    shape: tuple[int, ...]  # (X, Y, Z), or (C, X, Y, Z) for multi-component pixels
    geometry: Geometry


def scan_series(folder: Path) -> Series:
    """The slices and geometry of the one DICOM series in ``folder``, from headers alone."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: {missing_reason(folder, 'no such folder')}")
    found = dicom_files(folder)
    others = sorted(p for p in folder.iterdir() if is_image_file(p) or
                    (p.is_file() and is_h5_file(p) and not p.name.startswith(".")))
    if found and others:
        raise DataError(f"{folder}: both DICOM files and image files ({others[0].name}) in one "
                        "folder, which is ambiguous; keep the DICOM series in a folder of its own")
    if not found:
        raise DataError(f"{folder}: a folder without DICOM files (a case folder holds the "
                        "slices of one DICOM series)")
    files = _series_files(folder, found)
    infos = [_slice_info(path) for path in files]
    if len(infos) == 1:
        return _single_file(folder, files[0], infos[0])
    return _stack(folder, files, infos)


def read_series(folder: Path) -> Volume:
    """The DICOM series of ``folder`` as a :class:`Volume` (``(X, Y, Z)``) with its geometry."""
    import SimpleITK as sitk

    series = scan_series(folder)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(p) for p in series.files])
    try:
        with _quiet():  # e.g. ITK's "non uniform sampling": checked before
            image = reader.Execute()
    except RuntimeError as err:
        raise DataError(f"{folder}: unreadable DICOM series "
                        f"({integrity.sitk_reason(err)})") from None
    array = sitk.GetArrayFromImage(image)
    array = array.transpose(3, 2, 1, 0) if array.ndim == 4 else array.transpose(2, 1, 0)
    if tuple(array.shape) != tuple(series.shape):
        raise DataError(f"{folder}: the DICOM series holds {integrity.dims(array.shape)} voxels, "
                        f"its headers {integrity.dims(series.shape)}")
    return Volume(array=array, geometry=series.geometry, path=folder, header=None)


@dataclass(frozen=True)
class _Slice:
    path: Path
    size: tuple[int, ...]  # columns, rows[, frames]
    components: int
    spacing: tuple[float, ...]
    origin: np.ndarray
    direction: np.ndarray  # 3x3, columns: row direction, column direction, normal
    has_position: bool


def _series_files(folder: Path, found: list[Path]) -> list[Path]:
    """GDCM's one image series of ``folder``; DataError for none, several, or stray files."""
    import SimpleITK as sitk

    with _quiet():  # "No Series were found"
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
        names = ([sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), ids[0])]
                 if len(ids) == 1 else [])
    if len(ids) > 1:
        shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
        raise DataError(f"{len(ids)} DICOM series in {folder} (UIDs {shown}); put each series "
                        "in its own folder")
    if not ids:
        raise DataError(f"{folder}: DICOM files without image data ({_modalities(found)})")
    files = [Path(n) for n in names[0]]
    listed = {p.name for p in files}
    stray = [p for p in found if p.name not in listed]
    if stray:
        raise DataError(f"{folder}: {len(stray)} DICOM file(s) without image data "
                        f"({_modalities(stray)}) beside the image series, e.g. {stray[0].name}; "
                        "keep only the image series in this folder")
    return files


def _slice_info(path: Path) -> _Slice:
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with _quiet():
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataError(f"{path}: unreadable DICOM file ({integrity.sitk_reason(err)})") from None
    dim = reader.GetDimension()
    direction = np.asarray(reader.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3]
    return _Slice(path, tuple(int(n) for n in reader.GetSize()), reader.GetNumberOfComponents(),
                  tuple(float(s) for s in reader.GetSpacing()),
                  np.asarray(reader.GetOrigin()[:3], dtype=float), direction,
                  reader.HasMetaDataKey(_POSITION) and reader.HasMetaDataKey(_ORIENTATION))


def _single_file(folder: Path, path: Path, info: _Slice) -> Series:
    """A series of one file: a multi-frame volume (or a lone slice, refused as 2D later)."""
    size = (*info.size, 1)[:3]
    shape = size if info.components == 1 else (info.components, *size)
    spacing = (*info.spacing, 1.0)[:3]
    integrity.check_geometry(folder, spacing, info.origin, info.direction.ravel())
    geometry = Geometry(spacing=tuple(spacing), origin=tuple(info.origin),  # type: ignore[arg-type]
                        direction=tuple(float(d) + 0.0 for d in info.direction.ravel()))
    return Series(folder, [path], shape, geometry)


def _stack(folder: Path, files: list[Path], infos: list[_Slice]) -> Series:
    first = infos[0]
    for info in infos:
        if len(info.size) > 2 and info.size[2] > 1:
            raise DataError(f"{info.path}: a multi-frame file in a series of {len(infos)} files; "
                            "keep it in a folder of its own")
        if not info.has_position:
            raise DataError(f"{info.path}: no image position or orientation (0020,0032 / "
                            "0020,0037): its slice cannot be placed")
        if info.size[:2] != first.size[:2] or info.components != first.components:
            raise DataError(f"{folder}: slices differ in size ({info.path.name}: "
                            f"{integrity.dims(info.size[:2])}, {first.path.name}: "
                            f"{integrity.dims(first.size[:2])})")
        if not (np.allclose(info.direction, first.direction, atol=1e-3)
                and np.allclose(info.spacing[:2], first.spacing[:2], atol=1e-3)):
            raise DataError(f"{folder}: slices differ in orientation or pixel spacing "
                            f"({info.path.name} vs {first.path.name})")
    row, col = first.direction[:, 0], first.direction[:, 1]
    integrity.check_geometry(folder, (*first.spacing[:2], 1.0), first.origin,
                             first.direction.ravel(), fix="fix the image orientation (0020,0037)")
    normal = np.cross(row, col)
    positions = np.array([info.origin for info in infos])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    steps = np.diff(along)
    if steps.min() < _SAME_POSITION_MM:
        same = int(np.count_nonzero(steps < _SAME_POSITION_MM)) + 1
        raise DataError(f"{folder}: {same} slices share a position along the slice normal "
                        "(duplicate slices, or several acquisitions in one series); put each "
                        "acquisition in its own folder")
    median = float(np.median(steps))
    spread = float(steps.max() - steps.min())
    if steps.max() > GAP_FACTOR * median or spread > max(SPACING_SPREAD * median, _MIN_SPREAD_MM):
        raise DataError(f"{folder}: unevenly spaced slices (spacing {steps.min():.4g}-"
                        f"{steps.max():.4g} mm) or missing slices")
    offsets = positions - positions[0]
    across = np.linalg.norm(offsets - np.outer(offsets @ normal, normal), axis=1).max()
    if across > max(SPACING_SPREAD * median, _MIN_SPREAD_MM):
        raise DataError(f"{folder}: slices are not stacked along their normal (up to "
                        f"{across:.3g} mm off it: a gantry tilt or sheared volume); resample it "
                        "to an orthogonal grid first")
    spacing = (first.spacing[0], first.spacing[1],
               float(np.linalg.norm(positions[-1] - positions[0])) / (len(infos) - 1))
    direction = np.column_stack([row, col, normal])
    integrity.check_geometry(folder, spacing, positions[0], direction.ravel())
    size = (first.size[0], first.size[1], len(infos))
    shape = size if first.components == 1 else (first.components, *size)
    geometry = Geometry(spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                        origin=tuple(float(o) for o in positions[0]),  # type: ignore[arg-type]
                        direction=tuple(float(d) + 0.0 for d in direction.ravel()))
    return Series(folder, [files[i] for i in order], shape, geometry)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """GDCM / ITK calls: their stderr text is dropped, the process locale restored."""
    from crlnseg.io.writers import native_stderr_held

    saved = locale.setlocale(locale.LC_ALL)
    try:
        with native_stderr_held(replay=False):
            yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


def _modalities(paths: list[Path]) -> str:
    found = sorted({_modality(p) for p in paths})
    return f"modalit{'ies' if len(found) > 1 else 'y'} {', '.join(found)}"


def _modality(path: Path) -> str:
    """The Modality (0008,0060) of a DICOM file that GDCM reads no image from: a scan of the
    first bytes for the element, explicit or implicit VR little endian; "unknown" without it."""
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError:
        return "unknown"
    at = data.find(b"\x08\x00\x60\x00")
    while 0 <= at <= len(data) - 8:
        if data[at + 4:at + 6] == b"CS":
            (length,), start = struct.unpack_from("<H", data, at + 6), at + 8
        else:
            (length,), start = struct.unpack_from("<I", data, at + 4), at + 8
        value = data[start:start + length] if length <= 16 else b""
        text = value.decode("ascii", "replace").strip(" \x00")
        if text and text.replace("_", "").isalnum():
            return text
        at = data.find(b"\x08\x00\x60\x00", at + 1)
    return "unknown"
