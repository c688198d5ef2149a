"""Preprocessing shared by ``prepare`` (training cache) and ``predict`` (new scans): same maths.

Order: canonical orientation (first of all: the array is transposed and flipped to the closest
RAS axis order, :mod:`crlnseg.data.orientation`, never resampled; the spacing follows the axes),
then, as nnU-Net: crop to the non-zero box (optional) -> resample to the target spacing (image:
linear or cubic B-spline; label: nearest) -> normalise each channel:

- ``zscore``: ``(x - mean) / std`` over the (cropped) volume;
- ``ct``: clip to the window ``[lo, hi]``, then ``(x - mean) / std`` with ``ct_stats`` (the plan:
  the labelled foreground of the whole dataset, nnU-Net's CT scheme) or, without them, the
  clipped volume's own mean and std;
- ``minmax``: ``(x - min) / (max - min)``;
- ``none``: unchanged (float32).

Intensity statistics are taken on the cropped volume before resampling (one pass, also used for the
dataset fingerprint). :func:`restore` maps an array on the preprocessed grid back onto the original
grid (resample to the crop's shape, pad, then undo the orientation), so a predicted mask has exactly
the input's shape and array order, and the input's own header is its geometry.
Arrays are ``(C, X, Y, Z)`` images and ``(X, Y, Z)`` labels.

Axes of :class:`CaseInfo`: ``original_shape``, ``crop_box``, ``spacing``, ``shape`` and
``target_spacing`` (as ``PrepareSettings.target_spacing``) are along the canonical axes (R-L, A-P,
S-I); ``origin`` and ``direction`` are the input's own header; ``orientation`` maps the input's
array order to the canonical one (``{"permutation", "flips"}``, :class:`~crlnseg.data.orientation.
Transform`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import numpy as np

from crlnseg.data.orientation import (
    IDENTITY,
    canonical_spacing,
    canonical_transform,
    from_canonical,
    to_canonical,
)
from crlnseg.errors import DataError
from crlnseg.io.volume import Volume
from crlnseg.settings import PrepareSettings

__all__ = ["CaseInfo", "PreprocessedCase", "preprocess", "restore", "resample", "nonzero_box",
           "intensity_stats"]

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
_MAX_PERCENTILE_SAMPLES = 1_000_000  # strided (deterministic) subsample for percentiles


@dataclass
class CaseInfo:
    """What was done to one case; enough to map results back onto the original grid."""

    original_shape: tuple[int, int, int]  # the whole input grid, canonical axis order
    crop_box: Box  # [lo, hi) per axis, in canonical voxels of the whole input grid
    shape: tuple[int, int, int]  # preprocessed spatial shape
    spacing: tuple[float, float, float]  # the input's, canonical axis order
    target_spacing: tuple[float, float, float]  # of the preprocessed grid
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)  # the input's header
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)  # input's header
    intensity: list[dict[str, float]] = field(default_factory=list)  # per channel
    labels_present: list[int] = field(default_factory=list)
    # input array order -> canonical: canonical axis k = input axis permutation[k], then flipped
    orientation: dict[str, list] = field(
        default_factory=lambda: {"permutation": [0, 1, 2], "flips": [False, False, False]})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _HasGrid(Protocol):
    original_shape: Any
    crop_box: Any


@dataclass
class PreprocessedCase:
    image: np.ndarray  # float32 (C, X, Y, Z)
    label: np.ndarray | None  # uint8 (X, Y, Z)
    info: CaseInfo


def preprocess(image: Volume, label: Volume | None, settings: PrepareSettings
               ) -> PreprocessedCase:
    """Orient, crop, resample and normalise one case (the label, when given, follows the image)."""
    arr = image.array if image.array.ndim == 4 else image.array[None]
    lab = None
    if label is not None:
        lab = label.array
        if lab.shape != arr.shape[1:]:
            raise DataError(f"{label.path}: label shape {lab.shape} != image shape "
                            f"{arr.shape[1:]}")
    transform = IDENTITY
    if settings.orientation == "canonical":
        try:
            transform = canonical_transform(image.geometry.direction)
        except ValueError as err:
            raise DataError(f"{image.path or 'image'}: {err}") from None
    arr = to_canonical(arr, transform)
    lab = to_canonical(lab, transform) if lab is not None else None
    spatial = arr.shape[1:]
    box = nonzero_box(arr) if settings.crop_nonzero else tuple((0, n) for n in spatial)
    region = (slice(None),) + tuple(slice(lo, hi) for lo, hi in box)
    arr = arr[region]
    lab = lab[region[1:]] if lab is not None else None
    stats = [intensity_stats(ch, lab, settings) for ch in arr]
    spacing = canonical_spacing(image.geometry.spacing, transform)
    target = tuple(float(s) for s in settings.target_spacing or spacing)
    shape = tuple(max(1, round(n * s / t))
                  for n, s, t in zip(arr.shape[1:], spacing, target, strict=True))
    order = 3 if settings.interpolation == "bspline" else 1
    out = np.empty((arr.shape[0],) + shape, np.float32)
    for c, (ch, st) in enumerate(zip(arr, stats, strict=True)):
        resampled = resample(ch.astype(np.float32, copy=False), shape, order)
        out[c] = _normalise(resampled, st, settings)
    if lab is not None:
        lab = np.ascontiguousarray(resample(lab.astype(np.uint8, copy=False), shape, 0))
    info = CaseInfo(
        original_shape=tuple(int(n) for n in spatial), crop_box=box, shape=shape,  # type: ignore[arg-type]
        spacing=spacing, target_spacing=target,  # type: ignore[arg-type]
        origin=tuple(image.geometry.origin), direction=tuple(image.geometry.direction),
        intensity=stats, labels_present=[int(v) for v in np.unique(lab)] if lab is not None else [],
        orientation=transform.to_dict(),
    )
    return PreprocessedCase(image=out, label=lab, info=info)


def restore(array: np.ndarray, info: CaseInfo | _HasGrid, probabilities: bool | None = None
            ) -> np.ndarray:
    """Map ``array`` from the preprocessed grid back to the original grid, in the input's own
    array order (``info.orientation`` undone last; absent, as on a bare grid record: identity).

    Labels ``(X, Y, Z)`` (integer dtype) use nearest neighbour and pad with 0; float arrays use
    linear interpolation. ``(C, X, Y, Z)`` float arrays are class probabilities by default
    (``probabilities=None``): outside the crop box the background channel 0 is 1, the others 0.
    """
    original = tuple(int(n) for n in info.original_shape)
    box = [tuple(int(v) for v in b) for b in info.crop_box]
    crop_shape = tuple(hi - lo for lo, hi in box)
    order = 0 if array.dtype.kind in "iub" else 1
    if probabilities is None:
        probabilities = array.ndim == 4 and order == 1
    lead = array.shape[:-3]
    out = np.zeros(lead + original, dtype=array.dtype)
    if probabilities:
        out[0] = 1
    region = (Ellipsis,) + tuple(slice(lo, hi) for lo, hi in box)
    if array.ndim == 4:
        out[region] = np.stack([resample(ch, crop_shape, order) for ch in array])
    else:
        out[region] = resample(array, crop_shape, order)
    return from_canonical(out, getattr(info, "orientation", None))


def resample(array: np.ndarray, shape: tuple[int, ...], order: int) -> np.ndarray:
    """Resample a 3D array to ``shape``, voxel centres aligned (``grid_mode``), edges clamped."""
    if tuple(array.shape) == tuple(shape):
        return array
    from scipy.ndimage import zoom

    factors = [n / m for n, m in zip(shape, array.shape, strict=True)]
    return zoom(array, factors, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)


def nonzero_box(image: np.ndarray) -> Box:
    """Bounding box ``[lo, hi)`` of voxels non-zero in any channel; the full grid if none."""
    mask = np.any(image != 0, axis=0)
    box = []
    for axis in range(3):
        hits = np.flatnonzero(np.any(mask, axis=tuple(a for a in range(3) if a != axis)))
        box.append((int(hits[0]), int(hits[-1]) + 1) if hits.size else (0, mask.shape[axis]))
    return tuple(box)  # type: ignore[return-value]


def intensity_stats(channel: np.ndarray, label: np.ndarray | None, settings: PrepareSettings
                    ) -> dict[str, float]:
    """Raw statistics of one channel plus the normalisation ``(x - offset) / scale`` to apply."""
    x = channel.astype(np.float32, copy=False)
    stats = {"mean": float(x.mean(dtype=np.float64)), "std": float(x.std(dtype=np.float64)),
             "min": float(x.min()), "max": float(x.max())}
    stats["p00_5"], stats["p99_5"] = _percentiles(x.ravel(), (0.5, 99.5))
    if label is not None:
        fg = x[label > 0]
        stats["fg_count"] = float(fg.size)
        if fg.size:
            stats["fg_mean"] = float(fg.mean(dtype=np.float64))
            stats["fg_std"] = float(fg.std(dtype=np.float64))
            low, mid, high = _percentiles(fg, (0.5, 50, 99.5))
            stats["fg_p00_5"], stats["fg_p50"], stats["fg_p99_5"] = low, mid, high
    offset, scale = _normalisation(x, stats, settings)
    stats["norm_offset"], stats["norm_scale"] = offset, scale
    return stats


def _normalisation(x: np.ndarray, stats: dict[str, float], settings: PrepareSettings
                   ) -> tuple[float, float]:
    if settings.normalize == "zscore":
        return stats["mean"], max(stats["std"], 1e-8)
    if settings.normalize == "ct" and settings.ct_stats is not None:  # the dataset's (plan)
        return settings.ct_stats[0], settings.ct_stats[1]
    if settings.normalize == "ct":
        lo, hi = settings.ct_window
        clipped = np.clip(x, lo, hi)
        std = float(clipped.std(dtype=np.float64))
        return float(clipped.mean(dtype=np.float64)), max(std, 1e-8)
    if settings.normalize == "minmax":
        return stats["min"], max(stats["max"] - stats["min"], 1e-8)
    return 0.0, 1.0


def _normalise(x: np.ndarray, stats: dict[str, float], settings: PrepareSettings) -> np.ndarray:
    if settings.normalize == "ct":
        x = np.clip(x, *settings.ct_window)
    return ((x - stats["norm_offset"]) / stats["norm_scale"]).astype(np.float32, copy=False)


def _percentiles(values: np.ndarray, qs: tuple[float, ...]) -> tuple[float, ...]:
    step = max(1, values.size // _MAX_PERCENTILE_SAMPLES)
    return tuple(float(v) for v in np.percentile(values[::step], qs))
