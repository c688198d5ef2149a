"""3D U-Net variant (BraTS-like data): double conv blocks, max-pool down, transposed conv up,
concatenated skips. Same five levels ``base * (1, 2, 4, 8, 16)``, the same per-level ``strides`` and
``kernels`` and the same :class:`NetOutput` as the V-Net, so the Dynamic Interaction Module sees
the level-2 (``4 * base``) and level-1 (``2 * base``) features, and the same ``norm`` and
``activation`` options.
``checkpoint_activations`` recomputes the full-resolution layers in the backward pass (as the
V-Net does).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crlnseg.nets.backbone import (
    ISOTROPIC_KERNELS,
    ISOTROPIC_STRIDES,
    EncoderDecoder,
    deep_supervision_heads,
)
from crlnseg.nets.heads import ProjectionHead
from crlnseg.nets.layers import Activation, Norm
from crlnseg.nets.vnet import conv_block
from crlnseg.types import IntTriple

__all__ = ["UNet3D"]


class UNet3D(EncoderDecoder):
    def __init__(self, in_channels: int, num_classes: int, base: int = 16, dropout: bool = True,
                 embed_dim: int = 64, strides: tuple[IntTriple, ...] = ISOTROPIC_STRIDES,
                 kernels: tuple[IntTriple, ...] = ISOTROPIC_KERNELS, norm: Norm = "batch",
                 activation: Activation = "relu", deep_supervision: bool = False) -> None:
        super().__init__()
        b, k, s = base, kernels, strides
        na = {"norm": norm, "activation": activation}
        self.strides = tuple(tuple(level) for level in strides)
        widths = [b * 2**i for i in range(5)]
        self.enc = nn.ModuleList([conv_block(2, in_channels if i == 0 else widths[i - 1],
                                             widths[i], k[i], **na) for i in range(5)])
        self.pool = nn.ModuleList([nn.MaxPool3d(s[i]) for i in range(4)])
        self.up = nn.ModuleList([nn.ConvTranspose3d(widths[4 - i], widths[3 - i], s[3 - i],
                                                    stride=s[3 - i]) for i in range(4)])
        self.dec = nn.ModuleList([conv_block(2, 2 * widths[3 - i], widths[3 - i], k[3 - i],
                                             **na) for i in range(4)])
        self.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()
        self.out_conv = nn.Conv3d(b, num_classes, 1)
        self.head = ProjectionHead(b, b, embed_dim, k[0], **na)
        self.aux_heads = deep_supervision_heads(2 * b, 4 * b, num_classes) if deep_supervision \
            else None
        self.checkpoint_activations = False

    def down_level(self, i: int, x: Tensor) -> Tensor:
        return self.pool[i](x)

    def merge(self, up: Tensor, skip: Tensor) -> Tensor:
        return torch.cat([up, skip], dim=1)
