"""The training recipe around the views: which stream gets what, and one iteration with every
option on."""

from __future__ import annotations

import math

import pytest
import torch

from crlnseg.data.augment import augment_labelled, augment_unlabelled
from crlnseg.method.train_step import Batch, train_step
from crlnseg.settings import AugmentSettings, RunSettings
from crlnseg.train.state import init_state
from crlnseg.types import IGNORE

RECIPE = {"rotation_p": 1.0, "rotation": (-30.0, 30.0), "scale_p": 1.0, "elastic_p": 1.0,
          "elastic_sigma": (2.0, 3.0), "elastic_alpha": (10.0, 20.0),
          "mirror_p": (0.5, 0.5, 0.5), "gaussian_noise_p": 1.0, "blur_p": 1.0,
          "brightness_p": 1.0, "contrast_p": 1.0, "gamma_inverted_p": 1.0, "gamma_p": 1.0}


# Every optional transform off: the paper's views alone.
OFF = AugmentSettings(**{k: (0.0, 0.0, 0.0) if k == "mirror_p" else 0.0
                         for k in RECIPE if k.endswith("_p")})


def crops(n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 32, 32, 32, generator=g)
    return x, (torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2)[:, 0] > 0).long()


def test_with_everything_off_nothing_changes_and_nothing_is_drawn():
    x, y = crops()
    g = torch.Generator().manual_seed(0)
    before = g.get_state()
    img, lab = augment_labelled(x, y, OFF, g)
    img_u, inside = augment_unlabelled(x, OFF, g)
    assert img is x and lab is y and img_u is x and inside is None
    assert torch.equal(g.get_state(), before)


def test_by_default_labelled_crops_get_intensity_transforms_and_unlabelled_ones_nothing():
    x, y = crops(n=16)
    img, lab = augment_labelled(x, y, AugmentSettings(), torch.Generator().manual_seed(0))
    assert lab is y  # no spatial transform by default: the labels are untouched
    changed = [not torch.equal(img[i], x[i]) for i in range(len(x))]
    assert any(changed) and not all(changed)  # each transform is drawn per crop
    assert augment_unlabelled(x, AugmentSettings(), torch.Generator())[0] is x


def test_unlabelled_crops_get_the_spatial_transform_only():
    x, _ = crops()
    intensity = AugmentSettings(gamma_p=1.0, brightness_p=1.0, gaussian_noise_p=1.0)
    assert augment_unlabelled(x, intensity, torch.Generator())[0] is x
    spatial = AugmentSettings(rotation_p=1.0, **{k: v for k, v in RECIPE.items()
                                                 if k.startswith("gamma")})
    out, inside = augment_unlabelled(x, spatial, torch.Generator().manual_seed(0))
    assert inside is not None and not inside.all() and not torch.equal(out, x)
    off = spatial.model_copy(update={"spatial_unlabelled": False})
    assert augment_unlabelled(x, off, torch.Generator())[0] is x


def test_labelled_crops_get_both_and_replay_exactly():
    x, y = crops()
    aug = AugmentSettings(**RECIPE)
    a = augment_labelled(x, y, aug, torch.Generator().manual_seed(1))
    b = augment_labelled(x, y, aug, torch.Generator().manual_seed(1))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    img, lab = a
    assert img.shape == x.shape and lab.shape == y.shape
    assert (lab == IGNORE).any() and set(lab.unique().tolist()) <= {IGNORE, 0, 1}
    spatial_only = AugmentSettings(**{k: v for k, v in RECIPE.items() if k in (
        "rotation_p", "scale_p", "elastic_p", "elastic_sigma", "elastic_alpha", "mirror_p")})
    geometry, same_lab = augment_labelled(x, y, spatial_only, torch.Generator().manual_seed(1))
    assert torch.equal(same_lab, lab)  # the intensity draws come after the spatial ones
    assert not torch.allclose(geometry, img)


def tiny(method: str) -> RunSettings:
    return RunSettings.model_validate({
        "model": {"base_filters": 4, "prototypes_per_class": 2, "prototype_dim": 8,
                  "num_classes": 3, "norm": "instance", "activation": "leaky_relu",
                  "deep_supervision": True},
        "method": {"method": method, "warmup_fraction": 0.1, "anchors": 16, "negatives": 32},
        "augment": RECIPE, "train": {"patch": (32, 32, 32)}})


@pytest.mark.parametrize("method", ["supervised", "mean-teacher", "crln"])
def test_one_iteration_with_every_option_on_is_finite(method):
    settings = tiny(method)
    state = init_state(settings, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x, _ = crops(4)
    for i in range(2):
        y = torch.randint(0, 3, (2, 32, 32, 32), generator=torch.Generator().manual_seed(i))
        record = train_step(state, Batch(x[:2], y, x[2:]), settings, g, total_iterations=10)
        values = [v for v in record.as_dict().values() if v is not None]
        assert all(math.isfinite(v) for v in values), record
    if method != "supervised":
        assert record.loss_unsup is not None


def test_the_teacher_sees_the_transformed_view_and_outside_voxels_are_ignored(monkeypatch):
    import crlnseg.method.train_step as ts

    seen: dict = {}
    real_augment, real_strong = ts.augment_unlabelled, ts.apply_strong

    def spy_augment(*args, **kwargs):
        seen["augment"] = real_augment(*args, **kwargs)
        return seen["augment"]

    def spy_strong(image, label, conf, params):
        seen["strong"] = (image, label, conf)
        return real_strong(image, label, conf, params)

    monkeypatch.setattr(ts, "augment_unlabelled", spy_augment)
    monkeypatch.setattr(ts, "apply_strong", spy_strong)
    settings = tiny("crln")
    state = init_state(settings, torch.device("cpu"))
    x, y = crops(4)
    train_step(state, Batch(x[:2], y[:2], x[2:]), settings, torch.Generator().manual_seed(0),
               total_iterations=10)
    x_u, inside = seen["augment"]
    image, label, conf = seen["strong"]
    assert torch.equal(image, x_u) and inside is not None and not inside.all()
    assert (label[~inside] == IGNORE).all() and (conf[~inside] == 0).all()
    assert (label[inside] != IGNORE).all()


def test_an_anisotropic_model_trains_with_every_option_on():
    base = tiny("crln").model_dump()
    base["model"].update(strides=[[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
                         kernels=[[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]])
    base["augment"].update(rotation_axes="in-plane", rotation=(-180.0, 180.0))
    base["train"]["patch"] = (32, 32, 8)
    settings = RunSettings.model_validate(base)
    state = init_state(settings, torch.device("cpu"))
    x = torch.randn(4, 1, 32, 32, 8, generator=torch.Generator().manual_seed(0))
    record = train_step(state, Batch(x[:2], (x[:2, 0] > 0).long(), x[2:]), settings,
                        torch.Generator().manual_seed(0), total_iterations=10)
    assert all(math.isfinite(v) for v in record.as_dict().values() if v is not None)
