"""The in-memory image: an array in ``(X, Y, Z)`` (or ``(C, X, Y, Z)``) order plus its geometry.

Geometry follows SimpleITK/ITK conventions (LPS physical space): ``spacing`` (mm per voxel along
X, Y, Z), ``origin`` (physical position of voxel (0, 0, 0)) and ``direction`` (3x3 row-major
direction cosines, flattened to 9 floats). ``header`` keeps what a writer needs to write a mask
back in the reference's own format (e.g. the NIfTI header), so geometry is reproduced exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["Geometry", "Volume", "GEOMETRY_TOL"]

# The one tolerance of every geometry comparison (prepare, predict, rectify, evaluate), in mm /
# direction cosine: headers written by different tools round differently.
GEOMETRY_TOL = 1e-3


@dataclass(frozen=True)
class Geometry:
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)

    def close_to(self, other: Geometry, tol: float = GEOMETRY_TOL) -> bool:
        """Same spacing, origin and direction within ``tol`` (absolute)."""
        a = np.r_[self.spacing, self.origin, self.direction]
        b = np.r_[other.spacing, other.origin, other.direction]
        return bool(np.allclose(a, b, rtol=0.0, atol=tol))

    def describe(self) -> str:
        """``"spacing (0.7, 1, 2.5), origin (...), direction (...)"`` (4 significant digits)."""
        fmt = lambda xs: "(" + ", ".join(f"{x:.4g}" for x in xs) + ")"  # noqa: E731
        return (f"spacing {fmt(self.spacing)}, origin {fmt(self.origin)}, "
                f"direction {fmt(self.direction)}")


@dataclass
class Volume:
    array: np.ndarray
    geometry: Geometry = field(default_factory=Geometry)
    path: Path | None = None
    header: Any = None  # format-specific header kept for writing masks back (not compared)

    @property
    def spatial_shape(self) -> tuple[int, int, int]:
        return tuple(self.array.shape[-3:])  # type: ignore[return-value]
