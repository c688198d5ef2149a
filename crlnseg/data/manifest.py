"""The prepared cache: ``OUT/dataset.json`` plus one memory-mappable ``.npy`` per case array.

Layout::

    OUT/dataset.json               format_version, crlnseg_version, settings, channels, classes,
                                   fingerprint, cases[...], failed[...]
    OUT/cases/<ID>_image.npy       float32 (C, X, Y, Z), normalised
    OUT/cases/<ID>_label.npy       uint8 (X, Y, Z) (labelled cases only)

``np.load(..., mmap_mode="r")`` maps the arrays, so training reads patches without loading cases.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError

from crlnseg.errors import DataError
from crlnseg.settings import PrepareSettings

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "SourceStamp", "CaseRecord", "Manifest",
           "load_manifest", "save_manifest", "is_prepared", "dataset_fingerprint"]

FORMAT_VERSION = 2  # 2: cases in canonical orientation, with their transform
MANIFEST_NAME = "dataset.json"


class SourceStamp(BaseModel):
    """Size and modification time of a source file: a changed file is prepared again."""

    path: str
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: Path) -> SourceStamp:
        st = Path(path).stat()
        return cls(path=str(Path(path).resolve()), size=st.st_size, mtime_ns=st.st_mtime_ns)


class CaseRecord(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    images: list[str]
    label: str | None
    label_in_image: bool = False  # HDF5 case: the label is a dataset of the image file
    sources: list[SourceStamp] = Field(default_factory=list)
    original_shape: tuple[int, int, int]
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]
    crop_box: tuple[tuple[int, int], tuple[int, int], tuple[int, int]]
    orientation: dict[str, list] = Field(
        default_factory=lambda: {"permutation": [0, 1, 2], "flips": [False, False, False]})
    target_spacing: tuple[float, float, float]
    intensity: list[dict[str, float]]
    labels_present: list[int]
    image_file: str
    label_file: str | None


class Manifest(BaseModel):
    """``dataset.json``; :meth:`image` / :meth:`label` load (memory-map) a case's arrays."""

    model_config = ConfigDict(extra="ignore")

    format_version: int = FORMAT_VERSION
    crlnseg_version: str
    source: str | None = None
    settings: PrepareSettings
    channels: int
    classes: list[int]
    fingerprint: dict[str, Any]
    cases: list[CaseRecord]
    failed: list[dict[str, str]] = Field(default_factory=list)  # --keep-going: id, error
    _folder: Path = PrivateAttr(default=Path("."))
    _skipped: int = PrivateAttr(default=0)  # cases reused from an earlier run (not saved)

    @property
    def folder(self) -> Path:
        return self._folder

    @property
    def ids(self) -> list[str]:
        return [c.id for c in self.cases]

    @property
    def skipped(self) -> int:
        """Cases that the run which returned this manifest found already prepared."""
        return self._skipped

    def case(self, case_id: str) -> CaseRecord:
        for record in self.cases:
            if record.id == case_id:
                return record
        raise DataError(f"{self.folder}: no case '{case_id}' in the prepared dataset")

    def image(self, case_id: str, mmap: bool = True) -> np.ndarray:
        """float32 ``(C, X, Y, Z)``, memory-mapped read-only unless ``mmap=False``."""
        return self._load(self.case(case_id).image_file, mmap)

    def label(self, case_id: str, mmap: bool = True) -> np.ndarray | None:
        """uint8 ``(X, Y, Z)`` or None for an unlabelled case."""
        record = self.case(case_id)
        return self._load(record.label_file, mmap) if record.label_file else None

    def _load(self, relative: str, mmap: bool) -> np.ndarray:
        path = self.folder / relative
        try:
            return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: unreadable cached array ({err}); re-run crlnseg prepare "
                            "--overwrite") from None


def is_prepared(folder: Path) -> bool:
    """Whether ``folder`` holds a crlnseg cache (not, e.g., an nnU-Net raw ``dataset.json``)."""
    path = Path(folder) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "crlnseg_version" in data and "format_version" in data


def load_manifest(folder: Path) -> Manifest:
    """Read ``folder/dataset.json``; a foreign or other-version file is a one-line DataError."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise DataError(f"{folder}: not a prepared dataset (no {MANIFEST_NAME}); "
                        "run crlnseg prepare first")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict) or "crlnseg_version" not in data:
        raise DataError(f"{path}: not written by crlnseg prepare (raw dataset folder?)")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise DataError(f"{path}: cache format version {version}, this crlnseg reads version "
                        f"{FORMAT_VERSION}; run crlnseg prepare again with --overwrite")
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise DataError(f"{path}: invalid field {where}: {first['msg']}") from None
    manifest._folder = folder
    return manifest


def save_manifest(manifest: Manifest, folder: Path) -> None:
    """Write ``folder/dataset.json`` atomically (the last file a prepare run writes)."""
    from crlnseg.io.writers import write_atomic

    text = json.dumps(manifest.model_dump(mode="json"), indent=1)
    write_atomic(Path(folder) / MANIFEST_NAME, lambda tmp: tmp.write_text(text + "\n"),
                 overwrite=True)
    manifest._folder = Path(folder)


def dataset_fingerprint(cases: list[CaseRecord]) -> dict[str, Any]:
    """Dataset-level statistics, nnU-Net style.

    Per channel, over foreground voxels of labelled cases: pooled mean/std (exact) and the median
    over cases of each case's 0.5/50/99.5 percentiles (an approximation of the pooled percentiles).
    """
    labelled = [c for c in cases if c.label_file is not None]
    channels = len(cases[0].intensity) if cases else 0
    intensity = []
    for ch in range(channels):
        rows = [c.intensity[ch] for c in labelled if c.intensity[ch].get("fg_count", 0) > 0]
        n = np.array([r["fg_count"] for r in rows])
        entry: dict[str, float] = {"foreground_voxels": float(n.sum())}
        if rows:
            mean = np.array([r["fg_mean"] for r in rows])
            var = np.array([r["fg_std"] for r in rows]) ** 2
            pooled = float((n * mean).sum() / n.sum())
            entry["mean"] = pooled
            entry["std"] = float(np.sqrt((n * (var + (mean - pooled) ** 2)).sum() / n.sum()))
            for key in ("p00_5", "p50", "p99_5"):
                entry[key] = float(np.median([r[f"fg_{key}"] for r in rows]))
        intensity.append(entry)
    return {
        "cases": len(cases),
        "labelled": len(labelled),
        "intensity_foreground": intensity,
        "spacing_median": _median([c.spacing for c in cases]),
        "original_shape_median": _median([c.original_shape for c in cases]),
        "shape_median": _median([c.shape for c in cases]),
        "shape_min": [int(v) for v in np.min([c.shape for c in cases], axis=0)] if cases else [],
    }


def _median(rows: list[tuple]) -> list[float]:
    return [float(v) for v in np.median(np.asarray(rows, float), axis=0)] if rows else []
