"""Projection head for the contrastive embedding (method/METHOD.md Sec. 1): conv3 -> BN -> ReLU
-> conv1 (norm and activation as the backbone's, ``model.norm`` and ``model.activation``).

The head is split in two on purpose: ``hidden`` (conv3 -> BN -> ReLU) and ``project`` (the final
1x1x1 conv, an affine map H -> F). Positive supervision only needs the embedding at sampled voxels
and class means over many voxels; since ``project`` is affine, the mean of projections equals the
projection of the mean, so training projects sampled points only instead of a dense (B, F, X, Y, Z)
tensor (same values, a fraction of the memory).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crlnseg.nets.layers import Activation, Norm, activation_layer, norm_layer

__all__ = ["ProjectionHead"]


class ProjectionHead(nn.Module):
    """Full-resolution embedding: ``project(hidden(x))``, ``(B, H, X, Y, Z) -> (B, F, X, Y, Z)``."""

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int,
                 kernel: tuple[int, int, int] = (3, 3, 3), norm: Norm = "batch",
                 activation: Activation = "relu") -> None:
        super().__init__()
        self.hidden = nn.Sequential(
            nn.Conv3d(in_channels, hidden_channels, kernel, padding=tuple(k // 2 for k in kernel)),
            norm_layer(norm, hidden_channels),
            activation_layer(activation),
        )
        self.project = nn.Conv3d(hidden_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(self.hidden(x))

    def project_points(self, points: Tensor) -> Tensor:
        """Apply the final 1x1x1 conv to hidden features given as rows: ``(..., H) -> (..., F)``."""
        weight = self.project.weight.flatten(1)  # (F, H)
        bias = self.project.bias
        return torch.nn.functional.linear(points, weight.to(points.dtype),
                                          None if bias is None else bias.to(points.dtype))
