"""The training state (student, EMA teacher, optimisers, grad scaler, step), its device policy,
and its (de)serialisation for checkpoints that resume exactly.

Randomness of iteration t comes only from generators seeded by (seed, rank, t)
(:func:`seed_iteration`: patch sampling, augmentation, dropout), so a resumed run replays an
uninterrupted one exactly on the CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from crlnseg.method.crln import CRLNModel, build_model
from crlnseg.method.train_step import Placement, StudentObjective
from crlnseg.settings import RunSettings

__all__ = ["TrainState", "amp_dtype", "channels_last", "placement", "init_state",
           "state_to_dict", "state_from_dict", "seed_iteration"]


@dataclass
class TrainState:
    student: CRLNModel
    teacher: CRLNModel
    objective: nn.Module  # StudentObjective(student), wrapped by DDP when data-parallel
    optimizer: torch.optim.Optimizer
    mu_optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None
    placement: Placement
    iteration: int = 0


def amp_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the GPU supports it (no loss scaling needed), else fp16."""
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def channels_last(settings: RunSettings, device: torch.device) -> bool:
    """``train.channels_last``; unset: on, the faster layout wherever measured (oneDNN on the
    CPU, cuDNN on CUDA; benchmarks/RESULTS.md)."""
    chosen = settings.train.channels_last
    return True if chosen is None else chosen


def placement(settings: RunSettings, device: torch.device) -> Placement:
    """Mixed precision on CUDA when ``train.amp``; fp32 elsewhere."""
    amp = amp_dtype(device) if device.type == "cuda" and settings.train.amp else None
    return Placement(device, amp, channels_last(settings, device))


def init_state(settings: RunSettings, device: torch.device) -> TrainState:
    """Student (seeded with ``train.seed``), its EMA teacher, SGD, mu's optimiser, grad scaler."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.train.seed)
        student = build_model(settings)
    place = placement(settings, device)
    student.to(device)
    student.backbone.checkpoint_activations = settings.train.activation_checkpointing
    if place.channels_last:
        student.to(memory_format=torch.channels_last_3d)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    o = settings.optim
    params = [p for n, p in student.named_parameters() if n != "mu_raw"]
    optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    mu_optimizer = (torch.optim.SGD([student.mu_raw], lr=settings.method.mu_lr, momentum=0.9)
                    if student.has_relation else None)
    scaler = torch.amp.GradScaler("cuda") if place.amp_dtype == torch.float16 else None
    return TrainState(student, teacher, StudentObjective(student, settings.method), optimizer,
                      mu_optimizer, scaler, place, 0)


def state_to_dict(state: TrainState) -> dict[str, Any]:
    """Everything an exact resume needs (RNG states are the checkpoint's business)."""
    return {"student": state.student.state_dict(), "teacher": state.teacher.state_dict(),
            "optimizer": state.optimizer.state_dict(),
            "mu_optimizer": state.mu_optimizer.state_dict() if state.mu_optimizer else None,
            "scaler": state.scaler.state_dict() if state.scaler else None,
            "iteration": state.iteration}


def state_from_dict(state: TrainState, d: dict[str, Any]) -> None:
    state.student.load_state_dict(d["student"])
    state.teacher.load_state_dict(d["teacher"])
    state.optimizer.load_state_dict(d["optimizer"])
    if state.mu_optimizer is not None and d.get("mu_optimizer") is not None:
        state.mu_optimizer.load_state_dict(d["mu_optimizer"])
    if state.scaler is not None and d.get("scaler") is not None:
        state.scaler.load_state_dict(d["scaler"])
    state.iteration = int(d["iteration"])


def seed_iteration(seed: int, rank: int, iteration: int, generator: torch.Generator) -> None:
    """Seed the global torch RNG (dropout) and the step's generator from (seed, rank, t)."""
    a, b = np.random.SeedSequence((seed, rank, iteration)).generate_state(2, np.uint64)
    torch.manual_seed(int(a) >> 1)
    generator.manual_seed(int(b) >> 1)
