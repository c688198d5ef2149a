"""``crlnseg train``: the loop around one CRLN iteration, on one or many processes.

    plan (rank 0 / parent): check RUN_DIR, prepare raw inputs, infer C and channels, check data,
                            check a resume, write settings.json and environment.json
    each rank:  state <- init_state (or the last checkpoint); for t in start .. T - 1:
                    seed (seed, rank, t); batch <- loader[t]; record <- train_step(...)
                    sync BatchNorm buffers; log; validate; checkpoint; stop on SIGINT / SIGTERM

Randomness of iteration t comes only from generators seeded by (seed, rank, t) (patch sampling,
augmentation, dropout), so a resumed run replays an uninterrupted one exactly on the CPU.
Data parallelism: every rank samples its own patches; gradients are averaged over ranks (one
bucketed all-reduce before each optimiser step, see :mod:`crlnseg.parallel`); rank 0 writes.
Extending a finished run (``--resume --iterations N``) recomputes the poly schedule for the new
total, so the learning rate jumps up to its value at t / N_new.
"""

from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crlnseg.checkpoint import copy_checkpoint, load_checkpoint, save_checkpoint, set_rng_state
from crlnseg.errors import RunFailure
from crlnseg.settings import RunSettings

__all__ = ["RunPlan", "TrainResult", "last_validation", "train", "run_worker",
           "seed_iteration"]


@dataclass
class RunPlan:
    """What every rank needs (picklable; sent to spawned processes)."""

    out: Path
    settings: RunSettings
    labelled: Path
    unlabelled: Path | None
    val: Path | None
    meta: dict[str, Any]
    resume: bool
    device_type: str
    world_size: int
    # What a fresh run created: removed again when it fails before its first checkpoint
    # (the run folder itself when this invocation created it, plus its created parents).
    discard: list[Path] = field(default_factory=list)
    discard_parents: list[Path] = field(default_factory=list)


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


def seed_iteration(seed: int, rank: int, iteration: int, generator: torch.Generator) -> None:
    """Seed the global torch RNG (dropout) and the step's generator from (seed, rank, t)."""
    import numpy as np

    a, b = np.random.SeedSequence((seed, rank, iteration)).generate_state(2, np.uint64)
    torch.manual_seed(int(a) >> 1)
    generator.manual_seed(int(b) >> 1)


def _loop(plan: RunPlan, d: Any, state: Any, loader: Any, val_data: Any) -> TrainResult:
    from crlnseg.inference.choice import describe
    from crlnseg.method.train_step import Batch, train_step
    from crlnseg.parallel import StopFlag, sync_buffers
    from crlnseg.run_folder import MetricsLog, Progress
    from crlnseg.validation import validate

    s, t = plan.settings, plan.settings.train
    total, start, run = t.iterations, state.iteration, plan.out
    log = MetricsLog(run / "metrics.jsonl" if d.is_main else None)
    progress = Progress(total, start, enabled=d.is_main)
    stop, generator = StopFlag.install(), torch.Generator()
    result = TrainResult(run, start, total, best_val_dice=plan.meta.get("best_val_dice"),
                         inference=plan.meta.get("inference"))
    try:
        for iteration, batch in zip(range(start, total), loader, strict=False):
            seed_iteration(t.seed, d.rank, iteration, generator)
            batch = Batch(**{k: v.to(d.device, non_blocking=True) for k, v in batch.items()})
            with _out_of_memory_hint(s, d, iteration):
                record = train_step(state, batch, s, generator, total)
            sync_buffers(state, d)
            state.iteration = done = iteration + 1
            log.add(record)
            progress.advance(done)
            last = done == total
            if done % t.log_every == 0 or last:
                progress.logged(log.flush(done))
            improved = False
            if val_data is not None and (done % t.val_every == 0 or last):
                v = validate(state.teacher, val_data, s, d.device, d.rank, d.world_size, done)
                dice = v.dice
                tuned = v.choice["dice"]  # the chosen blending's: what predict will deliver
                log.write({"iteration": done, "val_dice": dice,
                           "val_dice_largest": v.dice_largest, "val_dice_tuned": tuned,
                           "val_per_case": v.per_case, "val_choice": v.choice})
                progress.message(f"iteration {done}: validation Dice {dice:.4f} "
                                 f"({v.dice_largest:.4f} keeping the largest component); "
                                 f"predict will use {describe(v.choice)}")
                result.val_dice, result.val_dice_largest = dice, v.dice_largest
                result.inference = v.choice
                # best.pt: the checkpoint whose own choice predicts best on validation
                improved = result.best_val_dice is None or tuned > result.best_val_dice
                result.best_val_dice = max(tuned, result.best_val_dice or -math.inf)
            stopped = stop.requested(d)
            if done % t.checkpoint_every == 0 or last or improved or stopped:
                _checkpoint(plan, d, state, done, result.best_val_dice, result.inference,
                            periodic=done % t.checkpoint_every == 0, best=improved)
                if d.is_main:  # a plot costs ~0.3 s: with checkpoints, not every log line
                    _plot(run)
            result.iteration = done
            if stopped:
                result.stopped_by = stop.signum or signal.SIGTERM
                progress.message(f"stopped at iteration {done}; checkpoint saved")
                break
    finally:
        progress.close()
        stop.uninstall()
    return result


def _checkpoint(plan: RunPlan, d: Any, state: Any, done: int, best_dice: float | None,
                inference: dict[str, Any] | None, periodic: bool, best: bool) -> None:
    from crlnseg.run_setup import drop_previous

    if not d.is_main:
        return
    folder = plan.out / "checkpoints"
    # `inference`: the last validation's choice (crlnseg.inference.choice), for predict
    meta = {**plan.meta, "iteration": done, "total_iterations": plan.settings.train.iterations,
            "world_size": d.world_size, "best_val_dice": best_dice, "inference": inference}
    save_checkpoint(folder / "last.pt", state, plan.settings, meta)
    drop_previous(plan.out)  # the run this one overwrote, kept until now in case it failed
    if periodic:
        copy_checkpoint(folder / "last.pt", folder / f"iter_{done}.pt")
    if best:
        copy_checkpoint(folder / "last.pt", folder / "best.pt")


def _plot(run: Path) -> None:
    from crlnseg.plot import plot_training
    from crlnseg.run_folder import read_metrics

    plot_training(read_metrics(run / "metrics.jsonl"), run / "training.png")


class _out_of_memory_hint:
    """Turn an out-of-memory error of one step into a RunFailure with what to change."""

    def __init__(self, settings: RunSettings, d: Any, iteration: int) -> None:
        self.settings, self.d, self.iteration = settings, d, iteration

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: Any, tb: Any) -> bool:
        oom = kind is not None and (issubclass(kind, MemoryError | torch.OutOfMemoryError) or (
            issubclass(kind, RuntimeError) and "out of memory" in str(err).lower()))
        if oom:
            t = self.settings.train
            raise RunFailure(
                f"out of memory on {self.d.device} at iteration {self.iteration} (patch "
                f"{t.patch}, batch {t.batch_labelled}+{t.batch_unlabelled}): use a smaller "
                "--patch or --batch-labelled/--batch-unlabelled"
                + ("" if t.amp else ", or --amp")) from None
        return False


def run_worker(plan: RunPlan) -> TrainResult:
    """One rank: join the group, build or restore the state, run the loop."""
    from crlnseg.data.manifest import load_manifest
    from crlnseg.data.sampling import IterationBatches, make_loader
    from crlnseg.distributed import cleanup, init_process
    from crlnseg.method.train_step import init_state, state_from_dict
    from crlnseg.parallel import broadcast_state, install_gradient_sync

    d = init_process(plan.device_type)
    if d.enabled and d.device.type == "cpu":  # share the cores between CPU ranks
        torch.set_num_threads(max(1, torch.get_num_threads() // d.world_size))
    if d.device.type == "cpu":
        from crlnseg.allocator import release_freed_memory, wanted

        if wanted(plan.settings.train.activation_checkpointing):  # memory over speed
            release_freed_memory()
    try:
        s = plan.settings
        state = init_state(s, d.device)
        if plan.resume:
            ckpt = load_checkpoint(plan.out / "checkpoints" / "last.pt", map_location=d.device)
            state_from_dict(state, ckpt["state"])
            state.iteration = int(ckpt["meta"]["iteration"])
            set_rng_state(ckpt["rng"])
        if d.enabled:
            broadcast_state(state)
            install_gradient_sync(state, d)
        t = s.train
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


def _spawned(plan: RunPlan) -> None:
    run_worker(plan)


def train(labelled: Path, unlabelled: Path | None, out: Path, settings: RunSettings, *,
          val: Path | None = None, gpus: int = 0, nproc: int = 1, resume: bool = False,
          overwrite: bool = False) -> TrainResult:
    """Train (or resume) a run in ``out``; returns where it stopped and the validation Dice."""
    from crlnseg.distributed import launched_by_torchrun
    from crlnseg.run_setup import discard_unsaved_run, plan_on_rank0, plan_run

    if launched_by_torchrun():
        plan = plan_on_rank0(labelled, unlabelled, out, settings, val, resume, overwrite)
        try:
            return run_worker(plan)
        except BaseException as err:
            if os.environ.get("RANK") != "0":
                raise
            raised = discard_unsaved_run(plan, err)
            if raised is err:
                raise
            raise raised from None
    plan = plan_run(labelled, unlabelled, out, settings, val, gpus, nproc, resume, overwrite)
    signum: list[int | None] = [None]
    try:
        if plan.world_size == 1:
            return run_worker(plan)
        return _spawn_workers(plan, signum)
    except BaseException as err:
        # A fresh run that saved no checkpoint leaves nothing behind (a retry would be refused).
        raised = discard_unsaved_run(plan, err, signum[0])
        if raised is err:
            raise
        raise raised from None


def _spawn_workers(plan: RunPlan, signum: list[int | None]) -> TrainResult:
    """Run the ranks as local processes; ``signum[0]``: the signal forwarded to them, if any."""
    import torch.multiprocessing as mp

    from crlnseg.distributed import spawn
    from crlnseg.parallel import forward_signals
    from crlnseg.run_folder import read_metrics

    last = plan.out / "checkpoints" / "last.pt"
    start = int(load_checkpoint(last)["meta"]["iteration"]) if plan.resume else 0
    with forward_signals() as received:
        try:
            spawn(_spawned, plan.world_size, (plan,))
        except mp.ProcessRaisedException as err:  # one line: the child's exception
            lines = [ln for ln in str(err).strip().splitlines() if ln.strip()]
            raise RunFailure(f"a training process failed: {lines[-1] if lines else err}") from None
        except mp.ProcessExitedException as err:
            # A rank can die on its way out after a forwarded stop signal (seen once: an abort
            # in a library's exit handler) when the checkpoint is already saved: the run
            # stopped as asked. Without a signal, or without a checkpoint, it is a failure.
            if received.signum is None or not last.is_file():
                raise RunFailure(f"a training process died: {err}") from None
        finally:
            signum[0] = received.signum
    ckpt = load_checkpoint(last)
    dice, largest = last_validation(read_metrics(plan.out / "metrics.jsonl"), start)
    return TrainResult(plan.out, int(ckpt["meta"]["iteration"]), plan.settings.train.iterations,
                       received.signum, dice, ckpt["meta"].get("best_val_dice"), largest,
                       ckpt["meta"].get("inference"))


def last_validation(history: list[dict[str, Any]], start: int
                    ) -> tuple[float | None, float | None]:
    """(val_dice, val_dice_largest) of the last validation after iteration ``start`` in
    ``metrics.jsonl`` lines: a resumed run reports its own, as the single-process path does."""
    vals = [line for line in history if "val_dice" in line and line["iteration"] > start]
    return (vals[-1]["val_dice"], vals[-1].get("val_dice_largest")) if vals else (None, None)

