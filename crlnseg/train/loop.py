"""The training loop of one rank, read top to bottom.

    state <- init_state (or the last checkpoint); for t in start .. T - 1:
        seed (seed, rank, t); batch <- loader[t]; record <- train_step(...)
        BatchNorm buffers follow rank 0; log; validate; checkpoint; stop on SIGINT / SIGTERM

Rank 0 writes; every rank validates its share of the cases. Extending a finished run
(``--resume --iterations N``) recomputes the poly schedule for the new total, so the learning
rate jumps up to its value at t / N_new.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crlnseg import signals
from crlnseg.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from crlnseg.console import log
from crlnseg.data.manifest import load_manifest
from crlnseg.data.sampling import IterationBatches, make_loader
from crlnseg.errors import DataError, RunFailure
from crlnseg.inference.choice import describe
from crlnseg.method.train_step import Batch, train_step
from crlnseg.settings import RunSettings
from crlnseg.train import overwrite as aside
from crlnseg.train.logging import MetricsLog, Progress, read_metrics
from crlnseg.train.parallel import Dist, any_rank, cleanup, distribute, init_process, sync_buffers
from crlnseg.train.plan import RunPlan
from crlnseg.train.plot import plot_training
from crlnseg.train.state import (
    TrainState,
    init_state,
    seed_iteration,
    state_from_dict,
    state_to_dict,
)
from crlnseg.train.validation import validate

__all__ = ["TrainResult", "run_worker"]


@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    total: int
    stopped_by: int | None = None  # signal number when interrupted
    val_dice: float | None = None
    best_val_dice: float | None = None  # best validation Dice of each checkpoint's chosen blending
    val_dice_largest: float | None = None  # last validation, largest component kept per class
    # Blending / post-processing for predict, chosen on the validation set (inference.choice)
    inference: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)


def _loop(plan: RunPlan, d: Dist, state: TrainState, loader: Any, val_data: Any) -> TrainResult:
    s, t = plan.settings, plan.settings.train
    total, start, run = t.iterations, state.iteration, plan.out
    log = MetricsLog(run / "metrics.jsonl" if d.is_main else None, start)
    progress = Progress(total, start, enabled=d.is_main)
    generator = torch.Generator()
    result = TrainResult(run, start, total, best_val_dice=plan.meta.get("best_val_dice"),
                         inference=plan.meta.get("inference"))
    with signals.stop_requested() as stop, contextlib.closing(progress):
        for iteration, batch in zip(range(start, total), loader, strict=False):
            seed_iteration(t.seed, d.rank, iteration, generator)
            batch = Batch(**{k: v.to(d.device, non_blocking=True) for k, v in batch.items()})
            with _out_of_memory_hint(s, d, iteration):
                record = train_step(state, batch, s, generator, total)
            sync_buffers(state, d)
            done = state.iteration
            log.add(record)
            progress.advance(done)
            last = done == total
            if done % t.log_every == 0 or last:
                progress.logged(log.flush(done))
            improved = False
            if val_data is not None and (done % t.val_every == 0 or last):
                v = validate(state.teacher, val_data, s, d.device, d.rank, d.world_size, done)
                tuned = v.choice["dice"]  # the chosen blending's: what predict will deliver
                log.write({"iteration": done, "val_dice": v.dice,
                           "val_dice_largest": v.dice_largest, "val_dice_tuned": tuned,
                           "val_per_case": v.per_case, "val_choice": v.choice})
                progress.message(f"iteration {done}: validation Dice {v.dice:.4f} "
                                 f"({v.dice_largest:.4f} keeping the largest component); "
                                 f"predict will use {describe(v.choice)}")
                result.val_dice, result.val_dice_largest = v.dice, v.dice_largest
                result.inference = v.choice
                # best.pt: the checkpoint whose own choice predicts best on validation
                improved = result.best_val_dice is None or tuned > result.best_val_dice
                result.best_val_dice = max(tuned, result.best_val_dice or -math.inf)
            stopped = any_rank(stop.signum, d)
            if done % t.checkpoint_every == 0 or last or improved or stopped:
                _checkpoint(plan, d, state, result, periodic=done % t.checkpoint_every == 0,
                            best=improved)
            result.iteration = done
            if stopped:
                result.stopped_by = stopped
                progress.message(f"stopped at iteration {done}; checkpoint saved")
                break
    return result


def _checkpoint(plan: RunPlan, d: Dist, state: TrainState, result: TrainResult, periodic: bool,
                best: bool) -> None:
    if not d.is_main:
        return
    folder, done = plan.out / "checkpoints", state.iteration
    # `inference`: the last validation's choice (crlnseg.inference.choice), for predict
    meta = {**plan.meta, "iteration": done, "total_iterations": plan.settings.train.iterations,
            "world_size": d.world_size, "best_val_dice": result.best_val_dice,
            "inference": result.inference}
    save_checkpoint(folder / "last.pt", state_to_dict(state), plan.settings, meta)
    aside.drop(plan.out)  # the run this one overwrote, kept until now in case it failed
    if periodic:
        copy_checkpoint(folder / "last.pt", folder / f"iter_{done}.pt")
    if best:
        copy_checkpoint(folder / "last.pt", folder / "best.pt")
    # a plot costs ~0.3 s: with checkpoints, not every log line
    try:
        plot_training(read_metrics(plan.out / "metrics.jsonl"), plan.out / "training.png")
    except DataError as err:  # a damaged metrics.jsonl must not stop a saved run
        log(f"warning: training.png not redrawn: {err}")


@contextlib.contextmanager
def _out_of_memory_hint(settings: RunSettings, d: Dist, iteration: int) -> Iterator[None]:
    """Turn an out-of-memory error of one step into a RunFailure with what to change."""
    try:
        yield
    except (MemoryError, torch.OutOfMemoryError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and not isinstance(err, torch.OutOfMemoryError) and (
                "out of memory" not in str(err).lower()):
            raise
        t = settings.train
        raise RunFailure(
            f"out of memory on {d.device} at iteration {iteration} (patch {t.patch}, batch "
            f"{t.batch_labelled}+{t.batch_unlabelled}): use a smaller --patch or "
            "--batch-labelled/--batch-unlabelled" + ("" if t.amp else ", or --amp")) from None


def _restore(plan: RunPlan, state: TrainState, d: Dist) -> None:
    ckpt = load_checkpoint(plan.out / "checkpoints" / "last.pt", map_location=d.device)
    state_from_dict(state, ckpt["state"])
    state.iteration = int(ckpt["meta"]["iteration"])
    set_rng_state(ckpt["rng"])


def run_worker(plan: RunPlan) -> TrainResult:
    """One rank: join the group, build or restore the state, run the loop."""
    d = init_process(plan.device_type)
    if d.enabled and d.device.type == "cpu":  # share the cores between CPU ranks
        torch.set_num_threads(max(1, torch.get_num_threads() // d.world_size))
    if d.device.type == "cpu":
        from crlnseg.train.allocator import release_freed_memory, wanted

        if wanted(plan.settings.train.activation_checkpointing):  # memory over speed
            release_freed_memory()
    try:
        s, t = plan.settings, plan.settings.train
        # channels-last 1x1x1 convolutions get contiguous gradients: equal memory, other strides
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view")
        state = init_state(s, d.device)
        if plan.resume:
            _restore(plan, state, d)
        if d.enabled:  # the projection head is unused without positive supervision, too
            distribute(state, d, find_unused_parameters=True)
        dataset = IterationBatches(plan.labelled, plan.unlabelled, t.patch, t.batch_labelled,
                                   t.batch_unlabelled if s.method.method != "supervised" else 0,
                                   s.model.num_classes, t.foreground_oversample, t.seed, d.rank)
        loader = make_loader(dataset, state.iteration, t.iterations, t.num_workers,
                             pin_memory=d.device.type == "cuda")
        val_data = load_manifest(plan.val) if plan.val is not None else None
        result = _loop(plan, d, state, loader, val_data)
        if os.environ.get("CRLNSEG_DEBUG_RANK_STATE"):  # tests: compare the ranks' weights
            torch.save({"student": state.student.state_dict(),
                        "teacher": state.teacher.state_dict()},
                       Path(os.environ["CRLNSEG_DEBUG_RANK_STATE"]) / f"rank{d.rank}.pt")
        return result
    finally:
        cleanup()
