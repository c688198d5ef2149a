"""The CRLN model (paper Sec. 3): backbone + prototypes P (C x R x F) + DIM + mu.

``CRLNModel(x)`` gives f(x), the relationship map M(x) and the embedding. Models for the
mean-teacher and supervised baselines are the same class without prototypes and DIM
(``relation`` is None). mu is a raw scalar parameter clamped to [0, 1] after each of its own
optimiser steps (METHOD.md: "kept in [0, 1]"; the reference starts it at 0 unconstrained, and a
clamped raw parameter starting at 0 is the closest constrained form); :attr:`CRLNModel.mu` also
clamps when read, so a value outside [0, 1] is never used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from crlnseg.method import rectification
from crlnseg.method.dynamic_interaction import DynamicInteraction
from crlnseg.method.prototypes import Prototypes
from crlnseg.nets import EmbedMode, NetOutput, build_backbone

if TYPE_CHECKING:
    from crlnseg.settings import RunSettings

__all__ = ["CRLNOutput", "CRLNModel", "build_model", "predict_logits"]


@dataclass
class CRLNOutput:
    """logits f(x) and M(x) (B, C, X, Y, Z); embedding (B, F, X, Y, Z) when requested dense."""

    logits: Tensor
    relation: Tensor | None
    embedding: Tensor | None
    net: NetOutput | None = None


class CRLNModel(nn.Module):
    def __init__(self, backbone: nn.Module, prototypes: Prototypes | None = None,
                 interaction: DynamicInteraction | None = None) -> None:
        super().__init__()
        if (prototypes is None) != (interaction is None):
            raise ValueError("prototypes and interaction come together")
        self.backbone = backbone
        self.prototypes = prototypes
        self.interaction = interaction
        self.mu_raw = nn.Parameter(torch.zeros(()))

    @property
    def has_relation(self) -> bool:
        return self.interaction is not None

    @property
    def mu(self) -> Tensor:
        """mu, constrained to [0, 1]."""
        return self.mu_raw.clamp(0.0, 1.0)

    @torch.no_grad()
    def clamp_mu_(self) -> None:
        self.mu_raw.clamp_(0.0, 1.0)

    def relation(self, net: NetOutput, count: int | None = None) -> Tensor:
        """M(x) for the first ``count`` samples (all by default) of a backbone output."""
        if self.interaction is None or self.prototypes is None:
            raise RuntimeError("this model has no Dynamic Interaction Module")
        n = net.feat_quarter.shape[0] if count is None else count
        return self.interaction(self.prototypes(), net.feat_quarter[:n], net.feat_half[:n])

    def forward(self, x: Tensor, with_relation: bool = True,
                embed: EmbedMode = "dense") -> CRLNOutput:
        net = self.backbone(x, embed=embed)
        relation = self.relation(net) if with_relation and self.has_relation else None
        return CRLNOutput(net.logits, relation, net.embedding, net)


def build_model(settings: RunSettings) -> CRLNModel:
    """Method crln: backbone + prototypes + DIM; mean-teacher / supervised: backbone only."""
    m = settings.model
    backbone = build_backbone(m)
    if settings.method.method != "crln":
        return CRLNModel(backbone)
    b = m.base_filters
    return CRLNModel(backbone, Prototypes(m.num_classes, m.prototypes_per_class, m.prototype_dim),
                     DynamicInteraction(m.num_classes, m.prototypes_per_class, m.prototype_dim,
                                        4 * b, 2 * b, up_stride=m.strides[0], kernel=m.kernels[1]))


def predict_logits(model: CRLNModel, x: Tensor, rectify: bool = True) -> Tensor:
    """Inference logits: f(x) + (1 - mu) M(x) if ``rectify`` and the model has a DIM, else f(x)."""
    out = model(x, with_relation=rectify and model.has_relation, embed="none")
    if out.relation is None:
        return out.logits
    return rectification.rectify(out.logits, out.relation, model.mu.to(out.logits.dtype))
