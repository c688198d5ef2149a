"""A predictor built once from a trained run and reused across cases.

Per case: preprocess exactly as training did (``crlnseg.data.preprocessing.preprocess`` with the
run's ``PrepareSettings``), sliding window of the EMA teacher over the whole case, per-patch

    rectified:  softmax(f(x) + (1 - mu) * M(x))      (method/METHOD.md Sec. 2, inference)
    raw:        softmax(f(x))                         (``rectify=False``)

blended into one probability map, mapped back to the input grid (``restore``: resample back,
un-crop), then argmax. Probabilities (not labels) are restored, so resampling back interpolates
the softmax rather than nearest-neighbour labels. :meth:`Predictor.rectify_volume` blends both
heads in the same pass (2C channels: the softmax of each head is averaged, as the literature
averages the softmax of patches).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from crlnseg.console import track
from crlnseg.inference.cases import check_channel_count
from crlnseg.inference.postprocess import argmax_max, keep_largest_component
from crlnseg.inference.sliding_window import sliding_window
from crlnseg.inference.tta import flip_sets, with_flips
from crlnseg.io.volume import Volume
from crlnseg.settings import PredictSettings, PrepareSettings, check_stride

__all__ = ["Prediction", "RectifiedPrediction", "Predictor", "inference_autocast",
           "resolve_device"]

Heads = Literal["raw", "rectified", "both"]


@dataclass
class Prediction:
    mask: np.ndarray                  # (X, Y, Z) uint8 on the input grid
    probabilities: np.ndarray | None  # (C, X, Y, Z) float32 on the input grid, when asked
    seconds: float


@dataclass
class RectifiedPrediction:
    raw: np.ndarray             # (X, Y, Z) uint8: argmax softmax(f)
    rectified: np.ndarray       # (X, Y, Z) uint8: argmax softmax(f + (1 - mu) M)
    raw_confidence: np.ndarray  # (X, Y, Z) float32: max softmax(f)
    confidence: np.ndarray      # (X, Y, Z) float32: max softmax(f + (1 - mu) M)
    mu: float | None            # None: the run has no M(x) (mean teacher, supervised)
    seconds: float


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        from crlnseg.errors import ConfigError

        raise ConfigError("--device cuda: no CUDA device is available")
    return torch.device(device)


def inference_autocast(device: torch.device, amp: bool) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA when ``amp`` (as nnU-Net predicts; training picks bf16 where the GPU
    has it), nothing otherwise. Shared by ``predict`` and validation so both score alike."""
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()


class Predictor:
    """EMA teacher + settings; call :meth:`predict_volume` or :meth:`rectify_volume` per case."""

    def __init__(self, model: torch.nn.Module, settings: PredictSettings,
                 patch: tuple[int, int, int], prepare: PrepareSettings, channels: int,
                 classes: list[str], device: torch.device | None = None,
                 meta: dict[str, Any] | None = None) -> None:
        from crlnseg.inference.choice import apply_choice

        self.meta = meta or {}
        # Blending sigma and keep-largest: explicit settings, else the run's validated choice.
        self.settings, self.choice_note = apply_choice(settings, self.meta.get("inference"))
        self.device = device or resolve_device(settings.device)
        self.model = model.to(self.device).eval()
        # Channels-last 3-D convolutions: 1.16-1.22x faster inference on the CPU (oneDNN),
        # probabilities within 2e-6 (benchmarks/predict_layout.py); on CUDA with mixed precision
        # as in training (cuDNN, benchmarks/RESULTS.md "GPU checks"); CUDA fp32 keeps the
        # default layout (not measured).
        self.channels_last = self.device.type == "cpu" or (self.device.type == "cuda"
                                                           and settings.amp)
        if self.channels_last:
            self.model.to(memory_format=torch.channels_last_3d)
        self.patch = tuple(settings.patch or patch)
        try:
            check_stride(self.settings.stride, self.patch)
        except ValueError as err:
            from crlnseg.errors import ConfigError

            raise ConfigError(f"--stride: {err}") from None
        self.prepare = prepare
        self.channels = channels
        self.classes = classes

    @classmethod
    def from_run(cls, model: Path, which: str = "last",
                 settings: PredictSettings | None = None) -> Predictor:
        """Load the EMA teacher of a run folder or checkpoint file (CheckpointError if bad)."""
        from crlnseg.inference.model import load_inference_model

        settings = settings or PredictSettings()
        device = resolve_device(settings.device)
        net, run, meta = load_inference_model(Path(model), which=which, device=str(device))
        prepare = PrepareSettings.model_validate(meta.get("prepare", run.prepare.model_dump()))
        classes = [str(c) for c in meta.get("classes", range(run.model.num_classes))]
        channels = int(meta.get("channels", run.model.in_channels))
        if settings.patch is not None:
            from crlnseg.errors import ConfigError
            from crlnseg.settings import check_patch

            try:
                check_patch(settings.patch, run.model.total_stride)
            except ValueError as err:
                raise ConfigError(f"--{err}") from None
        return cls(net, settings, tuple(run.train.patch), prepare, channels, classes, device, meta)

    @property
    def mu(self) -> float | None:
        """The teacher's mu; None for a run without a relationship map M(x) (mean teacher,
        supervised), whose "rectified" output is softmax(f)."""
        if not self.has_relation:
            return None
        return float(torch.as_tensor(self.model.mu).detach())

    @property
    def has_relation(self) -> bool:
        return bool(getattr(self.model, "has_relation", False))

    def relation_note(self) -> str | None:
        """A log line for runs that cannot rectify, else None."""
        if self.has_relation or not self.settings.rectify:
            return None
        method = self.meta.get("method", "without prototypes")
        return (f"this run ({method}) has no relationship map M(x): its rectified output is the "
                "teacher's softmax(f), unchanged")

    # -- the network on patches --------------------------------------------------------------
    def _patch_fn(self, heads: Heads) -> Callable[[torch.Tensor], torch.Tensor]:
        from crlnseg.method.rectification import rectify

        def fn(x: torch.Tensor) -> torch.Tensor:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            with inference_autocast(self.device, self.settings.amp):
                out = self.model(x, with_relation=heads != "raw", embed="none")
            f = out.logits.float()
            if heads == "raw" or out.relation is None:  # baselines without a DIM: M = 0
                p = torch.softmax(f, dim=1)
                return torch.cat([p, p], dim=1) if heads == "both" else p
            mu = self.model.mu
            mu = mu.detach().float() if torch.is_tensor(mu) else float(mu)
            r = rectify(f, out.relation.float(), mu)
            if heads == "rectified":
                return torch.softmax(r, dim=1)
            return torch.cat([torch.softmax(f, dim=1), torch.softmax(r, dim=1)], dim=1)

        return with_flips(fn, flip_sets(self.settings.tta))

    def probabilities(self, image: np.ndarray, heads: Heads = "rectified",
                      description: str = "patches") -> torch.Tensor:
        """Blended probabilities ``(K, X, Y, Z)`` float32 (CPU) of a preprocessed ``(C, X, Y, Z)``
        image; K = C classes, or 2C for ``heads="both"`` (raw first)."""
        s = self.settings
        k = len(self.classes) * (2 if heads == "both" else 1)
        x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
        blend = dict(patch=self.patch, out_channels=k, blend=s.mode, overlap=s.overlap,
                     stride=s.stride, batch_size=s.batch_size, sigma_scale=s.sigma_scale,
                     device=self.device,
                     progress=_progress(description))
        with torch.inference_mode():
            try:
                out = sliding_window(x, self._patch_fn(heads), **blend)
            except torch.cuda.OutOfMemoryError:
                # The blending buffer does not fit next to the network: keep it on the host.
                torch.cuda.empty_cache()
                out = sliding_window(x, self._patch_fn(heads), buffer_device="cpu", **blend)
        return out.cpu()

    # -- whole cases -------------------------------------------------------------------------
    def _check(self, volume: Volume) -> None:
        found = 1 if volume.array.ndim == 3 else int(volume.array.shape[0])
        check_channel_count(found, self.channels, volume.path or "input")

    def _run(self, volume: Volume, heads: Heads) -> list[np.ndarray]:
        """Preprocess, sliding window, restore: one probability map per head, input grid."""
        from crlnseg.data.orientation import from_canonical
        from crlnseg.data.preprocessing import preprocess, restore

        self._check(volume)
        case = preprocess(volume, None, self.prepare)
        info = case.info
        name = volume.path.name if volume.path is not None else "case"
        probs = self.probabilities(case.image, heads, description=name).numpy()
        del case  # the preprocessed image is not needed any more
        c = len(self.classes)
        parts = [probs[:c], probs[c:]] if heads == "both" else [probs]
        if _same_grid(info):  # no crop, no resampling: only the orientation to undo
            return [from_canonical(p, info.orientation) for p in parts]
        return [restore(p, info, probabilities=True) for p in parts]

    def predict_volume(self, volume: Volume, save_probabilities: bool = False) -> Prediction:
        start = time.perf_counter()
        (probs,) = self._run(volume, "rectified" if self.settings.rectify else "raw")
        mask, _ = argmax_max(probs)
        if self.settings.keep_largest:
            mask = keep_largest_component(mask, list(range(1, len(self.classes))))
        return Prediction(mask, probs if save_probabilities else None,
                          time.perf_counter() - start)

    def rectify_volume(self, volume: Volume) -> RectifiedPrediction:
        start = time.perf_counter()
        raw_probs, rect_probs = self._run(volume, "both")
        raw, raw_conf = argmax_max(raw_probs)
        rect, conf = argmax_max(rect_probs)
        return RectifiedPrediction(raw=raw, rectified=rect, raw_confidence=raw_conf,
                                   confidence=conf, mu=self.mu,
                                   seconds=time.perf_counter() - start)


def _same_grid(info: Any) -> bool:
    full = all(tuple(b) == (0, n) for b, n in zip(info.crop_box, info.original_shape, strict=True))
    return full and tuple(info.shape) == tuple(info.original_shape)


def _progress(description: str) -> Callable[[Iterator[Any], int], Iterator[Any]]:
    """The sliding window's progress, counted in batches of patches: ``<case>: batch 3/8``."""
    def wrap(batches: Iterator[Any], total: int) -> Iterator[Any]:
        return track(batches, description=f"{description}: batch", total=total)

    return wrap
