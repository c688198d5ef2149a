"""``crlnseg train`` as a library call: plan the run, run one rank here or N ranks as processes
(or join torchrun's), clean up a fresh run that fails before its first checkpoint."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from crlnseg import errors, signals
from crlnseg.checkpoint import load_checkpoint
from crlnseg.config import resolve_settings, saved_run_settings
from crlnseg.console import log
from crlnseg.errors import CrlnsegError, DataError, RunFailure, on_failure
from crlnseg.settings import RunSettings
from crlnseg.train.logging import read_metrics
from crlnseg.train.loop import TrainResult, run_worker
from crlnseg.train.parallel import launched_by_torchrun, spawn
from crlnseg.train.plan import RunPlan, plan_on_rank0, plan_run, planned_settings
from crlnseg.train.run_dir import discard_unsaved_run, is_run

__all__ = ["train", "run_settings", "summary", "result_json", "last_validation",
           "planned_settings"]


def train(labelled: Path, unlabelled: Path | None, out: Path, settings: RunSettings, *,
          val: Path | None = None, gpus: int = 0, nproc: int = 1, resume: bool = False,
          overwrite: bool = False) -> TrainResult:
    """Train (or resume) a run in ``out``; returns where it stopped and the validation Dice.

    A fresh run that fails or is interrupted before its first checkpoint leaves nothing behind
    (a retry would be refused) and puts back the run it was overwriting.
    """
    if launched_by_torchrun():
        plan = plan_on_rank0(labelled, unlabelled, out, settings, val, resume, overwrite)
        rank0 = os.environ.get("RANK") == "0"
        with on_failure(lambda err: discard_unsaved_run(plan.out, plan.created, err)
                        if rank0 else None):
            return run_worker(plan)
    plan = plan_run(labelled, unlabelled, out, settings, val, gpus, nproc, resume, overwrite)
    if plan.world_size == 1:
        with on_failure(lambda err: discard_unsaved_run(plan.out, plan.created, err)):
            return run_worker(plan)
    with signals.forward_to_children() as received, on_failure(
            lambda err: discard_unsaved_run(plan.out, plan.created, err, received.signum)):
        return _spawn_workers(plan, received)


def _spawn_workers(plan: RunPlan, received: signals.StopFlag) -> TrainResult:
    """Run the ranks as local processes (``received``: the stop signal forwarded to them)."""
    import torch.multiprocessing as mp

    last = plan.out / "checkpoints" / "last.pt"
    start = int(load_checkpoint(last)["meta"]["iteration"]) if plan.resume else 0
    try:
        spawn(run_worker, plan.world_size, (plan,))
    except mp.ProcessRaisedException as err:  # one line: the child's exception
        raise _child_error(err) from None
    except mp.ProcessExitedException as err:
        # A rank can die on its way out after a forwarded stop signal (an abort in a library's
        # exit handler) when the checkpoint is already saved: the run stopped as asked.
        # Without a signal, or without a checkpoint, it is a failure.
        if received.signum is None or not last.is_file():
            raise RunFailure(f"a training process died: {err}") from None
    ckpt = load_checkpoint(last)
    try:
        history = read_metrics(plan.out / "metrics.jsonl")
    except DataError as err:  # training finished; a damaged log only loses the report
        log(f"warning: {err}")
        history = []
    dice, largest = last_validation(history, start)
    return TrainResult(plan.out, int(ckpt["meta"]["iteration"]), plan.settings.train.iterations,
                       received.signum, dice, ckpt["meta"].get("best_val_dice"), largest,
                       ckpt["meta"].get("inference"))


def _child_error(err: Exception) -> CrlnsegError:
    """A rank's exception as the launcher's: a crlnseg error keeps its kind and message (and so
    its exit status); anything else is a RunFailure saying a training process failed."""
    lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else str(err)
    kind, _, message = last.partition(": ")
    cls = getattr(errors, kind.removeprefix("crlnseg.errors."), None)
    if kind.startswith("crlnseg.errors.") and isinstance(cls, type) and issubclass(
            cls, CrlnsegError) and cls is not errors.RunInterrupted:
        return cls(message)
    return RunFailure(f"a training process failed: {last}")


def last_validation(history: list[dict[str, Any]], start: int
                    ) -> tuple[float | None, float | None]:
    """(val_dice, val_dice_largest) of the last validation after iteration ``start`` in
    ``metrics.jsonl`` lines: a resumed run reports its own, as the single-process path does."""
    vals = [line for line in history if "val_dice" in line and line["iteration"] > start]
    return (vals[-1]["val_dice"], vals[-1].get("val_dice_largest")) if vals else (None, None)


def run_settings(preset: str | None, config: Path | None, options: dict[str, Any],
                 overrides: list[str], resume_dir: Path | None = None) -> RunSettings:
    """defaults (a resumed run's own saved settings) < preset < config file < options < --set."""
    base = saved_run_settings(resume_dir) if resume_dir and is_run(resume_dir) else None
    return resolve_settings(preset, config, options, overrides, base=base)


def result_json(result: TrainResult) -> dict[str, Any]:
    return {"run_dir": str(result.run_dir), "iteration": result.iteration,
            "iterations": result.total, "val_dice": result.val_dice,
            "best_val_dice": result.best_val_dice, "val_dice_largest": result.val_dice_largest,
            "inference": result.inference}


def summary(result: TrainResult) -> str:
    """A few lines for a person: where the checkpoints are, validation Dice, what to run next."""
    run, ckpt = result.run_dir, result.run_dir / "checkpoints"
    lines = [f"checkpoints: {ckpt / 'last.pt'}"
             + (f", {ckpt / 'best.pt'}" if (ckpt / "best.pt").is_file() else "")]
    if result.val_dice is not None:
        best = f"{result.best_val_dice:.4f}" if result.best_val_dice is not None else "-"
        lines.append(f"validation Dice: last {result.val_dice:.4f}, best {best} (with the "
                     "blending predict will use)")
    if result.stopped_by is not None:
        lines.insert(0, f"stopped by signal {result.stopped_by} at iteration "
                        f"{result.iteration}/{result.total}")
        lines.append(f"continue with: crlnseg train ... -o {run} --resume")
    else:
        lines.insert(0, f"trained {result.iteration}/{result.total} iterations into {run}")
        lines.append(f"next: crlnseg predict IMAGES -m {run} -o MASKS")
    return "\n".join(lines)
