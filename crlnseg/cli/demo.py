"""`crlnseg demo` (not implemented yet)."""

from __future__ import annotations

import typer

from crlnseg.cli.app import handle_errors, not_implemented


def register(app: typer.Typer) -> None:
    @app.command("demo", help="Run the whole pipeline on a generated synthetic dataset.")
    @handle_errors
    def demo() -> None:
        not_implemented("demo")
