"""Test-time augmentation by flips: the mean of the outputs over mirrored inputs.

    p(x) = 1/|S| * sum_{s in S} flip_s(g(flip_s(x)))

with ``g`` a patch function returning probabilities (softmax per patch) and ``S`` a set of axis
subsets. crlnseg uses all 8 subsets of the 3 spatial axes (as nnU-Net's mirroring): flips are
exact symmetries of the crop grid, and the weak view of training already flips. Averaging happens
per patch, so TTA costs compute (8x) but no full-size memory.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations

import torch

__all__ = ["flip_sets", "with_flips"]

PatchFn = Callable[[torch.Tensor], torch.Tensor]
SPATIAL_AXES = (2, 3, 4)  # (B, C, X, Y, Z)


def flip_sets(enabled: bool = True) -> list[tuple[int, ...]]:
    """Axis subsets to mirror: all 8 combinations of X, Y, Z, or only the identity."""
    if not enabled:
        return [()]
    return [c for r in range(len(SPATIAL_AXES) + 1) for c in combinations(SPATIAL_AXES, r)]


def with_flips(fn: PatchFn, flips: list[tuple[int, ...]]) -> PatchFn:
    """Wrap ``fn`` so it returns the mean of its un-mirrored outputs over ``flips``."""
    if flips == [()]:
        return fn

    def mirrored(x: torch.Tensor) -> torch.Tensor:
        total: torch.Tensor | None = None
        for axes in flips:
            out = fn(torch.flip(x, axes) if axes else x).float()
            out = torch.flip(out, axes) if axes else out
            total = out if total is None else total + out
        assert total is not None
        return total / len(flips)

    return mirrored
