"""`crlnseg evaluate PRED GT`: Dice, Jaccard, HD95 and ASD per case and class, plus a summary."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from crlnseg.cli.common import handle_errors, option_error

HELP = "\n\n".join([
    "Compare predicted masks with ground truth: Dice, Jaccard, HD95, ASD (equal to medpy).",
    "PRED and GT are two mask files or two folders of masks (cases matched by ID). Distances are "
    "in mm (GT header spacing) unless --voxel-units.",
    "Empty masks: both empty -> Dice 1, Jaccard 1, distances 0; one empty -> Dice 0, Jaccard 0, "
    "distances undefined (null in JSON, empty in CSV), counted as n_undefined in the summary and "
    "left out of its distance statistics (never averaged as 0).",
    "Summary per class: mean, population std, median, n and, with --bootstrap N, a seeded 95% "
    "bootstrap interval of the mean. Output: a table on a terminal, else JSON (or CSV) on stdout, "
    "or -o FILE.",
])

FORMATS = ("table", "json", "csv")


def register(app: typer.Typer) -> None:
    @app.command("evaluate", help=HELP)
    @handle_errors
    def evaluate(
        pred: Path = typer.Argument(..., help="Predicted mask file or folder."),
        gt: Path = typer.Argument(..., help="Ground-truth mask file or folder."),
        classes: str | None = typer.Option(None, "--classes", help="Labels to evaluate, e.g. 1,2,3 "
                                    "(default: every non-zero label of any GT case)."),
        voxel_units: bool = typer.Option(False, "--voxel-units",
                                         help="Distances in voxels (spacing 1) instead of mm."),
        fmt: str | None = typer.Option(None, "--format",
            help="table, json or csv (default: table on "
                 "a terminal, else json; with -o: from the file suffix)."),
        output: Path | None = typer.Option(None, "-o", "--output",
            help="Write the report to this file."),
        bootstrap: int = typer.Option(0, "--bootstrap", help="Bootstrap resamples for the 95% "
                                      "interval of each mean (0: none)."),
        seed: int = typer.Option(0, "--seed", help="Seed of the bootstrap."),
        workers: int = typer.Option(1, "--workers", help="Processes computing cases in parallel."),
        threads: int | None = typer.Option(None, "--threads", help="Threads of each process for "
                                           "the surface distances (default: the CPU cores "
                                           "divided among --workers)."),
        allow_missing: bool = typer.Option(False, "--allow-missing", help="Score cases present "
                                           "on one side only as failures (Dice 0)."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing -o FILE."),
    ) -> None:
        from pydantic import ValidationError

        from crlnseg.errors import ConfigError
        from crlnseg.evaluate import (
            EvaluateSettings,
            check_output,
            evaluate_pairs,
            plan_pairs,
            write_text,
        )

        fmt = fmt or _default_format(output)
        if fmt not in FORMATS:
            raise ConfigError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
        try:
            settings = EvaluateSettings(classes=_parse_classes(classes), voxel_units=voxel_units,
                                        bootstrap=bootstrap, seed=seed, workers=workers,
                                        threads=threads, allow_missing=allow_missing)
        except ValidationError as err:
            raise option_error(err) from None
        pairs = plan_pairs(pred, gt, allow_missing)
        if output is not None:  # before the metrics, which may take long
            check_output(output, pairs, overwrite)
        report = evaluate_pairs(pairs, settings)
        if output is None:
            sys.stdout.write(report.render(fmt, color=sys.stdout.isatty()))
        else:
            write_text(output, report.render(fmt), overwrite=overwrite)


def _default_format(output: Path | None) -> str:
    if output is not None:
        return "csv" if output.suffix.lower() == ".csv" else "json"
    return "table" if sys.stdout.isatty() else "json"


def _parse_classes(text: str | None) -> list[int] | None:
    from crlnseg.errors import ConfigError

    if text is None:
        return None
    try:
        labels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise ConfigError(f"--classes {text!r}: expected integers such as 1,2,3") from err
    if not labels:
        raise ConfigError(f"--classes {text!r}: no label given")
    return sorted(set(labels))
