"""Validation during training (``--val``): sliding-window Dice of the EMA teacher.

Each validation case is predicted with the rectified output softmax(f + (1 - mu) M) of the teacher
(what inference uses), blended over overlapping patches of the training size as ``crlnseg predict``
blends them (:func:`blending`), on the prepared grid; Dice is the mean over foreground classes
(medpy's definition, :func:`crlnseg.metrics.dice`).
With several processes each rank predicts its share of the cases and the results are gathered.
Validation data must never be the test set: ``best.pt`` is selected on it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["Validation", "blending", "case_dice", "validate"]


class Validation(NamedTuple):
    dice: float                 # mean Dice over the cases
    per_case: dict[str, float]  # Dice per case, in the manifest's order
    # Mean Dice after keeping the largest connected component of each class (`crlnseg predict
    # --keep-largest`): tells the user whether that post-processing suits their anatomy.
    dice_largest: float


def blending(stride: tuple[int, int, int] | None) -> dict[str, Any]:
    """Sliding-window blending as ``crlnseg predict`` does it by default, so that validation Dice
    (and ``best.pt``) reflect what users get from the run: Gaussian at overlap 0.5 with predict's
    sigma, or, with an explicit stride, uniform averaging (the literature's protocol)."""
    from crlnseg.settings import PredictSettings

    if stride is not None:
        return {"blend": "uniform", "stride": tuple(stride)}
    defaults = PredictSettings()
    return {"blend": "gaussian", "overlap": defaults.overlap, "sigma_scale": defaults.sigma_scale}


def case_dice(pred: np.ndarray, label: np.ndarray, num_classes: int) -> float:
    """Mean Dice over the foreground classes 1 .. C-1."""
    from crlnseg.metrics import dice

    return float(np.mean([dice(pred == c, label == c) for c in range(1, num_classes)]))


@torch.no_grad()
def validate(model: Any, manifest: Any, settings: Any, device: torch.device, rank: int = 0,
             world_size: int = 1) -> Validation:
    """Dice of ``model`` (eval mode) on a prepared manifest, with and without keeping the largest
    component of each class."""
    from crlnseg.inference.postprocess import keep_largest_component
    from crlnseg.inference.predictor import inference_autocast
    from crlnseg.inference.sliding_window import sliding_window
    from crlnseg.method.crln import predict_logits

    classes = settings.model.num_classes
    was_training = model.training
    model.eval()

    def probs(x: torch.Tensor) -> torch.Tensor:
        with inference_autocast(device, settings.train.amp):  # predict's precision, too
            return torch.softmax(predict_logits(model, x, rectify=True).float(), dim=1)

    foreground = list(range(1, classes))
    mine: dict[str, tuple[float, float]] = {}
    for case in manifest.cases[rank::world_size]:
        image = torch.from_numpy(np.array(manifest.image(case.id, mmap=True)))  # writable copy
        out = sliding_window(image, probs, settings.train.patch, classes,
                             **blending(settings.train.val_stride),
                             batch_size=settings.train.batch_labelled, device=device,
                             buffer_device="cpu")
        pred = out.argmax(0).numpy().astype(np.uint8)
        label = np.asarray(manifest.label(case.id, mmap=True))
        mine[case.id] = (case_dice(pred, label, classes),
                         case_dice(keep_largest_component(pred, foreground), label, classes))
    model.train(was_training)
    both = dict(mine)
    if world_size > 1:
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, mine)
        both = {k: v for part in parts for k, v in part.items()}
    per_case = {c.id: both[c.id][0] for c in manifest.cases}
    return Validation(float(np.mean(list(per_case.values()))), per_case,
                      float(np.mean([both[c.id][1] for c in manifest.cases])))
