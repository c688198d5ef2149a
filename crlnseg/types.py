"""Types and constants shared across the package, defined once.

Axis convention everywhere: arrays are ``(X, Y, Z)`` (channels first when present), the same order
as NIfTI voxel indices; "in-plane" means X and Y.
"""

from __future__ import annotations

__all__ = ["Triple", "IntTriple", "IGNORE"]

Triple = tuple[float, float, float]  # spacing, sizes in mm: X Y Z
IntTriple = tuple[int, int, int]  # shapes, patches, strides in voxels: X Y Z

IGNORE = -1  # label of voxels that carry no supervision (padding of the strong view, unreliable)
