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
        target_spacing: tuple[float, float, float] = typer.Option(
            None, metavar="X Y Z", help="Resample to this spacing in mm (default: keep)."),
        normalize: str = typer.Option("zscore", help="zscore | ct | minmax | none."),
        ct_window: tuple[float, float] = typer.Option(
            (-1000.0, 1000.0), metavar="LO HI", help="Clip window for --normalize ct."),
        crop_nonzero: bool = typer.Option(
            False, "--crop-nonzero", help="Crop to the box of non-zero voxels."),
        interpolation: str = typer.Option("bspline", help="Image resampling: bspline | linear."),
        h5_spacing: tuple[float, float, float] = typer.Option(
            (1.0, 1.0, 1.0), metavar="X Y Z", help="Spacing of HDF5 cases (they store none)."),
        workers: int = typer.Option(1, "--workers", "-j", min=1, help="Parallel processes."),
        overwrite: bool = typer.Option(
            False, "--overwrite", help="Replace a cache made with other settings."),
        keep_going: bool = typer.Option(
            False, "--keep-going", help="Skip bad cases (listed at the end)."),
    ) -> None:
        from pydantic import ValidationError

        from crlnseg.prepare import prepare, summary
        from crlnseg.settings import PrepareSettings

        try:
            settings = PrepareSettings(
                target_spacing=target_spacing, normalize=normalize, ct_window=ct_window,
                crop_nonzero=crop_nonzero, interpolation=interpolation, h5_spacing=h5_spacing)
        except ValidationError as err:
            raise option_error(err) from None
        manifest = prepare(source, out, settings, workers=workers, overwrite=overwrite,
                           keep_going=keep_going)
        print(summary(manifest, out))
