"""`crlnseg rectify IMAGES -o OUT -m RUN`: rectified pseudo-labels to review."""

from __future__ import annotations

from pathlib import Path

import typer

from crlnseg.cli.common import handle_errors
from crlnseg.cli.predict import (
    AMP,
    BATCH,
    BLEND,
    CHECKPOINT,
    DEVICE,
    MODEL,
    OVERLAP,
    OVERWRITE,
    SIGMA,
    STRIDE,
    TTA,
    TUNED,
    predict_settings,
)

HELP = "\n\n".join([
    "Write rectified pseudo-labels of unlabelled scans, with their confidence, for review.",
    "Per case, in OUT: <ID>_rectified, <ID>_raw (unrectified teacher), <ID>_confidence (float "
    "max softmax of the rectified output), <ID>_reliable (confidence >= threshold), with the "
    "input's geometry and extension; summary.csv and summary.json (case, mu, reliable_raw, "
    "reliable_rectified, seconds; with --labels also dice_raw, dice_rectified, "
    "dice_raw_reliable, dice_rectified_reliable); --preview: preview/<ID>.png.",
])


def register(app: typer.Typer) -> None:
    @app.command("rectify", help=HELP)
    @handle_errors
    def rectify(
        images: list[Path] = typer.Argument(..., metavar="IMAGES...", help="Image file(s) of one "
                                            "case, or a folder of cases."),
        out: Path = typer.Option(..., "-o", "--output", help="Output folder."),
        model: Path = MODEL, checkpoint: str = CHECKPOINT,
        labels: Path | None = typer.Option(None, "--labels",
            help="Folder of ground-truth <ID> masks: "
                 "adds Dice of raw and rectified pseudo-labels."),
        threshold: float = typer.Option(0.97, "--threshold", min=0.0, max=1.0,
                                        help="Confidence of a reliable voxel."),
        preview: bool = typer.Option(False, "--preview", help="Write preview/<ID>.png."),
        device: str = DEVICE, tta: bool = TTA, overlap: float = OVERLAP,
        sigma: float | None = SIGMA,
        stride: tuple[int, int, int] | None = STRIDE,
        blend: str | None = BLEND, batch_size: int = BATCH,
        tuned: bool = TUNED, amp: bool = AMP, overwrite: bool = OVERWRITE,
    ) -> None:
        from crlnseg.rectify import rectify_paths

        settings = predict_settings(overlap, stride, blend, batch_size, tta, device, amp, sigma,
                                    tuned=tuned)
        rectify_paths(images, out, model, settings, which=checkpoint, labels=labels,
                      threshold=threshold, preview=preview, overwrite=overwrite)
