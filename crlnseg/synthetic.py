"""A seeded synthetic cardiac-like dataset for the demo and the tests.

Each volume holds a bright, irregular "chamber" (a union of randomly rotated ellipsoids whose
surface is deformed by a smooth random field) with a few thin "veins" attached (curved, tapering
tubes that start inside the chamber and leave it), among distractors of similar brightness that
are not labelled: a thick "aorta" crossing the whole volume and a few compact blobs. The image is
blurred (partial volume), multiplied by a smooth bias field and gets Gaussian noise.
Label = chamber + veins. Distractors are almost as bright as the chamber and the bias field moves
intensities by about +-30 %, so no threshold separates them: a model has to use shape and context.

Every case draws from its own generator seeded by ``(seed, split, index)``, so a case does not
change when the number of cases in another split does. Pure numpy/scipy; about 0.1 s per
64 x 64 x 48 volume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from crlnseg.errors import OutputExistsError
from crlnseg.io.writers import write_atomic

__all__ = ["SPLITS", "smooth_field", "random_rotation", "chamber_mask", "tube_mask",
           "synthesize_case", "case_affine", "generate_dataset"]

Shape = tuple[int, int, int]
# Split name -> (folder, case-ID prefix, seed key). Labels of "unlabelled" go to a hidden folder.
SPLITS = {"labelled": ("labelled", "lab", 1), "unlabelled": ("unlabelled", "unl", 2),
          "test": ("test", "test", 3)}


def smooth_field(rng: np.random.Generator, shape: Shape, cells: int = 4) -> np.ndarray:
    """A smooth random field with unit standard deviation.

    Coarse noise on a ``cells^3`` lattice spread by separable Gaussian bumps, i.e.
    ``F = sum_ijk n_ijk * g_i(x) g_j(y) g_k(z)``: three small matrix products, much faster than
    spline upsampling of a 3D array.
    """
    coarse = rng.standard_normal((cells,) * 3)
    bases = []
    for size in shape:
        centres = np.linspace(-0.5, size - 0.5, cells)
        width = size / max(cells - 1, 1)
        bases.append(np.exp(-0.5 * ((np.arange(size)[:, None] - centres) / width) ** 2))
    field = np.einsum("ai,bj,ck,ijk->abc", *bases, coarse, optimize=True)
    return ((field - field.mean()) / (field.std() + 1e-8)).astype(np.float32)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (QR of a Gaussian matrix)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    return q if np.linalg.det(q) > 0 else -q


def _grid(shape: Shape) -> np.ndarray:
    return np.stack(np.meshgrid(*[np.arange(s, dtype=np.float32) for s in shape], indexing="ij"))


def _ellipsoid_level(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray,
                     rotation: np.ndarray) -> np.ndarray:
    """Normalised radius ``|R^T (x - c) / r|``: < 1 inside the ellipsoid."""
    local = np.einsum("ji,j...->i...", rotation, grid - centre[:, None, None, None])
    return np.sqrt(sum((local[i] / radii[i]) ** 2 for i in range(3)))


def chamber_mask(rng: np.random.Generator, shape: Shape, grid: np.ndarray) -> np.ndarray:
    """An irregular blob near the centre: union of 2-4 ellipsoids, surface deformed, one piece."""
    scale = min(shape) / 48.0
    centre = np.array(shape, dtype=np.float32) / 2 + rng.normal(0, 2.5 * scale, 3)
    level = np.full(shape, np.inf, dtype=np.float32)
    for _ in range(rng.integers(2, 5)):
        c = centre + rng.normal(0, 3.5 * scale, 3)
        radii = rng.uniform(7.5, 13.0, 3) * scale
        level = np.minimum(level, _ellipsoid_level(grid, c, radii, random_rotation(rng)))
    mask = level + 0.28 * smooth_field(rng, shape, cells=5) < 1.0
    pieces, count = ndimage.label(mask)
    if count > 1:  # keep the largest piece so the chamber is one structure
        mask = pieces == np.argmax(np.bincount(pieces.ravel())[1:]) + 1
    return mask


def _curve(rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, length: float,
           bend: float) -> np.ndarray:
    """Points every half voxel along a random smooth curve from ``start``."""
    points, d = [start], direction / np.linalg.norm(direction)
    for _ in range(int(length * 2)):
        d = d + rng.normal(0, bend, 3)
        d /= np.linalg.norm(d)
        points.append(points[-1] + 0.5 * d)
    return np.array(points)


def tube_mask(shape: Shape, points: np.ndarray, radii: np.ndarray) -> np.ndarray:
    """Voxels within ``radii[k]`` of ``points[k]`` for some k (spheres stamped along a curve)."""
    mask = np.zeros(shape, dtype=bool)
    for p, r in zip(points, radii, strict=True):
        lo = np.maximum(np.floor(p - r).astype(int), 0)
        hi = np.minimum(np.ceil(p + r).astype(int) + 1, shape)
        if np.any(hi <= lo):
            continue
        box = np.ogrid[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
        inside = sum((axis - p[i]) ** 2 for i, axis in enumerate(box)) <= r * r
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] |= inside
    return mask


def _veins(rng: np.random.Generator, chamber: np.ndarray, scale: float) -> np.ndarray:
    """2-4 tapering tubes that start inside the chamber and leave it outwards."""
    centre = np.argwhere(chamber).mean(axis=0)
    surface = np.argwhere(chamber & ~ndimage.binary_erosion(chamber))
    veins = np.zeros_like(chamber)
    for _ in range(rng.integers(2, 5)):
        at = surface[rng.integers(len(surface))].astype(np.float64)
        out = at - centre + rng.normal(0, 2.0, 3)
        start = at - 2.0 * out / np.linalg.norm(out)  # begin inside: the vein is attached
        points = _curve(rng, start, out, rng.uniform(12, 22) * scale, bend=0.12)
        radius = rng.uniform(1.6, 2.4) * scale
        veins |= tube_mask(chamber.shape, points, np.linspace(radius, 0.7 * radius, len(points)))
    return veins


def _distractors(rng: np.random.Generator, label: np.ndarray, grid: np.ndarray,
                 scale: float) -> np.ndarray:
    """An aorta-like thick tube across Z plus 1-3 compact blobs, kept apart from the label."""
    shape = label.shape
    x0 = np.array([rng.choice([0.18, 0.82]) * shape[0], rng.uniform(0.2, 0.8) * shape[1], -2.0])
    aorta = _curve(rng, x0, np.array([rng.normal(0, 0.2), rng.normal(0, 0.2), 1.0]),
                   shape[2] + 6, bend=0.04)
    mask = tube_mask(shape, aorta, np.full(len(aorta), rng.uniform(3.0, 4.5) * scale))
    for _ in range(rng.integers(1, 4)):
        centre = rng.uniform(0.12, 0.88, 3) * np.array(shape)
        radii = rng.uniform(3.0, 6.0, 3) * scale
        mask |= _ellipsoid_level(grid, centre, radii, random_rotation(rng)) < 1.0
    return mask & ~ndimage.binary_dilation(label, iterations=2)


def synthesize_case(rng: np.random.Generator, shape: Shape = (64, 64, 48)
                    ) -> tuple[np.ndarray, np.ndarray]:
    """One ``(image float32, label uint8)`` pair in ``(X, Y, Z)`` order."""
    scale = min(shape) / 48.0
    grid = _grid(shape)
    chamber = chamber_mask(rng, shape, grid)
    label = chamber | _veins(rng, chamber, scale)
    distractors = _distractors(rng, label, grid, scale)
    image = 0.25 + 0.04 * smooth_field(rng, shape, cells=6)  # soft-tissue background texture
    image[distractors] = rng.uniform(0.85, 1.0)
    image[label] = 1.0
    image = ndimage.gaussian_filter(image, 0.7)  # partial volume at the edges
    image *= np.exp(0.3 * smooth_field(rng, shape, cells=3))  # coil inhomogeneity
    image += rng.normal(0.0, 0.08, shape)
    return (100.0 * image).astype(np.float32), label.astype(np.uint8)


def case_affine(spacing: tuple[float, float, float], origin_seed: int) -> np.ndarray:
    """A NIfTI (RAS) affine: LPS-identity direction (as DICOM-derived scans), non-zero origin."""
    origin = np.array([40.0, 25.0, -30.0]) + origin_seed % 7
    return np.diag([-spacing[0], -spacing[1], spacing[2], 1.0]) + np.c_[np.zeros((4, 3)),
                                                                         np.r_[origin, 0.0]]


def _write_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib  # deferred: only the writer needs it

    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    write_atomic(path, lambda tmp: nib.save(image, tmp), overwrite=True)


def generate_dataset(out: Path, n_labelled: int = 4, n_unlabelled: int = 8, n_test: int = 4,
                     shape: Shape = (64, 64, 48),
                     spacing: tuple[float, float, float] = (1.25, 1.25, 1.25), seed: int = 0,
                     overwrite: bool = False) -> Path:
    """Write ``out/labelled/{images,labels}``, ``out/unlabelled/{images,labels_hidden}`` and
    ``out/test/{images,labels}`` as ``.nii.gz``; return ``out``.

    ``labels_hidden`` holds the truth of the unlabelled cases so that pseudo-labels can be scored.
    Refuses (:class:`OutputExistsError`) to write over existing case files unless ``overwrite``.
    """
    out = Path(out)
    counts = {"labelled": n_labelled, "unlabelled": n_unlabelled, "test": n_test}
    for split, n in counts.items():
        folder, prefix, key = SPLITS[split]
        label_dir = "labels_hidden" if split == "unlabelled" else "labels"
        for sub in ("images", label_dir):
            (out / folder / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            name = f"{prefix}_{i:02d}.nii.gz"
            paths = out / folder / "images" / name, out / folder / label_dir / name
            if not overwrite and any(p.exists() for p in paths):
                raise OutputExistsError(f"{paths[0]}: exists (use --overwrite)")
            image, label = synthesize_case(np.random.default_rng([seed, key, i]), shape)
            affine = case_affine(spacing, 10 * key + i)
            _write_nifti(image, affine, paths[0])
            _write_nifti(label, affine, paths[1])
    return out
