"""Validation during training (``--val``): sliding-window Dice of the EMA teacher.

Each validation case is predicted with the rectified output softmax(f + (1 - mu) M) of the teacher
(what inference uses), blended over overlapping patches of the training size as ``crlnseg predict``
blends them (:func:`blending`), on the prepared grid; Dice is the mean over foreground classes
(medpy's definition, :func:`crlnseg.metrics.dice`). The same patch outputs are also blended and
post-processed as the other candidates of :mod:`crlnseg.inference.choice`; the best is stored in
the checkpoint for ``crlnseg predict``.
With several processes each rank predicts its share of the cases and the results are gathered.
Validation data must never be the test set: ``best.pt`` and the inference choice are selected on it.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from crlnseg.inference.sliding_window import resolve_sigma
from crlnseg.metrics import mean_foreground_dice
from crlnseg.settings import PredictSettings

__all__ = ["Validation", "blending", "validate"]


class Validation(NamedTuple):
    dice: float                 # mean Dice over the cases, predict's built-in default blending
    per_case: dict[str, float]  # Dice per case, in the manifest's order
    # Mean Dice after keeping the largest connected component of each class (`crlnseg predict
    # --keep-largest`): tells the user whether that post-processing suits their anatomy.
    dice_largest: float
    # The blending / post-processing candidates' mean Dice and the best of them
    # (crlnseg.inference.choice), stored in the checkpoint for `crlnseg predict`.
    choice: dict[str, Any]


def blending(stride: tuple[int, int, int] | None) -> dict[str, Any]:
    """Sliding-window blending as ``crlnseg predict`` does it with its built-in default (the
    patches the candidates of :mod:`crlnseg.inference.choice` are blended from): Gaussian at
    overlap 0.5, or, with an explicit stride, uniform averaging (the literature's protocol)."""
    if stride is not None:
        return {"blend": "uniform", "stride": tuple(stride)}
    return {"blend": "gaussian", "overlap": PredictSettings().overlap,
            "sigma_scale": resolve_sigma(None)}


@torch.no_grad()
def validate(model: Any, manifest: Any, settings: Any, device: torch.device, rank: int = 0,
             world_size: int = 1, iteration: int | None = None) -> Validation:
    """Dice of ``model`` (eval mode) on a prepared manifest for each blending / post-processing
    candidate (:func:`crlnseg.inference.choice.candidates`: the built-in default first), from one
    pass of the network per case. Memory: one blended ``(C, X, Y, Z)`` float32 volume per
    candidate sigma (two), on the CPU."""
    from crlnseg.inference.choice import candidates, choose
    from crlnseg.inference.postprocess import keep_largest_component
    from crlnseg.inference.predictor import inference_autocast
    from crlnseg.inference.sliding_window import blend_patches, gaussian_importance_map
    from crlnseg.method.crln import predict_logits

    classes = settings.model.num_classes
    patch = tuple(settings.train.patch)
    was_training = model.training
    model.eval()

    def probs(x: torch.Tensor) -> torch.Tensor:
        with inference_autocast(device, settings.train.amp):  # predict's precision, too
            return torch.softmax(predict_logits(model, x, rectify=True).float(), dim=1)

    blend = blending(settings.train.val_stride)
    options = candidates(blend["blend"] == "gaussian")
    sigmas = list(dict.fromkeys(s for s, _ in options))
    maps = [torch.ones(patch) if s is None else gaussian_importance_map(patch, s) for s in sigmas]
    foreground = list(range(1, classes))
    mine: dict[str, list[float]] = {}  # case -> Dice per candidate, in `options` order
    for case in manifest.cases[rank::world_size]:
        image = torch.from_numpy(np.array(manifest.image(case.id, mmap=True)))  # writable copy
        blended = blend_patches(image, probs, patch, classes, maps,
                                overlap=blend.get("overlap", 0.5), stride=blend.get("stride"),
                                batch_size=settings.train.batch_labelled, device=device,
                                buffer_device="cpu")
        label = np.asarray(manifest.label(case.id, mmap=True))
        masks = {s: out.argmax(0).numpy().astype(np.uint8)
                 for s, out in zip(sigmas, blended, strict=True)}
        mine[case.id] = [mean_foreground_dice(
            keep_largest_component(masks[s], foreground) if largest else masks[s], label, classes)
            for s, largest in options]
    model.train(was_training)
    both = dict(mine)
    if world_size > 1:
        parts: list[Any] = [None] * world_size
        dist.all_gather_object(parts, mine)
        both = {k: v for part in parts for k, v in part.items()}
    means = np.mean([both[c.id] for c in manifest.cases], axis=0)
    scores = {option: float(m) for option, m in zip(options, means, strict=True)}
    default, default_largest = options[0], (options[0][0], True)
    per_case = {c.id: both[c.id][0] for c in manifest.cases}
    return Validation(scores[default], per_case, scores[default_largest],
                      choose(scores, iteration))
