"""Patch sampling from memory-mapped prepared arrays, keyed by iteration.

The crops of iteration ``t`` on rank ``r`` are drawn from ``numpy.random.default_rng((seed, r, t,
stream))``: they depend on nothing else, so any number of loader workers, any prefetch order and a
resumed run all see the same batches (exact resume needs no sampler state), and each rank samples
different patches. Labelled and unlabelled streams are independent. A crop reads only its window
of the memory-mapped array; where a volume is smaller than the patch, the crop is zero-padded
(as the reference code pads LA cases) and the label padded with background.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from crlnseg.errors import DataError
from crlnseg.signals import ignore_interrupt
from crlnseg.types import IntTriple

__all__ = ["crop_origin", "crop", "foreground_index", "IterationBatches", "make_loader",
           "check_training_data"]

STREAM_LABELLED, STREAM_UNLABELLED = 0, 1
MAX_FOREGROUND = 65536  # foreground voxels kept per class and case for oversampling


def crop_origin(shape: Sequence[int], patch: Sequence[int], rng: np.random.Generator,
                centre: Sequence[int] | None = None) -> IntTriple:
    """A random crop origin; negative where the volume is smaller than the patch (padding).

    With ``centre`` the crop is centred on that voxel, shifted to stay inside the volume.
    """
    origin = []
    for axis, (size, p) in enumerate(zip(shape, patch, strict=True)):
        low, high = min(0, size - p), max(0, size - p)
        if centre is None:
            origin.append(int(rng.integers(low, high + 1)))
        else:
            origin.append(int(np.clip(int(centre[axis]) - p // 2, low, high)))
    return tuple(origin)  # type: ignore[return-value]


def crop(array: np.ndarray, origin: Sequence[int], patch: Sequence[int],
         fill: float = 0) -> np.ndarray:
    """The window ``origin : origin + patch`` of the last three axes, padded with ``fill``."""
    lead = array.shape[:-3]
    out = np.full((*lead, *patch), fill, dtype=array.dtype)
    src, dst = [], []
    for start, p, size in zip(origin, patch, array.shape[-3:], strict=True):
        a, b = max(start, 0), min(start + p, size)
        src.append(slice(a, b))
        dst.append(slice(a - start, b - start))
    out[(..., *dst)] = array[(..., *src)]
    return out


def foreground_index(label: np.ndarray, num_classes: int) -> dict[int, np.ndarray]:
    """Flat indices of each foreground class's voxels (evenly thinned to MAX_FOREGROUND)."""
    flat = np.asarray(label).reshape(-1)
    out = {}
    for cls in range(1, num_classes):
        idx = np.flatnonzero(flat == cls)
        if idx.size > MAX_FOREGROUND:
            idx = idx[np.linspace(0, idx.size - 1, MAX_FOREGROUND).astype(np.int64)]
        if idx.size:
            out[cls] = idx
    return out


class IterationBatches(Dataset):
    """``dataset[t]`` is iteration ``t``'s batch for this rank, as a dict of tensors.

    ``labelled_image (Bl, C, X, Y, Z)`` float32, ``labelled_label (Bl, X, Y, Z)`` int64 and
    ``unlabelled_image (Bu, C, X, Y, Z)`` (``Bu = 0`` without unlabelled data). Manifests are
    opened lazily in each worker (memory maps are not pickled).
    """

    def __init__(self, labelled: Path, unlabelled: Path | None, patch: Sequence[int],
                 batch_labelled: int, batch_unlabelled: int, num_classes: int,
                 foreground_oversample: float, seed: int, rank: int = 0) -> None:
        self.folders = (Path(labelled), None if unlabelled is None else Path(unlabelled))
        self.patch = tuple(int(p) for p in patch)
        self.batch = (batch_labelled, batch_unlabelled if unlabelled is not None else 0)
        self.num_classes, self.oversample = num_classes, foreground_oversample
        self.seed, self.rank = seed, rank
        self._manifests: list[Any] | None = None
        self._foreground: dict[str, dict[int, np.ndarray]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_manifests": None, "_foreground": {}}

    def __len__(self) -> int:  # iterations are addressed directly; the sampler bounds them
        return 2**62

    def manifests(self) -> list[Any]:
        if self._manifests is None:
            from crlnseg.data.manifest import load_manifest

            self._manifests = [None if f is None else load_manifest(f) for f in self.folders]
        return self._manifests

    def rng(self, iteration: int, stream: int) -> np.random.Generator:
        return np.random.default_rng((self.seed, self.rank, iteration, stream))

    def _labelled_crop(self, manifest: Any,
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        case = manifest.cases[int(rng.integers(len(manifest.cases)))].id
        image, label = manifest.image(case, mmap=True), manifest.label(case, mmap=True)
        centre = None
        if rng.random() < self.oversample:
            if case not in self._foreground:
                self._foreground[case] = foreground_index(label, self.num_classes)
            fg = self._foreground[case]
            if fg:
                cls = list(fg)[int(rng.integers(len(fg)))]
                flat = fg[cls][int(rng.integers(fg[cls].size))]
                centre = np.unravel_index(flat, label.shape)
        origin = crop_origin(label.shape, self.patch, rng, centre)
        return crop(image, origin, self.patch), crop(label, origin, self.patch)

    def _unlabelled_crop(self, manifest: Any, rng: np.random.Generator) -> np.ndarray:
        case = manifest.cases[int(rng.integers(len(manifest.cases)))].id
        image = manifest.image(case, mmap=True)
        return crop(image, crop_origin(image.shape[1:], self.patch, rng), self.patch)

    def __getitem__(self, iteration: int) -> dict[str, torch.Tensor]:
        labelled, unlabelled = self.manifests()
        rng = self.rng(iteration, STREAM_LABELLED)
        pairs = [self._labelled_crop(labelled, rng) for _ in range(self.batch[0])]
        images = np.stack([p[0] for p in pairs]).astype(np.float32)
        labels = np.stack([p[1] for p in pairs]).astype(np.int64)
        out = {"labelled_image": torch.from_numpy(images),
               "labelled_label": torch.from_numpy(labels)}
        rng = self.rng(iteration, STREAM_UNLABELLED)
        crops = [self._unlabelled_crop(unlabelled, rng) for _ in range(self.batch[1])]
        # (0, C, X, Y, Z) when there is no unlabelled data
        unlabelled_images = np.stack(crops).astype(np.float32) if crops else images[:0]
        out["unlabelled_image"] = torch.from_numpy(unlabelled_images)
        return out


def make_loader(dataset: IterationBatches, start: int, stop: int, num_workers: int,
                pin_memory: bool) -> DataLoader:
    """Iterations ``start .. stop - 1`` in order, prepared ahead by ``num_workers`` processes."""
    return DataLoader(dataset, batch_size=None, sampler=range(start, stop), num_workers=num_workers,
                      pin_memory=pin_memory, prefetch_factor=4 if num_workers > 0 else None,
                      worker_init_fn=ignore_interrupt if num_workers > 0 else None)


def check_training_data(labelled: Any, unlabelled: Any | None, patch: Sequence[int],
                        num_classes: int, folders: tuple[Path, Path | None],
                        multiple: Sequence[int] = (1, 1, 1)) -> int:
    """Refuse data the loop cannot train on (one-line DataError); return the channel count.

    Checks: at least one labelled case, each with a label whose values are classes
    ``0 .. num_classes - 1``; one channel count everywhere; on each axis, at least one volume of
    each stream as large as the patch, or as its largest volume rounded up to ``multiple``
    (the model's total stride: a planned patch may pad its volumes by less than one stride;
    smaller volumes are padded).
    """
    if not labelled.cases:
        raise DataError(f"{folders[0]}: no labelled cases")
    channels: dict[int, str] = {}
    streams = [(labelled, folders[0], True)]
    if unlabelled is not None:
        if not unlabelled.cases:
            raise DataError(f"{folders[1]}: no unlabelled cases")
        streams.append((unlabelled, folders[1], False))
    for manifest, folder, with_labels in streams:
        largest = np.zeros(3, dtype=np.int64)
        for case in manifest.cases:
            image = manifest.image(case.id, mmap=True)
            channels.setdefault(image.shape[0], f"{folder}: case {case.id}")
            largest = np.maximum(largest, image.shape[1:])
            if with_labels:
                _check_label(manifest.label(case.id, mmap=True), case.id, folder, num_classes)
        if len(channels) > 1:
            (c0, w0), (c1, w1) = list(channels.items())[:2]
            raise DataError(f"{w1} has {c1} channel(s) but {w0} has {c0}")
        for axis, (p, size, m) in enumerate(zip(patch, largest, multiple, strict=True)):
            if p > max(size, -(-int(size) // m) * m):
                raise DataError(f"{folder}: patch {tuple(patch)} is larger than every volume "
                                f"on axis {'XYZ'[axis]} (largest {size}); use a smaller --patch")
    return next(iter(channels))


def _check_label(label: np.ndarray | None, case: str, folder: Path, num_classes: int) -> None:
    if label is None:
        raise DataError(f"{folder}: labelled case {case} has no label")
    if int(np.max(label)) >= num_classes:
        values = np.unique(label)
        bad = [int(v) for v in values if v >= num_classes]
        raise DataError(f"{folder}: case {case}: label values {bad} outside the classes "
                        f"0..{num_classes - 1}")
