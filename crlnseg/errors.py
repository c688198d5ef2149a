"""Error kinds. The CLI maps each to a one-line message and an exit status.

Library code raises these with a message that names the file or case and the problem, e.g.
``DataError(f"{path}: label shape {lab.shape} != image shape {img.shape}")``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

__all__ = ["CrlnsegError", "DataError", "ConfigError", "OutputExistsError", "CheckpointError",
           "RunFailure", "RunInterrupted", "Terminated", "on_failure"]


class CrlnsegError(Exception):
    """Base class; ``exit_code`` is what the CLI exits with."""

    exit_code = 1


class DataError(CrlnsegError):
    """Bad input data: unreadable, wrong shape/geometry/values, missing cases (exit 2)."""

    exit_code = 2


class ConfigError(CrlnsegError):
    """Invalid settings or options (exit 2)."""

    exit_code = 2


class OutputExistsError(CrlnsegError):
    """An output exists without ``--overwrite``, or the output is not writable (exit 2)."""

    exit_code = 2


class CheckpointError(CrlnsegError):
    """Missing, foreign or incompatible checkpoint (exit 2)."""

    exit_code = 2


class RunFailure(CrlnsegError):
    """A runtime failure such as running out of memory (exit 1)."""

    exit_code = 1


class RunInterrupted(CrlnsegError):
    """SIGINT / SIGTERM before a fresh training run saved its first checkpoint: what the run had
    written is removed; ``exit_code`` is 130 or 143 (128 + the signal)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt (a subclass, so every cleanup that
    handles an interrupt handles it too); the CLI exits 143 (128 + SIGTERM)."""


@contextlib.contextmanager
def on_failure(handler: Callable[[BaseException], BaseException | None]) -> Iterator[None]:
    """Clean up when the block raises anything (interrupts included): ``handler(err)`` runs and
    returns the exception to raise instead (None, or ``err`` itself: ``err`` goes on)."""
    try:
        yield
    except BaseException as err:
        replacement = handler(err)
        if replacement is None or replacement is err:
            raise
        raise replacement from None
