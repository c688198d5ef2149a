"""nnU-Net's augmentation of the crops, around the paper's views (METHOD.md Sec. 7):

    labelled    (x_l, y)  <- weak view -> spatial -> intensity        -> student
    unlabelled   x_u      <- weak view -> spatial (augment.spatial_unlabelled) -> teacher
                             -> pseudo-labels -> strong view           -> student

spatial = rotation, scaling, elastic deformation, mirroring (:mod:`crlnseg.data.spatial`),
intensity = noise, blur, brightness, contrast, gamma (:mod:`crlnseg.data.intensity`). On the
unlabelled stream the teacher sees the transformed weak view, so its pseudo-labels share the
student's geometry; voxels whose source lies outside the crop are returned as ``inside`` False
so their pseudo-labels can be ignored. Intensity transforms stay off that stream: they would
change the paper's weak view. With every probability 0 nothing is drawn from the generator, so
the rest of the iteration's randomness is as without this module.
"""

from __future__ import annotations

import torch
from torch import Tensor

from crlnseg.data.intensity import apply_intensity, draw_intensity_params, intensity_enabled
from crlnseg.data.spatial import apply_spatial, draw_spatial_params, spatial_enabled
from crlnseg.settings import AugmentSettings

__all__ = ["augment_labelled", "augment_unlabelled"]


def augment_labelled(image: Tensor, label: Tensor, settings: AugmentSettings,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Labelled crops (B, C, X, Y, Z) and labels (B, X, Y, Z); outside voxels labelled IGNORE."""
    if spatial_enabled(settings):
        image, spatial_label, _ = apply_spatial(
            image, label, draw_spatial_params(image.shape[0], generator, settings))
        assert spatial_label is not None
        label = spatial_label
    if intensity_enabled(settings):
        image = apply_intensity(image, draw_intensity_params(image.shape[0], image.shape[1],
                                                             generator, settings))
    return image, label


def augment_unlabelled(image: Tensor, settings: AugmentSettings, generator: torch.Generator
                       ) -> tuple[Tensor, Tensor | None]:
    """The unlabelled weak view (B, C, X, Y, Z), spatially transformed, and its ``inside`` mask
    (B, X, Y, Z); None when nothing was transformed."""
    if not (settings.spatial_unlabelled and spatial_enabled(settings)):
        return image, None
    image, _, inside = apply_spatial(image, None, draw_spatial_params(image.shape[0], generator,
                                                                      settings))
    return image, inside
