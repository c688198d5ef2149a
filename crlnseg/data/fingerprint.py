"""The dataset fingerprint that a plan is made from: per case, the spacing and the shape in
canonical (RAS) axis order, read from the headers alone; for CT, foreground intensities of the
labelled cases; the modality a ``dataset.json`` names."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crlnseg.data.discovery import CaseFiles, discover_cases
from crlnseg.data.orientation import canonical_shape, canonical_spacing, canonical_transform
from crlnseg.errors import DataError
from crlnseg.io import integrity
from crlnseg.io.paths import is_nifti
from crlnseg.io.readers import read_header
from crlnseg.types import IntTriple, Triple

__all__ = ["Fingerprint", "fingerprint", "ct_foreground", "dataset_modality", "discover"]

_FOREGROUND_SAMPLES = 10_000  # per labelled case: ample for 0.5 / 99.5 percentiles


@dataclass
class Fingerprint:
    """Per case, the spacing and the shape in canonical axis order; the CT foreground."""

    spacings: list[Triple]
    shapes: list[IntTriple]
    labelled: int
    unlabelled: int
    modality: str = "other"  # "ct" or "other"
    ct_foreground: dict[str, float] | None = None  # p00_5, p99_5, mean, std

    def summary(self) -> dict[str, Any]:
        s, n = np.asarray(self.spacings, float), np.asarray(self.shapes, float)
        return {"cases": len(self.spacings), "labelled": self.labelled,
                "unlabelled": self.unlabelled, "modality": self.modality,
                "spacing_median": [round(float(v), 4) for v in np.median(s, axis=0)],
                "spacing_min": [float(v) for v in s.min(axis=0)],
                "spacing_max": [float(v) for v in s.max(axis=0)],
                "shape_median": [float(v) for v in np.median(n, axis=0)],
                "ct_foreground": self.ct_foreground}


def fingerprint(labelled: Sequence[CaseFiles], unlabelled: Sequence[CaseFiles],
                h5_spacing: Triple = (1.0, 1.0, 1.0), modality: str = "other",
                orientation: str = "canonical") -> Fingerprint:
    """Headers of every case (no voxels read) and, for CT, the labelled foreground voxels."""
    spacings, shapes = [], []
    for case in [*labelled, *unlabelled]:
        path = Path(case.images[0])
        fast = _nifti_grid(path) if is_nifti(path) else None
        if fast is None:
            header = read_header(path, h5_spacing)
            fast = header.spatial_shape, header.geometry.spacing, header.geometry.direction
        shape, spacing, direction = fast
        try:
            t = canonical_transform(direction) if orientation == "canonical" else None
        except ValueError as err:
            raise DataError(f"{path}: {err}") from None
        spacings.append(canonical_spacing(spacing, t))
        shapes.append(canonical_shape(shape, t))
    ct = ct_foreground(labelled, h5_spacing) if modality == "ct" else None
    return Fingerprint(spacings, shapes, len(labelled), len(unlabelled), modality, ct)


def _nifti_grid(path: Path) -> tuple[IntTriple, Triple, tuple[float, ...]] | None:
    """(shape, spacing, LPS direction) of a NIfTI file from its header bytes, as SimpleITK reads
    them (spacing = pixdim; direction of the sform, else the qform), when that is clear-cut:
    every case's preparation reads the file with SimpleITK anyway, whose header read alone
    costs several times this. None (read it with :func:`read_header`) for anything unusual: no
    sform or qform, an sform and a qform of other axis orders, a direction without a clear
    closest axis, bad numbers."""
    header = integrity.raw_nifti_header(path)
    if header is None or int(header["dim"][0]) not in (3, 4):
        return None
    shape = tuple(int(n) for n in header["dim"][1:4])
    spacing = tuple(float(v) for v in header["pixdim"][1:4])
    if min(shape) < 1 or not all(math.isfinite(v) and v > 0 for v in spacing):
        return None
    frames = []
    for code, matrix in ((int(header["sform_code"]), header.get_sform),
                         (int(header["qform_code"]), header.get_qform)):
        if code > 0:
            m = np.asarray(matrix(), float)[:3, :3]
            norms = np.linalg.norm(m, axis=0)
            if not (np.isfinite(m).all() and (norms > 0).all()):
                return None
            ras = m / norms
            if np.abs(ras).max(axis=0).min() < 0.8:  # near 45 degrees: let ITK's reading decide
                return None
            frames.append(np.diag([-1.0, -1.0, 1.0]) @ ras)
    if not frames or any(canonical_transform(f) != canonical_transform(frames[0])
                         for f in frames[1:]):
        return None
    return shape, spacing, tuple(float(v) for v in frames[0].ravel())  # type: ignore[return-value]


def ct_foreground(cases: Sequence[CaseFiles], h5_spacing: Triple = (1.0, 1.0, 1.0)
                  ) -> dict[str, float] | None:
    """0.5 / 99.5 percentiles, mean and std of foreground voxels sampled from every labelled
    case (at most 10 000 each, seeded), as nnU-Net's CT normalisation samples them."""
    from crlnseg.data.cache import load_case

    rng = np.random.default_rng(0)
    samples = []
    for case in cases:
        if case.label is None:
            continue
        image, label = load_case(case, h5_spacing)
        if label is None:
            continue
        first = image.array if image.array.ndim == 3 else image.array[0]
        values = first[label.array > 0].astype(np.float64)
        if values.size:
            take = min(values.size, _FOREGROUND_SAMPLES)
            samples.append(rng.choice(values, take, replace=False))
    if not samples:
        return None
    fg = np.concatenate(samples)
    lo, hi = np.percentile(fg, (0.5, 99.5))
    return {"p00_5": float(lo), "p99_5": float(hi), "mean": float(fg.mean()),
            "std": float(fg.std())}


def dataset_modality(folder: Path) -> str | None:
    """``ct`` when the ``dataset.json`` of ``folder`` (nnU-Net's format: ``channel_names``, or
    MSD's ``modality``) names every channel CT; ``other`` when it names others; None without."""
    for path in (folder / "dataset.json", folder.parent / "dataset.json"):
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or "crlnseg_version" in data:
            return None  # a crlnseg cache's own manifest
        names = data.get("channel_names") or data.get("modality") or {}
        if isinstance(names, dict) and names:
            ct = all(str(v).strip().lower() == "ct" for v in names.values())
            return "ct" if ct else "other"
        return None
    return None


def discover(folders: Sequence[Path]) -> tuple[list[CaseFiles], list[CaseFiles]]:
    """The labelled and unlabelled cases of raw dataset folders."""
    labelled, unlabelled = [], []
    for folder in folders:
        for case in discover_cases(folder):
            (labelled if case.label is not None else unlabelled).append(case)
    return labelled, unlabelled
