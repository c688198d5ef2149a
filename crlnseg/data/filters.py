"""Separable Gaussian smoothing of (N, C, X, Y, Z) tensors, shared by the elastic deformation
(smoothed displacement noise) and the Gaussian blur of the intensity augmentation."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gaussian_kernel", "gaussian_filter"]


def gaussian_kernel(sigma: float, truncate: float = 4.0, device: torch.device | None = None
                    ) -> Tensor:
    """Normalised 1D Gaussian, radius ``int(truncate * sigma + 0.5)`` as scipy's."""
    radius = max(int(truncate * sigma + 0.5), 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def gaussian_filter(x: Tensor, sigma: float, mode: Literal["constant", "replicate"] = "constant"
                    ) -> Tensor:
    """Each channel of x (N, C, X, Y, Z) smoothed with sigma (voxels) along X, Y and Z; outside
    the volume 0 (``constant``) or the edge value (``replicate``)."""
    if sigma <= 0:
        return x
    k = gaussian_kernel(sigma, device=x.device).to(x.dtype)
    r, c = k.numel() // 2, x.shape[1]
    for axis in range(3):
        shape = [1, 1, 1]
        shape[axis] = k.numel()
        weight = k.reshape(1, 1, *shape).expand(c, 1, *shape)
        pad = [0, 0, 0, 0, 0, 0]
        pad[4 - 2 * axis] = pad[5 - 2 * axis] = r
        x = F.conv3d(F.pad(x, pad, mode=mode) if mode == "replicate" else F.pad(x, pad),
                     weight, groups=c)
    return x
