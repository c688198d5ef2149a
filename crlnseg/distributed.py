"""Process groups for data-parallel training: ``--gpus N`` / ``--nproc N`` spawn, or ``torchrun``.

One :class:`Dist` value tells the loop who it is (rank, world size, device) and whether it writes
outputs (rank 0 only). The same code runs with NCCL on CUDA and gloo on the CPU (tests).
Multi-node: ``torchrun --nnodes M --nproc-per-node N --rdzv-endpoint HOST:PORT
-m crlnseg train ...`` sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, which
:func:`init_process` reads.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Dist", "launched_by_torchrun", "free_port", "init_process", "spawn", "cleanup"]


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

    mp.spawn(_entry, args=(nprocs, free_port(), fn, args), nprocs=nprocs, join=True)


def cleanup() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()

