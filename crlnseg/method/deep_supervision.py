"""Deep supervision (nnU-Net's), the supervised term with ``model.deep_supervision``:

    L_sup = sum_k w_k seg(z_k, y_k),   w_k = 2^-k / sum_j 2^-j,   k = 0, 1, 2

z_0 = f(x_l) at full resolution, z_1 and z_2 the auxiliary logits of the 1/2 and 1/4 decoder
levels (per-axis factors from ``model.strides``), y_k the label y subsampled to z_k's size by
taking one voxel per block (nearest neighbour), so a voxel of y_k is IGNORE exactly when its
source voxel is; seg = CE + Dice (:func:`crlnseg.method.losses.segmentation_loss`).
"""

from __future__ import annotations

from torch import Tensor

from crlnseg.method.losses import segmentation_loss

__all__ = ["deep_supervision_weights", "downsample_label", "deep_supervision_loss"]


def deep_supervision_weights(levels: int) -> list[float]:
    """w_k = 2^-k, normalised to sum 1."""
    raw = [0.5**k for k in range(levels)]
    return [w / sum(raw) for w in raw]


def downsample_label(label: Tensor, size: tuple[int, ...]) -> Tensor:
    """Label (B, X, Y, Z) subsampled to ``size`` (X', Y', Z'), each side a divisor of its own."""
    if len(size) != label.dim() - 1 or any(
            n < 1 or s % n for s, n in zip(label.shape[1:], size, strict=True)):
        raise ValueError(f"expected a size that divides the label's {tuple(label.shape[1:])}, "
                         f"got {tuple(size)}")
    fx, fy, fz = (s // n for s, n in zip(label.shape[1:], size, strict=True))
    return label[:, ::fx, ::fy, ::fz]


def deep_supervision_loss(logits: list[Tensor], label: Tensor) -> Tensor:
    """L_sup of logits [z_0 (B, C, X, Y, Z), z_1, ...] (finest first) against y (B, X, Y, Z)."""
    weights = deep_supervision_weights(len(logits))
    return sum((w * segmentation_loss(z, downsample_label(label, tuple(z.shape[2:])))
                for w, z in zip(weights, logits, strict=True)), start=logits[0].new_zeros(()))
