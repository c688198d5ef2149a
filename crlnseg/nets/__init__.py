"""Backbones (V-Net, 3D U-Net) with one output type, :class:`NetOutput`."""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from crlnseg.nets.backbone import strip_deep_supervision
from crlnseg.nets.heads import ProjectionHead
from crlnseg.nets.output import EmbedMode, NetOutput
from crlnseg.nets.unet import UNet3D
from crlnseg.nets.vnet import VNet

if TYPE_CHECKING:
    from crlnseg.settings import ModelSettings

__all__ = ["EmbedMode", "NetOutput", "ProjectionHead", "UNet3D", "VNet", "build_backbone",
           "strip_deep_supervision"]


def build_backbone(model: ModelSettings) -> nn.Module:
    """The backbone named by ``model.backbone``; its embedding width is the prototype width F."""
    cls = {"vnet": VNet, "unet": UNet3D}[model.backbone]
    return cls(model.in_channels, model.num_classes, model.base_filters, model.dropout,
               model.prototype_dim, model.strides, model.kernels, norm=model.norm,
               activation=model.activation, deep_supervision=model.deep_supervision)
