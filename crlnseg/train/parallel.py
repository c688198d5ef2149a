"""Data-parallel training: process groups, torch's DistributedDataParallel, the EMA teacher.

``--gpus N`` / ``--nproc N`` spawn N local processes; ``torchrun`` (also multi-node:
``torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT -m crlnseg train ...``) sets
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which :func:`init_process` reads.
NCCL on CUDA, gloo on the CPU (tests). Every rank samples its own patches.

- The student's objective (:class:`crlnseg.method.train_step.StudentObjective`) runs inside
  :class:`torch.nn.parallel.DistributedDataParallel`: gradients are averaged over ranks by DDP's
  bucketed all-reduce, overlapped with the backward pass. ``find_unused_parameters`` is on: without
  positive supervision (or with fewer than two valid classes) no projection parameter is used.
- mu has its own optimiser and backward pass (on detached inputs): its scalar gradient is
  averaged by an explicit all-reduce (a gradient hook), outside DDP.
- BatchNorm statistics of student and teacher follow rank 0 after each step
  (:func:`sync_buffers`, one broadcast; DDP's own ``broadcast_buffers`` is off, as it would
  sync the student only, before the next forward), so every rank holds the same models.
"""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["Dist", "launched_by_torchrun", "free_port", "init_process", "spawn", "cleanup",
           "distribute", "sync_buffers", "any_rank"]


@dataclass(frozen=True)
class Dist:
    """This process's place in the job; ``world_size == 1`` means no process group."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def init_process(device_type: str, rank: int | None = None, world_size: int | None = None,
                 local_rank: int | None = None) -> Dist:
    """Join the process group (env:// rendezvous) and pick this rank's device.

    Arguments default to the torchrun environment; a world of one creates no group.
    """
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if local_rank is None else local_rank
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        kwargs: dict[str, Any] = {"device_id": device} if device_type == "cuda" else {}
        dist.init_process_group(backend, rank=rank, world_size=world_size, **kwargs)
    return Dist(rank, local_rank, world_size, device)


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    fn(*args)


def spawn(fn: Callable[..., Any], nprocs: int, args: tuple = ()) -> None:
    """Run ``fn(*args)`` in ``nprocs`` local processes with torchrun's environment set.

    An exception in any child is re-raised here (torch reports it as ProcessRaisedException).
    """
    import torch.multiprocessing as mp

    # DDP's C++ reducer logs notes (e.g. on find_unused_parameters) straight to stderr.
    os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    mp.spawn(_entry, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _broadcast(tensors: list[torch.Tensor]) -> None:
    """Rank 0's values of ``tensors`` on every rank (one flat broadcast per dtype)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = _flatten_dense_tensors([t.data for t in group])
        dist.broadcast(flat, 0)
        for t, v in zip(group, _unflatten_dense_tensors(flat, group), strict=True):
            t.data.copy_(v)


def distribute(state: Any, d: Dist, find_unused_parameters: bool) -> None:
    """Make ``state`` data-parallel: rank 0's student, teacher and mu everywhere, the student's
    objective wrapped in DDP, mu's gradient averaged over ranks."""
    from torch.nn.parallel import DistributedDataParallel

    _broadcast([*state.student.parameters(), *state.student.buffers(),
                *state.teacher.parameters(), *state.teacher.buffers()])
    device_ids = [d.device.index] if d.device.type == "cuda" else None
    # Buffers are synced after each step instead (the keyword's name changed in torch 2.13).
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = ({"forward_sync_buffers": False} if "forward_sync_buffers" in params
               else {"broadcast_buffers": False})
    state.objective = DistributedDataParallel(
        state.objective, device_ids=device_ids, find_unused_parameters=find_unused_parameters,
        **no_sync)
    world = d.world_size

    def average(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world

    if state.mu_optimizer is not None:
        state.student.mu_raw.register_hook(average)


def sync_buffers(state: Any, d: Dist) -> None:
    """BatchNorm statistics of student and teacher follow rank 0 (each rank's forward and the
    EMA updated them from its own crops)."""
    if d.enabled:
        _broadcast([*state.student.buffers(), *state.teacher.buffers()])


def any_rank(signum: int | None, d: Dist) -> int | None:
    """The largest stop signal any rank received (every rank stops at the same iteration)."""
    if not d.enabled:
        return signum
    device = d.device if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([float(signum or 0)], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    value = int(flag.item())
    return value or None
