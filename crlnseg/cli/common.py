"""What every command shares: the ``--debug`` state, one-line failures, the error-to-exit-status
wrapper (SIGTERM acts as an interrupt while a command runs, :mod:`crlnseg.signals`) and
settings errors as ``--option: message``; the command classes whose help lists a flag as a flag
(no ``<bool>`` / ``BOOLEAN`` placeholder: a flag takes no value).

Kept apart from :mod:`crlnseg.cli.app`, which imports every command module to register it, so that
a command module can be imported on its own (``import crlnseg.cli.predict``) without a cycle.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import typer
from typer.core import TyperCommand, TyperGroup

__all__ = ["state", "fail", "handle_errors", "option_error", "Command", "Group"]

F = TypeVar("F", bound=Callable[..., Any])

state = {"debug": False}


def fail(message: str, code: int) -> None:
    """Print one line on stderr and exit with ``code``."""
    from crlnseg.console import console

    if console.is_terminal:
        console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


def _traceback() -> None:
    if state["debug"]:
        traceback.print_exc(file=sys.stderr)


def handle_errors(func: F) -> F:
    """Wrap a command: known errors -> one line + exit status; others -> exit 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from crlnseg.errors import CrlnsegError, Terminated
        from crlnseg.signals import sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                return func(*args, **kwargs)
        except (typer.Exit, typer.Abort, SystemExit):
            raise
        except CrlnsegError as err:
            _traceback()
            fail(str(err).splitlines()[0] if str(err) else type(err).__name__, err.exit_code)
        except Terminated:
            fail("terminated", 128 + signal.SIGTERM)
        except KeyboardInterrupt:
            fail("interrupted", 130)
        except BrokenPipeError:  # `crlnseg ... | head`: the reader left, as a shell tool
            _quiet_stdout()
            raise SystemExit(128 + signal.SIGPIPE) from None
        except MemoryError:
            _traceback()
            fail("out of memory: try a smaller patch or batch, or --amp on CUDA", 1)
        except Exception as err:  # noqa: BLE001 - the CLI boundary
            _traceback()
            text = str(err).splitlines()[0] if str(err) else ""
            hint = "" if state["debug"] else " (run with --debug for the traceback)"
            fail(f"{type(err).__name__}: {text}{hint}", 1)

    return wrapper  # type: ignore[return-value]


def _quiet_stdout() -> None:
    """Point stdout at /dev/null so that Python's flush at exit does not fail again."""
    import os
    import sys

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # no real file descriptor (a test runner's capture)
        pass


def option_error(err: Any, options: dict[str, str] | None = None) -> Exception:
    """A settings model's first ValidationError as ``--option: message`` (``options`` renames
    fields whose option differs, e.g. sigma_scale -> sigma)."""
    from crlnseg.errors import ConfigError

    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    option = (options or {}).get(field, field).replace("_", "-")
    message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our checks
    return ConfigError(f"--{option}: {message}" if option else message)


def _flags_take_no_placeholder(command: Any, ctx: Any) -> None:
    # Help shows an option's metavar in place of its type; an empty one shows nothing.
    for param in command.get_params(ctx):
        if getattr(param, "is_flag", False) and not getattr(param, "count", False) \
                and param.metavar is None:
            param.metavar = ""


class Command(TyperCommand):
    """A command whose help shows flags (``--overwrite``, ``--amp/--no-amp``, ``--help``) bare."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _flags_take_no_placeholder(self, ctx)
        super().format_help(ctx, formatter)


class Group(TyperGroup):
    """The command group, its flags (``--version``, ``--debug``, ``--help``) shown bare."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        _flags_take_no_placeholder(self, ctx)
        super().format_help(ctx, formatter)
