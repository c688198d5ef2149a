"""`crlnseg demo`: generate a synthetic dataset and run every stage on it."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from crlnseg.cli.common import handle_errors
from crlnseg.demo import EXPECTED_TIME, FULL

HELP = (
    f"Run the whole pipeline on a generated synthetic dataset: {EXPECTED_TIME}.\n\n"
    "Generates a small cardiac-like dataset (a bright irregular chamber with attached veins among "
    "similarly bright distractors, bias field and noise: 4 labelled, 8 unlabelled and 4 test "
    "scans), then runs prepare -> train (CRLN, cpu preset) -> rectify (pseudo-labels of the "
    "unlabelled scans, scored against their hidden labels) -> predict (test scans) -> evaluate.\n\n"
    "Each stage says what it does on stderr; the final Dice table goes to stdout; every artefact "
    "stays in DIR (data/, prepared/, run/, pseudo_labels/, predictions/, evaluation.json). A "
    "non-empty DIR is refused unless --overwrite, which replaces only those artefacts."
)


def register(app: typer.Typer) -> None:
    @app.command("demo", help=HELP)
    @handle_errors
    def demo(
        output: Path = typer.Option(Path("crlnseg-demo"), "-o", "--output", metavar="DIR",
                                    help="Folder for every artefact."),
        overwrite: bool = typer.Option(False, "--overwrite",
                                       help="Replace the artefacts of an earlier demo in DIR."),
        iterations: int | None = typer.Option(None, "--iterations", min=1,
                                       help=f"Training iterations (default {FULL.iterations})."),
        seed: int = typer.Option(0, "--seed", help="Seed of the dataset and of training."),
        device: str = typer.Option("cpu", "--device", help="cpu, cuda or auto."),
        quick: bool = typer.Option(False, "--quick", hidden=True,
                                   help="Tiny volumes and a few iterations (the test's setting)."),
    ) -> None:
        from crlnseg.console import log
        from crlnseg.demo import run_demo

        result = run_demo(output, seed=seed, iterations=iterations, quick=quick,
                          overwrite=overwrite, device=device)
        sys.stdout.write(result.report.to_table(color=sys.stdout.isatty()))
        p = result.pseudo
        if "dice_raw" in p:
            print(f"Pseudo-labels of the unlabelled scans: Dice raw {p['dice_raw']:.4f}, "
                  f"rectified {p['dice_rectified']:.4f}; reliable voxels "
                  f"{p['reliable_raw']:.1%} -> {p['reliable_rectified']:.1%} (mu {p['mu']:.3f})")
        total = sum(result.seconds.values())
        log(f"demo finished in {total / 60:.1f} min; artefacts in {result.out}")
