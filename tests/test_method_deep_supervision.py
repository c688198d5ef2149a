"""Deep supervision: label targets per resolution, weighted loss, heads, inference loading."""

from __future__ import annotations

import pytest
import torch

from crlnseg.checkpoint import save_checkpoint
from crlnseg.inference.model import load_inference_model
from crlnseg.method.crln import build_model
from crlnseg.method.deep_supervision import (
    deep_supervision_loss,
    deep_supervision_weights,
    downsample_label,
)
from crlnseg.method.losses import segmentation_loss
from crlnseg.settings import RunSettings
from crlnseg.train.state import init_state, state_to_dict
from crlnseg.types import IGNORE

ANISOTROPIC = {"strides": [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
               "kernels": [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]}


def tiny(deep: bool = True, **model) -> RunSettings:
    patch = (32, 32, 8) if "strides" in model else (32, 32, 32)
    return RunSettings.model_validate({
        "model": {"base_filters": 4, "prototypes_per_class": 2, "prototype_dim": 8,
                  "num_classes": 3, "deep_supervision": deep, **model},
        "train": {"patch": patch}})


def test_weights_are_halving_and_normalised():
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(1) == [1.0]


def test_downsampled_labels_take_one_voxel_per_block_and_keep_ignore():
    label = torch.arange(2 * 8 * 8 * 4).reshape(2, 8, 8, 4) % 3
    label[0, 2:4, 0:2, 0:2] = IGNORE  # a whole 2x2x2 block: IGNORE at the next resolution
    half = downsample_label(label, (4, 4, 2))
    assert half.shape == (2, 4, 4, 2)
    assert torch.equal(half, label[:, ::2, ::2, ::2])
    assert half[0, 1, 0, 0] == IGNORE and int((half == IGNORE).sum()) == 1
    aniso = downsample_label(label, (2, 2, 4))  # Z not pooled
    assert aniso.shape == (2, 2, 2, 4) and torch.equal(aniso, label[:, ::4, ::4, :])
    with pytest.raises(ValueError, match="divides"):
        downsample_label(label, (3, 4, 2))


def test_loss_is_the_weighted_sum_over_resolutions():
    g = torch.Generator().manual_seed(0)
    label = torch.randint(0, 3, (2, 16, 16, 8), generator=g)
    label[:, :3] = IGNORE
    logits = [torch.randn(2, 3, 16, 16, 8, generator=g), torch.randn(2, 3, 8, 8, 4, generator=g),
              torch.randn(2, 3, 4, 4, 4, generator=g)]
    by_hand = (4 / 7 * segmentation_loss(logits[0], label)
               + 2 / 7 * segmentation_loss(logits[1], label[:, ::2, ::2, ::2])
               + 1 / 7 * segmentation_loss(logits[2], label[:, ::4, ::4, ::2]))
    torch.testing.assert_close(deep_supervision_loss(logits, label), by_hand)
    torch.testing.assert_close(deep_supervision_loss(logits[:1], label),
                               segmentation_loss(logits[0], label))


@pytest.mark.parametrize("backbone", ["vnet", "unet"])
@pytest.mark.parametrize("topology", [{}, ANISOTROPIC])
def test_heads_give_logits_at_the_half_and_quarter_levels(backbone, topology):
    settings = tiny(backbone=backbone, **topology)
    net = build_model(settings).backbone.eval()
    size = settings.train.patch
    with torch.no_grad():
        out = net(torch.randn(3, 1, *size), embed="none")
        half, quarter = net.deep_logits(out, 2)
    s0, s1 = settings.model.strides[0], settings.model.strides[1]
    assert half.shape == (2, 3, *(n // a for n, a in zip(size, s0, strict=True)))
    assert quarter.shape == (2, 3, *(n // a // b for n, a, b in zip(size, s0, s1, strict=True)))
    plain = build_model(tiny(False, backbone=backbone, **topology)).backbone
    assert plain.aux_heads is None
    with pytest.raises(RuntimeError, match="no deep-supervision heads"):
        plain.deep_logits(out)


def test_the_heads_leave_the_other_layers_initialisation_unchanged():
    torch.manual_seed(0)
    deep = build_model(tiny(True)).state_dict()
    torch.manual_seed(0)
    plain = build_model(tiny(False)).state_dict()
    assert set(deep) - set(plain) == {k for k in deep if k.startswith("backbone.aux_heads.")}
    assert set(deep) - set(plain)
    for key, value in plain.items():
        assert torch.equal(deep[key], value), key


@pytest.mark.parametrize("deep", [True, False])
def test_checkpoints_with_or_without_heads_load_for_inference(tmp_path, deep):
    settings = tiny(deep)
    state = init_state(settings, torch.device("cpu"))
    saved = state_to_dict(state)
    if not deep:  # weights without heads under settings that ask for them
        settings = tiny(True)
    save_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt", saved, settings,
                    {"classes": [0, 1, 2]})
    model, loaded, _ = load_inference_model(tmp_path / "run")
    assert loaded == settings and model.backbone.aux_heads is None
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, embed="none").logits,
                                   state.teacher.eval()(x, embed="none").logits)


@pytest.mark.parametrize("method", ["supervised", "mean-teacher", "crln"])
def test_the_supervised_term_of_every_method_is_deep(method):
    from crlnseg.method.train_step import student_losses

    settings = RunSettings.model_validate({
        "model": {**tiny().model.model_dump(), "dropout": False},
        "method": {"method": method, "anchors": 8, "negatives": 8}, "train": {"patch": (32,) * 3}})
    state = init_state(settings, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 32, 32, 32, generator=g)
    y = torch.randint(0, 3, (2, 32, 32, 32), generator=g)
    terms, _, _ = student_losses(state, x, y, None, None, None, settings, g, after_warmup=False)
    net = state.student.backbone(x, embed="none")
    by_hand = deep_supervision_loss([net.logits, *state.student.backbone.deep_logits(net)], y)
    torch.testing.assert_close(terms["supervised"], by_hand)
    grad = torch.autograd.grad(terms["supervised"], state.student.backbone.aux_heads[1].weight)
    assert grad[0].abs().sum() > 0
