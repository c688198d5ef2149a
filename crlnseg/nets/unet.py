"""3D U-Net variant (BraTS-like data): double conv blocks, max-pool down, transposed conv up,
concatenated skips. Same five levels ``base * (1, 2, 4, 8, 16)`` and same :class:`NetOutput` as the
V-Net, so the Dynamic Interaction Module sees 1/4 (``4 * base``) and 1/2 (``2 * base``) features.
``checkpoint_activations`` recomputes the full-resolution layers in the backward pass (as the
V-Net does).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crlnseg.nets.checkpointing import checkpointed
from crlnseg.nets.heads import ProjectionHead
from crlnseg.nets.output import EmbedMode, NetOutput, check_input
from crlnseg.nets.vnet import conv_block

__all__ = ["UNet3D"]


class UNet3D(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, base: int = 16, dropout: bool = True,
                 embed_dim: int = 64) -> None:
        super().__init__()
        b = base
        widths = [b * 2**i for i in range(5)]
        self.enc = nn.ModuleList([conv_block(2, in_channels if i == 0 else widths[i - 1], widths[i])
                                  for i in range(5)])
        self.pool = nn.MaxPool3d(2)
        self.up = nn.ModuleList([nn.ConvTranspose3d(widths[4 - i], widths[3 - i], 2, stride=2)
                                 for i in range(4)])
        self.dec = nn.ModuleList([conv_block(2, 2 * widths[3 - i], widths[3 - i])
                                  for i in range(4)])
        self.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()
        self.out_conv = nn.Conv3d(b, num_classes, 1)
        self.head = ProjectionHead(b, b, embed_dim)
        self.checkpoint_activations = False

    def _top_down(self, x: Tensor) -> tuple[Tensor, Tensor]:
        skip = self.enc[0](x)
        return skip, self.pool(skip)

    def _up_top(self, x: Tensor, skip: Tensor) -> Tensor:
        return torch.cat([self.up[3](x), skip], dim=1)

    def _logits(self, x: Tensor) -> Tensor:
        return self.out_conv(self.dropout(x))

    def forward(self, x: Tensor, embed: EmbedMode = "dense") -> NetOutput:
        check_input(x, 16)
        ck = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        skip, x = checkpointed(self._top_down, self, x, enabled=ck)
        skips = [skip]
        for i in range(1, 4):
            x = self.enc[i](x)
            skips.append(x)
            x = self.pool(x)
        x = self.dropout(self.enc[4](x))
        feats = []
        for i in range(3):
            x = self.dec[i](torch.cat([self.up[i](x), skips[3 - i]], dim=1))
            feats.append(x)
        # Three segments, not one: the backward pass then rebuilds one block's activations at a
        # time, and the peak (reached there, not in the forward pass) stays lower.
        x = checkpointed(self._up_top, self, x, skip, enabled=ck)
        x = checkpointed(self.dec[3], self, x, enabled=ck)
        logits = checkpointed(self._logits, self, x, enabled=ck)
        return NetOutput.build(logits, feats[1], feats[2], x, self.head, embed, checkpoint=ck)
