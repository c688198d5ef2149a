"""`crlnseg train`: semi-supervised training into a run folder (resumable, multi-process)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

from crlnseg.cli.common import handle_errors
from crlnseg.console import log
from crlnseg.signals import exit_code

HELP = "\n\n".join([
    "Train a model on labelled and unlabelled scans (CRLN, mean teacher or supervised).",
    "--labelled / --unlabelled / --val take raw folders (the layouts prepare reads) or prepare "
    "outputs; raw folders are prepared into RUN_DIR/prepared (reused by later runs).",
    "Settings: defaults < the dataset's plan (target spacing, normalisation, pooling, patch: "
    "crlnseg plan) < --preset < --config FILE (YAML/JSON) < options < --set key=value "
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
        patch: tuple[int, int, int] | None = typer.Option(None, "--patch", metavar="X Y Z",
                                                            help="Crop size in voxels."),
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
        sets: list[str] = typer.Option([], "--set", metavar="KEY=VALUE",
                                       help="Override any setting: section.key=value "
                                            "(repeatable)."),
        print_config: bool = typer.Option(False, "--print-config", help="Print the resolved "
                                          "settings as JSON and exit, with --labelled the "
                                          "dataset's plan and its reasons on stderr "
                                          "(model.in_channels and model.num_classes are taken "
                                          "from the labelled data when training starts)."),
        as_json: bool = typer.Option(False, "--json", help="Print the JSON result on stdout "
                                     "even on a terminal (always printed when piped)."),
    ) -> None:
        from crlnseg import plan as plan_stage
        from crlnseg.errors import ConfigError
        from crlnseg.train import result_json, run_settings, summary
        from crlnseg.train import train as run_train

        options = {"method": {"method": method}, "model": {"base_filters": base_filters},
                   "train": {"iterations": iterations, "patch": patch, "seed": seed,
                             "batch_labelled": batch_labelled, "device": device, "amp": amp,
                             "batch_unlabelled": batch_unlabelled, "log_every": log_every}}
        settings = run_settings(preset, config, options, sets, output if resume else None)
        if print_config:  # the plan's reasons on stderr, the settings on stdout
            settings, planned = ((settings, None) if resume
                                 else plan_stage.planned(settings, labelled, unlabelled))
            if planned is not None:
                log(plan_stage.table(planned))
            print(json.dumps(settings.model_dump(mode="json"), indent=2))
            return
        if labelled is None or output is None:
            raise ConfigError("--labelled and -o/--output are required")
        result = run_train(labelled, unlabelled, output, settings, val=val, gpus=gpus,
                           nproc=nproc, resume=resume, overwrite=overwrite)
        log(summary(result))
        if as_json or not sys.stdout.isatty():
            print(json.dumps(result_json(result)))
        if result.stopped_by is not None:
            raise typer.Exit(exit_code(result.stopped_by))
