"""Write masks and maps onto a reference image's grid, atomically and without losing geometry.

A NIfTI output of a NIfTI reference is written with nibabel from a copy of the reference header,
so qform, sform, their codes and the voxel sizes are reproduced bit for bit (SimpleITK would
recompute them from its own, float-rounded, direction matrix). Everything else goes through
SimpleITK with the reference's spacing, origin and direction. The file appears under its final
name only once complete (temporary name in the same folder, then :func:`os.replace`).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crlnseg.errors import DataError, OutputExistsError
from crlnseg.io.paths import H5_SUFFIXES, is_nifti, split_suffix
from crlnseg.io.volume import Volume

__all__ = ["write_image", "atomic_path", "write_atomic"]


def write_image(array: np.ndarray, reference: Volume, path: Path, overwrite: bool = False) -> None:
    """Write ``array`` (``(X, Y, Z)`` or ``(C, X, Y, Z)``) with ``reference``'s geometry.

    The dtype follows the array (bool -> uint8, float64 -> float32); a 4D array is written as a
    channel (vector) image. Refuses to replace an existing file unless ``overwrite``.
    """
    path = Path(path)
    array = _storable(np.asarray(array))
    if array.ndim not in (3, 4) or array.shape[-3:] != reference.spatial_shape:
        raise DataError(f"{path}: array shape {array.shape} does not match the reference "
                        f"grid {reference.spatial_shape}")
    if split_suffix(path)[1].lower() in H5_SUFFIXES:
        raise DataError(f"{path}: writing HDF5 is not supported; use .nii.gz, .nrrd or .mha")
    header = reference.header
    if is_nifti(path) and header is not None and _is_nifti_header(header):
        write_atomic(path, lambda tmp: _write_nibabel(array, header, tmp), overwrite)
    else:
        write_atomic(path, lambda tmp: _write_sitk(array, reference, tmp), overwrite)


def atomic_path(path: Path) -> Path:
    """A hidden temporary name next to ``path``, same extension (so writers pick the format)."""
    stem, suffix = split_suffix(path)
    return path.with_name(f".{stem}.tmp-{secrets.token_hex(4)}{suffix}")


def write_atomic(path: Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``; the temporary is removed on failure."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: already exists (use --overwrite to replace it)")
    if not path.parent.is_dir():
        raise OutputExistsError(f"{path}: output folder {path.parent} does not exist")
    tmp = atomic_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except PermissionError as err:
        raise OutputExistsError(f"{path}: not writable ({err.strerror})") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _storable(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return array.astype(np.float32)
    if array.dtype.kind in "iu" and array.dtype.itemsize > 4:
        return array.astype(np.int32 if array.dtype.kind == "i" else np.uint32)
    return array


def _is_nifti_header(header: object) -> bool:
    import nibabel as nib

    return isinstance(header, nib.Nifti1Header)


def _write_nibabel(array: np.ndarray, reference_header, tmp: Path) -> None:
    import nibabel as nib

    header = reference_header.copy()
    data = np.moveaxis(array, 0, -1) if array.ndim == 4 else array  # NIfTI: channels last
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    # The reference's intensity scaling and display range do not apply to a mask or a map.
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = header["cal_max"] = 0
    header.set_intent("none")
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, None, header=header)
    # affine=None keeps the header's own qform/sform (codes included) instead of recomputing them.
    image.to_filename(str(tmp))


def _write_sitk(array: np.ndarray, reference: Volume, tmp: Path) -> None:
    import SimpleITK as sitk

    if array.ndim == 4:  # (C, X, Y, Z) -> (Z, Y, X, C) vector image
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(3, 2, 1, 0)),
                                       isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    g = reference.geometry
    image.SetSpacing(g.spacing)
    image.SetOrigin(g.origin)
    image.SetDirection(g.direction)
    sitk.WriteImage(image, str(tmp), useCompression=True)
