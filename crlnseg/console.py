"""One rich console on stderr; plain periodic log lines when stderr is not a terminal.

stdout carries only results so that pipes stay clean.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from rich.console import Console

__all__ = ["console", "log", "track", "is_interactive"]

T = TypeVar("T")

console = Console(stderr=True, highlight=False)


def is_interactive() -> bool:
    return console.is_terminal


def log(message: str) -> None:
    """A status line on stderr (plain text when not a terminal)."""
    if is_interactive():
        console.print(message)
    else:
        print(message, file=sys.stderr, flush=True)


def track(items: Iterable[T], description: str, total: int | None = None,
          every_seconds: float = 10.0) -> Iterator[T]:
    """Iterate with a progress bar on a terminal, else with a log line every ``every_seconds``."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    if is_interactive():
        from rich.progress import track as rich_track

        yield from rich_track(items, description=description, total=total, console=console,
                              transient=True)
        return
    last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_seconds or done == total:
            of = f"/{total}" if total is not None else ""
            print(f"{description} {done}{of}", file=sys.stderr, flush=True)
            last = now
