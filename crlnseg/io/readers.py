"""Read medical images into :class:`Volume` (arrays in ``(X, Y, Z)`` / ``(C, X, Y, Z)`` order).

SimpleITK reads every file format (NIfTI, NRRD, MetaImage) so geometry follows one convention
(ITK/LPS); for NIfTI the nibabel header is kept as ``Volume.header`` so that masks are written back
with the source's own qform/sform (see :mod:`crlnseg.io.writers`). HDF5 case files (community
layout, ``image``/``label`` datasets already in x-y-z order) store no geometry: spacing is given.
Every problem is a one-line :class:`DataError` ``"<path>: <problem>"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from crlnseg.errors import DataError
from crlnseg.io.paths import is_h5_file, is_nifti
from crlnseg.io.volume import Geometry, Volume

__all__ = ["read_image", "read_h5_case", "read_case_images", "read_label", "MAX_CHANNELS",
           "GEOMETRY_TOL"]

MAX_CHANNELS = 16  # a 4D file with more volumes is a time series, not a stack of modalities
GEOMETRY_TOL = 1e-3  # mm / direction cosine; headers written by different tools round differently


def read_image(path: Path, h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Volume:
    """One image file; 3D -> ``(X, Y, Z)``, a 4D channel stack -> ``(C, X, Y, Z)``."""
    path = Path(path)
    if is_h5_file(path):
        return read_h5_case(path, h5_spacing)[0]
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    array, geometry = _read_sitk(path)
    _check_finite(array, path)
    header = _nifti_header(path) if is_nifti(path) else None
    return Volume(array=array, geometry=geometry, path=path, header=header)


def read_h5_case(path: Path, spacing: Sequence[float] = (1.0, 1.0, 1.0)
                 ) -> tuple[Volume, Volume | None]:
    """``(image, label)`` of a community HDF5 case; ``label`` is None when the file has none."""
    import h5py

    path = Path(path)
    geometry = Geometry(spacing=tuple(float(s) for s in spacing))  # type: ignore[arg-type]
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset (found {sorted(f)})")
            image = np.asarray(f["image"][()])
            label = np.asarray(f["label"][()]) if "label" in f else None
    except OSError as err:
        raise DataError(f"{path}: unreadable HDF5 file ({_first_line(err)})") from None
    _check_dims(image, path)
    _check_finite(image, path)
    image_vol = Volume(array=image, geometry=geometry, path=path)
    if label is None:
        return image_vol, None
    if label.ndim != 3:
        raise DataError(f"{path}: label has {label.ndim} dimensions {label.shape}, expected 3")
    return image_vol, Volume(array=label, geometry=geometry, path=path)


def read_case_images(paths: Sequence[Path], h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)
                     ) -> Volume:
    """The channel files of one case stacked channels-first: ``(C, X, Y, Z)``.

    A single file may itself be a 4D channel stack. Channels must share shape and geometry.
    """
    if not paths:
        raise DataError("no image files given")
    volumes = [read_image(Path(p), h5_spacing) for p in paths]
    if len(volumes) == 1:
        vol = volumes[0]
        array = vol.array if vol.array.ndim == 4 else vol.array[None]
        return Volume(array=array, geometry=vol.geometry, path=vol.path, header=vol.header)
    first = volumes[0]
    for vol in volumes:
        if vol.array.ndim != 3:
            raise DataError(f"{vol.path}: a channel file must be 3D, got shape {vol.array.shape}")
        if vol.array.shape != first.array.shape:
            raise DataError(f"{vol.path}: channel shape {vol.array.shape} != "
                            f"{first.array.shape} of {first.path.name}")  # type: ignore[union-attr]
        if not vol.geometry.close_to(first.geometry, GEOMETRY_TOL):
            raise DataError(f"{vol.path}: channel geometry differs from {first.path.name} "  # type: ignore[union-attr]
                            f"({_describe(vol.geometry)} vs {_describe(first.geometry)})")
    dtype = np.result_type(*[v.array for v in volumes])
    array = np.stack([v.array for v in volumes]).astype(dtype, copy=False)
    return Volume(array=array, geometry=first.geometry, path=first.path, header=first.header)


def read_label(source: Path | Volume, reference: Volume | None = None,
               h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Volume:
    """A label map as uint8 ``(X, Y, Z)``: integer, non-negative, <= 255, matching ``reference``."""
    vol = source if isinstance(source, Volume) else read_image(Path(source), h5_spacing)
    where = vol.path
    arr = vol.array
    if arr.ndim != 3:
        raise DataError(f"{where}: label must be 3D, got shape {arr.shape}")
    if reference is not None:
        if arr.shape != reference.spatial_shape:
            raise DataError(f"{where}: label shape {arr.shape} != image shape "
                            f"{reference.spatial_shape}")
        if not vol.geometry.close_to(reference.geometry, GEOMETRY_TOL):
            raise DataError(f"{where}: label geometry ({_describe(vol.geometry)}) != image "
                            f"geometry ({_describe(reference.geometry)})")
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            raise DataError(f"{where}: label has NaN/Inf values")
        if not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{where}: label has non-integer values (e.g. {_non_integer(arr)})")
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{where}: label has unsupported type {arr.dtype}")
    if arr.size and arr.min() < 0:
        raise DataError(f"{where}: label has negative values (min {arr.min():g})")
    if arr.size and arr.max() > 255:
        raise DataError(f"{where}: label values up to {arr.max():g}, at most 255 supported")
    return Volume(array=arr.astype(np.uint8), geometry=vol.geometry, path=vol.path,
                  header=vol.header)


def _read_sitk(path: Path) -> tuple[np.ndarray, Geometry]:
    """Geometry from SimpleITK's header reader; voxels from SimpleITK, or nibabel for NIfTI.

    SimpleITK silently zero-fills a truncated ``.nii.gz``; nibabel detects it, so NIfTI voxels are
    read with nibabel (same ``(X, Y, Z)`` index order, same scaling).
    """
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        dim, vector = reader.GetDimension(), reader.GetNumberOfComponents() > 1
        if dim != 3 and not (dim == 4 and not vector):
            kind = f"{dim}D {'vector ' * vector}image"
            raise DataError(f"{path}: {kind} of size {reader.GetSize()}, expected 3D")
        if is_nifti(path):
            array = _nifti_voxels(path)
        else:
            array = _sitk_order(sitk.GetArrayFromImage(reader.Execute()), dim, vector)
    except RuntimeError as err:
        raise DataError(f"{path}: unreadable or corrupt image ({_sitk_reason(err)})") from None
    _check_dims(array, path)
    direction = np.asarray(reader.GetDirection()).reshape(dim, dim)[:3, :3]
    geometry = Geometry(spacing=tuple(float(s) for s in reader.GetSpacing()[:3]),  # type: ignore[arg-type]
                        origin=tuple(float(o) for o in reader.GetOrigin()[:3]),  # type: ignore[arg-type]
                        direction=tuple(float(d) + 0.0 for d in direction.ravel()))
    return array, geometry


def _sitk_order(array: np.ndarray, dim: int, vector: bool) -> np.ndarray:
    if vector:  # (Z, Y, X, C) -> (C, X, Y, Z)
        return array.transpose(3, 2, 1, 0)
    if dim == 4:  # (T, Z, Y, X) -> (T, X, Y, Z)
        return array.transpose(0, 3, 2, 1)
    return array.transpose(2, 1, 0)


def _nifti_voxels(path: Path) -> np.ndarray:
    """NIfTI voxels in ``(X, Y, Z)`` / ``(C, X, Y, Z)``, scaled; truncation is an error."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        array = np.asarray(image.dataobj)
    except Exception as err:  # noqa: BLE001 - EOFError, zlib.error, OSError...: all mean corrupt
        raise DataError(f"{path}: unreadable or corrupt image ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    if array.dtype == np.float64 and image.get_data_dtype() != np.float64:
        array = array.astype(np.float32)  # scaled integers: float32 is exact enough (as ITK)
    if array.ndim == 5 and array.shape[3] == 1:  # NIfTI vector layout (X, Y, Z, 1, C)
        array = array[:, :, :, 0]
    return np.moveaxis(array, -1, 0) if array.ndim == 4 else array


def _check_dims(array: np.ndarray, path: Path) -> None:
    """3D, or 4D with a channel axis first of at most MAX_CHANNELS; no flat (2D) volume."""
    if array.ndim == 4 and array.shape[0] > MAX_CHANNELS:
        raise DataError(f"{path}: 4D image with {array.shape[0]} volumes is not a channel stack "
                        f"(at most {MAX_CHANNELS} channels), expected 3D")
    if array.ndim not in (3, 4):
        raise DataError(f"{path}: {array.ndim}D array of shape {array.shape}, expected 3D")
    if min(array.shape[-3:]) < 2:
        raise DataError(f"{path}: 2D image (shape {array.shape[-3:]}), expected a 3D volume")


def _check_finite(array: np.ndarray, path: Path) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise DataError(f"{path}: {bad} NaN/Inf intensity value(s)")


def _nifti_header(path: Path):  # -> nibabel.Nifti1Header | None
    import nibabel as nib

    try:
        return nib.load(str(path)).header.copy()
    except Exception:  # noqa: BLE001 - SimpleITK read the file; the header is a bonus for writing
        return None


def _non_integer(arr: np.ndarray) -> str:
    values = arr[arr != np.round(arr)]
    return f"{values.flat[0]:g}"


def _describe(g: Geometry) -> str:
    fmt = lambda xs: "(" + ", ".join(f"{x:.4g}" for x in xs) + ")"  # noqa: E731
    return f"spacing {fmt(g.spacing)}, origin {fmt(g.origin)}, direction {fmt(g.direction)}"


def _sitk_reason(err: Exception) -> str:
    # SimpleITK messages span many lines ("sitk::ERROR: ..."); keep the most telling one.
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for line in lines:
        if "ERROR" in line or "error" in line.lower():
            return line.split("ERROR:")[-1].strip()[:200]
    return (lines[-1] if lines else type(err).__name__)[:200]


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:200]
