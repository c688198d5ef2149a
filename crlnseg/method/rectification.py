"""Rectification (paper Sec. 3.3): ybar_r = ybar + (1 - mu) * M(x), on logits.

pseudo-label = argmax softmax(ybar_r), confidence = max softmax(ybar_r). mu in [0, 1] says how much
the prior is distrusted: mu = 1 gives the plain prediction back.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["rectify", "pseudo_labels", "confident_share"]


def rectify(logits: Tensor, relation: Tensor, mu: Tensor | float) -> Tensor:
    """ybar_r = ybar + (1 - mu) * M(x); all (B, C, X, Y, Z) except the scalar mu."""
    return logits + (1.0 - mu) * relation


def pseudo_labels(logits: Tensor) -> tuple[Tensor, Tensor]:
    """(label (B, X, Y, Z) long, confidence (B, X, Y, Z) float) from logits (B, C, X, Y, Z)."""
    confidence, label = torch.softmax(logits.float(), dim=1).max(dim=1)
    return label, confidence


def confident_share(confidence: Tensor, threshold: float) -> float:
    """Share of voxels whose confidence reaches ``threshold``."""
    return float((confidence >= threshold).float().mean())
