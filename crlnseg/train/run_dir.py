"""The run folder: what a run writes, which folders a run may use, and clean-up of a run that
fails or is interrupted before its first checkpoint.

A crlnseg run is recognised by its own ``settings.json`` and ``environment.json`` (:func:`is_run`).
A non-empty folder that is not a run is never used or cleared, even with ``--overwrite``; the run
folder must lie outside its inputs. What a fresh run creates is listed (:class:`Created`): when
it fails, or is interrupted, before its first checkpoint it is removed again
(:func:`discard_unsaved_run`), so nothing half-written blocks a retry, and a run it was
overwriting is put back (:mod:`crlnseg.train.overwrite`).

Layout written by ``crlnseg train`` (rank 0 only)::

    RUN/settings.json            resolved RunSettings
    RUN/environment.json         package versions, device, torch / CUDA, git commit when known
    RUN/metrics.jsonl            one JSON line per logging step (window means) and per validation
    RUN/training.png             curves of metrics.jsonl
    RUN/checkpoints/last.pt      iter_<N>.pt (periodic), best.pt (only with --val)
    RUN/prepared/{labelled,unlabelled,val}   caches of raw inputs prepared on the fly
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from crlnseg import signals
from crlnseg.checkpoint import load_checkpoint
from crlnseg.console import log
from crlnseg.data.manifest import is_prepared
from crlnseg.errors import CheckpointError, DataError, OutputExistsError, RunInterrupted, Terminated
from crlnseg.io.writers import check_outside
from crlnseg.settings import RunSettings
from crlnseg.train import overwrite as aside

__all__ = ["OUTPUTS", "CACHES", "Created", "is_run", "check_run_dir", "check_inputs", "remove",
           "discard_unsaved_run", "interrupted"]

OUTPUTS = ("checkpoints", "metrics.jsonl", "training.png", "settings.json", "environment.json")
CACHES = ("labelled", "unlabelled", "val")  # RUN/prepared/<name>: raw inputs prepared on the fly


@dataclass
class Created:
    """What this invocation created: removed again if the run fails before its first checkpoint
    (the run folder itself when it was new, plus the parents it needed)."""

    paths: list[Path] = field(default_factory=list)
    parents: list[Path] = field(default_factory=list)



def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run written by ``crlnseg train``: its ``settings.json`` has the
    sections of RunSettings and its ``environment.json`` lists the crlnseg version."""
    folder = Path(folder)
    settings = _read_json(folder / "settings.json")
    env = _read_json(folder / "environment.json")
    return (isinstance(settings, dict) and all(isinstance(settings.get(k), dict)
                                               for k in RunSettings.model_fields)
            and isinstance(env, dict) and isinstance(env.get("packages"), dict)
            and "crlnseg" in env["packages"])


def _only_caches(folder: Path) -> bool:
    """A folder holding nothing but ``prepared/`` caches of crlnseg (a run that never started)."""
    if any(entry.name != "prepared" for entry in folder.iterdir()):
        return False
    prepared = folder / "prepared"
    return not prepared.exists() or (prepared.is_dir() and all(
        c.name in CACHES and is_prepared(c) for c in prepared.iterdir()))


def check_run_dir(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None for a fresh run; refuses a folder it must not use:
    a non-empty folder that is not a crlnseg run is never used or cleared, even with --overwrite."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    run = out.is_dir() and is_run(out)
    last = out / "checkpoints" / "last.pt"
    if resume:
        if not out.exists():
            raise CheckpointError(f"{out}: nothing to resume (no such run folder)")
        if not run:
            raise CheckpointError(f"{out}: nothing to resume (not a crlnseg run: no settings.json "
                                  "and environment.json written by crlnseg train)")
        if not last.is_file():
            raise CheckpointError(f"{out}: nothing to resume (no checkpoints/last.pt); start "
                                  "again with --overwrite")
        return load_checkpoint(last)
    if not out.exists() or not any(out.iterdir()):
        return None
    if run:
        if not overwrite:
            if not last.is_file():
                raise OutputExistsError(f"{out} already holds a run that saved no checkpoint; "
                                        "use --overwrite to start again (--resume needs "
                                        "checkpoints/last.pt)")
            raise OutputExistsError(f"{out} already holds a run; use --resume to continue it or "
                                    "--overwrite to start again")
        return None
    if _only_caches(out):
        return None
    raise OutputExistsError(f"{out}: exists, is not empty and is not a crlnseg run folder; "
                            "choose a new or empty folder (--overwrite never clears a folder "
                            "that crlnseg train did not write)")


def check_inputs(out: Path, inputs: dict[str, Path | None]) -> None:
    """Every given input exists, and the run folder is neither an input nor inside one."""
    dst = out.resolve()
    for option, folder in inputs.items():
        if folder is None:
            continue
        if not Path(folder).exists():
            raise DataError(f"{option} {folder}: no such file or folder")
        check_outside(out, folder, option, "run folder")
        src = Path(folder).resolve()
        if any(dst / name == src or dst / name in src.parents for name in OUTPUTS):
            raise OutputExistsError(f"{option} {folder}: lies inside the run's own outputs in "
                                    f"{out}; move it out of the run folder")


def remove(paths: list[Path], parents: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() or path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()
    for folder in parents:
        try:
            folder.rmdir()
        except OSError:
            pass


def discard_unsaved_run(out: Path, created: Created, err: BaseException,
                        signum: int | None = None) -> BaseException:
    """After a fresh run failed or was interrupted before its first checkpoint: remove what this
    invocation wrote and put back a run it was overwriting; returns the exception to raise, a
    one-line RunInterrupted for a signal."""
    if (out / "checkpoints" / "last.pt").is_file():
        return err  # a checkpoint exists: --resume continues from it
    discard = created.paths
    own_folder = out in discard
    try:
        others = [] if own_folder else [
            p for p in out.iterdir()
            if p not in discard and p.name not in ("prepared", aside.PREVIOUS)]
    except OSError:  # the folder went away meanwhile: nothing left to clean, keep the error
        return interrupted(err, out, own_folder, signum)
    if others:  # files of the user's own: stay a (checkpoint-less) run, --overwrite may retry
        discard = [p for p in discard if p.name not in ("settings.json", "environment.json")]
    restored = False
    with signals.held():
        remove(discard, created.parents)
        if not own_folder:
            try:
                restored = aside.restore(out)
            except OSError as restore_err:  # the next crlnseg train on the folder tries again
                log(f"warning: {out}: could not put back the run set aside in "
                    f"{aside.PREVIOUS} ({restore_err.strerror or restore_err}); the next "
                    "crlnseg train on this folder does")
    return interrupted(err, out, own_folder, signum, restored)


def interrupted(err: BaseException, out: Path, removed_folder: bool,
                signum: int | None = None, restored: bool = False) -> BaseException:
    """``err``, or for a stop signal one RunInterrupted line saying what was cleaned up."""
    if signum is None and not isinstance(err, KeyboardInterrupt):
        return err
    term = signum == signal.SIGTERM or (signum is None and isinstance(err, Terminated))
    what = (f"removed {out}" if removed_folder else f"removed what it had written in {out}")
    if restored:
        what += " and put back the run it was overwriting"
    return RunInterrupted(f"{'terminated' if term else 'interrupted'} before the first "
                          f"checkpoint: no checkpoint was saved (nothing to --resume); {what}; "
                          "run the same command again to start afresh",
                          signals.exit_code(signal.SIGTERM if term else signal.SIGINT))
