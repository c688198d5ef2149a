"""Normalisation and activation layers of the backbones, chosen by ``model.norm`` and
``model.activation``: BatchNorm + ReLU (the reference V-Net) or nnU-Net's InstanceNorm (affine)
+ LeakyReLU (slope 0.01)."""

from __future__ import annotations

from typing import Literal

from torch import nn

__all__ = ["Norm", "Activation", "norm_layer", "activation_layer"]

Norm = Literal["batch", "instance"]
Activation = Literal["relu", "leaky_relu"]


def norm_layer(kind: Norm, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm3d(channels)
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    raise ValueError(f"norm must be batch or instance, got {kind!r}")


def activation_layer(kind: Activation) -> nn.Module:
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leaky_relu":
        return nn.LeakyReLU(0.01, inplace=True)
    raise ValueError(f"activation must be relu or leaky_relu, got {kind!r}")
