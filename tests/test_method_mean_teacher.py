"""EMA teacher update."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from crlnseg.method.mean_teacher import ema_decay, ema_update


def test_decay_warm_up_and_cap():
    assert ema_decay(0, 0.99) == 0.0
    assert ema_decay(9, 0.99) == pytest.approx(0.9)
    assert ema_decay(10_000, 0.99) == 0.99


def test_ema_matches_formula_on_parameters_and_buffers():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    teacher = copy.deepcopy(student)
    student.train()(torch.randn(8, 3))  # moves BN running stats and the batch counter
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.9)
    for k, t in teacher.state_dict().items():
        s = student.state_dict()[k]
        if t.is_floating_point():
            torch.testing.assert_close(t, 0.9 * before[k] + 0.1 * s)
        else:
            assert torch.equal(t, s)
    ema_update(teacher, student, 0.0)  # decay 0 copies
    for k, t in teacher.state_dict().items():
        torch.testing.assert_close(t, student.state_dict()[k].to(t.dtype))
