"""`crlnseg train`: semi-supervised training into a run folder (resumable, multi-process)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from crlnseg.cli.common import handle_errors

HELP = "\n\n".join([
    "Train a model on labelled and unlabelled scans (CRLN, mean teacher or supervised).",
    "--labelled / --unlabelled / --val take raw folders (the layouts prepare reads) or prepare "
    "outputs; raw folders are prepared into RUN_DIR/prepared (reused by later runs).",
    "Settings: defaults < --preset < --config FILE (YAML/JSON) < options < --set key=value "
    "(e.g. --set method.xi=0.9 --set train.patch=96,96,96). --print-config shows the result.",
    "RUN_DIR gets settings.json, environment.json, metrics.jsonl, training.png and checkpoints/ "
    "(last.pt, iter_<N>.pt, best.pt with --val). SIGINT/SIGTERM save last.pt and exit with "
    "128+signal (130/143); --resume continues exactly (same data and number of processes); "
    "--resume --iterations N extends a run (the poly schedule is recomputed for the new total). "
    "A new run that fails or is interrupted before its first checkpoint removes what it wrote.",
    "RUN_DIR must be new, empty or a crlnseg run (--overwrite replaces a run, never a folder "
    "crlnseg did not write) and outside the input folders.",
    "Multi-GPU: --gpus N; or torchrun --nproc-per-node N -m crlnseg train ...; CPU processes for "
    "testing: --device cpu --nproc N.",
])


def register(app: typer.Typer) -> None:
    @app.command("train", help=HELP)
    @handle_errors
    def train(
        labelled: Path | None = typer.Option(None, "--labelled",
                                      help="Images + labels (raw or prepared)."),
        unlabelled: Path | None = typer.Option(None, "--unlabelled",
            help="Images (raw or prepared)."),
        output: Path | None = typer.Option(None, "-o", "--output", help="Run folder RUN_DIR."),
        val: Path | None = typer.Option(None, "--val",
            help="Validation images + labels (never the test "
                 "set): Dice during training and best.pt."),
        config: Path | None = typer.Option(None, "--config", help="Settings file (YAML or JSON)."),
        preset: str | None = typer.Option(None, "--preset",
            help="la8, la16, pancreas6, pancreas12, "
                 "brats25, brats50 or cpu."),
        method: str | None = typer.Option(None, "--method",
            help="crln, mean-teacher or supervised."),
        iterations: int | None = typer.Option(None, "--iterations", help="Training iterations."),
        patch: tuple[int, int, int] | None = typer.Option(None, "--patch", help="Crop size X Y Z."),
        batch_labelled: int | None = typer.Option(None, "--batch-labelled", help="Labelled crops."),
        batch_unlabelled: int | None = typer.Option(None, "--batch-unlabelled",
            help="Unlabelled crops."),
        base_filters: int | None = typer.Option(None, "--base-filters", help="Backbone width."),
        device: str | None = typer.Option(None, "--device", help="auto, cpu or cuda."),
        gpus: int = typer.Option(0, "--gpus", help="Train with N CUDA processes (N >= 0)."),
        nproc: int = typer.Option(1, "--nproc",
            help="Processes, >= 1 (CPU ranks with --device cpu)."),
        amp: bool | None = typer.Option(None, "--amp/--no-amp", help="Mixed precision on CUDA."),
        seed: int | None = typer.Option(None, "--seed", help="Random seed, 0 .. 2**63 - 1."),
        log_every: int | None = typer.Option(None, "--log-every",
            help="Iterations per metrics line."),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in RUN_DIR."),
        overwrite: bool = typer.Option(False, "--overwrite", help="Replace a run in RUN_DIR."),
        sets: list[str] = typer.Option([], "--set",
                                       help="Override any setting: section.key=value."),
        print_config: bool = typer.Option(False, "--print-config", help="Print the resolved "
                                          "settings as JSON and exit (model.in_channels, "
                                          "model.num_classes and prepare.* are taken from the "
                                          "labelled data when training starts)."),
    ) -> None:
        from crlnseg.config import resolve_settings, saved_run_settings
        from crlnseg.errors import ConfigError

        options = {"method": {"method": method}, "model": {"base_filters": base_filters},
                   "train": {"iterations": iterations, "patch": patch, "seed": seed,
                             "batch_labelled": batch_labelled, "device": device, "amp": amp,
                             "batch_unlabelled": batch_unlabelled, "log_every": log_every}}
        if resume and overwrite:
            raise ConfigError("--resume and --overwrite contradict each other: --resume "
                              "continues the run, --overwrite starts it again; give one of them")
        if nproc < 1:
            raise ConfigError(f"--nproc {nproc}: must be at least 1")
        if gpus < 0:
            raise ConfigError(f"--gpus {gpus}: must be 0 (none) or more")
        base = None
        if resume and output is not None:
            from crlnseg.run_setup import is_run

            # a run's own settings.json only (plan_run says why a folder is not a run)
            base = saved_run_settings(output) if is_run(output) else None
        settings = resolve_settings(preset, config, options, sets, base=base)
        if print_config:
            print(json.dumps(settings.model_dump(mode="json"), indent=2))
            return
        if labelled is None or output is None:
            raise ConfigError("--labelled and -o/--output are required")
        from crlnseg.console import log
        from crlnseg.train import train as run_train

        result = run_train(labelled, unlabelled, output, settings, val=val, gpus=gpus,
                           nproc=nproc, resume=resume, overwrite=overwrite)
        print(json.dumps({"run_dir": str(result.run_dir), "iteration": result.iteration,
                          "iterations": result.total, "val_dice": result.val_dice,
                          "best_val_dice": result.best_val_dice,
                          "val_dice_largest": result.val_dice_largest,
                          "inference": result.inference}))
        if result.stopped_by is not None:
            log(f"stopped by signal {result.stopped_by} at iteration {result.iteration}; "
                f"continue with: crlnseg train ... -o {output} --resume")
            raise typer.Exit(128 + int(result.stopped_by))
