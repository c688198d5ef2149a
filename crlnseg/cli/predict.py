"""`crlnseg predict` (not implemented yet)."""

from __future__ import annotations

import typer

from crlnseg.cli.app import handle_errors, not_implemented


def register(app: typer.Typer) -> None:
    @app.command("predict", help="Segment scans with a trained model.")
    @handle_errors
    def predict() -> None:
        not_implemented("predict")
