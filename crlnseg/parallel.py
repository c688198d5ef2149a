"""Data-parallel plumbing of the loop: gradient averaging, BatchNorm buffers, stop signals.

Gradients are averaged over ranks by one bucketed all-reduce just before each optimiser step
(the student's SGD and mu's own optimiser; before unscaling when a GradScaler is used, so every
rank sees the same inf/NaN). This is what DistributedDataParallel computes, without its autograd
hooks: a CRLN iteration has two backward passes (student, then mu on detached inputs), calls the
backbone and the DIM separately, and some parameters get no gradient in some iterations (e.g.
positive supervision with one valid class), all of which DDP's reducer rejects or needs
``find_unused_parameters`` for. The price: communication is not overlapped with the backward.
BatchNorm buffers of student and teacher follow rank 0 after each step (DDP's
``broadcast_buffers``), so the EMA teacher stays identical on every rank.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["average_gradients", "install_gradient_sync", "broadcast_state", "sync_buffers",
           "StopFlag", "forward_signals"]


def average_gradients(params: list[torch.Tensor], world_size: int) -> None:
    """grad <- mean over ranks; a parameter without gradient on some rank counts as zero there."""
    if not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    has = torch.tensor([float(p.grad is not None) for p in params], device=params[0].device)
    flat = _flatten_dense_tensors([g.float() for g in grads] + [has])
    dist.all_reduce(flat)
    *synced, has_any = _unflatten_dense_tensors(flat, [*grads, has])
    for p, g, any_rank in zip(params, synced, has_any.tolist(), strict=True):
        if any_rank > 0:
            p.grad = (g / world_size).to(p.dtype)


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _wrap(optimizer: torch.optim.Optimizer, scaler: Any, world_size: int) -> None:
    step, synced = optimizer.step, {"done": False}

    def sync() -> None:
        if not synced["done"]:
            average_gradients(_params(optimizer), world_size)
            synced["done"] = True

    def synced_step(*args: Any, **kwargs: Any) -> Any:
        sync()
        synced["done"] = False  # the next iteration's gradients
        return step(*args, **kwargs)

    optimizer.step = synced_step  # type: ignore[method-assign]
    if scaler is not None:
        unscale = scaler.unscale_

        def synced_unscale(opt: torch.optim.Optimizer) -> None:
            if opt is optimizer:
                sync()
            unscale(opt)

        scaler.unscale_ = synced_unscale


def install_gradient_sync(state: Any, d: Any) -> None:
    """Average gradients across ranks before every step of the state's optimisers."""
    _wrap(state.optimizer, state.scaler, d.world_size)
    if state.mu_optimizer is not None:
        _wrap(state.mu_optimizer, None, d.world_size)


def _broadcast(tensors: list[torch.Tensor]) -> None:
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors([t.data for t in group])
        dist.broadcast(flat, 0)
        for t, v in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
            t.data.copy_(v)


def broadcast_state(state: Any) -> None:
    """Rank 0's student and teacher (parameters and buffers) on every rank."""
    for model in (state.student, state.teacher):
        _broadcast([*model.parameters(), *model.buffers()])


def sync_buffers(state: Any, d: Any) -> None:
    """BatchNorm statistics of student and teacher follow rank 0 (as DDP broadcast_buffers)."""
    if d.enabled:
        _broadcast([*state.student.buffers(), *state.teacher.buffers()])


class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop stops after the current iteration, on every rank."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    @classmethod
    def install(cls) -> StopFlag:
        flag = cls()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                flag.previous[sig] = signal.signal(sig, flag._handle)
        return flag

    def _handle(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def requested(self, d: Any) -> bool:
        if not d.enabled:
            return self.signum is not None
        device = d.device if dist.get_backend() == "nccl" else torch.device("cpu")
        flag = torch.tensor([float(self.signum or 0)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.signum is None:
            self.signum = int(flag.item())
        return flag.item() > 0

    def uninstall(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def forward_signals() -> Iterator[StopFlag]:
    """In a launcher process: pass SIGINT / SIGTERM on to the worker processes, remember it."""
    flag = StopFlag()

    def forward(signum: int, frame: Any) -> None:
        flag.signum = signum
        for child in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError, TypeError):
                os.kill(child.pid, signum)  # type: ignore[arg-type]

    for sig in (signal.SIGINT, signal.SIGTERM):
        flag.previous[sig] = signal.signal(sig, forward)
    try:
        yield flag
    finally:
        flag.uninstall()
