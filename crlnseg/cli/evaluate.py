"""`crlnseg evaluate` (not implemented yet)."""

from __future__ import annotations

import typer

from crlnseg.cli.app import handle_errors, not_implemented


def register(app: typer.Typer) -> None:
    @app.command("evaluate", help="Compare predicted masks with ground truth (Dice, Jaccard, HD95, ASD).")
    @handle_errors
    def evaluate() -> None:
        not_implemented("evaluate")
