"""The trained model for inference: the EMA teacher of a checkpoint, checked against its meta."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from crlnseg.checkpoint import clean_message, load_checkpoint, resolve_checkpoint
from crlnseg.config import settings_from_dict
from crlnseg.errors import CheckpointError
from crlnseg.inference.choice import check_choice
from crlnseg.method.crln import CRLNModel, build_model
from crlnseg.nets import strip_deep_supervision
from crlnseg.settings import RunSettings

__all__ = ["load_inference_model"]


def load_inference_model(model: Path, which: str = "last",
                         device: Any = "cpu") -> tuple[CRLNModel, RunSettings, dict]:
    """The EMA teacher (what inference uses) in eval mode, the run's settings and its meta."""
    path = resolve_checkpoint(model, which)
    data = load_checkpoint(path, map_location="cpu")
    settings = settings_from_dict(data["settings"], source=str(path))
    # Inference never uses deep-supervision heads: built without them, loaded with or without.
    plain = settings.model_copy(update={"model": settings.model.model_copy(
        update={"deep_supervision": False})})
    net = build_model(plain)
    try:
        net.load_state_dict(strip_deep_supervision(data["state"]["teacher"]))
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{path}: teacher weights do not match the model "
                              f"({clean_message(str(err))})") from None
    meta = data["meta"]
    problem = check_choice(meta.get("inference"))
    if problem:
        raise CheckpointError(f"{path}: damaged checkpoint: {problem}")
    # A meta that disagrees with the weights would fail mid-run, after outputs were planned.
    classes = meta.get("classes", range(settings.model.num_classes))
    if len(classes) != settings.model.num_classes:
        raise CheckpointError(f"{path}: damaged checkpoint: {len(classes)} classes in its meta, "
                              f"{settings.model.num_classes} in its model")
    if int(meta.get("channels", settings.model.in_channels)) != settings.model.in_channels:
        raise CheckpointError(f"{path}: damaged checkpoint: {meta.get('channels')} channels in "
                              f"its meta, {settings.model.in_channels} in its model")
    return net.to(device).eval(), settings, meta
