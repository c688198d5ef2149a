"""Sliding-window inference over a whole volume, with Gaussian or uniform blending.

A network trained on crops of size ``patch`` (X, Y, Z) sees the volume as overlapping patches;
the per-patch outputs (probabilities: the caller applies softmax per patch) are blended as

    P(v) = sum_k w_k(v) * p_k(v) / sum_k w_k(v)

with ``w`` a Gaussian importance map centred on the patch (sigma = ``sigma_scale`` * patch, so
the less reliable patch borders count less; nnU-Net, MONAI and crlnseg's predictor use 1/8) or
``w = 1`` (uniform: the literature's protocol, e.g. LA stride 18 x 18 x 4, which averages the
softmax of every patch).

Memory: one ``(K, X, Y, Z)`` float32 accumulator and one ``(X, Y, Z)`` float32 weight map, on
``buffer_device``; the division happens in place, so the result *is* the accumulator. Volumes
smaller than the patch on some axis are padded with zeros (centred, as the reference code) and
the result is cropped back.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import torch

from crlnseg.types import IntTriple

__all__ = ["Blend", "DEFAULT_SIGMA", "resolve_sigma", "gaussian_importance_map", "overlap_starts",
           "stride_starts", "patch_origins", "pad_to_patch", "sliding_window", "blend_patches"]

Blend = Literal["gaussian", "uniform"]
PatchFn = Callable[[torch.Tensor], torch.Tensor]


# nnU-Net's and MONAI's sigma, as a share of the patch side: the built-in default everywhere.
DEFAULT_SIGMA = 1.0 / 8.0


def resolve_sigma(sigma_scale: float | None) -> float:
    """The Gaussian sigma (share of the patch side) to blend with: the given one, else the
    built-in default."""
    return DEFAULT_SIGMA if sigma_scale is None else float(sigma_scale)


def gaussian_importance_map(patch: Sequence[int], sigma_scale: float = DEFAULT_SIGMA
                            ) -> torch.Tensor:
    """Separable Gaussian of shape ``patch``, sigma = ``patch * sigma_scale``, max 1, min > 0."""
    axes = []
    for size in patch:
        centre, sigma = size // 2, size * sigma_scale
        coords = torch.arange(size, dtype=torch.float64) - centre
        axes.append(torch.exp(-0.5 * (coords / sigma) ** 2))
    weight = axes[0][:, None, None] * axes[1][None, :, None] * axes[2][None, None, :]
    weight = weight / weight.max()
    # Never 0: a voxel covered only by patch corners must not divide by zero.
    return weight.clamp_min(1e-12).to(torch.float32)


def overlap_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Patch starts along one axis, as nnU-Net: the fewest steps of at most
    ``patch * (1 - overlap)`` that cover the axis, spread evenly from 0 to ``size - patch``."""
    if size <= patch:
        return [0]
    target = max(patch * (1.0 - overlap), 1.0)
    steps = math.ceil((size - patch) / target) + 1
    actual = (size - patch) / (steps - 1)
    return sorted({int(round(actual * i)) for i in range(steps)})


def stride_starts(size: int, patch: int, stride: int) -> list[int]:
    """Patch starts along one axis, as the literature's ``test_single_case``:
    ``min(stride * i, size - patch)`` for ``i < ceil((size - patch) / stride) + 1``."""
    if size <= patch:
        return [0]
    steps = math.ceil((size - patch) / stride) + 1
    return sorted({min(stride * i, size - patch) for i in range(steps)})


def patch_origins(shape: Sequence[int], patch: Sequence[int], overlap: float = 0.5,
                  stride: Sequence[int] | None = None) -> list[IntTriple]:
    """All patch origins (X, Y, Z) covering ``shape`` (already padded to at least ``patch``)."""
    if stride is not None:
        per_axis = [stride_starts(n, p, s) for n, p, s in zip(shape, patch, stride, strict=True)]
    else:
        per_axis = [overlap_starts(n, p, overlap) for n, p in zip(shape, patch, strict=True)]
    return [(x, y, z) for x in per_axis[0] for y in per_axis[1] for z in per_axis[2]]


def pad_to_patch(image: torch.Tensor, patch: Sequence[int]
                 ) -> tuple[torch.Tensor, tuple[slice, ...]]:
    """Zero-pad ``(C, X, Y, Z)`` to at least ``patch`` per axis (centred); returns the padded
    image and the spatial slices that crop a padded-grid result back to the input grid."""
    shape = image.shape[-3:]
    before = [max(p - n, 0) // 2 for n, p in zip(shape, patch, strict=True)]
    after = [max(p - n, 0) - b for n, p, b in zip(shape, patch, before, strict=True)]
    crop = tuple(slice(b, b + n) for b, n in zip(before, shape, strict=True))
    if not any(before) and not any(after):
        return image, crop
    # F.pad takes pairs from the last axis backwards.
    pads = [v for axis in (2, 1, 0) for v in (before[axis], after[axis])]
    return torch.nn.functional.pad(image, pads, mode="constant", value=0.0), crop


def _batches(origins: list[IntTriple], size: int) -> Iterator[list[IntTriple]]:
    for i in range(0, len(origins), size):
        yield origins[i:i + size]


def sliding_window(image: torch.Tensor, patch_fn: PatchFn, patch: Sequence[int],
                   out_channels: int, blend: Blend = "gaussian", overlap: float = 0.5,
                   stride: Sequence[int] | None = None, batch_size: int = 1,
                   sigma_scale: float | None = None,
                   device: torch.device | str = "cpu",
                   buffer_device: torch.device | str | None = None,
                   progress: Callable[[Iterator[list[IntTriple]], int], Iterator[list[IntTriple]]]
                   | None = None) -> torch.Tensor:
    """Blend ``patch_fn`` over ``image`` ``(C, X, Y, Z)``; returns ``(K, X, Y, Z)`` float32.

    ``patch_fn`` maps a batch ``(B, C, *patch)`` on ``device`` to ``(B, K, *patch)`` (typically
    probabilities); ``stride`` (voxels, X Y Z) overrides ``overlap``. ``progress`` may wrap the
    batch iterator (it receives the iterator and the number of batches).
    """
    patch = tuple(int(p) for p in patch)
    if blend == "gaussian":
        weight = gaussian_importance_map(patch, resolve_sigma(sigma_scale))
    else:
        weight = torch.ones(patch, dtype=torch.float32)
    return blend_patches(image, patch_fn, patch, out_channels, [weight], overlap, stride,
                         batch_size, device, buffer_device, progress)[0]


def blend_patches(image: torch.Tensor, patch_fn: PatchFn, patch: Sequence[int],
                  out_channels: int, weight_maps: Sequence[torch.Tensor], overlap: float = 0.5,
                  stride: Sequence[int] | None = None, batch_size: int = 1,
                  device: torch.device | str = "cpu",
                  buffer_device: torch.device | str | None = None,
                  progress: Callable[[Iterator[list[IntTriple]], int], Iterator[list[IntTriple]]]
                  | None = None) -> list[torch.Tensor]:
    """:func:`sliding_window` with several weightings of the same patch outputs: one blended
    ``(K, X, Y, Z)`` volume per map of ``weight_maps`` (each of shape ``patch``), the network run
    once. Validation scores blending variants this way; memory grows with the number of maps."""
    patch = tuple(int(p) for p in patch)
    buffer_device = torch.device(buffer_device if buffer_device is not None else device)
    padded, crop = pad_to_patch(image, patch)
    shape = padded.shape[-3:]
    origins = patch_origins(shape, patch, overlap, stride)
    maps = [w.to(buffer_device, torch.float32) for w in weight_maps]
    accs = [torch.zeros((out_channels, *shape), dtype=torch.float32, device=buffer_device)
            for _ in maps]
    sums = [torch.zeros(tuple(shape), dtype=torch.float32, device=buffer_device) for _ in maps]
    batches: Iterator[list[IntTriple]] = _batches(origins, max(1, batch_size))
    if progress is not None:
        batches = progress(batches, math.ceil(len(origins) / max(1, batch_size)))
    for batch in batches:
        boxes = [tuple(slice(o, o + p) for o, p in zip(org, patch, strict=True)) for org in batch]
        x = torch.stack([padded[(slice(None), *box)] for box in boxes]).to(device)
        out = patch_fn(x).to(buffer_device, torch.float32)
        if out.shape[1] != out_channels:
            raise ValueError(f"patch_fn returned {out.shape[1]} channels, expected {out_channels}")
        for box, o in zip(boxes, out, strict=True):
            for acc, total, weight in zip(accs, sums, maps, strict=True):
                acc[(slice(None), *box)] += o * weight
                total[box] += weight
    for acc, total in zip(accs, sums, strict=True):
        acc /= total  # in place: the accumulator becomes the blended result
    return [acc[(slice(None), *crop)] for acc in accs]
