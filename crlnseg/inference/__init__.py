"""Inference: sliding window (Gaussian or uniform blending), test-time flips, post-processing,
and the reusable :class:`~crlnseg.inference.predictor.Predictor`."""

from __future__ import annotations

from crlnseg.inference.postprocess import keep_largest_component
from crlnseg.inference.sliding_window import gaussian_importance_map, patch_origins, sliding_window
from crlnseg.inference.tta import flip_sets, with_flips

__all__ = ["sliding_window", "gaussian_importance_map", "patch_origins", "flip_sets", "with_flips",
           "keep_largest_component"]
