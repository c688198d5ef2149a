"""``crlnseg prepare``: raw scans -> the training cache (arrays + ``dataset.json``).

The cache is built by :func:`crlnseg.data.cache.prepare_dataset` (all-or-nothing, unchanged
cases reused); ``crlnseg train`` prepares raw inputs the same way on the fly.
"""

from __future__ import annotations

from pathlib import Path

from crlnseg.data.cache import prepare_dataset
from crlnseg.data.manifest import Manifest
from crlnseg.settings import PrepareSettings

__all__ = ["prepare", "prepare_dataset", "summary"]


def prepare(source: Path, out: Path, settings: PrepareSettings, workers: int = 1,
            overwrite: bool = False, keep_going: bool = False) -> Manifest:
    """Validate and preprocess ``source`` into the cache ``out``; returns its manifest."""
    return prepare_dataset(source, out, settings, workers=workers, overwrite=overwrite,
                           keep_going=keep_going)


def summary(manifest: Manifest, out: Path) -> str:
    """One line: how many cases the cache holds, new, reused and failed."""
    n, failed = len(manifest.cases), len(manifest.failed)
    new = n - manifest.skipped
    failures = f", {failed} failed" if failed else ""
    return (f"prepared {n} case{'s' * (n != 1)} -> {out} ({new} new, "
            f"{manifest.skipped} already prepared{failures})")
