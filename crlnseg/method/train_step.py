"""One CRLN training iteration (METHOD.md Sec. 1-5), and the state it updates.

    lr      <- poly(lr0, t, T)
    x_l, x_u <- weak views;  ybar, M_T <- teacher(x_u)  (eval mode, no gradient)
    yhat, c <- pseudo_labels(ybar + (1 - mu) M_T)   after warm-up, when rectifying; else of ybar
    x_s, yhat_s, c_s <- strong view of (x_u, yhat, c)
    L = w_sup seg(f(x_l), y) + w_rel seg(M(x_l), y) + w_unsup L_unsup + w_cps L_cps
        (seg(f(x_l), y) is the weighted sum over decoder resolutions with model.deep_supervision,
        crlnseg.method.deep_supervision)
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
from dataclasses import asdict, dataclass, field
from typing import Protocol

import torch
from torch import Tensor, nn

from crlnseg.data.augment import augment_labelled, augment_unlabelled
from crlnseg.data.views import apply_strong, apply_weak, draw_strong_params, draw_weak_params
from crlnseg.method.crln import CRLNModel
from crlnseg.method.deep_supervision import deep_supervision_loss
from crlnseg.method.losses import pseudo_label_loss, segmentation_loss
from crlnseg.method.mean_teacher import ema_decay, ema_update
from crlnseg.method.positive_supervision import positive_supervision_loss
from crlnseg.method.prototypes import class_summary
from crlnseg.method.rectification import confident_share, pseudo_labels, rectify
from crlnseg.settings import MethodSettings, RunSettings
from crlnseg.types import IGNORE

__all__ = ["Placement", "StepState", "StudentObjective", "Batch", "StepRecord", "poly_lr",
           "warmup_iterations", "student_losses", "train_step"]


@dataclass(frozen=True)
class Placement:
    """Where the step's tensors live and in which precision: chosen by the caller (training
    decides the policy), applied here. ``amp_dtype`` None: fp32."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is not None and self.device.type == "cuda":
            return torch.autocast("cuda", dtype=self.amp_dtype)
        return contextlib.nullcontext()

    def put(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 5:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        return x


class StepState(Protocol):
    """What one iteration reads and updates (:class:`crlnseg.train.state.TrainState`)."""

    student: CRLNModel
    teacher: CRLNModel
    objective: nn.Module  # StudentObjective of the student, or its data-parallel wrapper
    optimizer: torch.optim.Optimizer
    mu_optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None
    placement: Placement
    iteration: int


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


def _masked(label: Tensor, conf: Tensor, inside: Tensor | None) -> tuple[Tensor, Tensor]:
    if inside is None:
        return label, conf
    inside = inside.to(label.device)
    return torch.where(inside, label, IGNORE), torch.where(inside, conf, 0.0)


@torch.no_grad()
def teacher_pseudo_labels(state: StepState, x_u: Tensor, rectifying: bool, settings: RunSettings,
                          x_mu: Tensor | None = None, inside: Tensor | None = None
                          ) -> tuple[Tensor, Tensor, float, float | None, Tensor | None,
                                     Tensor | None]:
    """(yhat, confidence, share confident before, after rectification) from the weak view x_u,
    and the teacher's detached f, M of ``x_mu`` (the mu view) when given, from the same pass.
    Voxels outside ``inside`` (read from beyond the crop by a spatial transform) get IGNORE
    and confidence 0, as the strong view's padding."""
    thr = settings.method.confidence_threshold
    n_u = x_u.shape[0]
    x = x_u if x_mu is None else torch.cat([x_u, x_mu])
    with state.placement.autocast():
        out = state.teacher(x, with_relation=rectifying or x_mu is not None, embed="none")
    f_mu = m_mu = None
    if x_mu is not None:
        f_mu, m_mu = out.logits[n_u:].float(), out.relation[n_u:].float()
    logits = out.logits[:n_u]
    relation = None if out.relation is None else out.relation[:n_u]
    label, conf = _masked(*pseudo_labels(logits), inside)
    raw, rectified = confident_share(conf, thr), None
    if rectifying and relation is not None:
        mu = state.student.mu.detach()  # the mu being learned, not its EMA
        label, conf = _masked(*pseudo_labels(rectify(logits.float(), relation.float(), mu)),
                              inside)
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


class StudentObjective(nn.Module):
    """The student's loss terms of one iteration as one forward pass (the module that
    data-parallel training wraps), and the detached f(x_l), M(x_l) for the mu step.

    It holds the student's backbone, P and DIM (not mu, which has its own optimiser). P and the
    DIM enter only through ``relation`` = seg(M(x_l), y); positive supervision uses the
    teacher's prototype summary m_c (no gradient) and the pseudo-label loss no M at all.
    """

    def __init__(self, student: CRLNModel, method: MethodSettings) -> None:
        super().__init__()
        self.backbone = student.backbone
        self.prototypes = student.prototypes
        self.interaction = student.interaction
        self.method = method

    def forward(self, x_l: Tensor, y_l: Tensor, x_s: Tensor | None, y_s: Tensor | None,
                c_s: Tensor | None, summary: Tensor | None, generator: torch.Generator
                ) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
        m = self.method
        n_l = x_l.shape[0]
        use_cps = m.method == "crln" and m.positive_supervision
        x = x_l if x_s is None else torch.cat([x_l, x_s])
        net = self.backbone(x, embed="hidden" if use_cps else "none")
        if getattr(self.backbone, "aux_heads", None) is not None:
            terms = {"supervised": deep_supervision_loss(
                [net.logits[:n_l], *self.backbone.deep_logits(net, n_l)], y_l)}
        else:
            terms = {"supervised": segmentation_loss(net.logits[:n_l], y_l)}
        relation = None
        if self.interaction is not None and self.prototypes is not None:
            relation = self.interaction(self.prototypes(), net.feat_quarter[:n_l],
                                        net.feat_half[:n_l])
            terms["relation"] = segmentation_loss(relation, y_l)
        if x_s is not None and m.method != "supervised":
            terms["unsup"] = pseudo_label_loss(net.logits[n_l:], y_s, c_s,
                                               m.confidence_threshold)
        if use_cps:
            labels = y_l if y_s is None else torch.cat(
                [y_l, torch.where(c_s >= m.weak_threshold, y_s, IGNORE)])
            terms["cps"] = positive_supervision_loss(
                net.embed_hidden, self.backbone.head.project_points, labels,
                torch.softmax(net.logits.detach().float(), dim=1), summary, m.xi, generator,
                anchors=m.anchors, negatives=m.negatives, temperature=m.temperature,
                uncertain_below=m.confidence_threshold)
        detached = None if relation is None else relation.detach()
        return terms, net.logits[:n_l].detach(), detached


def student_losses(state: StepState, x_l: Tensor, y_l: Tensor, x_s: Tensor | None,
                   y_s: Tensor | None, c_s: Tensor | None, settings: RunSettings,
                   generator: torch.Generator, after_warmup: bool
                   ) -> tuple[dict[str, Tensor], Tensor, Tensor | None]:
    """:class:`StudentObjective` of the state; m_c is the teacher's after the warm-up (before
    it, positive supervision uses plain class means)."""
    summary = None
    if after_warmup and state.teacher.prototypes is not None:
        summary = class_summary(state.teacher.prototypes().detach())
    return state.objective(x_l, y_l, x_s, y_s, c_s, summary, generator)


def _mu_step(state: StepState, f_l: Tensor, m_l: Tensor, y_l: Tensor) -> float:
    """0.5 (CE + Dice)(f(x_l) + (1 - mu) M(x_l), y) on detached inputs; mu clamped to [0, 1]."""
    assert state.mu_optimizer is not None
    loss = 0.5 * segmentation_loss(rectify(f_l.float(), m_l.float(), state.student.mu), y_l)
    state.mu_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    state.mu_optimizer.step()
    state.student.clamp_mu_()
    return float(loss.detach())


def _views(batch: Batch, settings: RunSettings, generator: torch.Generator, device: torch.device
           ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Weak views of the labelled (image, label) and unlabelled crops, on the device, with
    nnU-Net's augmentation where set (crlnseg.data.augment), and the mask of unlabelled voxels
    whose source lies inside the crop (None: all)."""
    aug = settings.augment
    x_l = batch.labelled_image.to(device, non_blocking=True)
    square = x_l.shape[2] == x_l.shape[3]
    weak = draw_weak_params(x_l.shape[0], generator, aug, square)
    x_l, y_l = apply_weak(x_l, batch.labelled_label.to(device, non_blocking=True), weak)
    assert y_l is not None
    x_l, y_l = augment_labelled(x_l, y_l, aug, generator)
    if batch.unlabelled_image.shape[0] == 0 or settings.method.method == "supervised":
        return x_l, y_l, None, None
    x_u = batch.unlabelled_image.to(device, non_blocking=True)
    x_u, _ = apply_weak(x_u, None, draw_weak_params(x_u.shape[0], generator, aug, square))
    x_u, inside = augment_unlabelled(x_u, aug, generator)
    return x_l, y_l, x_u, inside


def _optimise(state: StepState, loss: Tensor) -> None:
    state.optimizer.zero_grad(set_to_none=True)
    if state.scaler is not None:
        state.scaler.scale(loss).backward()
        state.scaler.step(state.optimizer)
        state.scaler.update()
    else:
        loss.backward()
        state.optimizer.step()


def train_step(state: StepState, batch: Batch, settings: RunSettings,
               generator: torch.Generator, total_iterations: int) -> StepRecord:
    """One full iteration (module docstring); increments ``state.iteration``."""
    m, place = settings.method, state.placement
    lr = poly_lr(settings.optim.lr, state.iteration, total_iterations, settings.optim.poly_power)
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    after_warmup = state.iteration >= warmup_iterations(m.warmup_fraction, total_iterations)
    rectifying = m.method == "crln" and m.rectify and after_warmup
    state.student.train()
    state.teacher.eval()
    x_l, y_l, x_u, inside = _views(batch, settings, generator, place.device)
    x_s = y_s = c_s = None
    raw = rectified = None
    x_mu = y_mu = f_mu = m_mu = None
    fit_mu = state.mu_optimizer is not None  # exists only for models with a DIM
    if fit_mu and m.mu_view == "strong" and x_u is not None:
        x_mu, y_mu = mu_view(x_l, y_l, settings, generator)
        x_mu = place.put(x_mu)
    if x_u is not None:
        label, conf, raw, rectified, f_mu, m_mu = teacher_pseudo_labels(
            state, place.put(x_u), rectifying, settings, x_mu, inside)
        x_s, y_s, c_s = apply_strong(x_u, label, conf, draw_strong_params(
            x_u.shape[0], generator, settings.augment, x_u.shape[2] == x_u.shape[3]))
        x_s = place.put(x_s)
    weights = {"supervised": m.w_supervised, "relation": m.w_relation, "unsup": m.w_unsup,
               "cps": m.w_cps}
    with place.autocast():
        terms, f_l, m_l = student_losses(state, place.put(x_l), y_l, x_s, y_s, c_s, settings,
                                         generator, after_warmup)
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
