"""Read medical images into :class:`Volume` (arrays in ``(X, Y, Z)`` / ``(C, X, Y, Z)`` order).

SimpleITK reads every file format (NIfTI, NRRD, MetaImage) so geometry follows one convention
(ITK/LPS); for NIfTI the nibabel header is kept as ``Volume.header`` so that masks are written back
with the source's own qform/sform (see :mod:`crlnseg.io.writers`). HDF5 case files (community
layout, ``image``/``label`` datasets already in x-y-z order) store no geometry: spacing is given.
A folder holding one DICOM series is read as one image (see :mod:`crlnseg.io.dicom`).
Every problem is a one-line :class:`DataError` ``"<path>: <problem>"``. A header that claims more
voxels than the file can hold is refused from its size before anything is allocated (and a short
read says so too), and so is a geometry no grid can have (spacing not positive and finite,
direction not orthonormal; see :mod:`crlnseg.io.integrity`). What the C++ readers print on stderr
and what nibabel warns or logs is not shown: the checks here say what matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from crlnseg.errors import DataError, RunFailure
from crlnseg.io import integrity
from crlnseg.io.paths import is_h5_file, is_nifti, missing_reason
from crlnseg.io.volume import GEOMETRY_TOL, Geometry, Volume

__all__ = ["read_image", "read_h5_case", "read_case_images", "read_label", "read_header",
           "check_case_headers", "check_label_header", "label_array", "Header", "MAX_CHANNELS",
           "GEOMETRY_TOL"]

MAX_CHANNELS = 16  # a 4D file with more volumes is a time series, not a stack of modalities
_sitk_reason, _first_line = integrity.sitk_reason, integrity.first_line
_describe = Geometry.describe


@dataclass(frozen=True)
class Header:
    """What a file's header says, without its voxels: shape as :func:`read_image` would return."""

    path: Path
    shape: tuple[int, ...]  # (X, Y, Z) or (C, X, Y, Z)
    geometry: Geometry

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.shape[-3:])  # type: ignore[return-value]


def read_image(path: Path, h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Volume:
    """One image file (or DICOM series folder); 3D -> ``(X, Y, Z)``, a 4D channel stack ->
    ``(C, X, Y, Z)``."""
    path = Path(path)
    if is_h5_file(path):
        return read_h5_case(path, h5_spacing)[0]
    if path.is_dir():
        from crlnseg.io.dicom import read_series

        volume = read_series(path)
        _check_shape(volume.array.shape, path)
        _check_finite(volume.array, path)
        return volume
    if not path.is_file():
        raise DataError(f"{path}: {missing_reason(path, 'no such file')}")
    array, geometry = _read_sitk(path)
    _check_finite(array, path)
    header = _nifti_header(path) if is_nifti(path) else None
    return Volume(array=array, geometry=geometry, path=path, header=header)


def read_h5_case(path: Path, spacing: Sequence[float] = (1.0, 1.0, 1.0)
                 ) -> tuple[Volume, Volume | None]:
    """``(image, label)`` of a community HDF5 case; ``label`` is None when the file has none."""
    import h5py

    path = Path(path)
    geometry = _h5_geometry(path, spacing)
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset (found {sorted(f)})")
            image = np.asarray(f["image"][()])
            label = np.asarray(f["label"][()]) if "label" in f else None
    except OSError as err:
        raise DataError(f"{path}: unreadable HDF5 file ({_first_line(err)})") from None
    _check_shape(image.shape, path)
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


def read_header(path: Path, h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Header:
    """Shape and geometry from the header alone (fast): checks a file before any output exists.

    Voxel data are not read, so a truncated or corrupt body still fails later, in
    :func:`read_image`.
    """
    path = Path(path)
    if is_h5_file(path):
        return _h5_header(path, h5_spacing)
    if path.is_dir():
        from crlnseg.io.dicom import scan_series

        series = scan_series(path)
        _check_shape(series.shape, path)
        return Header(path, series.shape, series.geometry)
    if not path.is_file():
        raise DataError(f"{path}: {missing_reason(path, 'no such file')}")
    import SimpleITK as sitk

    from crlnseg.io.writers import native_stderr_held

    integrity.check_nifti_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with native_stderr_held(replay=False):  # header oddities: checked here instead
            reader.ReadImageInformation()
    except RuntimeError as err:
        raise DataError(f"{path}: unreadable or corrupt image ({_sitk_reason(err)})") from None
    integrity.check_claimed_size(path, reader)
    dim, components = reader.GetDimension(), reader.GetNumberOfComponents()
    size = tuple(int(n) for n in reader.GetSize())
    if dim != 3 and not (dim == 4 and components == 1):
        kind = f"{dim}D {'vector ' * (components > 1)}image"
        raise DataError(f"{path}: {kind} of size {size}, expected 3D")
    shape = ((components, *size) if components > 1
             else (size[3], *size[:3]) if dim == 4 else size)
    _check_shape(shape, path)
    return Header(path, shape, _reader_geometry(reader, dim, path))


def check_case_headers(paths: Sequence[Path], h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)
                       ) -> Header:
    """The header-level checks of :func:`read_case_images`; the case's stacked header."""
    if not paths:
        raise DataError("no image files given")
    headers = [read_header(Path(p), h5_spacing) for p in paths]
    first = headers[0]
    if len(headers) == 1:
        shape = first.shape if len(first.shape) == 4 else (1, *first.shape)
        return Header(first.path, shape, first.geometry)
    for h in headers:
        if len(h.shape) != 3:
            raise DataError(f"{h.path}: a channel file must be 3D, got shape {h.shape}")
        if h.shape != first.shape:
            raise DataError(f"{h.path}: channel shape {h.shape} != {first.shape} of "
                            f"{first.path.name}")
        if not h.geometry.close_to(first.geometry, GEOMETRY_TOL):
            raise DataError(f"{h.path}: channel geometry differs from {first.path.name} "
                            f"({_describe(h.geometry)} vs {_describe(first.geometry)})")
    return Header(first.path, (len(headers), *first.shape), first.geometry)


def check_label_header(path: Path, reference: Header,
                       h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
    """The header-level checks of :func:`read_label` (3D, shape and geometry of ``reference``)."""
    header = read_header(Path(path), h5_spacing)
    shape = header.shape[1:] if len(header.shape) == 4 and header.shape[0] == 1 else header.shape
    _check_label_shape(shape, header.path)
    _check_label_grid(shape, header.geometry, header.path, reference.spatial_shape,
                      reference.geometry)


def label_array(array: np.ndarray, where: Path | None) -> np.ndarray:
    """A label map as ``(X, Y, Z)``: a single-volume 4D file (X, Y, Z, 1) is a 3D label."""
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    _check_label_shape(array.shape, where)
    return array


def _check_label_shape(shape: tuple[int, ...], where: Path | None) -> None:
    if len(shape) == 4:  # (C, X, Y, Z) here is (X, Y, Z, C) in the file: report the file's order
        raise DataError(f"{where}: label must be 3D, got {shape[0]} volumes of "
                        f"{tuple(shape[1:])} (file shape {(*shape[1:], shape[0])})")
    if len(shape) != 3:
        raise DataError(f"{where}: label must be 3D, got shape {tuple(shape)}")


def _check_label_grid(shape: tuple[int, ...], geometry: Geometry, where: Path | None,
                      ref_shape: tuple[int, ...], ref_geometry: Geometry) -> None:
    if tuple(shape) != tuple(ref_shape):
        raise DataError(f"{where}: label shape {tuple(shape)} != image shape {tuple(ref_shape)}")
    if not geometry.close_to(ref_geometry, GEOMETRY_TOL):
        raise DataError(f"{where}: label geometry ({_describe(geometry)}) != image "
                        f"geometry ({_describe(ref_geometry)})")


def _h5_header(path: Path, spacing: Sequence[float]) -> Header:
    import h5py

    geometry = _h5_geometry(path, spacing)
    try:
        with h5py.File(path, "r") as f:
            if "image" not in f:
                raise DataError(f"{path}: no 'image' dataset (found {sorted(f)})")
            shape = tuple(int(n) for n in f["image"].shape)
            label = tuple(int(n) for n in f["label"].shape) if "label" in f else None
    except OSError as err:
        raise DataError(f"{path}: unreadable HDF5 file ({_first_line(err)})") from None
    _check_shape(shape, path)
    if label is not None and len(label) != 3:
        raise DataError(f"{path}: label has {len(label)} dimensions {label}, expected 3")
    return Header(path, shape, geometry)


def _h5_geometry(path: Path, spacing: Sequence[float]) -> Geometry:
    """HDF5 cases store no geometry: the given spacing, checked as a header's would be, and the
    axes taken as R, A, S (NIfTI's identity affine), so their array order is already canonical
    and masks written for them get an identity affine."""
    integrity.check_geometry(path, spacing, fix="fix h5_spacing")
    return Geometry(spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
                    direction=(-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))


def read_label(source: Path | Volume, reference: Volume | None = None,
               h5_spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Volume:
    """A label map as uint8 ``(X, Y, Z)``: integer, non-negative, <= 255, matching ``reference``."""
    vol = source if isinstance(source, Volume) else read_image(Path(source), h5_spacing)
    where = vol.path
    arr = label_array(vol.array, where)
    if reference is not None:
        _check_label_grid(arr.shape, vol.geometry, where, reference.spatial_shape,
                          reference.geometry)
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

    from crlnseg.io.writers import native_stderr_held

    integrity.check_nifti_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    printed: list[str] = []
    try:
        with native_stderr_held(replay=False):  # header oddities: checked here instead
            reader.ReadImageInformation()
        dim, vector = reader.GetDimension(), reader.GetNumberOfComponents() > 1
        if dim != 3 and not (dim == 4 and not vector):
            kind = f"{dim}D {'vector ' * vector}image"
            raise DataError(f"{path}: {kind} of size {reader.GetSize()}, expected 3D")
        geometry = _reader_geometry(reader, dim, path)  # before ITK refuses it as it reads
        integrity.check_claimed_size(path, reader)
        if is_nifti(path):
            array = _nifti_voxels(path)
        else:
            with native_stderr_held(replay=False) as printed:
                image = reader.Execute()
            array = _sitk_order(sitk.GetArrayFromImage(image), dim, vector)
    except RuntimeError as err:
        said = f"{err}\n{''.join(printed)}"
        if integrity.SHORT_READ.search(said):
            raise DataError(integrity.claims_more(path, reader.GetSize())) from None
        if "Failed to allocate memory" in said:
            size = integrity.dims(reader.GetSize())
            raise RunFailure(f"{path}: out of memory reading {size} voxels "
                             f"({integrity.claimed_bytes(reader) / 2**30:.1f} GiB)") from None
        raise DataError(f"{path}: unreadable or corrupt image ({_sitk_reason(err)})") from None
    _check_shape(array.shape, path)
    return array, geometry


def _reader_geometry(reader, dim: int, path: Path) -> Geometry:
    """The spatial geometry of a SimpleITK reader after ReadImageInformation, checked."""
    direction = np.asarray(reader.GetDirection()).reshape(dim, dim)[:3, :3]
    geometry = Geometry(spacing=tuple(float(s) for s in reader.GetSpacing()[:3]),  # type: ignore[arg-type]
                        origin=tuple(float(o) for o in reader.GetOrigin()[:3]),  # type: ignore[arg-type]
                        direction=tuple(float(d) + 0.0 for d in direction.ravel()))
    integrity.check_geometry(path, geometry.spacing, geometry.origin, geometry.direction)
    return geometry


def _sitk_order(array: np.ndarray, dim: int, vector: bool) -> np.ndarray:
    if vector:  # (Z, Y, X, C) -> (C, X, Y, Z)
        return array.transpose(3, 2, 1, 0)
    if dim == 4:  # (T, Z, Y, X) -> (T, X, Y, Z)
        return array.transpose(0, 3, 2, 1)
    return array.transpose(2, 1, 0)


def _nifti_voxels(path: Path) -> np.ndarray:
    """NIfTI voxels in ``(X, Y, Z)`` / ``(C, X, Y, Z)``, scaled; truncation is an error."""
    import nibabel as nib

    shape: tuple[int, ...] = ()
    try:
        with integrity.quiet_nibabel():  # header oddities: checked before
            image = nib.load(str(path))
            shape = tuple(image.shape)
            array = np.asarray(image.dataobj)
    except MemoryError:  # the file can hold the data (checked before): a runtime failure
        raise RunFailure(f"{path}: out of memory reading {integrity.dims(shape)} voxels") from None
    except Exception as err:  # noqa: BLE001 - EOFError, zlib.error, OSError...: all mean corrupt
        if shape and (isinstance(err, EOFError) or integrity.SHORT_READ.search(str(err))):
            raise DataError(integrity.claims_more(path, shape)) from None
        raise DataError(f"{path}: unreadable or corrupt image ({type(err).__name__}: "
                        f"{_first_line(err)})") from None
    if array.dtype == np.float64 and image.get_data_dtype() != np.float64:
        array = array.astype(np.float32)  # scaled integers: float32 is exact enough (as ITK)
    if array.ndim == 5 and array.shape[3] == 1:  # NIfTI vector layout (X, Y, Z, 1, C)
        array = array[:, :, :, 0]
    return np.moveaxis(array, -1, 0) if array.ndim == 4 else array


def _check_shape(shape: tuple[int, ...], path: Path) -> None:
    """3D, or 4D with a channel axis first of at most MAX_CHANNELS; no flat (2D) volume."""
    shape = tuple(shape)
    if len(shape) == 4 and shape[0] > MAX_CHANNELS:
        raise DataError(f"{path}: 4D image with {shape[0]} volumes is not a channel stack "
                        f"(at most {MAX_CHANNELS} channels), expected 3D")
    if len(shape) not in (3, 4):
        raise DataError(f"{path}: {len(shape)}D array of shape {shape}, expected 3D")
    if min(shape[-3:]) < 2:
        raise DataError(f"{path}: 2D image (shape {shape[-3:]}), expected a 3D volume")


def _check_finite(array: np.ndarray, path: Path) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        bad = int(array.size - np.count_nonzero(np.isfinite(array)))
        raise DataError(f"{path}: {bad} NaN/Inf intensity value(s)")


def _nifti_header(path: Path):  # -> nibabel.Nifti1Header | None
    import nibabel as nib

    try:
        with integrity.quiet_nibabel():
            header = nib.load(str(path)).header.copy()
            raw = integrity.raw_nifti_header(path)
        if raw is not None:  # nibabel sets a qfac other than +-1 to 1, SimpleITK to its sign
            pixdim = header["pixdim"].copy()
            pixdim[0] = -1.0 if raw["pixdim"][0] < 0 else 1.0
            header["pixdim"] = pixdim
        return header
    except Exception as err:  # noqa: BLE001 - SimpleITK read the file; the header is a bonus
        from crlnseg.console import log

        log(f"note: nibabel cannot read the header of {path} ({type(err).__name__}); masks of "
            "this image get SimpleITK's NIfTI header (same geometry, qform/sform codes may differ)")
        return None


def _non_integer(arr: np.ndarray) -> str:
    values = arr[arr != np.round(arr)]
    return f"{values.flat[0]:g}"
