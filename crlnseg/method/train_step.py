"""One CRLN training iteration (METHOD.md Sec. 1-5), and the state it updates.

    lr      <- poly(lr0, t, T)
    x_l, x_u <- weak views;  ybar, M_T <- teacher(x_u)  (eval mode, no gradient)
    yhat, c <- pseudo_labels(ybar + (1 - mu) M_T)   after warm-up, when rectifying; else of ybar
    x_s, yhat_s, c_s <- strong view of (x_u, yhat, c)
    L = w_sup seg(f(x_l), y) + w_rel seg(M(x_l), y) + w_unsup L_unsup + w_cps L_cps
    student step on L; teacher <- EMA(student)
    mu step on 0.5 seg(f + (1 - mu) M, y) of a labelled view, inputs detached, mu clamped to [0, 1]
Switches (settings.method): "supervised" (first term only), "mean-teacher" (no DIM, no
rectification, no positive supervision), "crln" with ``rectify`` / ``positive_supervision``.
The mu view (``method.mu_view``): "weak" (default) reuses the detached f(x_l), M(x_l) of this
iteration's student forward (departure: the reference runs a second forward after the student
step). "strong" (crlnseg's option) fits mu on the EMA teacher's f and M of a strong view of the
labelled crops, batched with the teacher's pass over x_u: on the training view M fits the few
labelled scans more closely than it generalises, so mu learned there trusts M more than the
unlabelled scans warrant. On LA "strong" makes rectified pseudo-labels more accurate than raw
ones but less confident, and the student learns less from them (benchmarks/RESULTS.md, "mu").
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from crlnseg.data.views import apply_strong, apply_weak, draw_strong_params, draw_weak_params
from crlnseg.method.crln import CRLNModel, build_model
from crlnseg.method.losses import IGNORE, pseudo_label_loss, segmentation_loss
from crlnseg.method.mean_teacher import ema_decay, ema_update
from crlnseg.method.positive_supervision import positive_supervision_loss
from crlnseg.method.prototypes import class_summary
from crlnseg.method.rectification import confident_share, pseudo_labels, rectify
from crlnseg.settings import RunSettings

__all__ = ["TrainState", "Batch", "StepRecord", "poly_lr", "warmup_iterations", "init_state",
           "state_to_dict", "state_from_dict", "autocast", "channels_last", "student_losses",
           "train_step"]


@dataclass
class TrainState:
    student: CRLNModel
    teacher: CRLNModel
    optimizer: torch.optim.Optimizer
    mu_optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None
    iteration: int = 0


@dataclass
class Batch:
    labelled_image: Tensor  # (Bl, Cin, X, Y, Z) float
    labelled_label: Tensor  # (Bl, X, Y, Z) long
    unlabelled_image: Tensor  # (Bu, Cin, X, Y, Z) float, Bu may be 0


@dataclass
class StepRecord:
    """Loss terms and diagnostics of one iteration; None where a term does not apply."""

    loss: float
    loss_supervised: float
    loss_relation: float | None
    loss_unsup: float | None
    loss_cps: float | None
    loss_mu: float | None
    mu: float | None
    lr: float
    confident_raw: float | None
    confident_rectified: float | None

    def as_dict(self) -> dict[str, float | None]:
        return asdict(self)


def poly_lr(base: float, iteration: int, total: int, power: float) -> float:
    """lr = lr0 * (1 - t / T) ** power."""
    return base * (1.0 - min(iteration, total) / total) ** power


def warmup_iterations(fraction: float, total: int) -> int:
    return int(round(fraction * total))


def _amp_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(settings: RunSettings, device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed precision on CUDA when ``train.amp`` (bf16 where supported, else fp16); fp32 else."""
    if device.type == "cuda" and settings.train.amp:
        return torch.autocast("cuda", dtype=_amp_dtype(device))
    return contextlib.nullcontext()


def init_state(settings: RunSettings, device: torch.device) -> TrainState:
    """Student (seeded with ``train.seed``), its EMA teacher, SGD, mu's optimiser, grad scaler."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.train.seed)
        student = build_model(settings)
    student.to(device)
    student.backbone.checkpoint_activations = settings.train.activation_checkpointing
    if channels_last(settings, device):
        student.to(memory_format=torch.channels_last_3d)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    o = settings.optim
    params = [p for n, p in student.named_parameters() if n != "mu_raw"]
    optimizer = torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    mu_optimizer = (torch.optim.SGD([student.mu_raw], lr=settings.method.mu_lr, momentum=0.9)
                    if student.has_relation else None)
    fp16 = device.type == "cuda" and settings.train.amp and _amp_dtype(device) == torch.float16
    scaler = torch.amp.GradScaler("cuda") if fp16 else None
    return TrainState(student, teacher, optimizer, mu_optimizer, scaler, 0)


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


def channels_last(settings: RunSettings, device: torch.device) -> bool:
    """``train.channels_last``; unset: on, the faster layout wherever measured: oneDNN's
    channels-last 3-D convolutions ~1.25x on the CPU, cuDNN's on an H100 1.4x (CRLN) to 1.6x (mean
    teacher) in fp32 and 1.7x to 2x with mixed precision (benchmarks/RESULTS.md "GPU checks")."""
    chosen = settings.train.channels_last
    return True if chosen is None else chosen


def _to(x: Tensor, device: torch.device, settings: RunSettings) -> Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last(settings, device) and x.dim() == 5:
        x = x.contiguous(memory_format=torch.channels_last_3d)
    return x


@torch.no_grad()
def teacher_pseudo_labels(state: TrainState, x_u: Tensor, rectifying: bool, settings: RunSettings,
                          x_mu: Tensor | None = None
                          ) -> tuple[Tensor, Tensor, float, float | None, Tensor | None,
                                     Tensor | None]:
    """(yhat, confidence, share confident before, after rectification) from the weak view x_u,
    and the teacher's detached f, M of ``x_mu`` (the mu view) when given, from the same pass."""
    thr = settings.method.confidence_threshold
    n_u = x_u.shape[0]
    x = x_u if x_mu is None else torch.cat([x_u, x_mu])
    with autocast(settings, x_u.device):
        out = state.teacher(x, with_relation=rectifying or x_mu is not None, embed="none")
    f_mu = m_mu = None
    if x_mu is not None:
        f_mu, m_mu = out.logits[n_u:].float(), out.relation[n_u:].float()
    logits = out.logits[:n_u]
    relation = None if out.relation is None else out.relation[:n_u]
    label, conf = pseudo_labels(logits)
    raw, rectified = confident_share(conf, thr), None
    if rectifying and relation is not None:
        mu = state.student.mu.detach()  # the mu being learned, not its EMA
        label, conf = pseudo_labels(rectify(logits.float(), relation.float(), mu))
        rectified = confident_share(conf, thr)
    return label, conf, raw, rectified, f_mu, m_mu


def mu_view(x_l: Tensor, y_l: Tensor, settings: RunSettings, generator: torch.Generator
            ) -> tuple[Tensor, Tensor]:
    """The strong view (in-plane rescale, CutMix, intensity, noise, rot/flip) of the labelled
    crops and labels that mu is fitted on (``method.mu_view = "strong"``)."""
    params = draw_strong_params(x_l.shape[0], generator, settings.augment,
                                x_l.shape[2] == x_l.shape[3])
    ones = torch.ones(y_l.shape, dtype=torch.float32, device=y_l.device)
    x, y, _ = apply_strong(x_l, y_l, ones, params)
    return x, y.long()


def student_losses(state: TrainState, x_l: Tensor, y_l: Tensor, x_s: Tensor | None,
                   y_s: Tensor | None, c_s: Tensor | None, settings: RunSettings,
                   generator: torch.Generator, after_warmup: bool
                   ) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """Weighted-free loss terms of the student, and the detached f(x_l), M(x_l) for the mu step.

    P and the DIM enter only through ``relation`` = seg(M(x_l), y); positive supervision uses the
    teacher's prototypes (no gradient) and the pseudo-label loss no M at all.
    """
    m, student = settings.method, state.student
    n_l = x_l.shape[0]
    use_cps = m.method == "crln" and m.positive_supervision
    x = x_l if x_s is None else torch.cat([x_l, x_s])
    net = student.backbone(x, embed="hidden" if use_cps else "none")
    terms = {"supervised": segmentation_loss(net.logits[:n_l], y_l)}
    relation = student.relation(net, n_l) if student.has_relation else None
    if relation is not None:
        terms["relation"] = segmentation_loss(relation, y_l)
    if x_s is not None and m.method != "supervised":
        terms["unsup"] = pseudo_label_loss(net.logits[n_l:], y_s, c_s, m.confidence_threshold)
    if use_cps:
        labels = y_l if y_s is None else torch.cat(
            [y_l, torch.where(c_s >= m.weak_threshold, y_s, IGNORE)])
        summary = None
        if after_warmup and state.teacher.prototypes is not None:
            summary = class_summary(state.teacher.prototypes().detach())
        terms["cps"] = positive_supervision_loss(
            net.embed_hidden, student.backbone.head.project_points, labels,
            torch.softmax(net.logits.detach().float(), dim=1), summary, m.xi, generator,
            anchors=m.anchors, negatives=m.negatives, temperature=m.temperature,
            uncertain_below=m.confidence_threshold)
    detached = None if relation is None else relation.detach()
    return terms, net.logits[:n_l].detach(), detached


def _mu_step(state: TrainState, f_l: Tensor, m_l: Tensor, y_l: Tensor) -> float:
    """0.5 (CE + Dice)(f(x_l) + (1 - mu) M(x_l), y) on detached inputs; mu clamped to [0, 1]."""
    assert state.mu_optimizer is not None
    loss = 0.5 * segmentation_loss(rectify(f_l.float(), m_l.float(), state.student.mu), y_l)
    state.mu_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.mu_optimizer.step()
    state.student.clamp_mu_()
    return float(loss.detach())


def _views(batch: Batch, settings: RunSettings, generator: torch.Generator, device: torch.device
           ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Weak views of the labelled (image, label) and unlabelled crops, on the device."""
    x_l = batch.labelled_image.to(device, non_blocking=True)
    square = x_l.shape[2] == x_l.shape[3]
    weak = draw_weak_params(x_l.shape[0], generator, settings.augment, square)
    x_l, y_l = apply_weak(x_l, batch.labelled_label.to(device, non_blocking=True), weak)
    if batch.unlabelled_image.shape[0] == 0 or settings.method.method == "supervised":
        return x_l, y_l, None
    x_u = batch.unlabelled_image.to(device, non_blocking=True)
    x_u, _ = apply_weak(x_u, None, draw_weak_params(x_u.shape[0], generator, settings.augment,
                                                    square))
    return x_l, y_l, x_u


def _optimise(state: TrainState, loss: Tensor) -> None:
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        loss.backward()
        state.optimizer.step()


def train_step(state: TrainState, batch: Batch, settings: RunSettings,
               generator: torch.Generator, total_iterations: int) -> StepRecord:
    """One full iteration (module docstring); increments ``state.iteration``."""
    m, device = settings.method, next(state.student.parameters()).device
    lr = poly_lr(settings.optim.lr, state.iteration, total_iterations, settings.optim.poly_power)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    after_warmup = state.iteration >= warmup_iterations(m.warmup_fraction, total_iterations)
    rectifying = m.method == "crln" and m.rectify and after_warmup
    state.student.train()
    state.teacher.eval()
    x_l, y_l, x_u = _views(batch, settings, generator, device)
    x_s = y_s = c_s = None
    raw = rectified = None
    x_mu = y_mu = f_mu = m_mu = None
    fit_mu = state.mu_optimizer is not None  # exists only for models with a DIM
    if fit_mu and m.mu_view == "strong" and x_u is not None:
        x_mu, y_mu = mu_view(x_l, y_l, settings, generator)
        x_mu = _to(x_mu, device, settings)
    if x_u is not None:
        label, conf, raw, rectified, f_mu, m_mu = teacher_pseudo_labels(
            state, _to(x_u, device, settings), rectifying, settings, x_mu)
        x_s, y_s, c_s = apply_strong(x_u, label, conf, draw_strong_params(
            x_u.shape[0], generator, settings.augment, x_u.shape[2] == x_u.shape[3]))
        x_s = _to(x_s, device, settings)
    weights = {"supervised": m.w_supervised, "relation": m.w_relation, "unsup": m.w_unsup,
               "cps": m.w_cps}
    with autocast(settings, device):
        terms, f_l, m_l = student_losses(state, _to(x_l, device, settings), y_l, x_s, y_s, c_s,
                                         settings, generator, after_warmup)
    loss = sum(weights[k] * v for k, v in terms.items())
    _optimise(state, loss)
    ema_update(state.teacher, state.student, ema_decay(state.iteration, m.ema_decay))
    if f_mu is None:  # mu_view "weak", or no unlabelled crops: the student's training view
        f_mu, m_mu, y_mu = f_l, m_l, y_l
    loss_mu = _mu_step(state, f_mu, m_mu, y_mu) if fit_mu and m_mu is not None else None
    state.iteration += 1
    value = {k: float(v.detach()) for k, v in terms.items()}
    return StepRecord(
        loss=float(loss.detach()), loss_supervised=value["supervised"],
        loss_relation=value.get("relation"), loss_unsup=value.get("unsup"),
        loss_cps=value.get("cps"), loss_mu=loss_mu,
        mu=float(state.student.mu.detach()) if state.student.has_relation else None, lr=lr,
        confident_raw=raw, confident_rectified=rectified)
