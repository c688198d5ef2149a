"""`crlnseg prepare` (not implemented yet)."""

from __future__ import annotations

import typer

from crlnseg.cli.app import handle_errors, not_implemented


def register(app: typer.Typer) -> None:
    @app.command("prepare", help="Validate and preprocess scans into a fast training cache.")
    @handle_errors
    def prepare() -> None:
        not_implemented("prepare")
