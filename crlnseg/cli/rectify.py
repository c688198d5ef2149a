"""`crlnseg rectify` (not implemented yet)."""

from __future__ import annotations

import typer

from crlnseg.cli.app import handle_errors, not_implemented


def register(app: typer.Typer) -> None:
    @app.command("rectify", help="Write rectified pseudo-labels and confidence maps for unlabelled scans.")
    @handle_errors
    def rectify() -> None:
        not_implemented("rectify")
