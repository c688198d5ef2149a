"""`crlnseg train` (not implemented yet)."""

from __future__ import annotations

import typer

from crlnseg.cli.app import handle_errors, not_implemented


def register(app: typer.Typer) -> None:
    @app.command("train", help="Train a model on labelled and unlabelled scans (CRLN, mean teacher or supervised).")
    @handle_errors
    def train() -> None:
        not_implemented("train")
