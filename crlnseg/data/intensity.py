"""Intensity augmentation of the labelled crops (nnU-Net's), in nnU-Net's order, for crop x with
channels x_c (each operation drawn per crop with its own probability, values per channel):

    noise       x   <- x + n,  n ~ N(0, sigma^2) per voxel, sigma ~ U(range), one field per crop
    blur        x_c <- G(sigma_c) * x_c                               (edges replicated)
    brightness  x_c <- b_c x_c
    contrast    x_c <- clip(mean + f_c (x_c - mean), min, max)         (the range is kept)
    gamma inv.  x_c <- -g(-x_c)
    gamma       x_c <- g(x_c),  g(v) = min + (max - min) ((v - min) / (max - min))^gamma_c,
                then the mean and std of x_c restored

with min, max, mean, std those of x_c. As batchgenerators, contrast and gamma values are drawn
below 1 half the time when the range allows it; the noise sigma is the drawn value itself.
Draws (:func:`draw_intensity_params`) are separate from :func:`apply_intensity`; images are
(B, C, X, Y, Z).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from crlnseg.data.filters import gaussian_filter
from crlnseg.data.spatial import uniform_halves
from crlnseg.data.views import numpy_rng
from crlnseg.settings import AugmentSettings

__all__ = ["IntensityParams", "intensity_enabled", "draw_intensity_params", "apply_intensity",
           "gamma_transform", "contrast_transform"]

PerChannel = list[float] | None  # one value per channel; None: not applied to this crop


@dataclass
class IntensityParams:
    noise: list[tuple[int, float] | None]  # (seed of the noise field, sigma)
    blur: list[PerChannel]  # sigma in voxels
    brightness: list[PerChannel]
    contrast: list[PerChannel]
    gamma_inverted: list[PerChannel]
    gamma: list[PerChannel]


def intensity_enabled(settings: AugmentSettings) -> bool:
    """Whether any intensity transform can happen; when not, nothing is drawn."""
    s = settings
    return max(s.gaussian_noise_p, s.blur_p, s.brightness_p, s.contrast_p, s.gamma_inverted_p,
               s.gamma_p) > 0


def draw_intensity_params(batch_size: int, channels: int, generator: torch.Generator,
                          settings: AugmentSettings) -> IntensityParams:
    s, rng = settings, numpy_rng(generator)
    out = IntensityParams([], [], [], [], [], [])
    for _ in range(batch_size):
        on = rng.uniform(size=6) < (s.gaussian_noise_p, s.blur_p, s.brightness_p, s.contrast_p,
                                    s.gamma_inverted_p, s.gamma_p)
        noise = (int(rng.integers(0, 2**62)), float(rng.uniform(*s.gaussian_noise_sigma)))
        values = [[float(rng.uniform(*s.blur_sigma)) for _ in range(channels)],
                  [float(rng.uniform(*s.brightness)) for _ in range(channels)],
                  [uniform_halves(rng, *s.contrast) for _ in range(channels)],
                  [uniform_halves(rng, *s.gamma) for _ in range(channels)],
                  [uniform_halves(rng, *s.gamma) for _ in range(channels)]]
        out.noise.append(noise if on[0] else None)
        for field, v, used in zip((out.blur, out.brightness, out.contrast, out.gamma_inverted,
                                   out.gamma), values, on[1:], strict=True):
            field.append(v if used else None)
    return out


def contrast_transform(x: Tensor, factor: float) -> Tensor:
    """clip(mean + factor (x - mean), min, max) of one channel."""
    mean = x.mean()
    return ((x - mean) * factor + mean).clamp(x.min(), x.max())


def gamma_transform(x: Tensor, gamma: float, invert: bool = False) -> Tensor:
    """g(x) of one channel (module docstring) with its mean and std restored; ``invert``:
    -g(-x)."""
    x = -x if invert else x
    mean, std = x.mean(), x.std(correction=0)
    lo, span = x.min(), x.max() - x.min()
    y = ((x - lo) / (span + 1e-7)) ** gamma * span + lo
    y = (y - y.mean()) / (y.std(correction=0) + 1e-8) * std + mean
    return -y if invert else y


def _noise(like: Tensor, seed: int, sigma: float) -> Tensor:
    gen = torch.Generator(device=like.device).manual_seed(seed)
    return torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype) * sigma


def apply_intensity(image: Tensor, params: IntensityParams) -> Tensor:
    out = []
    for i in range(image.shape[0]):
        x = image[i]
        if params.noise[i] is not None:
            x = x + _noise(x, *params.noise[i])
        channels = list(x)
        for c in range(len(channels)):
            v = channels[c]
            if params.blur[i] is not None:
                v = gaussian_filter(v[None, None], params.blur[i][c], "replicate")[0, 0]
            if params.brightness[i] is not None:
                v = v * params.brightness[i][c]
            if params.contrast[i] is not None:
                v = contrast_transform(v, params.contrast[i][c])
            if params.gamma_inverted[i] is not None:
                v = gamma_transform(v, params.gamma_inverted[i][c], invert=True)
            if params.gamma[i] is not None:
                v = gamma_transform(v, params.gamma[i][c])
            channels[c] = v
        out.append(torch.stack(channels))
    return torch.stack(out)
