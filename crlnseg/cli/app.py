"""The ``crlnseg`` Typer app: registers the commands and maps errors to exit statuses.

Known errors (:class:`crlnseg.errors.CrlnsegError`) become one red line on stderr and their exit
status (2 for bad input, 1 for runtime failures); ``--debug`` adds the traceback, never changes the
status. SIGTERM is handled like Ctrl-C (temporaries removed, one line, exit 128 + 15 = 143);
``crlnseg train`` replaces the handler during its loop to save a checkpoint first.
"""

from __future__ import annotations

import sys

import typer
from typer.core import TyperCommand

from crlnseg import __version__
from crlnseg.cli.common import Command, Group, fail, handle_errors, option_error, state

__all__ = ["app", "main", "handle_errors", "option_error", "state"]

app = typer.Typer(
    name="crlnseg",
    help="Semi-supervised 3D medical image segmentation with Cooperative Rectification Learning.",
    no_args_is_help=True,
    add_completion=False,
    cls=Group,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


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


def _register() -> None:
    # Each module defines ``register(app)``; importing them is cheap (no torch at import time).
    from crlnseg.cli import demo, evaluate, plan, predict, prepare, rectify, train

    for module in (prepare, plan, train, rectify, predict, evaluate, demo):
        module.register(app)
    for command in app.registered_commands:  # flags shown bare in every command's help
        if command.cls in (None, TyperCommand):
            command.cls = Command


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
