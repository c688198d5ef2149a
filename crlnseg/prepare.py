"""``crlnseg prepare``: raw scans -> the training cache (arrays + ``dataset.json``).

The cache is built by :func:`crlnseg.data.cache.prepare_dataset` (all-or-nothing, unchanged
cases reused); ``crlnseg train`` prepares raw inputs the same way on the fly. The target spacing
and the normalisation that no option gives come from the folder's plan
(:mod:`crlnseg.data.planner`); ``train`` plans from its labelled and unlabelled folders together.
"""

from __future__ import annotations

from pathlib import Path

from crlnseg.data import planner
from crlnseg.data.cache import prepare_dataset
from crlnseg.data.manifest import Manifest
from crlnseg.settings import PrepareSettings, RunSettings

__all__ = ["prepare", "prepare_dataset", "planned_prepare", "summary"]


def prepare(source: Path, out: Path, settings: PrepareSettings, workers: int = 1,
            overwrite: bool = False, keep_going: bool = False, plan: bool = True) -> Manifest:
    """Validate and preprocess ``source`` into the cache ``out``; returns its manifest.

    ``plan``: fields of ``settings`` that were not given are planned from ``source``."""
    if plan:
        settings = planned_prepare(settings, source)
    return prepare_dataset(source, out, settings, workers=workers, overwrite=overwrite,
                           keep_going=keep_going)


def planned_prepare(settings: PrepareSettings, source: Path) -> PrepareSettings:
    """``settings`` with the target spacing and normalisation of ``source``'s plan where they
    were not given (``model_fields_set``)."""
    result = planner.plan_folders(RunSettings(prepare=settings), [source], "cpu")
    return planner.apply(RunSettings(prepare=settings), result).prepare


def summary(manifest: Manifest, out: Path) -> str:
    """One line: how many cases the cache holds, new, reused and failed."""
    n, failed = len(manifest.cases), len(manifest.failed)
    new = n - manifest.skipped
    failures = f", {failed} failed" if failed else ""
    return (f"prepared {n} case{'s' * (n != 1)} -> {out} ({new} new, "
            f"{manifest.skipped} already prepared{failures})")
