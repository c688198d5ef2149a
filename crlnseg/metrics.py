"""Overlap and surface-distance metrics, equal to ``medpy.metric.binary`` (connectivity 1).

Dice ``2|P n R| / (|P| + |R|)``, Jaccard ``|P n R| / |P u R|``. Surfaces follow medpy: a surface
voxel is a mask voxel removed by one binary erosion with the face-connected structuring element,
voxels outside the array counting as background (so mask voxels on the array border are surface).
With ``d(A -> B)`` the distance from each surface voxel of A to the nearest surface voxel of B
(Euclidean, in mm with ``spacing``), ``HD95 = percentile95(d(P -> R) u d(R -> P))`` (linear
interpolation, as ``numpy.percentile``) and ``ASD = mean(d(P -> R))`` (one direction, as medpy's
``asd``; not the symmetric ``assd``).

Speed: both masks are cropped to the bounding box of their union plus a margin of one voxel and
the two surfaces are extracted once; one pass per direction serves both HD95 and ASD (medpy runs
six erosions and three distance transforms of the whole array). A pass finds, for each surface
voxel, the nearest surface voxel of the other mask: first among the few offsets of a voxel or
two, in increasing length (most voxels of a prediction's surface lie that close to the
reference), then, for the voxels left, by an exact nearest-neighbour query of a KD-tree over the
other surface's coordinates in mm. Its cost grows with the number of surface voxels, not with
the volume. A Euclidean distance transform of the box (medpy's method) replaces the tree when
most voxels of dense surfaces are far apart, where it is cheaper (:func:`choose_method`). Every
distance is computed from the integer offset to the nearest voxel as scipy's transform computes
it, so the values equal medpy's to the last bit, except that a tie between different offsets of
equal length may round 1 ulp apart.

Empty masks (medpy raises): both empty -> Dice 1, Jaccard 1, distances 0; one empty -> Dice 0,
Jaccard 0, distances ``None`` (not defined; reported as null, never averaged as 0).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence

import numpy as np
from scipy.spatial import KDTree

__all__ = ["dice", "mean_foreground_dice", "jaccard", "crop_to_union", "surface",
           "choose_method", "surface_distances", "hd95_asd", "hd95", "asd", "case_metrics",
           "usable_cores"]

Spacing = Sequence[float] | None
METHODS = ("auto", "kdtree", "edt")
# Box voxels of distance transform that cost as much as one KD-tree query from a far voxel.
KDTREE_COST_PER_BOX = 12
# The offsets looked up before the KD-tree reach this many finest spacings.
LOCAL_REACH = 2.0
# Query points per KD-tree thread.
POINTS_PER_THREAD = 4096


def dice(pred: np.ndarray, ref: np.ndarray) -> float:
    """Dice coefficient of the non-zero voxels; 1.0 when both masks are empty (as medpy)."""
    p, r = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    total = np.count_nonzero(p) + np.count_nonzero(r)
    return 1.0 if total == 0 else float(2.0 * np.count_nonzero(p & r) / total)


def mean_foreground_dice(pred: np.ndarray, ref: np.ndarray, num_classes: int,
                         where: np.ndarray | None = None) -> float | None:
    """Mean Dice over the foreground classes 1 .. C-1, restricted to the voxels ``where`` when
    given (None when ``where`` selects no voxel: nothing to score)."""
    if where is not None:
        if not where.any():
            return None
        pred, ref = pred[where], ref[where]
    return float(np.mean([dice(pred == c, ref == c) for c in range(1, num_classes)]))


def jaccard(pred: np.ndarray, ref: np.ndarray) -> float:
    """Jaccard index of the non-zero voxels; 1.0 when both masks are empty (as medpy)."""
    p, r = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    union = np.count_nonzero(p | r)
    return 1.0 if union == 0 else float(np.count_nonzero(p & r)) / float(union)


def crop_to_union(pred: np.ndarray, ref: np.ndarray, margin: int = 1
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Both boolean masks cropped to the bounding box of ``pred | ref`` grown by ``margin``.

    The margin is clipped at the array border. Cropping does not change any surface or distance
    (``margin >= 0`` would already do; 1 keeps a background shell for clarity):

    * Erosion: a voxel's surface status depends on its face neighbours. A neighbour outside the
      crop is either outside the array (background for erosion, as on the full array) or outside
      the union bounding box, where both masks are 0. So erosion sees the same values.
    * Distances: ``d(P -> R)`` at a P-surface voxel is the distance to the nearest R-surface voxel.
      All R-surface voxels are R voxels, hence inside the crop, so the nearest one over the crop
      is the nearest one over the whole array; P-surface voxels are inside the crop too.
    Empty union -> two empty arrays.
    """
    p, r = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    union = p | r
    slices = []
    for axis in range(union.ndim):
        other = tuple(a for a in range(union.ndim) if a != axis)
        hits = np.flatnonzero(union.any(axis=other))
        if hits.size == 0:
            return p[(slice(0, 0),) * p.ndim], r[(slice(0, 0),) * r.ndim]
        lo = max(int(hits[0]) - margin, 0)
        hi = min(int(hits[-1]) + 1 + margin, union.shape[axis])
        slices.append(slice(lo, hi))
    return p[tuple(slices)], r[tuple(slices)]


def surface(mask: np.ndarray) -> np.ndarray:
    """Voxels of ``mask`` that one face-connected erosion removes (medpy's object border).

    Equal to ``mask ^ binary_erosion(mask, generate_binary_structure(ndim, 1))`` with voxels
    outside the array as background, from 2 * ndim shifted ANDs (several times faster).
    """
    # C order: masks read from NIfTI are often Fortran-ordered views, and the shifted ANDs
    # below run several times slower across strides.
    mask = np.ascontiguousarray(mask, dtype=bool)
    interior = mask.copy()
    for axis in range(mask.ndim):
        low, high = [slice(None)] * mask.ndim, [slice(None)] * mask.ndim
        low[axis], high[axis] = slice(0, -1), slice(1, None)
        interior[tuple(low)] &= mask[tuple(high)]
        interior[tuple(high)] &= mask[tuple(low)]
        for end in (slice(0, 1), slice(-1, None)):  # the neighbour outside is background
            face = [slice(None)] * mask.ndim
            face[axis] = end
            interior[tuple(face)] = False
    return mask & ~interior


def _sampling(spacing: Spacing, ndim: int) -> np.ndarray | None:
    if spacing is None:
        return None
    values = np.asarray(spacing, dtype=np.float64).reshape(-1)
    if values.size == 1:
        values = np.repeat(values, ndim)
    if values.size != ndim:
        raise ValueError(f"spacing has {values.size} values for a {ndim}-D mask")
    return values


def choose_method(far_voxels: int, box_voxels: int) -> str:
    """How to finish a direction once the local look-up is done: ``"kdtree"`` (cost per voxel
    left) unless ``far_voxels`` are many for the box, then ``"edt"`` (cost per box voxel).

    A KD-tree query from a voxel far from the target surface costs about
    ``KDTREE_COST_PER_BOX`` box voxels of distance transform (measured with
    ``benchmarks/evaluate_speed.py --crossover``). A prediction's surface has a few percent of
    its voxels far from the reference (the tree wins by far); two unrelated masks with dense,
    distant surfaces have most of theirs (the transform wins by about 1.5x).
    """
    return "edt" if far_voxels * KDTREE_COST_PER_BOX > box_voxels else "kdtree"


def _edt_distances(target: np.ndarray, sampling: np.ndarray | None) -> np.ndarray:
    """Distance of every voxel of the box to the nearest ``target`` voxel (medpy's method)."""
    # Imported here: scipy.ndimage adds a noticeable share of the CLI's start-up time.
    from scipy.ndimage import distance_transform_edt

    # The transform measures the distance to the nearest zero, so invert the target surface.
    return distance_transform_edt(~target, sampling=sampling)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _query_threads(threads: int, points: int) -> int:
    """At most ``threads`` (-1: every usable core) and one per ``POINTS_PER_THREAD`` points:
    starting and joining a thread costs more than it saves on fewer."""
    limit = usable_cores() if threads < 1 else threads
    return max(1, min(limit, points // POINTS_PER_THREAD))


def _lengths(offsets: np.ndarray, sampling: np.ndarray | None) -> np.ndarray:
    """Lengths of integer offsets (one per row), rounded as scipy's distance transform rounds
    them (offset * spacing, squares summed axis by axis), so that both methods agree bit for bit."""
    squares = offsets.astype(np.float64)
    if sampling is not None:
        squares *= sampling
    squares *= squares
    total = squares[:, 0].copy()
    for axis in range(1, squares.shape[1]):
        total += squares[:, axis]
    return np.sqrt(total)


def _local_offsets(sampling: np.ndarray | None, ndim: int) -> tuple[np.ndarray, np.ndarray]:
    """Every integer offset no longer than ``LOCAL_REACH`` finest spacings or one coarsest
    spacing (whichever is longer: each axis gets its face neighbours), shortest first.

    The set is a whole ball, so the first of them that meets the target is the nearest one.
    """
    scale = np.ones(ndim) if sampling is None else sampling
    limit = max(LOCAL_REACH * float(scale.min()), float(scale.max()))
    reach = np.floor(limit / scale + 1e-9).astype(np.int64)
    axes = np.meshgrid(*(np.arange(-k, k + 1) for k in reach), indexing="ij")
    offsets = np.stack([a.ravel() for a in axes], axis=1)
    lengths = _lengths(offsets, sampling)
    order = np.argsort(lengths, kind="stable")
    keep = order[lengths[order] <= limit]
    return offsets[keep], lengths[keep]


def _nearest_distances(source: np.ndarray, target: np.ndarray, target_mask: np.ndarray,
                       local: tuple[np.ndarray, np.ndarray], sampling: np.ndarray | None,
                       method: str, threads: int) -> np.ndarray:
    """Distance from each ``source`` voxel to its nearest ``target`` voxel (C order).

    ``source`` and ``target`` are the flat indices (ascending) of two surfaces in a box padded by
    the reach of the ``local`` offsets; ``target_mask`` is the target surface in that box. Most
    voxels of a predicted surface lie within a voxel or two of the reference surface: looking up
    the ``local`` offsets in increasing length resolves them, far cheaper than a tree query. The
    voxels left are farther than every local offset: an exact KD-tree search over the target
    or a distance transform of the box (``method``, or :func:`choose_method` for ``"auto"``)
    finds their nearest target voxel.
    """
    offsets, lengths = local
    flat_target = target_mask.ravel()
    steps = offsets @ (np.asarray(target_mask.strides, dtype=np.int64) // target_mask.itemsize)
    distances = np.empty(source.size)
    todo, flat = np.arange(source.size), source
    for step, length in zip(steps.tolist(), lengths.tolist(), strict=True):
        hit = flat_target[flat + step]
        if hit.any():
            distances[todo[hit]] = length
            miss = ~hit
            todo, flat = todo[miss], flat[miss]
            if todo.size == 0:
                return distances
    if method == "auto":
        method = choose_method(todo.size, target_mask.size)
    if method == "edt":
        distances[todo] = _edt_distances(target_mask, sampling).ravel()[flat]
        return distances
    shape = target_mask.shape
    points = np.stack(np.unravel_index(flat, shape), axis=1)
    candidates = np.stack(np.unravel_index(target, shape), axis=1)
    scale = np.ones(len(shape)) if sampling is None else sampling
    # Sliding-midpoint splits (unbalanced, uncompacted) build faster and query surface points
    # faster than the default median splits.
    tree = KDTree(candidates * scale, leafsize=32, balanced_tree=False, compact_nodes=False)
    _, nearest = tree.query(points * scale, workers=_query_threads(threads, len(points)))
    distances[todo] = _lengths(candidates[nearest] - points, sampling)
    return distances


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Spacing = None,
                      method: str = "auto", threads: int = -1
                      ) -> tuple[np.ndarray, np.ndarray]:
    """``(d(pred -> ref), d(ref -> pred))``: surface-to-surface distances, computed once.

    Each array holds one distance per surface voxel of its source mask, in C order (as medpy's
    ``__surface_distances``). Both masks must be non-empty (ValueError otherwise).

    ``method``: ``"edt"``: two Euclidean distance transforms of the cropped box, as medpy.
    ``"kdtree"``: the offsets of a voxel or two around each surface voxel, shortest first
    (``_local_offsets``), then a KD-tree over the other surface's coordinates in mm for the
    voxels still unresolved. ``"auto"`` (default): as ``"kdtree"``, finishing each direction
    with the tree or the transform, whichever :func:`choose_method` expects to be cheaper. All
    give the same values. ``threads``: at most this many threads for a KD-tree query (-1: every
    usable core; a query uses one thread per ``POINTS_PER_THREAD`` points).
    """
    if pred.shape != ref.shape:
        raise ValueError(f"mask shapes differ: got {pred.shape} and {ref.shape}")
    if method not in METHODS:
        raise ValueError(f"method {method!r}: expected one of {', '.join(METHODS)}")
    p, r = crop_to_union(np.atleast_1d(pred), np.atleast_1d(ref), margin=1)
    if not p.any() or not r.any():
        raise ValueError("surface distances need two non-empty masks")
    sampling = _sampling(spacing, p.ndim)
    p_surface, r_surface = surface(p), surface(r)
    if method == "edt":
        return (_edt_distances(r_surface, sampling)[p_surface],
                _edt_distances(p_surface, sampling)[r_surface])
    local = _local_offsets(sampling, p.ndim)
    # A margin of the offsets' reach keeps every local look-up inside the array.
    pad = [(int(k), int(k)) for k in np.abs(local[0]).max(axis=0)]
    p_padded, r_padded = np.pad(p_surface, pad), np.pad(r_surface, pad)
    p_flat, r_flat = np.flatnonzero(p_padded), np.flatnonzero(r_padded)
    return (_nearest_distances(p_flat, r_flat, r_padded, local, sampling, method, threads),
            _nearest_distances(r_flat, p_flat, p_padded, local, sampling, method, threads))


def hd95_asd(pred: np.ndarray, ref: np.ndarray, spacing: Spacing = None,
             method: str = "auto", threads: int = -1) -> tuple[float | None, float | None]:
    """``(HD95, ASD)`` from one pass over both surfaces (:func:`surface_distances`); see the
    module doc for empty masks."""
    p_any, r_any = bool(np.any(pred)), bool(np.any(ref))
    if not p_any and not r_any:
        return 0.0, 0.0
    if not p_any or not r_any:
        return None, None
    to_ref, to_pred = surface_distances(pred, ref, spacing, method, threads)
    return float(np.percentile(np.hstack((to_ref, to_pred)), 95)), float(to_ref.mean())


def hd95(pred: np.ndarray, ref: np.ndarray, spacing: Spacing = None) -> float | None:
    """95th percentile of the symmetric surface distances (medpy ``hd95``)."""
    return hd95_asd(pred, ref, spacing)[0]


def asd(pred: np.ndarray, ref: np.ndarray, spacing: Spacing = None) -> float | None:
    """Mean distance from ``pred``'s surface to ``ref``'s surface (medpy ``asd``)."""
    return hd95_asd(pred, ref, spacing)[1]


def case_metrics(pred: np.ndarray, ref: np.ndarray, classes: Iterable[int],
                 spacing: Spacing = None, threads: int = -1) -> list[dict]:
    """One ``{"class", "dice", "jaccard", "hd95", "asd"}`` row per class of two label maps."""
    if pred.shape != ref.shape:
        raise ValueError(f"label map shapes differ: got {pred.shape} and {ref.shape}")
    rows = []
    for k in classes:
        # Cropping first makes every metric below (and the per-class surfaces) cost O(bbox).
        p, r = crop_to_union(pred == k, ref == k, margin=1)
        distance = hd95_asd(p, r, spacing, threads=threads)
        rows.append({"class": int(k), "dice": dice(p, r), "jaccard": jaccard(p, r),
                     "hd95": distance[0], "asd": distance[1]})
    return rows
