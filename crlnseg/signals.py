"""Every SIGINT / SIGTERM rule of crlnseg, in one place.

| where                         | SIGINT (Ctrl-C)            | SIGTERM                          |
|-------------------------------|----------------------------|----------------------------------|
| any command                   | KeyboardInterrupt          | :class:`Terminated` (a subclass) |
| the training loop             | finish the iteration, save ``last.pt``, exit 130 / 143        |
| a launcher of training ranks  | forwarded to the ranks, remembered                            |
| data-loader workers           | ignored (the loop decides) | default                          |
| a clean-up or a move          | held until the block ends (:func:`held`)                      |

Handlers can only be set from the main thread; elsewhere these helpers do nothing.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

from crlnseg.errors import Terminated

__all__ = ["STOP_SIGNALS", "StopFlag", "stop_requested", "forward_to_children", "held",
           "sigterm_as_interrupt", "ignore_interrupt", "exit_code"]

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def exit_code(signum: int) -> int:
    """The shell's convention: 128 + the signal (130 for SIGINT, 143 for SIGTERM)."""
    return 128 + int(signum)


class StopFlag:
    """The first stop signal received (``signum``), for a loop that stops at a safe point."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def note(self, signum: int, frame: Any = None) -> None:
        self.signum = signum


@contextlib.contextmanager
def _handled(handler: Any) -> Iterator[None]:
    if not _main_thread():
        yield
        return
    previous = {n: signal.signal(n, handler) for n in STOP_SIGNALS}
    try:
        yield
    finally:
        for n, old in previous.items():
            signal.signal(n, old)


@contextlib.contextmanager
def stop_requested() -> Iterator[StopFlag]:
    """In the training loop: SIGINT / SIGTERM only set the flag; the loop checks it after each
    iteration, saves a checkpoint and stops."""
    flag = StopFlag()
    with _handled(flag.note):
        yield flag


@contextlib.contextmanager
def forward_to_children() -> Iterator[StopFlag]:
    """In a launcher of training processes: pass SIGINT / SIGTERM on to them, remember it."""
    flag = StopFlag()

    def forward(signum: int, frame: Any) -> None:
        flag.note(signum)
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(child.pid, signum)  # type: ignore[arg-type]

    with _handled(forward):
        yield flag


@contextlib.contextmanager
def held(deliver: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM cannot cut the block short: a clean-up or a move cut in half is worse
    than a stop that comes a moment late. ``deliver``: the first one received acts as usual when
    the block ends (a scheduler sends its one SIGTERM once); else it is dropped (the block runs
    on the way out already)."""
    flag = StopFlag()
    with _handled(flag.note):
        yield
    if deliver and flag.signum is not None:
        signal.raise_signal(flag.signum)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`Terminated`, so every clean-up that handles
    Ctrl-C handles it too."""
    if not _main_thread():
        yield
        return
    owner = os.getpid()

    def terminate(signum: int, frame: Any) -> None:
        if os.getpid() != owner:  # a forked worker (process pool): die as it would have
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def ignore_interrupt(worker_id: int = 0) -> None:
    """Data-loader worker start-up: Ctrl-C reaches the whole process group, and the workers must
    keep serving while the loop saves its checkpoint and exits."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
