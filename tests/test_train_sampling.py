"""Patch sampling: crops, padding, foreground oversampling, iteration-keyed determinism, checks."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from crlnseg.data.sampling import (
    IterationBatches,
    check_training_data,
    crop,
    crop_origin,
    make_loader,
)
from crlnseg.errors import DataError


@dataclass
class FakeCase:
    id: str


class FakeManifest:
    """The two calls sampling makes on a prepared manifest, over in-memory arrays."""

    def __init__(self, images: dict, labels: dict) -> None:
        self.images, self.labels = images, labels
        self.cases = [FakeCase(k) for k in images]

    def image(self, case_id: str, mmap: bool = True) -> np.ndarray:
        return self.images[case_id]

    def label(self, case_id: str, mmap: bool = True) -> np.ndarray | None:
        return self.labels.get(case_id)


def _manifest(shapes, channels=1, seed=0, labelled=True):
    rng = np.random.default_rng(seed)
    images, labels = {}, {}
    for i, shape in enumerate(shapes):
        images[f"c{i}"] = rng.standard_normal((channels, *shape)).astype(np.float32)
        if labelled:
            lab = np.zeros(shape, np.uint8)
            lab[2:5, 3:6, 1:4] = 1
            labels[f"c{i}"] = lab
    return FakeManifest(images, labels)


def test_crop_pads_and_reads_window():
    a = np.arange(4 * 5 * 6, dtype=np.float32).reshape(1, 4, 5, 6)
    out = crop(a, (-2, 1, 0), (8, 3, 6), fill=-1)
    assert out.shape == (1, 8, 3, 6)
    assert np.all(out[:, :2] == -1) and np.all(out[:, 6:] == -1)
    np.testing.assert_array_equal(out[:, 2:6], a[:, :, 1:4])


def test_crop_origin_bounds_and_centre():
    rng = np.random.default_rng(0)
    for _ in range(200):
        o = crop_origin((10, 4, 16), (8, 8, 16), rng)
        assert 0 <= o[0] <= 2 and -4 <= o[1] <= 0 and o[2] == 0
    assert crop_origin((10, 10, 10), (4, 4, 4), rng, centre=(0, 5, 9)) == (0, 3, 6)


def _dataset(labelled, unlabelled, patch=(8, 8, 8), oversample=0.0, rank=0, seed=1):
    folder = None if unlabelled is None else Path("unl")
    ds = IterationBatches(Path("lab"), folder, patch, 2, 3, 2, oversample, seed, rank)
    ds._manifests = [labelled, unlabelled]
    return ds


def test_batches_depend_only_on_seed_rank_iteration():
    lab, unl = _manifest([(12, 10, 9), (6, 10, 9)]), _manifest([(9, 9, 9)], labelled=False)
    a, b = _dataset(lab, unl), _dataset(lab, unl)
    b[5]  # a different access order must not change anything
    for key, value in a[3].items():
        assert torch.equal(value, b[3][key])
    assert a[3]["labelled_image"].shape == (2, 1, 8, 8, 8)
    assert a[3]["labelled_label"].dtype == torch.int64
    assert a[3]["unlabelled_image"].shape == (3, 1, 8, 8, 8)
    assert not torch.equal(a[3]["labelled_image"], a[4]["labelled_image"])
    other_rank = _dataset(lab, unl, rank=1)
    assert not torch.equal(a[3]["unlabelled_image"], other_rank[3]["unlabelled_image"])


def test_foreground_oversampling_centres_on_labels():
    lab = _manifest([(40, 40, 40)])
    hits = [_dataset(lab, None, oversample=1.0)[t]["labelled_label"].sum() > 0 for t in range(10)]
    assert all(hits)
    plain = [_dataset(lab, None, oversample=0.0)[t]["labelled_label"].sum() > 0 for t in range(10)]
    assert not all(plain)


def test_loader_with_workers_equals_direct_access():
    lab, unl = _manifest([(12, 10, 9)]), _manifest([(9, 9, 9)], labelled=False)
    ds = _dataset(lab, unl)
    # FakeManifest is in memory, so keep it across the pickle that workers get
    ds.__getstate__ = lambda: dict(ds.__dict__)  # type: ignore[method-assign]
    loaded = list(make_loader(ds, 2, 5, num_workers=0, pin_memory=False))
    assert len(loaded) == 3
    assert torch.equal(loaded[1]["unlabelled_image"], ds[3]["unlabelled_image"])


def _check(lab, unl, patch=(8, 8, 8), classes=2):
    return check_training_data(lab, unl, patch, classes, (Path("lab"), Path("unl")))


def test_check_accepts_good_data_and_pads_small_volumes():
    assert _check(_manifest([(12, 10, 9), (6, 6, 6)], channels=2),
                  _manifest([(9, 9, 9)], channels=2, labelled=False)) == 2


@pytest.mark.parametrize("case, message", [
    ("empty", "no labelled cases"),
    ("nolabel", "has no label"),
    ("values", "label values [3]"),
    ("channels", "channel"),
    ("unl_channels", "channel"),
    ("patch", "larger than every volume on axis Y"),
])
def test_check_rejects_bad_data(case, message):
    lab, unl = _manifest([(12, 10, 9), (12, 10, 9)]), _manifest([(9, 9, 9)], labelled=False)
    patch = (8, 8, 8)
    if case == "empty":
        lab = FakeManifest({}, {})
    elif case == "nolabel":
        del lab.labels["c1"]
    elif case == "values":
        lab.labels["c1"][0, 0, 0] = 3
    elif case == "channels":
        lab.images["c1"] = np.zeros((2, 12, 10, 9), np.float32)
    elif case == "unl_channels":
        unl = _manifest([(9, 9, 9)], channels=3, labelled=False)
    elif case == "patch":
        patch = (8, 16, 8)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _check(lab, unl, patch)


def test_check_lets_a_patch_pad_by_less_than_one_total_stride():
    lab, unl = _manifest([(12, 10, 28)]), _manifest([(12, 10, 28)], labelled=False)
    multiple = (4, 4, 16)
    assert check_training_data(lab, unl, (12, 12, 32), 2, (Path("lab"), Path("unl")),
                               multiple) == 1
    with pytest.raises(DataError, match="axis Z"):
        check_training_data(lab, unl, (12, 12, 48), 2, (Path("lab"), Path("unl")), multiple)
    with pytest.raises(DataError, match="axis Z"):  # without a multiple: the volume's own size
        check_training_data(lab, unl, (12, 10, 32), 2, (Path("lab"), Path("unl")))
