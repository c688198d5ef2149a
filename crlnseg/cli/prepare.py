"""`crlnseg prepare SOURCE -o OUT`: validate and preprocess scans into the training cache."""

from __future__ import annotations

from pathlib import Path

import typer

from crlnseg.cli.common import handle_errors, option_error


def register(app: typer.Typer) -> None:
    @app.command("prepare", help="Validate and preprocess scans into a fast training cache.")
    @handle_errors
    def prepare(
        source: Path = typer.Argument(..., help="Dataset folder (images/+labels/, nnU-Net "
                                      "imagesTr/, flat images, <ID>/mri_norm2.h5) or one file."),
        out: Path = typer.Option(..., "--out", "-o", help="Output cache folder."),
        target_spacing: tuple[float, float, float] | None = typer.Option(
            None, metavar="X Y Z", help="Resample to this spacing in mm (default: planned, the "
            "per-axis median; with --no-plan: keep each case's)."),
        normalize: str | None = typer.Option(
            None, help="zscore | ct | minmax | none (default: planned, ct for CT, else zscore)."),
        modality: str | None = typer.Option(None, help="auto | ct | other (auto: dataset.json)."),
        ct_window: tuple[float, float] | None = typer.Option(
            None, metavar="LO HI", help="Clip window for --normalize ct (planned for CT)."),
        crop_nonzero: bool | None = typer.Option(
            None, "--crop-nonzero", help="Crop to the box of non-zero voxels."),
        interpolation: str | None = typer.Option(None, help="Image resampling: bspline | linear."),
        h5_spacing: tuple[float, float, float] | None = typer.Option(
            None, metavar="X Y Z", help="Spacing of HDF5 cases (they store none; default 1 1 1)."),
        orientation: str | None = typer.Option(
            None, help="canonical (default: the closest RAS axis order) | input (keep each "
            "file's array order)."),
        plan: bool = typer.Option(True, "--plan/--no-plan",
                                  help="Plan what no option gives from the dataset."),
        workers: int = typer.Option(1, "--workers", "-j", min=1, help="Parallel processes."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace a cache made with other settings."),
        keep_going: bool = typer.Option(
            False, "--keep-going", help="Skip bad cases (listed at the end)."),
    ) -> None:
        from pydantic import ValidationError

        from crlnseg.prepare import prepare, summary
        from crlnseg.settings import PrepareSettings

        given = {"target_spacing": target_spacing, "normalize": normalize, "modality": modality,
                 "ct_window": ct_window, "crop_nonzero": crop_nonzero,
                 "interpolation": interpolation, "h5_spacing": h5_spacing,
                 "orientation": orientation}
        try:
            settings = PrepareSettings(**{k: v for k, v in given.items() if v is not None})
        except ValidationError as err:
            raise option_error(err) from None
        manifest = prepare(source, out, settings, workers=workers, overwrite=overwrite,
                           keep_going=keep_going, plan=plan)
        print(summary(manifest, out))
