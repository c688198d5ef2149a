"""The training cache: every case validated, preprocessed, and written as arrays + ``dataset.json``.

All-or-nothing: arrays and ``dataset.json`` are written into a hidden staging folder next to OUT,
which replaces OUT by a rename only once every case succeeded; on an error the staging folder is
removed and OUT is left as it was (absent if it did not exist). Cases already prepared with the
same settings from unchanged sources (size, mtime) are reused (hard links), not recomputed.
With ``keep_going`` bad cases are listed on stderr and recorded in ``dataset.json`` (``failed``);
the run succeeds if at least one case was prepared.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

from crlnseg import __version__
from crlnseg.console import log, track
from crlnseg.data.discovery import CaseFiles, discover_cases
from crlnseg.data.manifest import (
    CaseRecord,
    Manifest,
    SourceStamp,
    dataset_fingerprint,
    is_prepared,
    load_manifest,
    save_manifest,
)
from crlnseg.data.preprocessing import preprocess
from crlnseg.errors import DataError, OutputExistsError
from crlnseg.io import Volume, read_case_images, read_h5_case, read_label
from crlnseg.io.writers import output_errors, write_atomic
from crlnseg.settings import PrepareSettings

__all__ = ["prepare_dataset", "load_case", "prepare_case"]


def prepare_dataset(source: Path, out: Path, settings: PrepareSettings, workers: int = 1,
                    overwrite: bool = False, keep_going: bool = False,
                    case_ids: list[str] | None = None,
                    accept: Callable[[Manifest], None] | None = None) -> Manifest:
    """Prepare every case of ``source`` (a dataset folder or one file) into the cache ``out``.

    ``accept``: called with the new manifest before ``out`` is changed; what it raises aborts
    the preparation and leaves ``out`` as it was.
    """
    source, out = Path(source), Path(out)
    cases = _select(discover_cases(source), case_ids)
    _check_locations(source, out)
    previous = _previous_records(out, settings, overwrite)
    current = {c.id: _stamps(c) for c in cases}
    reused = [previous[c.id] for c in cases
              if c.id in previous and _still_valid(previous[c.id], current[c.id], out)]
    todo = [c for c in cases if c.id not in {r.id for r in reused}]
    if not todo and len(reused) == len(previous) and previous:
        manifest = load_manifest(out)  # nothing changed: leave OUT untouched
        if not manifest.failed:
            if accept is not None:
                accept(manifest)
            manifest._skipped = len(reused)
            return manifest
    with output_errors(out):
        created = _make_parents(out.parent)
    staging: Path | None = None
    try:
        staging = _make_staging(out)
        (staging / "cases").mkdir()
        for record in reused:
            _link_case(record, out, staging)
        records, failed = _prepare_all(todo, staging, settings, workers, keep_going)
        if not records and not reused:
            raise DataError(f"{source}: no case could be prepared; first error: {failed[0][1]}")
        manifest = _build_manifest(source, settings, records + reused, failed)
        save_manifest(manifest, staging)
        if accept is not None:
            accept(manifest)
        with output_errors(out):
            _replace(staging, out)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        for folder in reversed(created):
            _rmdir_quiet(folder)
        raise
    for case_id, message in failed:
        log(f"warning: bad case {case_id} not prepared: {message}")
    manifest._folder = out
    manifest._skipped = len(reused)
    return manifest


def load_case(case: CaseFiles, h5_spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
              ) -> tuple[Volume, Volume | None]:
    """Read and validate one case: image ``(C, X, Y, Z)`` and uint8 label (or None)."""
    if case.label_in_image:
        image, label = read_h5_case(case.images[0], h5_spacing)
        if image.array.ndim == 3:
            image.array = image.array[None]
        return image, read_label(label, reference=image) if label is not None else None
    image = read_case_images(case.images, h5_spacing)
    if case.label is None:
        return image, None
    return image, read_label(case.label, reference=image, h5_spacing=h5_spacing)


def _save_array(path: Path, array: np.ndarray) -> None:
    """``.npy`` through :func:`write_atomic`: a full disk is one line naming the file."""

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, array)

    write_atomic(path, save, overwrite=True)


def prepare_case(case: CaseFiles, folder: Path, settings: PrepareSettings) -> CaseRecord:
    """Read, validate, preprocess and save one case into ``folder/cases``; its manifest record."""
    image, label = load_case(case, settings.h5_spacing)
    result = preprocess(image, label, settings)
    image_file = f"cases/{case.id}_image.npy"
    _save_array(folder / image_file, np.ascontiguousarray(result.image, dtype=np.float32))
    label_file = None
    if result.label is not None:
        label_file = f"cases/{case.id}_label.npy"
        _save_array(folder / label_file, np.ascontiguousarray(result.label, dtype=np.uint8))
    return CaseRecord(
        id=case.id, images=[str(p.resolve()) for p in case.images],
        label=str(case.label.resolve()) if case.label else None,
        label_in_image=case.label_in_image, sources=_stamps(case),
        image_file=image_file, label_file=label_file, **result.info.to_dict())


def _prepare_all(todo: list[CaseFiles], staging: Path, settings: PrepareSettings, workers: int,
                 keep_going: bool) -> tuple[list[CaseRecord], list[tuple[str, str]]]:
    records: list[CaseRecord] = []
    failed: list[tuple[str, str]] = []
    for case, outcome in track(_outcomes(todo, staging, settings, workers), "preparing",
                               total=len(todo)):
        if isinstance(outcome, CaseRecord):
            records.append(outcome)
        elif keep_going:
            failed.append((case.id, str(outcome).splitlines()[0]))
        else:
            raise outcome
    return records, failed


def _outcomes(todo: list[CaseFiles], staging: Path, settings: PrepareSettings, workers: int
              ) -> Iterator[tuple[CaseFiles, CaseRecord | DataError]]:
    """(case, record or its DataError), serially or from a process pool (any order)."""
    if workers <= 1 or len(todo) <= 1:
        for case in todo:
            try:
                yield case, prepare_case(case, staging, settings)
            except DataError as err:
                yield case, err
        return
    with ProcessPoolExecutor(max_workers=min(workers, len(todo))) as pool:
        futures = {pool.submit(prepare_case, c, staging, settings): c for c in todo}
        try:
            for future in as_completed(futures):
                try:
                    yield futures[future], future.result()
                except DataError as err:
                    yield futures[future], err
        finally:  # an abort (error, Ctrl-C) must not leave workers writing into staging
            pool.shutdown(wait=True, cancel_futures=True)


def _build_manifest(source: Path, settings: PrepareSettings, records: list[CaseRecord],
                    failed: list[tuple[str, str]]) -> Manifest:
    records = sorted(records, key=lambda r: r.id)
    channels = {len(r.intensity) for r in records}
    if len(channels) > 1:
        odd = next(r for r in records if len(r.intensity) != len(records[0].intensity))
        raise DataError(f"{odd.images[0]}: case '{odd.id}' has {len(odd.intensity)} channels, "
                        f"case '{records[0].id}' has {len(records[0].intensity)}")
    classes = sorted({0}.union(*(r.labels_present for r in records)))
    return Manifest(crlnseg_version=__version__, source=str(source.resolve()), settings=settings,
                    channels=channels.pop(), classes=classes,
                    fingerprint=dataset_fingerprint(records), cases=records,
                    failed=[{"id": i, "error": e} for i, e in failed])


def _select(cases: list[CaseFiles], case_ids: list[str] | None) -> list[CaseFiles]:
    if case_ids is None:
        return cases
    known = {c.id for c in cases}
    unknown = [i for i in case_ids if i not in known]
    if unknown:
        raise DataError(f"case '{unknown[0]}' not found in the source ({len(known)} cases)")
    wanted = set(case_ids)
    return [c for c in cases if c.id in wanted]


def _check_locations(source: Path, out: Path) -> None:
    src, dst = source.resolve(), out.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        raise OutputExistsError(f"{out}: the output must be outside the source {source} "
                                "(input files are never overwritten)")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")


def _previous_records(out: Path, settings: PrepareSettings, overwrite: bool
                      ) -> dict[str, CaseRecord]:
    """Reusable cases of an existing cache; refuses to replace what it must not."""
    if not out.exists() or not any(out.iterdir()):
        return {}
    if not is_prepared(out):
        raise OutputExistsError(f"{out}: exists, is not empty and is not a crlnseg cache; "
                                "choose a new or empty folder")
    try:
        manifest = load_manifest(out)
    except DataError:
        if overwrite:
            return {}
        raise
    if manifest.settings.model_dump(mode="json") != settings.model_dump(mode="json"):
        if overwrite:
            return {}
        raise OutputExistsError(f"{out}: prepared with different settings "
                                f"({_settings_diff(manifest.settings, settings)}); "
                                "use --overwrite to replace it")
    return {r.id: r for r in manifest.cases}


def _settings_diff(old: PrepareSettings, new: PrepareSettings) -> str:
    a, b = old.model_dump(mode="json"), new.model_dump(mode="json")
    return ", ".join(f"{k}: {a[k]} -> {b[k]}" for k in a if a[k] != b.get(k))


def _stamps(case: CaseFiles) -> list[SourceStamp]:
    files = list(case.images) + ([case.label] if case.label and not case.label_in_image else [])
    try:
        return [SourceStamp.of(p) for p in files]
    except OSError as err:
        raise DataError(f"{err.filename}: cannot read ({err.strerror})") from None


def _still_valid(record: CaseRecord, stamps: list[SourceStamp], out: Path) -> bool:
    files = [record.image_file] + ([record.label_file] if record.label_file else [])
    return record.sources == stamps and all((out / f).is_file() for f in files)


def _link_case(record: CaseRecord, out: Path, staging: Path) -> None:
    for name in filter(None, (record.image_file, record.label_file)):
        try:
            os.link(out / name, staging / name)
        except OSError:  # another file system, or no hard links: copy instead
            shutil.copy2(out / name, staging / name)


def _make_staging(out: Path) -> Path:
    """The hidden staging folder next to ``out``: created by ``mkdir``, not ``mkdtemp``, so its
    mode follows the umask like any folder the user creates (it becomes ``out``)."""
    staging = out.with_name(f".{out.name}.tmp-{secrets.token_hex(4)}")
    with output_errors(out):
        staging.mkdir()
    return staging


def _replace(staging: Path, out: Path) -> None:
    """Put the finished staging folder at ``out`` (the old cache is removed only afterwards)."""
    if not out.exists():
        os.rename(staging, out)
        return
    trash = out.with_name(f".{out.name}.old-{secrets.token_hex(4)}")
    os.rename(out, trash)
    try:
        os.rename(staging, out)
    except OSError:
        os.rename(trash, out)
        raise
    shutil.rmtree(trash, ignore_errors=True)


def _make_parents(folder: Path) -> list[Path]:
    """Create missing parent folders; returns those created (removed again on failure)."""
    missing = [p for p in [folder, *folder.parents] if not p.exists()]
    created: list[Path] = []
    try:
        for p in reversed(missing):
            p.mkdir()
            created.append(p)
    except BaseException:
        for p in reversed(created):
            _rmdir_quiet(p)
        raise
    return created


def _rmdir_quiet(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass
