"""``train --overwrite`` replaces a run as a whole or not at all.

The old run's outputs wait in ``RUN_DIR/.crlnseg-previous`` until the new run's first checkpoint
(then they are deleted) and move back if the new run fails before it. The process that set them
aside holds an exclusive ``flock`` on ``.crlnseg-previous/.lock`` for as long as it lives; the
kernel releases it when the process dies, however it dies. So the next ``crlnseg train`` on the
folder knows an overwrite killed outright (lock free: the old run is put back) from one still
running (lock held: refused as "in use").

Moves go checkpoints first when setting aside and last when putting back, so
``checkpoints/last.pt`` at the top always means the top holds a whole run. SIGINT / SIGTERM wait
until a move is done (:func:`crlnseg.signals.held`).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path

from crlnseg import signals
from crlnseg.console import log
from crlnseg.errors import OutputExistsError

__all__ = ["PREVIOUS", "set_aside", "restore", "settle", "drop"]

PREVIOUS = ".crlnseg-previous"
LOCK = ".lock"
_held: dict[Path, int] = {}  # PREVIOUS folder -> the fd holding its lock (this process's)


def _order(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: n != "checkpoints")


def _lock(previous: Path) -> int | None:
    """The lock's fd, or None when another living process holds it."""
    fd = os.open(previous / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _release(previous: Path) -> None:
    fd = _held.pop(previous, None)
    if fd is not None:
        os.close(fd)


def set_aside(out: Path, names: tuple[str, ...]) -> None:
    """Move the old run's ``names`` into ``out/PREVIOUS`` (all or none) and lock it."""
    previous = out / PREVIOUS
    present = _order([n for n in names if (out / n).exists() or (out / n).is_symlink()])
    if not present:
        return
    moved: list[str] = []
    with signals.held(deliver=True):
        try:
            previous.mkdir()
            fd = _lock(previous)
            assert fd is not None  # a folder made just now
            _held[previous] = fd
            for name in present:
                (out / name).rename(previous / name)
                moved.append(name)
        except OSError as err:
            for name in reversed(moved):
                (previous / name).rename(out / name)
            _release(previous)
            shutil.rmtree(previous, ignore_errors=True)
            raise OutputExistsError(f"{out}: cannot set the old run aside for --overwrite "
                                    f"({err.strerror or err})") from None


def restore(out: Path) -> bool:
    """Move a run set aside back over what the new run wrote; whether there was one."""
    previous = out / PREVIOUS
    if not previous.is_dir() or previous.is_symlink():
        return False
    with signals.held():
        names = [p.name for p in previous.iterdir() if p.name != LOCK]
        for name in reversed(_order(names)):
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            (previous / name).rename(target)
        with contextlib.suppress(FileNotFoundError):
            (previous / LOCK).unlink()
        _release(previous)
        previous.rmdir()
    return True


def drop(out: Path) -> None:
    """The new run saved a checkpoint: the run it overwrote goes for good (best effort; a
    leftover is removed by the next ``crlnseg train`` on this folder)."""
    previous = out / PREVIOUS
    if previous.is_dir() and not previous.is_symlink():
        shutil.rmtree(previous, ignore_errors=True)
        _release(previous)


def settle(out: Path) -> None:
    """An overwrite killed outright leaves the run it replaced in ``out/PREVIOUS``: drop it if
    the new run saved a checkpoint, put it back if not, refuse while that process still runs."""
    previous = out / PREVIOUS
    if not previous.is_dir() or previous.is_symlink():
        return
    if (out / "checkpoints" / "last.pt").is_file():
        try:
            shutil.rmtree(previous)
        except OSError as err:
            raise OutputExistsError(f"{previous}: cannot remove the run an earlier --overwrite "
                                    f"replaced ({err.strerror or err}); remove it by hand"
                                    ) from None
        return
    fd = _held.get(previous) or _lock(previous)
    if fd is None:
        raise OutputExistsError(f"{out}: in use: another crlnseg train is replacing this run "
                                "(--overwrite) and has not saved a checkpoint yet; wait for it "
                                "or stop it")
    _held[previous] = fd
    if restore(out):
        log(f"{out}: put back the run that an interrupted --overwrite had set aside")
