"""Dynamic Interaction Module (paper Sec. 3.2, METHOD.md Sec. 3): prototypes x features -> M(x).

Stage s (1/4 resolution, width F; then 1/2 resolution, width F/2):
  tokens      T = LN(conv1(feat)) flattened to N positions                      (B, N, D)
  interaction A = (W_q LN(P)) (W_k T)^T / sqrt(D)                                (B, C*R, N)
              P <- P + proj(softmax_N(A) W_v T);  P <- P + MLP(LN(P))          (B, C*R, D)
  spatial     A normalised per map over positions (per-prototype scale/shift),
              reshaped to (B*C, R, X, Y, Z) -> depthwise 3^3 -> BN -> ReLU -> 1^3 -> BN -> ReLU
  aggregation 1x1x1 conv R -> 1: one cue map per class                          (B, C, X, Y, Z)
Between stages the prototypes move to the next width with a linear map (F -> F/2). The finest
stage's cue maps pass a class-mixing 1x1x1 conv, a stride-2 transposed conv to the input size and
a ReLU: M(x) >= 0. With an anisotropic backbone the spatial block's kernel is the level-1
kernel and the up-sampling the level-0 stride, so M(x) always has the input's size. The coarse
stage shapes M only through the refined prototypes, so it computes
no cue map (the reference computes one and discards it); the finest stage's prototype update
feeds nothing, so it is not computed either (no parameter is left without a gradient, which DDP
also requires).
Departures from the reference: per-map normalisation instead of a LayerNorm over N (no parameter
depends on the crop size); the update is added to its input and class/prototype axes are
transposed, not reshaped (the intended operations); the layers after the spatial block start as
a mean, an identity and a nearest-neighbour upsampling (:func:`init_output_layers`), not PyTorch's
default init (which leaves M's foreground channel dead under the final ReLU).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["InteractionStage", "DynamicInteraction", "init_output_layers"]


def normalise_maps(a: Tensor, scale: Tensor, shift: Tensor, eps: float = 1e-5) -> Tensor:
    """Per-map standardisation over positions with per-prototype scale and shift: (B, K, N)."""
    var, mean = torch.var_mean(a, dim=-1, keepdim=True, correction=0)
    return (a - mean) * (var + eps).rsqrt() * scale[:, None] + shift[:, None]


@torch.no_grad()
def init_output_layers(aggregate: nn.Conv3d, class_mix: nn.Conv3d,
                       upsample: nn.ConvTranspose3d) -> None:
    """Mean over prototypes, identity class mix, nearest-neighbour x2 upsampling, zero biases:
    M(x) starts as the upsampled mean of each class's rectified spatial maps, >= 0 and alive.

    Departure from the reference (PyTorch default init): with it the three small random layers
    give M a near-constant pre-ReLU map whose foreground channel is < 0 almost everywhere, the
    final ReLU passes it no gradient, and M(x) barely learns at lr 2.5e-3.
    """
    aggregate.weight.fill_(1.0 / aggregate.in_channels)
    eye = torch.eye(class_mix.out_channels, dtype=class_mix.weight.dtype)
    class_mix.weight.copy_(eye.view(*eye.shape, 1, 1, 1))
    upsample.weight.copy_(eye.view(*eye.shape, 1, 1, 1).expand_as(upsample.weight))
    for layer in (aggregate, class_mix, upsample):
        if layer.bias is not None:
            layer.bias.zero_()


class InteractionStage(nn.Module):
    """One stage: interaction maps A; then the prototype update (coarse stage) or the spatial
    and prototype aggregation into cue maps (finest stage)."""

    def __init__(self, in_channels: int, width: int, num_classes: int, per_class: int,
                 spatial: bool, kernel: tuple[int, int, int] = (3, 3, 3)) -> None:
        super().__init__()
        self.tokens = nn.Conv3d(in_channels, width, 1)
        self.token_norm = nn.LayerNorm(width)
        self.query_norm = nn.LayerNorm(width)
        self.q, self.k = nn.Linear(width, width), nn.Linear(width, width)
        self.num_classes, self.per_class, self.scale = num_classes, per_class, width**-0.5
        self.spatial: nn.Module | None = None
        if not spatial:
            self.v, self.proj = nn.Linear(width, width), nn.Linear(width, width)
            self.mlp_norm = nn.LayerNorm(width)
            self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(),
                                     nn.Linear(4 * width, width))
        else:
            k = num_classes * per_class
            self.map_scale = nn.Parameter(torch.ones(k))
            self.map_shift = nn.Parameter(torch.zeros(k))
            r = per_class
            self.spatial = nn.Sequential(
                nn.Conv3d(r, r, kernel, padding=tuple(k // 2 for k in kernel), groups=r,
                          bias=False), nn.BatchNorm3d(r),
                nn.ReLU(inplace=True), nn.Conv3d(r, r, 1, bias=False), nn.BatchNorm3d(r),
                nn.ReLU(inplace=True))
            self.aggregate = nn.Conv3d(r, 1, 1)

    def forward(self, protos: Tensor, feat: Tensor) -> tuple[Tensor, Tensor | None]:
        """protos (B, C*R, D), feat (B, Cin, X, Y, Z) -> refined protos, cues (B, C, X, Y, Z)."""
        b, _, *size = feat.shape
        tokens = self.token_norm(self.tokens(feat).flatten(2).transpose(1, 2))  # (B, N, D)
        q = self.q(self.query_norm(protos))
        a = (q @ self.k(tokens).transpose(1, 2)) * self.scale  # (B, K, N)
        if self.spatial is None:
            protos = protos + self.proj(a.softmax(dim=-1) @ self.v(tokens))  # residual, not 2x
            return protos + self.mlp(self.mlp_norm(protos)), None
        a = normalise_maps(a.float(), self.map_scale, self.map_shift).to(feat.dtype)
        # K = C*R is class-major, so this view is the intended (class, prototype) split.
        maps = a.reshape(b * self.num_classes, self.per_class, *size)
        # Depthwise 3-D conv backward is 10-50x slower in NCDHW than channels-last on the CPU.
        maps = maps.contiguous(memory_format=torch.channels_last_3d)
        cues = self.aggregate(self.spatial(maps))
        return protos, cues.reshape(b, self.num_classes, *size)


class DynamicInteraction(nn.Module):
    """M(x) from prototypes P (C, R, F) and decoder features at 1/4 and 1/2 resolution."""

    def __init__(self, num_classes: int, per_class: int, dim: int, quarter_channels: int,
                 half_channels: int, up_stride: tuple[int, int, int] = (2, 2, 2),
                 kernel: tuple[int, int, int] = (3, 3, 3)) -> None:
        super().__init__()
        half_dim = max(dim // 2, 1)
        self.coarse = InteractionStage(quarter_channels, dim, num_classes, per_class, spatial=False)
        self.to_fine = nn.Linear(dim, half_dim)
        self.fine = InteractionStage(half_channels, half_dim, num_classes, per_class, spatial=True,
                                     kernel=kernel)
        self.class_mix = nn.Conv3d(num_classes, num_classes, 1)
        self.upsample = nn.ConvTranspose3d(num_classes, num_classes, up_stride, stride=up_stride)
        self.relu = nn.ReLU()
        init_output_layers(self.fine.aggregate, self.class_mix, self.upsample)

    def forward(self, prototypes: Tensor, feat_quarter: Tensor, feat_half: Tensor) -> Tensor:
        """-> M(x) >= 0, (B, C, X, Y, Z): ``feat_half``'s size times the level-0 stride."""
        b = feat_quarter.shape[0]
        protos = prototypes.flatten(0, 1).unsqueeze(0).expand(b, -1, -1).to(feat_quarter.dtype)
        protos, _ = self.coarse(protos, feat_quarter)
        protos, cues = self.fine(self.to_fine(protos), feat_half)
        assert cues is not None
        return self.relu(self.upsample(self.class_mix(cues)))
