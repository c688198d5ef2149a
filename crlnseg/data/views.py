"""Weak and strong views (method/METHOD.md Sec. 1) on batched tensors on the model's device.

Random draws (``draw_*_params``, from a passed ``torch.Generator``) are separate from the
deterministic operations (``apply_*``), so a test can replay a view exactly. Images are
(B, C, X, Y, Z); labels and confidences (B, X, Y, Z). "In-plane" is X and Y.
Weak view: rot90 in-plane (k in 0..3; only 0 or 2 when X != Y, so the batch keeps its shape),
flip along X or Y, intensity scale U(0.75, 1.25) (the crop is the sampler's).
Strong view, from the weak view with its pseudo-label and confidence: in-plane rescale
U(0.5, 1.5) (window placed at a random offset; labels padded with -1, confidences with 0, images
with 0), box CutMix with the next sample (lambda ~ Beta(4, 4), box in-plane, full depth),
intensity scale (p 0.8), Gaussian noise (sigma 0.1, clipped to +-0.2, p 0.5), rot90/flip (p 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from crlnseg.settings import AugmentSettings
from crlnseg.types import IGNORE

__all__ = ["WeakParams", "StrongParams", "draw_weak_params", "apply_weak", "draw_strong_params",
           "apply_strong", "numpy_rng", "IGNORE"]


@dataclass
class WeakParams:
    rot90: list[int]  # in-plane quarter turns per sample
    flip: list[int]  # axis (0 = X, 1 = Y) per sample, -1 = none
    scale: list[float]  # intensity factor per sample


@dataclass
class StrongParams:
    rescale: list[float]  # in-plane zoom factor per sample
    offset: list[tuple[float, float]]  # where the output window sits, as fractions of the slack
    box: list[tuple[float, float, float, float]]  # CutMix (x0, x1, y0, y1) fractions; [] = none
    intensity: list[float]  # 1.0 when not applied
    noise_seed: list[int | None]  # seed of the noise field, None when not applied
    rot90: list[int]
    flip: list[int]  # -1 = none
    noise_sigma: float = 0.1
    noise_clip: float = 0.2


def numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded from the torch one (numpy has Beta; torch's takes no generator)."""
    return np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))


def draw_weak_params(batch_size: int, generator: torch.Generator, settings: AugmentSettings,
                     square: bool = True) -> WeakParams:
    rng = numpy_rng(generator)
    rot = rng.integers(0, 4, batch_size) if square else 2 * rng.integers(0, 2, batch_size)
    lo, hi = settings.weak_intensity
    return WeakParams([int(k) for k in rot], [int(a) for a in rng.integers(0, 2, batch_size)],
                      [float(s) for s in rng.uniform(lo, hi, batch_size)])


def _rot_flip(t: Tensor, k: int, axis: int, first: int) -> Tensor:
    """rot90 in the plane of dims (first, first + 1), then flip along first + axis."""
    t = torch.rot90(t, k, dims=(first, first + 1)) if k % 4 else t
    return t.flip(first + axis) if axis >= 0 else t


def apply_weak(image: Tensor, label: Tensor | None, params: WeakParams
               ) -> tuple[Tensor, Tensor | None]:
    images, labels = [], []
    for i in range(image.shape[0]):
        k, axis = params.rot90[i], params.flip[i]
        images.append(_rot_flip(image[i], k, axis, 1) * params.scale[i])
        if label is not None:
            labels.append(_rot_flip(label[i], k, axis, 0))
    return torch.stack(images), (torch.stack(labels) if label is not None else None)


def draw_strong_params(batch_size: int, generator: torch.Generator, settings: AugmentSettings,
                       square: bool = True) -> StrongParams:
    s, rng = settings, numpy_rng(generator)
    boxes: list[tuple[float, float, float, float]] = []
    for _ in range(batch_size if batch_size > 1 else 0):
        cut = float(np.sqrt(1.0 - rng.beta(s.cutmix_beta, s.cutmix_beta)))
        cx, cy = rng.uniform(0, 1, 2)
        boxes.append((max(cx - cut / 2, 0), min(cx + cut / 2, 1),
                      max(cy - cut / 2, 0), min(cy + cut / 2, 1)))
    n = batch_size
    flip_on = rng.uniform(size=n) < s.flip_p
    rot = rng.integers(0, 4, n) if square else 2 * rng.integers(0, 2, n)
    return StrongParams(
        rescale=[float(v) for v in rng.uniform(*s.rescale, n)],
        offset=[(float(a), float(b)) for a, b in rng.uniform(0, 1, (n, 2))],
        box=boxes,
        intensity=[float(v) if on else 1.0 for v, on in
                   zip(rng.uniform(*s.intensity, n), rng.uniform(size=n) < s.intensity_p,
                       strict=True)],
        noise_seed=[int(v) if on else None for v, on in
                    zip(rng.integers(0, 2**62, n), rng.uniform(size=n) < s.noise_p, strict=True)],
        rot90=[int(k) if on else 0 for k, on in zip(rot, flip_on, strict=True)],
        flip=[int(a) if on else -1 for a, on in zip(rng.integers(0, 2, n), flip_on, strict=True)],
        noise_sigma=s.noise_sigma, noise_clip=s.noise_clip,
    )


def _place(t: Tensor, size: tuple[int, int], offset: tuple[float, float], fill: float) -> Tensor:
    """Crop or pad the last-but-one two in-plane dims of t (..., X', Y', Z) to ``size``."""
    out = t.new_full((*t.shape[:-3], size[0], size[1], t.shape[-1]), fill)
    src, dst = [], []
    for have, want, frac in zip(t.shape[-3:-1], size, offset, strict=True):
        start = int(round(abs(have - want) * frac))
        n = min(have, want)
        src.append(slice(start, start + n) if have > want else slice(0, n))
        dst.append(slice(0, n) if have > want else slice(start, start + n))
    out[..., dst[0], dst[1], :] = t[..., src[0], src[1], :]
    return out


def _rescale(image: Tensor, label: Tensor, conf: Tensor, factor: float,
             offset: tuple[float, float]) -> tuple[Tensor, Tensor, Tensor]:
    x, y, z = image.shape[-3:]
    new = (max(int(round(x * factor)), 1), max(int(round(y * factor)), 1), z)
    img = F.interpolate(image[None], size=new, mode="trilinear", align_corners=False)[0]
    near = F.interpolate(torch.stack([label.to(conf.dtype), conf])[None], size=new,
                         mode="nearest")[0]
    return (_place(img, (x, y), offset, 0.0), _place(near[0], (x, y), offset, IGNORE).long(),
            _place(near[1], (x, y), offset, 0.0))


def _cutmix(tensors: list[Tensor], box: list[tuple[float, float, float, float]]) -> list[Tensor]:
    """Sample i takes the box region of sample (i + 1) % B, in every tensor (same box)."""
    out = [t.clone() for t in tensors]
    for i, (x0, x1, y0, y1) in enumerate(box):
        j = (i + 1) % len(box)
        for src, dst in zip(tensors, out, strict=True):
            sx, sy = src.shape[-3], src.shape[-2]
            xs = slice(int(round(x0 * sx)), int(round(x1 * sx)))
            ys = slice(int(round(y0 * sy)), int(round(y1 * sy)))
            dst[i, ..., xs, ys, :] = src[j, ..., xs, ys, :]
    return out


def _noise(like: Tensor, seed: int, sigma: float, clip: float) -> Tensor:
    gen = torch.Generator(device=like.device).manual_seed(seed)
    noise = torch.randn(like.shape, generator=gen, device=like.device, dtype=like.dtype)
    return (noise * sigma).clamp(-clip, clip)


def apply_strong(image: Tensor, label: Tensor, confidence: Tensor, params: StrongParams
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The strong view of (image (B, C, X, Y, Z), label (B, X, Y, Z), confidence (B, X, Y, Z))."""
    parts = [_rescale(image[i], label[i], confidence[i], params.rescale[i], params.offset[i])
             for i in range(image.shape[0])]
    img, lab, conf = (torch.stack(t) for t in zip(*parts, strict=True))
    if params.box:
        img, lab, conf = _cutmix([img, lab, conf], params.box)
    images, labels, confs = [], [], []
    for i in range(img.shape[0]):
        x = img[i] * params.intensity[i]
        if params.noise_seed[i] is not None:
            x = x + _noise(x, params.noise_seed[i], params.noise_sigma, params.noise_clip)
        k, axis = params.rot90[i], params.flip[i]
        images.append(_rot_flip(x, k, axis, 1))
        labels.append(_rot_flip(lab[i], k, axis, 0))
        confs.append(_rot_flip(conf[i], k, axis, 0))
    return torch.stack(images), torch.stack(labels), torch.stack(confs)
