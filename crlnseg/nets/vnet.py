"""V-Net backbone as in the semi-supervised LA literature (UA-MT / MC-Net / CRLN reference code).

Five levels of ``base * (1, 2, 4, 8, 16)`` filters, stride-2 convolutions down, stride-2 transposed
convolutions up with additive skips, BatchNorm, Dropout3d(0.5) on the bottleneck and the last
decoder block when ``dropout``. Input sides must be multiples of 16 (four halvings).
Returns :class:`NetOutput`: logits, the decoder features at 1/4 (``4 * base`` channels) and 1/2
(``2 * base``) resolution that feed the Dynamic Interaction Module, and the projection embedding.
With ``checkpoint_activations`` (training only) the full-resolution top of the encoder, of the
decoder and the projection head's hidden layer are recomputed in the backward pass
(:mod:`crlnseg.nets.checkpointing`): same results, a fraction of the activation memory.
"""

from __future__ import annotations

from torch import Tensor, nn

from crlnseg.nets.backbone import EncoderDecoder
from crlnseg.nets.heads import ProjectionHead

__all__ = ["VNet"]


def conv_block(stages: int, in_ch: int, out_ch: int) -> nn.Sequential:
    """``stages`` x (conv3 -> BN -> ReLU)."""
    layers: list[nn.Module] = []
    for i in range(stages):
        layers += [nn.Conv3d(in_ch if i == 0 else out_ch, out_ch, 3, padding=1),
                   nn.BatchNorm3d(out_ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def resample_block(in_ch: int, out_ch: int, up: bool) -> nn.Sequential:
    """Stride-2 (transposed) convolution -> BN -> ReLU."""
    conv = nn.ConvTranspose3d if up else nn.Conv3d
    return nn.Sequential(conv(in_ch, out_ch, 2, stride=2), nn.BatchNorm3d(out_ch),
                         nn.ReLU(inplace=True))


class VNet(EncoderDecoder):
    def __init__(self, in_channels: int, num_classes: int, base: int = 16, dropout: bool = True,
                 embed_dim: int = 64) -> None:
        super().__init__()
        b = base
        self.enc = nn.ModuleList([conv_block(1, in_channels, b), conv_block(2, 2 * b, 2 * b),
                                  conv_block(3, 4 * b, 4 * b), conv_block(3, 8 * b, 8 * b),
                                  conv_block(3, 16 * b, 16 * b)])
        self.down = nn.ModuleList([resample_block(b * 2**i, b * 2 ** (i + 1), up=False)
                                   for i in range(4)])
        # Decoder levels 1/8, 1/4, 1/2, 1: block after each up-sampling + skip.
        self.up = nn.ModuleList([resample_block(b * 2 ** (4 - i), b * 2 ** (3 - i), up=True)
                                 for i in range(4)])
        self.dec = nn.ModuleList([conv_block(3, 8 * b, 8 * b), conv_block(3, 4 * b, 4 * b),
                                  conv_block(2, 2 * b, 2 * b), conv_block(1, b, b)])
        self.dropout = nn.Dropout3d(0.5) if dropout else nn.Identity()
        self.out_conv = nn.Conv3d(b, num_classes, 1)
        self.head = ProjectionHead(b, b, embed_dim)
        self.checkpoint_activations = False

    def down_level(self, i: int, x: Tensor) -> Tensor:
        return self.down[i](x)

    def merge(self, up: Tensor, skip: Tensor) -> Tensor:
        return up + skip
