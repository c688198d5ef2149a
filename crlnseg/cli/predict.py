"""`crlnseg predict INPUT... -o OUTPUT -m RUN`: masks on the inputs' exact grids."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from crlnseg.cli.common import handle_errors, option_error

if TYPE_CHECKING:
    from crlnseg.settings import PredictSettings

HELP = "\n\n".join([
    "Segment scans with a trained run (the EMA teacher of its last checkpoint).",
    "INPUT is one image, the channel files of one case (<ID>_0000.nii.gz, <ID>_0001.nii.gz...: "
    "one ID, channels 0..C-1), or a folder of cases; OUTPUT is then a mask file (or a folder "
    "receiving <ID><ext>, with the input's extension: img.mha gives img.mha; HDF5 gives .nii.gz), "
    "or a folder with one mask per case, named <ID><ext> likewise.",
    "Output: softmax(f + (1 - mu) M) of the sliding window, argmax, on the input's exact grid. "
    "stdout: one tab-separated line per case: case, seconds, <class>=<voxels> per class.",
])


def predict_settings(overlap: float, stride: tuple[int, int, int] | None, blend: str | None,
                     batch_size: int, tta: bool, device: str, amp: bool,
                     sigma: float | None = None, **extra: Any) -> PredictSettings:
    """Options -> PredictSettings; an explicit --stride means uniform blending unless --blend."""
    from pydantic import ValidationError

    from crlnseg.errors import ConfigError
    from crlnseg.settings import PredictSettings

    mode = blend or ("uniform" if stride else "gaussian")
    if sigma is not None:
        if mode == "uniform":
            raise ConfigError("--sigma: only Gaussian blending has a sigma (an explicit --stride "
                              "means uniform blending unless --blend gaussian)")
        extra["sigma_scale"] = sigma
    try:
        return PredictSettings(overlap=overlap, stride=stride, mode=mode, batch_size=batch_size,
                               tta=tta, device=device, amp=amp, **extra)
    except ValidationError as err:
        raise option_error(err, {"sigma_scale": "sigma"}) from None


# Options shared with `crlnseg rectify`.
MODEL = typer.Option(..., "-m", "--model", help="Run folder or checkpoint file (.pt).")
CHECKPOINT = typer.Option("last", "--checkpoint", help="last, best, or a checkpoint PATH.")
DEVICE = typer.Option("auto", "--device", help="auto, cpu or cuda.")
TTA = typer.Option(False, "--tta", help="Average the softmax over the 8 flips of X, Y, Z.")
OVERLAP = typer.Option(0.5, "--overlap", help="Patch overlap (Gaussian blending).")
STRIDE = typer.Option(None, "--stride", metavar="X Y Z", help="Explicit stride in voxels, "
                      "uniform blending (literature LA protocol: 18 18 4).")
SIGMA = typer.Option(None, "--sigma", help="Gaussian sigma as a share of the patch side "
                     "(default: the run's choice on its validation set, else 0.125 = 1/8, "
                     "nnU-Net's; 0.333 suited well-trained CRLN models on LA).")
TUNED = typer.Option(True, "--tuned/--no-tuned", help="Use the sigma (and, for predict, "
                     "--keep-largest) the run chose on its validation set, where not given "
                     "explicitly; --no-tuned: the built-in defaults.")
BLEND = typer.Option(None, "--blend", help="gaussian or uniform (default: gaussian; uniform "
                     "with --stride).")
BATCH = typer.Option(2, "--batch-size", help="Patches per forward pass.")
AMP = typer.Option(True, "--amp/--no-amp", help="Mixed precision on CUDA.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace existing outputs.")


def register(app: typer.Typer) -> None:
    @app.command("predict", help=HELP)
    @handle_errors
    def predict(
        inputs: list[Path] = typer.Argument(..., metavar="INPUT...", help="Image file(s) of one "
                                            "case, or a folder of cases."),
        output: Path = typer.Option(..., "-o", "--output", help="Mask file or output folder."),
        model: Path = MODEL, checkpoint: str = CHECKPOINT, device: str = DEVICE,
        tta: bool = TTA, overlap: float = OVERLAP, sigma: float | None = SIGMA,
        stride: tuple[int, int, int] | None = STRIDE,
        blend: str | None = BLEND, batch_size: int = BATCH,
        save_probabilities: bool = typer.Option(False, "--save-probabilities", help="Also write "
                                                "<ID>_probabilities.npz (float16, C X Y Z)."),
        keep_largest: bool | None = typer.Option(
            None, "--keep-largest/--no-keep-largest", show_default=False,
            help="Keep the largest connected component of each class (default: as the run "
            "chose on its validation set, else off)."),
        no_rectify: bool = typer.Option(False, "--no-rectify", help="Output softmax(f) alone."),
        tuned: bool = TUNED, amp: bool = AMP, overwrite: bool = OVERWRITE,
    ) -> None:
        from crlnseg.predict import predict_paths

        settings = predict_settings(overlap, stride, blend, batch_size, tta, device, amp, sigma,
                                    keep_largest=keep_largest, rectify=not no_rectify,
                                    tuned=tuned)
        predict_paths(inputs, output, model, settings, which=checkpoint,
                      probabilities=save_probabilities, overwrite=overwrite)
