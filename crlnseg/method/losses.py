"""Segmentation losses (METHOD.md Sec. 5).

seg(z, y) = CE(z, y) + Dice(softmax(z), y), Dice soft on the foreground classes (1..C-1, averaged),
pooled over the batch, in the reference's form 1 - (2 sum(p y) + s) / (sum(p^2) + sum(y^2) + s).
L_unsup = mean_b w_b * CE_b(z_s, yhat), CE_b the mean over voxels of image b whose pseudo-label is
not ignored (-1), w_b the share of voxels of image b with confidence >= 0.97.
Losses are computed in fp32 whatever the autocast dtype of the logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from crlnseg.types import IGNORE

__all__ = ["IGNORE", "soft_dice_loss", "segmentation_loss", "pseudo_label_loss"]

_SMOOTH = 1e-5


def soft_dice_loss(probs: Tensor, target: Tensor) -> Tensor:
    """Batch-pooled soft Dice loss over foreground classes; probs (B, C, ...), target (B, ...)."""
    valid = (target != IGNORE).unsqueeze(1).to(probs.dtype)
    onehot = F.one_hot(target.clamp_min(0), probs.shape[1]).movedim(-1, 1).to(probs.dtype)
    p, y = probs[:, 1:] * valid, onehot[:, 1:] * valid
    dims = [0, *range(2, probs.dim())]
    inter = (p * y).sum(dims)
    dice = (2 * inter + _SMOOTH) / ((p * p).sum(dims) + (y * y).sum(dims) + _SMOOTH)
    return 1 - dice.mean()


def segmentation_loss(logits: Tensor, target: Tensor) -> Tensor:
    """CE + soft Dice of logits (B, C, X, Y, Z) against a label map (B, X, Y, Z)."""
    logits = logits.float()
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE)
    return ce + soft_dice_loss(torch.softmax(logits, dim=1), target)


def pseudo_label_loss(logits: Tensor, label: Tensor, confidence: Tensor,
                      threshold: float) -> Tensor:
    """Confidence-weighted pseudo-label CE; logits (B, C, ...), label and confidence (B, ...)."""
    ce = F.cross_entropy(logits.float(), label, ignore_index=IGNORE, reduction="none").flatten(1)
    valid = (label != IGNORE).flatten(1)
    per_image = ce.sum(1) / valid.sum(1).clamp_min(1)
    weight = (confidence >= threshold).flatten(1).float().mean(1)
    return (weight * per_image).mean()
