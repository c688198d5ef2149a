"""Learnable class prototypes P: C classes x R prototypes per class x F features (paper Sec. 3.1).

Zero-initialised as in the reference; the Dynamic Interaction Module breaks the symmetry (its
per-prototype spatial convolutions and the class-mixing layer differ per prototype and class).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Prototypes", "class_summary"]


class Prototypes(nn.Module):
    def __init__(self, num_classes: int, per_class: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_classes, per_class, dim))

    def forward(self) -> Tensor:
        """P, (C, R, F)."""
        return self.weight


def class_summary(prototypes: Tensor) -> Tensor:
    """m_c, the mean of class c's R prototypes: ``(C, R, F) -> (C, F)`` (METHOD.md Sec. 4)."""
    return prototypes.mean(dim=1)
