"""Canonical voxel orientation: every case is brought to the closest RAS axis order and flips.

A direction (ITK/LPS, row-major 3x3, column ``i`` = physical direction of array axis ``i``) is
turned into RAS (``diag(-1, -1, 1) @ D``: axis 0 towards Right = -x_LPS, axis 1 towards Anterior
= -y_LPS, axis 2 towards Superior = +z_LPS) and matched to the closest signed axis permutation
exactly as nibabel's ``io_orientation`` / ``as_closest_canonical`` choose it: the closest
rotation (polar decomposition), then, array axis by array axis (the most clear-cut first: largest
maximum absolute cosine, ties by axis number), the world axis with the largest absolute cosine
among those not yet taken; ties (within 1e-6) go to the lowest world axis (R, then A, then S).
An oblique direction is thus mapped to its closest canonical permutation; the array is only
transposed and flipped (never resampled), and its own header stays the reference of every
output.

A :class:`Transform` ``(permutation, flips)`` reads: canonical axis ``k`` is input array axis
``permutation[k]``, reversed when ``flips[k]``. :func:`to_canonical` and :func:`from_canonical`
apply it to ``(X, Y, Z)`` and ``(C, X, Y, Z)`` arrays and are exact inverses of each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

__all__ = ["Transform", "IDENTITY", "canonical_transform", "to_canonical", "from_canonical",
           "as_transform", "canonical_spacing", "canonical_shape"]

_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
_TIE = 1e-6


class Transform(NamedTuple):
    """Canonical axis ``k`` = input axis ``permutation[k]``, reversed where ``flips[k]``."""

    permutation: tuple[int, int, int]
    flips: tuple[bool, bool, bool]

    @property
    def is_identity(self) -> bool:
        return self.permutation == (0, 1, 2) and not any(self.flips)

    def to_dict(self) -> dict[str, list]:
        return {"permutation": list(self.permutation), "flips": list(self.flips)}


IDENTITY = Transform((0, 1, 2), (False, False, False))


def canonical_transform(direction: Sequence[float] | np.ndarray) -> Transform:
    """The permutation and flips that bring an array with this LPS direction to RAS order."""
    d = np.asarray(direction, dtype=np.float64).reshape(3, 3)
    ras = _LPS_TO_RAS @ d
    norms = np.linalg.norm(ras, axis=0)
    norms[norms == 0] = 1.0
    rotation = ras / norms
    u, s, vt = np.linalg.svd(rotation)
    keep = s > s.max() * 3 * np.finfo(s.dtype).eps
    if not keep.all():
        raise ValueError(f"direction {tuple(d.ravel())} is degenerate (rank {int(keep.sum())})")
    r = u @ vt  # the closest rotation (polar decomposition), as nibabel
    permutation = [0, 0, 0]
    flips = [False, False, False]
    free = [True, True, True]
    # The most clear-cut array axis chooses first (nibabel >= 5.2's order), ties by axis number.
    clear = np.round(np.abs(r).max(axis=0) / _TIE)
    for axis in (int(a) for a in np.argsort(-clear, kind="stable")):
        col = r[:, axis]
        score = np.where(free, np.abs(col), -1.0)
        best = float(score.max())
        world = int(next(j for j in range(3) if free[j] and score[j] >= best - _TIE))
        free[world] = False
        permutation[world] = axis
        flips[world] = bool(col[world] < 0)
    return Transform(tuple(permutation), tuple(flips))  # type: ignore[arg-type]


def as_transform(value: Any) -> Transform:
    """A :class:`Transform` from a Transform, a ``{"permutation", "flips"}`` mapping, an object
    with those attributes (a manifest record) or None (identity: data without the field)."""
    if value is None:
        return IDENTITY
    if isinstance(value, Transform):
        return value
    if isinstance(value, dict):
        perm, flips = value.get("permutation"), value.get("flips")
    else:
        perm, flips = getattr(value, "permutation", None), getattr(value, "flips", None)
    if perm is None or flips is None:
        raise ValueError(f"not an orientation transform: {value!r}")
    perm_t = tuple(int(p) for p in perm)
    flips_t = tuple(bool(f) for f in flips)
    if sorted(perm_t) != [0, 1, 2] or len(flips_t) != 3:
        raise ValueError(f"not an orientation transform: permutation {perm_t}, flips {flips_t}")
    return Transform(perm_t, flips_t)  # type: ignore[arg-type]


def to_canonical(array: np.ndarray, transform: Any) -> np.ndarray:
    """``(X, Y, Z)`` or ``(C, X, Y, Z)`` input-order array -> canonical order (C-contiguous, so
    that every input order gives the very same array, statistics included, bit for bit)."""
    t = as_transform(transform)
    if t.is_identity:
        return np.ascontiguousarray(array)
    lead = _lead(array)
    out = np.transpose(array, tuple(range(lead)) + tuple(lead + p for p in t.permutation))
    flipped = tuple(lead + k for k in range(3) if t.flips[k])
    if flipped:
        out = np.flip(out, axis=flipped)
    return np.ascontiguousarray(out)


def from_canonical(array: np.ndarray, transform: Any) -> np.ndarray:
    """Canonical-order ``(X, Y, Z)`` or ``(C, X, Y, Z)`` array -> the input's own order (the exact
    inverse of :func:`to_canonical`); the array itself when the transform is the identity."""
    t = as_transform(transform)
    if t.is_identity:
        return array
    lead = _lead(array)
    flipped = tuple(lead + k for k in range(3) if t.flips[k])
    out = np.flip(array, axis=flipped) if flipped else array
    inverse = np.argsort(t.permutation)
    out = np.transpose(out, tuple(range(lead)) + tuple(lead + int(i) for i in inverse))
    return np.ascontiguousarray(out)


def canonical_spacing(spacing: Sequence[float], transform: Any) -> tuple[float, float, float]:
    """The spacing of the canonical axes."""
    t = as_transform(transform)
    return tuple(float(spacing[p]) for p in t.permutation)  # type: ignore[return-value]


def canonical_shape(shape: Sequence[int], transform: Any) -> tuple[int, int, int]:
    """The spatial shape of the canonical array of an input of spatial ``shape``."""
    t = as_transform(transform)
    return tuple(int(shape[p]) for p in t.permutation)  # type: ignore[return-value]


def _lead(array: np.ndarray) -> int:
    if array.ndim not in (3, 4):
        raise ValueError(f"expected an (X, Y, Z) or (C, X, Y, Z) array, got shape {array.shape}")
    return array.ndim - 3
