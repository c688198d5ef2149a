"""Spatial augmentation of the crops (nnU-Net's): rotation, scaling, elastic deformation, mirroring.

Each sample gets one transform, shared by its image and label. Output voxel p (voxel units,
crop centre c = (n - 1) / 2 per axis) reads the source point

    q = c + s R (p - c + d(p))

with R = R_Z R_Y R_X the rotation (angles about X, Y, Z; "in-plane": about Z only), s the scale
(s > 1 shows a larger field of view, the content shrinks: nnU-Net's convention) and d a smoothed
random displacement (elastic: U(-1, 1) noise per voxel and axis, Gaussian-smoothed with sigma,
times alpha, as batchgenerators). Images are resampled trilinearly with 0 outside the crop;
labels one-hot, trilinearly, then argmax, and every voxel whose q lies outside the crop gets
IGNORE (as does the weight of ignored source voxels). A sample with no rotation, scale or
deformation is not resampled at all, so identity parameters return the input exactly. Mirroring
along X, Y and Z follows. Random draws (:func:`draw_spatial_params`, from a passed
``torch.Generator``) are separate from :func:`apply_spatial`, as in :mod:`crlnseg.data.views`.
Images are (B, C, X, Y, Z); labels and the returned ``inside`` masks (B, X, Y, Z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crlnseg.data.filters import gaussian_filter
from crlnseg.data.views import numpy_rng
from crlnseg.settings import AugmentSettings
from crlnseg.types import IGNORE

__all__ = ["SpatialParams", "spatial_enabled", "draw_spatial_params", "rotation_matrix",
           "source_points", "sample_points", "apply_spatial", "uniform_halves"]

_EDGE = 1e-3  # voxels: q this far past the border still counts as inside (float error)


@dataclass
class SpatialParams:
    angles: list[tuple[float, float, float]]  # radians about X, Y, Z per sample
    scale: list[float]  # 1.0 = none
    elastic: list[tuple[int, float, float] | None]  # (noise seed, alpha, sigma); None = none
    mirror: list[tuple[bool, bool, bool]]  # flip along X, Y, Z

    def resamples(self, i: int) -> bool:
        return any(self.angles[i]) or self.scale[i] != 1.0 or self.elastic[i] is not None


def spatial_enabled(settings: AugmentSettings) -> bool:
    """Whether any spatial transform can happen; when not, nothing is drawn, so the random
    stream of the other augmentations is as without this module."""
    s = settings
    return max(s.rotation_p, s.scale_p, s.elastic_p, *s.mirror_p) > 0


def uniform_halves(rng: np.random.Generator, lo: float, hi: float) -> float:
    """batchgenerators' draw of a factor: below 1 half the time when the range allows it."""
    if rng.uniform() < 0.5 and lo < 1:
        return float(rng.uniform(lo, 1.0))
    return float(rng.uniform(max(lo, 1.0), hi))


def draw_spatial_params(batch_size: int, generator: torch.Generator, settings: AugmentSettings
                        ) -> SpatialParams:
    s, rng = settings, numpy_rng(generator)
    axes = (True, True, True) if s.rotation_axes == "all" else (False, False, True)
    params = SpatialParams([], [], [], [])
    for _ in range(batch_size):
        on = rng.uniform(size=3) < (s.rotation_p, s.scale_p, s.elastic_p)
        degrees = rng.uniform(*s.rotation, 3)
        params.angles.append(tuple(math.radians(float(a)) if on[0] and use else 0.0
                                   for a, use in zip(degrees, axes, strict=True)))
        scale = uniform_halves(rng, *s.scale)
        params.scale.append(scale if on[1] else 1.0)
        seed, alpha, sigma = (int(rng.integers(0, 2**62)), float(rng.uniform(*s.elastic_alpha)),
                              float(rng.uniform(*s.elastic_sigma)))
        params.elastic.append((seed, alpha, sigma) if on[2] else None)
        params.mirror.append(tuple(bool(v) for v in rng.uniform(size=3) < s.mirror_p))
    return params


def rotation_matrix(angles: tuple[float, float, float]) -> Tensor:
    """R = R_Z R_Y R_X for angles (radians) about X, Y, Z: (3, 3) float64."""
    cx, cy, cz = (math.cos(a) for a in angles)
    sx, sy, sz = (math.sin(a) for a in angles)
    rx = torch.tensor([[1, 0, 0], [0, cx, -sx], [0, sx, cx]], dtype=torch.float64)
    ry = torch.tensor([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]], dtype=torch.float64)
    rz = torch.tensor([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]], dtype=torch.float64)
    return rz @ ry @ rx


def _displacement(shape: tuple[int, int, int], elastic: tuple[int, float, float],
                  device: torch.device | None) -> Tensor:
    """d (X, Y, Z, 3) in voxels: smoothed U(-1, 1) noise times alpha."""
    seed, alpha, sigma = elastic
    gen = torch.Generator(device=device).manual_seed(seed)
    noise = torch.rand((1, 3, *shape), generator=gen, device=device) * 2 - 1
    return (gaussian_filter(noise, sigma) * alpha)[0].movedim(0, -1)


def source_points(shape: tuple[int, int, int], angles: tuple[float, float, float], scale: float,
                  displacement: Tensor | None = None, device: torch.device | None = None
                  ) -> Tensor:
    """q (X, Y, Z, 3), the source point in voxels of every output voxel p."""
    centre = torch.tensor([(n - 1) / 2 for n in shape], device=device)
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in shape]
    p = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1) - centre
    if displacement is not None:
        p = p + displacement
    m = (scale * rotation_matrix(angles)).to(device=device, dtype=torch.float32)
    return p @ m.T + centre


def sample_points(shape: tuple[int, int, int], params: SpatialParams, i: int,
                  device: torch.device | None = None) -> Tensor | None:
    """q (X, Y, Z, 3) of sample ``i`` before mirroring; None when it is not resampled."""
    if not params.resamples(i):
        return None
    elastic = params.elastic[i]
    d = None if elastic is None else _displacement(shape, elastic, device)
    return source_points(shape, params.angles[i], params.scale[i], d, device)


def _sample(volume: Tensor, q: Tensor) -> Tensor:
    """volume (C, X, Y, Z) read trilinearly at q (X', Y', Z', 3), 0 outside."""
    sizes = torch.tensor([max(n - 1, 1) for n in volume.shape[1:]], device=q.device)
    grid = (2 * q / sizes - 1).flip(-1)  # grid_sample's last axis indexes the last dim
    return F.grid_sample(volume[None].float(), grid[None], mode="bilinear", padding_mode="zeros",
                         align_corners=True)[0]


def _resample(image: Tensor, label: Tensor | None, q: Tensor, classes: int
              ) -> tuple[Tensor, Tensor | None, Tensor]:
    shape = torch.tensor(image.shape[1:], device=q.device)
    inside = ((q >= -_EDGE) & (q <= shape - 1 + _EDGE)).all(-1)
    img = _sample(image, q).to(image.dtype)
    if label is None:
        return img, None, inside
    onehot = F.one_hot(label.clamp_min(0), classes).movedim(-1, 0) * (label >= 0)
    weights = _sample(onehot, q)
    ignored = 1 - weights.sum(0, keepdim=True)  # share of ignored source voxels
    best = torch.cat([weights, ignored]).argmax(0)
    lab = torch.where((best == classes) | ~inside, IGNORE, best).to(label.dtype)
    return img, lab, inside


def apply_spatial(image: Tensor, label: Tensor | None, params: SpatialParams
                  ) -> tuple[Tensor, Tensor | None, Tensor]:
    """The transformed (image, label or None, inside): ``inside`` (B, X, Y, Z) marks the voxels
    whose source point lies within the crop."""
    shape = tuple(image.shape[2:])
    classes = int(label.max().clamp_min(0)) + 1 if label is not None else 0
    images, labels, insides = [], [], []
    for i in range(image.shape[0]):
        img, lab = image[i], None if label is None else label[i]
        inside = torch.ones(shape, dtype=torch.bool, device=image.device)
        q = sample_points(shape, params, i, image.device)
        if q is not None:
            img, lab, inside = _resample(img, lab, q, classes)
        dims = [a for a in range(3) if params.mirror[i][a]]
        if dims:
            img, inside = img.flip([a + 1 for a in dims]), inside.flip(dims)
            lab = None if lab is None else lab.flip(dims)
        images.append(img)
        labels.append(lab)
        insides.append(inside)
    return (torch.stack(images), None if label is None else torch.stack(labels),
            torch.stack(insides))
