"""A plan from the dataset fingerprint (labelled and unlabelled cases together).

nnU-Net's rules, made for semi-supervised training (every value comes with its reason):

- target spacing ``prepare.target_spacing``: the per-axis median of the cases' spacings; for an
  anisotropic dataset (coarsest / finest median spacing > 3) the coarse axis takes its 10th
  percentile instead (never finer than the other axes), so the thinner-sliced cases are not
  squashed into a few thick slices;
- intensity ``prepare.normalize``: CT (``dataset.json`` channel names as nnU-Net writes them, or
  ``prepare.modality = "ct"``) is clipped to the 0.5 / 99.5 percentiles of the labelled
  foreground voxels of the whole dataset and z-scored with their mean and std; other modalities
  keep per-case z-score;
- topology ``model.strides`` / ``model.kernels``: at each of the four levels an axis is pooled
  unless its spacing there is more than twice the finest axis's, and convolved across (kernel 3)
  unless it is that coarse (kernel 1);
- patch ``train.patch``: within a voxel budget per device (the ``cpu`` preset's 64 x 64 x 32 on
  the CPU, the ``la8`` patch 112 x 112 x 80 on a GPU), each side a multiple of its axis's total
  stride, the patch that covers the most of the median shape at the target spacing, so that it
  follows the median shape's aspect (on LA these rules give back the two presets' patches).

Spacings and shapes are in canonical (RAS) axis order (:mod:`crlnseg.data.orientation`), as the
cache stores the cases.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crlnseg.data.discovery import CaseFiles
from crlnseg.data.fingerprint import (
    Fingerprint,
    ct_foreground,
    dataset_modality,
    discover,
    fingerprint,
)
from crlnseg.errors import DataError
from crlnseg.settings import RunSettings
from crlnseg.types import IntTriple, Triple

__all__ = ["VOXEL_BUDGET", "ANISOTROPY", "PLANNED", "PREPARE_KEYS", "Fingerprint", "Plan",
           "fingerprint", "plan", "dataset_modality", "ct_foreground", "discover", "topology",
           "patch_size", "target_spacing"]

VOXEL_BUDGET = {"cpu": 64 * 64 * 32, "cuda": 112 * 112 * 80}
ANISOTROPY = 3.0
LEVELS = 4


@dataclass
class Plan:
    """Planned values by setting key (``section.field``) and the reason for each."""

    values: dict[str, Any]
    reasons: dict[str, str] = field(default_factory=dict)
    fingerprint: dict[str, Any] = field(default_factory=dict)
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        """JSON types only (lists, not tuples), as stored in checkpoints."""
        return json.loads(json.dumps(asdict(self)))

    def overrides(self, keys: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
        """The plan (or the ``keys`` of it) as nested settings overrides."""
        out: dict[str, dict[str, Any]] = {}
        for key, value in self.values.items():
            if keys is None or key in keys:
                section, name = key.split(".")
                out.setdefault(section, {})[name] = value
        return out

    def table(self) -> list[tuple[str, str, str]]:
        return [(k, show(v, ", " if k in PAIRS else " x "), self.reasons.get(k, ""))
                for k, v in self.values.items()]


PAIRS = ("prepare.ct_window", "prepare.ct_stats")  # (lo, hi) and (mean, std), not sizes


def show(value: Any, sep: str = " x ") -> str:
    """``0.625 x 0.625 x 2.5``; nested levels separated by commas."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, tuple | list):
        if all(not isinstance(v, tuple | list) for v in value):
            return sep.join(show(v) for v in value)
        return ", ".join(show(v) for v in value)
    return str(value)


def target_spacing(spacings: np.ndarray) -> tuple[Triple, str]:
    median = np.median(spacings, axis=0)
    if median.max() / median.min() <= ANISOTROPY:
        return _triple(median), "per-axis median of the cases' spacings"
    coarse = int(np.argmax(median))
    target = median.copy()
    others = np.delete(median, coarse)
    # nnU-Net's limit: the coarse axis stays the coarse axis (its 10th percentile may fall
    # below the in-plane spacing when a few cases are near-isotropic).
    target[coarse] = max(float(np.percentile(spacings[:, coarse], 10)), float(others.max()))
    return _triple(target), (
        f"per-axis median; anisotropic (median {median.max():.3g} / {median.min():.3g} mm > "
        f"{ANISOTROPY:g}): axis {'XYZ'[coarse]} takes its 10th percentile")


def topology(spacing: Triple) -> tuple[list[IntTriple], list[IntTriple]]:
    """Per level, the strides and kernels for voxels of ``spacing`` (see the module doc)."""
    current, strides, kernels = list(spacing), [], []
    for _ in range(LEVELS):
        finest = min(current)
        pooled = [s <= 2 * finest for s in current]
        kernels.append(tuple(3 if p else 1 for p in pooled))
        strides.append(tuple(2 if p else 1 for p in pooled))
        current = [s * (2 if p else 1) for s, p in zip(current, pooled, strict=True)]
    finest = min(current)
    kernels.append(tuple(3 if s <= 2 * finest else 1 for s in current))
    return strides, kernels  # type: ignore[return-value]


def patch_size(median_shape: np.ndarray, total: IntTriple, budget: int) -> IntTriple:
    """The patch, each side a multiple of ``total`` (at most the median shape rounded up to one,
    as nnU-Net pads a patch to its pooling) and within ``budget`` voxels, that covers the most
    of the median shape; ties go to the fewer voxels, then to the aspect closest to the median's.
    """
    t = np.asarray(total, float)
    shape = np.maximum(np.asarray(median_shape, float), 1.0)
    if float(np.prod(t)) > budget:
        return tuple(int(v) for v in total)  # type: ignore[return-value]
    # Candidates for X and Y within the budget; Z follows: the multiple that covers the median
    # Z with the fewest voxels, or the most the budget leaves.
    top = [min(math.ceil(shape[i] / t[i]), budget // int(np.prod(np.delete(t, i)) * t[i]))
           for i in range(2)]
    xy = np.stack(np.meshgrid(np.arange(1, top[0] + 1) * t[0], np.arange(1, top[1] + 1) * t[1],
                              indexing="ij"), axis=-1).reshape(-1, 2)
    z_room = np.floor(budget / xy.prod(axis=1) / t[2]) * t[2]
    z = np.minimum(z_room, math.ceil(shape[2] / t[2]) * t[2])
    grid = np.column_stack([xy, z])[z >= t[2]]
    voxels = grid.prod(axis=1)
    covered = np.minimum(grid, shape).prod(axis=1)
    ratio = np.log(grid / shape)
    aspect = np.abs(ratio - ratio.mean(axis=1, keepdims=True)).sum(axis=1)
    best = np.lexsort((aspect, voxels, -np.round(covered, 6)))[0]
    return tuple(int(v) for v in grid[best])  # type: ignore[return-value]


# The preprocessing keys (a prepared cache fixes them) and, after them, the model's and patch's.
PREPARE_KEYS = ("prepare.target_spacing", "prepare.normalize", "prepare.ct_window",
                "prepare.ct_stats")
PLANNED = (*PREPARE_KEYS, "model.strides", "model.kernels", "train.patch")


def plan(fp: Fingerprint, device: str = "cpu",
         fixed: dict[str, tuple[Any, str]] | None = None) -> Plan:
    """The plan of a fingerprint for ``device`` ("cpu" or "cuda").

    ``fixed``: ``key -> (value, reason)`` given elsewhere (a preset, a settings file, an option,
    a prepared cache); they are kept, and the values that follow from them (topology and patch
    from the spacing, patch from the strides) are planned around them.
    """
    if not fp.spacings:
        raise DataError("no cases to plan from")
    fixed = {k: v for k, v in (fixed or {}).items() if k in PLANNED}
    spacings = np.asarray(fp.spacings, float)
    values: dict[str, Any] = {}
    reasons: dict[str, str] = {}

    def put(key: str, value: Any, reason: str) -> Any:
        values[key], reasons[key] = fixed.get(key, (value, reason))
        return values[key]

    planned_target, why_spacing = target_spacing(spacings)
    target = put("prepare.target_spacing", planned_target, why_spacing)
    target = planned_target if target is None else _triple(target)
    _intensity(fp, put)
    strides, kernels = topology(target)
    strides = put("model.strides", strides,
                  "an axis is pooled unless its spacing is > 2x the finest axis's")
    put("model.kernels", kernels, "kernel 1 along an axis > 2x coarser than the finest, else 3")
    total = tuple(math.prod(int(level[a]) for level in strides) for a in range(3))
    shapes = np.asarray(fp.shapes, float) * spacings / np.asarray(target)
    median_shape = np.round(np.median(shapes, axis=0), 3)  # 48.0000001 is 48
    budget = VOXEL_BUDGET[device]
    put("train.patch", patch_size(median_shape, total, budget),  # type: ignore[arg-type]
        f"covers the most of the median shape {show(_triple(median_shape, 0))} at the target "
        f"spacing within {budget} voxels ({device}); multiples of {show(total)}")
    return Plan(values, reasons, fp.summary(), device)


def _intensity(fp: Fingerprint, put: Any) -> None:
    if fp.ct_foreground:
        ct = fp.ct_foreground
        put("prepare.normalize", "ct", "CT: one normalisation for the whole dataset")
        put("prepare.ct_window", (ct["p00_5"], ct["p99_5"]),
            "0.5 / 99.5 percentiles of the labelled foreground voxels")
        put("prepare.ct_stats", (ct["mean"], max(ct["std"], 1e-8)),
            "mean and std of the labelled foreground voxels")
    elif fp.modality == "ct":
        put("prepare.normalize", "zscore", "CT without labelled foreground: per-case z-score")
    else:
        put("prepare.normalize", "zscore", "not CT: each case z-scored with its own mean and std")


def _triple(values: Any, digits: int | None = 6) -> Triple:
    return tuple(float(v) if digits is None else round(float(v), digits)
                 for v in values)  # type: ignore[return-value]


def explicit(settings: RunSettings) -> dict[str, tuple[Any, str]]:
    """The planned keys that a preset, a settings file, an option or ``--set`` gave."""
    out = {}
    for key in PLANNED:
        section, name = key.split(".")
        part = getattr(settings, section)
        if name in part.model_fields_set:
            out[key] = (getattr(part, name), "set (preset, settings file, option or --set)")
    return out


def plan_folders(settings: RunSettings, folders: Sequence[Path | None], device: str) -> Plan:
    """The plan of a run's inputs: raw dataset folders or prepared caches, the labelled first
    (its labelled cases count as labelled, every other case as unlabelled); the first prepared
    folder fixes the preprocessing (all inputs of a run share one)."""
    from crlnseg.data.manifest import is_prepared, load_manifest

    fixed = explicit(settings)
    prep = settings.prepare
    spacings: list[Triple] = []
    shapes: list[IntTriple] = []
    raw_lab: list[CaseFiles] = []
    raw_unl: list[CaseFiles] = []
    counts = [0, 0]
    cache: Path | None = None
    modality = prep.modality
    for i, folder in enumerate(folders):
        if folder is None:
            continue
        folder = Path(folder)
        if is_prepared(folder):
            manifest = load_manifest(folder)
            spacings += [tuple(c.spacing) for c in manifest.cases]  # type: ignore[misc]
            shapes += [tuple(c.original_shape) for c in manifest.cases]  # type: ignore[misc]
            counts[min(i, 1)] += len(manifest.cases)
            if cache is None:  # every input of a run shares one preprocessing
                cache = folder
                for key in PREPARE_KEYS:
                    value = getattr(manifest.settings, key.split(".")[1])
                    fixed[key] = (value, f"as {folder} was prepared")
            continue
        lab, unl = discover([folder])
        raw_lab.extend(lab if i == 0 else [])
        raw_unl.extend(unl if i == 0 else [*lab, *unl])
        if modality == "auto":
            modality = dataset_modality(folder) or "auto"
    modality = "other" if modality == "auto" else modality
    given = fixed.get("prepare.normalize", (None, ""))[0]
    # Dataset-wide CT statistics when the data is CT, or the normalisation was set to ct;
    # never when another normalisation was set or a cache fixes the preprocessing.
    sample = (given == "ct" or (given is None and modality == "ct")) and cache is None
    fp = fingerprint(raw_lab, raw_unl, prep.h5_spacing, "ct" if sample else "other",
                     prep.orientation)
    fp.spacings = spacings + fp.spacings
    fp.shapes = shapes + fp.shapes
    fp.labelled += counts[0]
    fp.unlabelled += counts[1]
    fp.modality = modality
    return plan(fp, device, fixed)


def apply(settings: RunSettings, p: Plan) -> RunSettings:
    """``settings`` with the plan's values where nothing else gave them."""
    from crlnseg.config import deep_merge

    given = explicit(settings)
    keys = [k for k in p.values if k not in given]
    data = deep_merge(settings.model_dump(mode="json", exclude_unset=True), p.overrides(keys))
    return type(settings).model_validate(data)
