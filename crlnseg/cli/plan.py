"""`crlnseg plan DATA...`: what train would plan from the dataset fingerprint, and why."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crlnseg.cli.common import handle_errors

HELP = "\n\n".join([
    "Show the plan crlnseg train derives from a dataset: target spacing, intensity "
    "normalisation, pooling and kernels per axis, patch; each with its reason.",
    "DATA: dataset folders (raw or prepared), the labelled first; unlabelled folders after it. "
    "Values given by --preset, --config or --set are kept and marked as set.",
])


def register(app: typer.Typer) -> None:
    @app.command("plan", help=HELP)
    @handle_errors
    def plan(
        data: list[Path] = typer.Argument(..., help="Dataset folders, the labelled first."),
        preset: str | None = typer.Option(None, "--preset", help="A preset's values are kept."),
        config: Path | None = typer.Option(None, "--config", help="Settings file (YAML/JSON)."),
        modality: str | None = typer.Option(None, "--modality", help="auto, ct or other."),
        device: str = typer.Option("auto", "--device", help="Plan for auto, cpu or cuda."),
        sets: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="Override any setting (repeatable)."),
        as_json: bool = typer.Option(False, "--json", help="Print the plan as JSON."),
    ) -> None:
        from crlnseg import plan as stage
        from crlnseg.config import resolve_settings
        from crlnseg.errors import ConfigError

        if device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device {device!r}: use auto, cpu or cuda")
        settings = resolve_settings(preset, config, {"prepare": {"modality": modality}}, sets)
        result = stage.plan_dataset(data, settings, device)
        print(json.dumps(stage.as_json(result), indent=2) if as_json else stage.table(result))
