"""The ``crlnseg`` Typer app: registers the commands and maps errors to exit statuses.

Known errors (:class:`crlnseg.errors.CrlnsegError`) become one red line on stderr and their exit
status (2 for bad input, 1 for runtime failures); ``--debug`` adds the traceback, never changes the
status. SIGTERM is handled like Ctrl-C (temporaries removed, one line, exit 128 + 15 = 143);
``crlnseg train`` replaces the handler during its loop to save a checkpoint first.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from functools import wraps
from typing import Any, TypeVar

import typer

from crlnseg import __version__

__all__ = ["app", "main", "handle_errors", "option_error", "state"]

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="crlnseg",
    help="Semi-supervised 3D medical image segmentation with Cooperative Rectification Learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

state = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"crlnseg {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors."),
) -> None:
    state["debug"] = debug


def fail(message: str, code: int) -> None:
    """Print one line on stderr and exit with ``code``."""
    from crlnseg.console import console

    if console.is_terminal:
        console.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    else:
        print(f"error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While a command runs, SIGTERM raises :class:`crlnseg.errors.Terminated`."""
    from crlnseg.errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        yield  # signal handlers can only be set from the main thread
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


def _traceback() -> None:
    if state["debug"]:
        traceback.print_exc(file=sys.stderr)


def handle_errors(func: F) -> F:
    """Wrap a command: known errors -> one line + exit status; others -> exit 1."""

    @wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from crlnseg.errors import CrlnsegError, Terminated

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
        except MemoryError:
            _traceback()
            fail("out of memory: try a smaller patch or batch, or --amp on CUDA", 1)
        except Exception as err:  # noqa: BLE001 - the CLI boundary
            _traceback()
            text = str(err).splitlines()[0] if str(err) else ""
            hint = "" if state["debug"] else " (run with --debug for the traceback)"
            fail(f"{type(err).__name__}: {text}{hint}", 1)

    return wrapper  # type: ignore[return-value]


def option_error(err: Any, options: dict[str, str] | None = None) -> Exception:
    """A settings model's first ValidationError as ``--option: message`` (``options`` renames
    fields whose option differs, e.g. sigma_scale -> sigma)."""
    from crlnseg.errors import ConfigError

    first = err.errors()[0]
    field = str(first["loc"][0]) if first["loc"] else ""
    option = (options or {}).get(field, field).replace("_", "-")
    message = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our checks
    return ConfigError(f"--{option}: {message}" if option else message)


def _register() -> None:
    # Each module defines ``register(app)``; importing them is cheap (no torch at import time).
    from crlnseg.cli import demo, evaluate, predict, prepare, rectify, train

    for module in (prepare, train, rectify, predict, evaluate, demo):
        module.register(app)


_register()


def main() -> None:
    """The ``crlnseg`` entry point: click's usage errors (unknown option, bad value) become one
    line on stderr and exit 2, as every other bad input does, instead of a framed block."""
    try:
        code = app(standalone_mode=False)  # a command's typer.Exit comes back as its code
        if isinstance(code, int):
            sys.exit(code)
    except typer.Exit as err:
        sys.exit(err.exit_code)
    except typer.Abort:  # EOF at a prompt (typer turns Ctrl-C while parsing into Exit(130))
        fail_now("interrupted", 130)
    except Exception as err:  # noqa: BLE001 - click's errors (typer may vendor click): duck-typed
        if not hasattr(err, "format_message"):
            raise
        code, message = int(getattr(err, "exit_code", 2)), err.format_message()
        if not message:  # e.g. no arguments: click has printed the help already
            sys.exit(code)
        ctx = getattr(err, "ctx", None)
        where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        fail_now(f"{message}{where}", code)


def fail_now(message: str, code: int) -> None:
    """:func:`fail` outside a command: print the line and leave the process."""
    try:
        fail(message, code)
    except typer.Exit as err:
        sys.exit(err.exit_code)
