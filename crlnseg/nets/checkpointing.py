"""Activation checkpointing that keeps BatchNorm's running statistics exact.

A checkpointed segment stores only its inputs in the forward pass and runs its forward again
during the backward pass to rebuild the activations it needs. The full-resolution layers of a
3D backbone hold most of a training step's memory (every 16-channel tensor of a 112x112x80 crop
is 64 MB) but cost a small share of its arithmetic, so recomputing them buys the most memory for
the least time.

``torch.utils.checkpoint`` alone would update every BatchNorm's running mean and variance (and
``num_batches_tracked``) a second time during the recompute, so the EMA teacher, which copies
those buffers, and every evaluation would drift from an un-checkpointed run. During the recompute
the segment's BatchNorm layers normalise with the batch statistics exactly as in the first pass
but update scratch copies of their buffers; dropout masks are replayed from the saved RNG state.
Gradients and buffers equal those of the plain forward (``tests/test_nets_checkpointing.py``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

from torch import nn
from torch.utils.checkpoint import checkpoint

__all__ = ["checkpointed"]


_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def _stats_frozen(module: nn.Module) -> Iterator[None]:
    """BatchNorm layers of ``module`` update scratch copies of their buffers, then get the
    originals back. (Not tracking statistics at all would save fewer tensors for the backward
    pass than the first forward did, which the checkpoint machinery rejects.)"""
    layers = [m for m in module.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    originals = [{name: getattr(m, name) for name in _BUFFERS} for m in layers]
    for m, buffers in zip(layers, originals, strict=True):
        for name, value in buffers.items():
            setattr(m, name, value.clone())
    try:
        yield
    finally:
        for m, buffers in zip(layers, originals, strict=True):
            for name, value in buffers.items():
                setattr(m, name, value)


def checkpointed(fn: Callable[..., Any], module: nn.Module, *args: Any, enabled: bool) -> Any:
    """``fn(*args)``, recomputed in the backward pass when ``enabled``; ``module`` holds every
    layer ``fn`` uses (its BatchNorm buffers are left alone by the recompute)."""
    if not enabled:
        return fn(*args)
    return checkpoint(fn, *args, use_reentrant=False,
                      context_fn=lambda: (contextlib.nullcontext(), _stats_frozen(module)))
