"""The forward pass both backbones share: five levels, skips, the 1/4 and 1/2 decoder features for
the Dynamic Interaction Module, and optional activation checkpointing of the full-resolution top.

A backbone defines its layers (``enc``, ``up``, ``dec``, ``dropout``, ``out_conv``, ``head``) and
two hooks: how a level goes down (:meth:`EncoderDecoder.down_level`: strided conv for the V-Net,
max-pool for the U-Net) and how an up-sampled map meets its skip (:meth:`merge`: sum or concat).
With deep supervision (``model.deep_supervision``) a backbone also has ``aux_heads``, 1x1x1 convs
giving C-class logits from the 1/2 and 1/4 decoder features (:meth:`deep_logits`). nnU-Net weighs
the coarsest decoder output 0, so the 1/8 level has no head. Only the supervised loss reads them:
the forward pass, the teacher's pseudo-labels and inference never do, and a checkpoint loads
for inference with or without them (:func:`strip_deep_supervision`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from crlnseg.nets.checkpointing import checkpointed
from crlnseg.nets.output import EmbedMode, NetOutput, check_input

__all__ = ["EncoderDecoder", "ISOTROPIC_STRIDES", "ISOTROPIC_KERNELS", "total_stride",
           "deep_supervision_heads", "strip_deep_supervision"]

ISOTROPIC_STRIDES = ((2, 2, 2),) * 4
ISOTROPIC_KERNELS = ((3, 3, 3),) * 5


def total_stride(strides: tuple[tuple[int, int, int], ...]) -> tuple[int, int, int]:
    """Down-sampling of the whole backbone per axis: input sides are multiples of it."""
    out = [1, 1, 1]
    for level in strides:
        out = [o * s for o, s in zip(out, level, strict=True)]
    return tuple(out)  # type: ignore[return-value]


def deep_supervision_heads(half_width: int, quarter_width: int, num_classes: int
                           ) -> nn.ModuleList:
    """Heads of the 1/2 and 1/4 decoder levels, in that order. Their initialisation leaves the
    global RNG as it was, so every other layer (DIM included) starts as without them and a run
    with deep supervision compares paired with one without."""
    with torch.random.fork_rng(devices=[]):
        return nn.ModuleList([nn.Conv3d(half_width, num_classes, 1),
                              nn.Conv3d(quarter_width, num_classes, 1)])


def strip_deep_supervision(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict without the deep-supervision heads, which inference never uses."""
    return {k: v for k, v in state.items() if not k.startswith("aux_heads.")
            and ".aux_heads." not in k}


class EncoderDecoder(nn.Module):
    enc: nn.ModuleList
    up: nn.ModuleList
    dec: nn.ModuleList
    dropout: nn.Module
    out_conv: nn.Module
    head: nn.Module
    checkpoint_activations: bool
    strides: tuple[tuple[int, int, int], ...]
    aux_heads: nn.ModuleList | None

    def down_level(self, i: int, x: Tensor) -> Tensor:
        """Level ``i`` -> ``i + 1`` (half the resolution)."""
        raise NotImplementedError

    def merge(self, up: Tensor, skip: Tensor) -> Tensor:
        """An up-sampled map and the encoder's skip at the same resolution."""
        raise NotImplementedError

    def deep_logits(self, net: NetOutput, count: int | None = None) -> list[Tensor]:
        """Auxiliary logits (B, C, X/2, Y/2, Z/2) and (B, C, X/4, Y/4, Z/4) (per-axis factors
        from ``strides``) of the first ``count`` samples (all by default) of ``net``."""
        if self.aux_heads is None:
            raise RuntimeError("this backbone has no deep-supervision heads")
        n = net.feat_half.shape[0] if count is None else count
        return [self.aux_heads[0](net.feat_half[:n]), self.aux_heads[1](net.feat_quarter[:n])]

    def _top_down(self, x: Tensor) -> tuple[Tensor, Tensor]:
        skip = self.enc[0](x)
        return skip, self.down_level(0, skip)

    def _up_top(self, x: Tensor, skip: Tensor) -> Tensor:
        return self.merge(self.up[3](x), skip)

    def _logits(self, x: Tensor) -> Tensor:
        return self.out_conv(self.dropout(x))

    def forward(self, x: Tensor, embed: EmbedMode = "dense") -> NetOutput:
        check_input(x, total_stride(self.strides))
        ck = self.checkpoint_activations and self.training and torch.is_grad_enabled()
        skip, x = checkpointed(self._top_down, self, x, enabled=ck)
        skips = [skip]
        for i in range(1, 4):
            x = self.enc[i](x)
            skips.append(x)
            x = self.down_level(i, x)
        x = self.dropout(self.enc[4](x))
        feats = []
        for i in range(3):
            x = self.dec[i](self.merge(self.up[i](x), skips[3 - i]))
            feats.append(x)
        # Three segments, not one: the backward pass then rebuilds one block's activations at a
        # time, and the peak (reached there, not in the forward pass) stays lower.
        x = checkpointed(self._up_top, self, x, skip, enabled=ck)
        x = checkpointed(self.dec[3], self, x, enabled=ck)
        logits = checkpointed(self._logits, self, x, enabled=ck)
        return NetOutput.build(logits, feats[1], feats[2], x, self.head, embed, checkpoint=ck)
