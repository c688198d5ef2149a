"""Helpers of the predict / rectify tests: a stand-in model, a tiny real run, NIfTI writing."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

OBLIQUE_SPACING = (0.7, 1.3, 2.5)


class StandIn(nn.Module):
    """Flip-equivariant stand-in for CRLNModel: f = s * (level, mean3x3x3(x)), M = (0, shift)."""

    def __init__(self, scale: float = 4.0, level: float = 1.4, shift: float = 2.0,
                 mu: float = 0.5, has_relation: bool = True) -> None:
        super().__init__()
        self.scale, self.level, self.shift = scale, level, shift
        self.mu_raw = nn.Parameter(torch.tensor(mu))
        self.has_relation = has_relation  # False: a baseline (mean teacher, supervised), no M(x)

    @property
    def mu(self) -> torch.Tensor:
        return self.mu_raw.clamp(0, 1)

    def forward(self, x: torch.Tensor, with_relation: bool = True, embed: str = "dense"):
        smooth = nn.functional.avg_pool3d(x[:, :1], 3, stride=1, padding=1,
                                          count_include_pad=False)
        logits = self.scale * torch.cat([torch.full_like(smooth, self.level), smooth], dim=1)
        relation = None
        if with_relation and self.has_relation:
            relation = torch.cat([torch.zeros_like(smooth), torch.full_like(smooth, self.shift)],
                                 dim=1)
        return SimpleNamespace(logits=logits, relation=relation, embedding=None)


def oblique_affine(spacing=OBLIQUE_SPACING, origin=(12.5, -30.25, 7.0)) -> np.ndarray:
    """A RAS affine with a rotation about two axes (oblique) and anisotropic spacing."""
    a, b = np.deg2rad(20.0), np.deg2rad(-12.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    affine = np.eye(4)
    affine[:3, :3] = rz @ rx @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def write_nifti(path: Path, array: np.ndarray, affine: np.ndarray | None = None) -> Path:
    import nibabel as nib

    affine = oblique_affine() if affine is None else affine
    image = nib.Nifti1Image(array, affine)
    image.header.set_qform(affine, code=1)
    image.header.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))
    return path


def blob_image(shape=(20, 18, 12), seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image float32, label uint8): a bright off-centre ellipsoid in noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    centre = np.array(shape) * np.array([0.4, 0.55, 0.5])
    radii = np.array(shape) * 0.28
    label = (((grid - centre) / radii) ** 2).sum(-1) <= 1.0
    image = 100.0 * label + rng.normal(0.0, 10.0, shape)
    return image.astype(np.float32), label.astype(np.uint8)


def make_tiny_run(folder: Path, channels: int = 1, inference: dict | None = None,
                  method: str = "crln", prepare: dict | None = None) -> Path:
    """A real (untrained) crlnseg run: base filters 4, R 2, F 8, patch 16^3; ``inference``: a
    validated blending choice stored as training stores it (crlnseg.inference.choice)."""
    from crlnseg.checkpoint import save_checkpoint
    from crlnseg.settings import (
        MethodSettings,
        ModelSettings,
        PrepareSettings,
        RunSettings,
        TrainSettings,
    )
    from crlnseg.train.state import init_state, state_to_dict

    settings = RunSettings(
        model=ModelSettings(in_channels=channels, base_filters=4, prototypes_per_class=2,
                            prototype_dim=8),
        train=TrainSettings(patch=(16, 16, 16), device="cpu", seed=3),
        method=MethodSettings(method=method), prepare=PrepareSettings(**(prepare or {})))
    state = init_state(settings, torch.device("cpu"))
    with torch.no_grad():
        state.teacher.mu_raw.fill_(0.25)  # rectified output != raw output
    meta = {"classes": ["background", "foreground"], "channels": channels, "method": method,
            "prepare": settings.prepare.model_dump(mode="json"), "iteration": 0,
            "inference": inference}
    save_checkpoint(folder / "checkpoints" / "last.pt", state_to_dict(state), settings, meta)
    return folder
