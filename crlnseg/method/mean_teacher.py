"""EMA teacher (mean teacher): theta_T <- d theta_T + (1 - d) theta_S, d = min(1 - 1/(t+1), cap).

Floating-point buffers (BatchNorm running statistics) are averaged the same way, so the teacher's
eval-mode normalisation matches its weights; integer buffers (batch counters) are copied.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ema_decay", "ema_update"]


def ema_decay(step: int, cap: float) -> float:
    """d(t) = min(1 - 1/(t+1), cap): 0 at t = 0 (the teacher copies the student), then warms up."""
    return min(1.0 - 1.0 / (step + 1), cap)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """In place: teacher = decay * teacher + (1 - decay) * student (parameters and buffers)."""
    t_float, s_float = [], []
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t_float.append(t)
        s_float.append(s.detach())
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.is_floating_point():
            t_float.append(t)
            s_float.append(s)
        else:
            t.copy_(s)
    torch._foreach_lerp_(t_float, s_float, 1.0 - decay)
