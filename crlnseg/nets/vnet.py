"""V-Net backbone as in the semi-supervised LA literature (UA-MT / MC-Net / CRLN reference code).

Five levels of ``base * (1, 2, 4, 8, 16)`` filters, stride-2 convolutions down, stride-2 transposed
convolutions up with additive skips, BatchNorm, Dropout3d(0.5) on the bottleneck and the last
decoder block when ``dropout``; ``norm`` and ``activation`` may be nnU-Net's instead
(:mod:`crlnseg.nets.layers`). ``strides`` (per level and axis, 1 or 2) and ``kernels`` (per level
and axis) make it anisotropic: an axis with stride 1 is not down-sampled at that level, a kernel
side of 1 does not convolve across that axis. Input sides must be multiples of the total stride
(16 with the default four halvings).
Returns :class:`NetOutput`: logits, the decoder features at 1/4 (``4 * base`` channels) and 1/2
(``2 * base``) resolution that feed the Dynamic Interaction Module, and the projection embedding.
With ``checkpoint_activations`` (training only) the full-resolution top of the encoder, of the
decoder and the projection head's hidden layer are recomputed in the backward pass
(:mod:`crlnseg.nets.checkpointing`): same results, a fraction of the activation memory.
"""

from __future__ import annotations

from torch import Tensor, nn

from crlnseg.nets.backbone import (
    ISOTROPIC_KERNELS,
    ISOTROPIC_STRIDES,
    EncoderDecoder,
    deep_supervision_heads,
)
from crlnseg.nets.heads import ProjectionHead
from crlnseg.nets.layers import Activation, Norm, activation_layer, norm_layer
from crlnseg.types import IntTriple

__all__ = ["VNet", "conv_block", "resample_block"]


def conv_block(stages: int, in_ch: int, out_ch: int, kernel: IntTriple = (3, 3, 3),
               norm: Norm = "batch", activation: Activation = "relu") -> nn.Sequential:
    """``stages`` x (conv ``kernel`` -> norm -> activation), the size kept."""
    layers: list[nn.Module] = []
    for i in range(stages):
        layers += [nn.Conv3d(in_ch if i == 0 else out_ch, out_ch, kernel,
                             padding=tuple(k // 2 for k in kernel)),
                   norm_layer(norm, out_ch), activation_layer(activation)]
    return nn.Sequential(*layers)


def resample_block(in_ch: int, out_ch: int, up: bool, stride: IntTriple = (2, 2, 2),
                   norm: Norm = "batch", activation: Activation = "relu") -> nn.Sequential:
    """Strided (transposed) convolution -> norm -> activation; kernel = stride per axis."""
    conv = nn.ConvTranspose3d if up else nn.Conv3d
    return nn.Sequential(conv(in_ch, out_ch, stride, stride=stride), norm_layer(norm, out_ch),
                         activation_layer(activation))


class VNet(EncoderDecoder):
    def __init__(self, in_channels: int, num_classes: int, base: int = 16, dropout: bool = True,
                 embed_dim: int = 64, strides: tuple[IntTriple, ...] = ISOTROPIC_STRIDES,
                 kernels: tuple[IntTriple, ...] = ISOTROPIC_KERNELS, norm: Norm = "batch",
                 activation: Activation = "relu", deep_supervision: bool = False) -> None:
        super().__init__()
        b, k, s = base, kernels, strides
        na = {"norm": norm, "activation": activation}
        self.strides = tuple(tuple(level) for level in strides)
        self.enc = nn.ModuleList([conv_block(1, in_channels, b, k[0], **na),
                                  conv_block(2, 2 * b, 2 * b, k[1], **na),
                                  conv_block(3, 4 * b, 4 * b, k[2], **na),
                                  conv_block(3, 8 * b, 8 * b, k[3], **na),
                                  conv_block(3, 16 * b, 16 * b, k[4], **na)])
        self.down = nn.ModuleList([resample_block(b * 2**i, b * 2 ** (i + 1), False, s[i], **na)
                                   for i in range(4)])
        # Decoder levels 3, 2, 1, 0: block after each up-sampling + skip.
        self.up = nn.ModuleList([resample_block(b * 2 ** (4 - i), b * 2 ** (3 - i), True,
                                                s[3 - i], **na) for i in range(4)])
        self.dec = nn.ModuleList([conv_block(3, 8 * b, 8 * b, k[3], **na),
                                  conv_block(3, 4 * b, 4 * b, k[2], **na),
                                  conv_block(2, 2 * b, 2 * b, k[1], **na),
                                  conv_block(1, b, b, k[0], **na)])
        self.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()
        self.out_conv = nn.Conv3d(b, num_classes, 1)
        self.head = ProjectionHead(b, b, embed_dim, k[0], **na)
        self.aux_heads = deep_supervision_heads(2 * b, 4 * b, num_classes) if deep_supervision \
            else None
        self.checkpoint_activations = False

    def down_level(self, i: int, x: Tensor) -> Tensor:
        return self.down[i](x)

    def merge(self, up: Tensor, skip: Tensor) -> Tensor:
        return up + skip
