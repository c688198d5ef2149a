"""Backbones and the CRLN model: shapes at several input sizes, input checks, inference output."""

from __future__ import annotations

import pytest
import torch

from crlnseg.method.crln import build_model, predict_logits
from crlnseg.nets import NetOutput, build_backbone
from crlnseg.settings import RunSettings


def tiny(**over) -> RunSettings:
    model = {"base_filters": 4, "prototypes_per_class": 3, "prototype_dim": 8, "num_classes": 3}
    model.update(over.pop("model", {}))
    return RunSettings.model_validate({"model": model, **over})


@pytest.fixture(scope="module")
def crln_model():
    torch.manual_seed(0)
    return build_model(tiny()).eval()


@pytest.mark.parametrize("size", [(32, 32, 32), (64, 48, 32), (112, 112, 80)])
def test_one_model_many_sizes(crln_model, size):
    x = torch.randn(1, 1, *size)
    with torch.no_grad():
        out = crln_model(x)
    q = tuple(s // 4 for s in size)
    h = tuple(s // 2 for s in size)
    assert out.logits.shape == (1, 3, *size)
    assert out.relation is not None and out.relation.shape == (1, 3, *size)
    assert out.embedding is not None and out.embedding.shape == (1, 8, *size)
    assert out.net.feat_quarter.shape == (1, 16, *q)
    assert out.net.feat_half.shape == (1, 8, *h)
    assert (out.relation >= 0).all()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.relation).all()


@pytest.mark.parametrize("backbone", ["vnet", "unet"])
def test_backbone_output_and_embed_modes(backbone):
    net = build_backbone(tiny(model={"backbone": backbone, "in_channels": 2}).model).eval()
    x = torch.randn(2, 2, 32, 16, 48)
    with torch.no_grad():
        dense = net(x)
        hidden = net(x, embed="hidden")
        none = net(x, embed="none")
    assert isinstance(dense, NetOutput)
    assert dense.logits.shape == (2, 3, 32, 16, 48)
    assert dense.feat_quarter.shape == (2, 16, 8, 4, 12)
    assert dense.feat_half.shape == (2, 8, 16, 8, 24)
    assert hidden.embedding is None and none.embed_hidden is None and none.embedding is None
    # The head projects sampled points exactly as the dense 1x1x1 conv does.
    rows = hidden.embed_hidden[1, :, 3, 5, 7][None]
    torch.testing.assert_close(net.head.project_points(rows)[0], dense.embedding[1, :, 3, 5, 7])


def test_input_size_not_multiple_of_16_is_rejected():
    net = build_backbone(tiny().model)
    with pytest.raises(ValueError, match=r"multiples of \(16, 16, 16\)"):
        net(torch.randn(1, 1, 32, 32, 24))


def test_baseline_model_has_no_relation_and_predict_is_plain():
    model = build_model(tiny(method={"method": "mean-teacher"})).eval()
    assert model.interaction is None and model.prototypes is None
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = model(x)
        assert out.relation is None
        torch.testing.assert_close(predict_logits(model, x), out.logits)


def test_predict_logits_rectifies_with_mu(crln_model):
    x = torch.randn(1, 1, 32, 32, 32)
    with torch.no_grad():
        out = crln_model(x)
        crln_model.mu_raw.fill_(0.25)
        got = predict_logits(crln_model, x)
        plain = predict_logits(crln_model, x, rectify=False)
        crln_model.mu_raw.fill_(0.0)
    torch.testing.assert_close(got, out.logits + 0.75 * out.relation)
    torch.testing.assert_close(plain, out.logits)


# A 0.8 x 0.8 x 4 mm plan: Z is not pooled in the first two levels (its spacing is more than
# twice the in-plane one until X and Y have been halved twice), nor convolved across at level 0.
ANISOTROPIC = {"strides": [[2, 2, 1], [2, 2, 1], [2, 2, 2], [2, 2, 2]],
               "kernels": [[3, 3, 1], [3, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]]}


@pytest.mark.parametrize("backbone", ["vnet", "unet"])
def test_an_anisotropic_topology_keeps_every_output_shape(backbone):
    settings = tiny(model={"backbone": backbone, **ANISOTROPIC}, train={"patch": (32, 32, 8)})
    assert settings.model.total_stride == (16, 16, 4)
    torch.manual_seed(0)
    model = build_model(settings).eval()
    x = torch.randn(2, 1, 32, 48, 8)
    with torch.no_grad():
        out = model(x)
    assert out.logits.shape == (2, 3, 32, 48, 8)
    assert out.relation.shape == (2, 3, 32, 48, 8) and bool((out.relation >= 0).all())
    assert out.net.feat_half.shape == (2, 8, 16, 24, 8)  # level 1: Z not pooled yet
    assert out.net.feat_quarter.shape == (2, 16, 8, 12, 8)  # level 2: still full Z
    assert out.embedding.shape == (2, 8, 32, 48, 8)
    first = model.backbone.enc[0][0]
    assert first.kernel_size == (3, 3, 1) and first.padding == (1, 1, 0)
    assert model.backbone.down_level(0, torch.randn(1, 4, 8, 8, 8)).shape[-1] == 8
    with pytest.raises(ValueError, match=r"multiples of \(16, 16, 4\)"):
        model(torch.randn(1, 1, 32, 32, 6))


def test_the_patch_must_fit_the_topology():
    with pytest.raises(ValueError, match=r"multiple of the model's total stride \(16, 16, 4\)"):
        tiny(model=ANISOTROPIC, train={"patch": (32, 32, 6)})
    with pytest.raises(ValueError, match="each stride must be 1 or 2"):
        tiny(model={"strides": [[3, 2, 2], [2, 2, 2], [2, 2, 2], [2, 2, 2]]})


def test_an_anisotropic_model_trains_a_step():
    from crlnseg.method.train_step import Batch, train_step
    from crlnseg.train.state import init_state

    settings = tiny(model={**ANISOTROPIC, "num_classes": 2}, train={"patch": (32, 32, 8)})
    state = init_state(settings, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32, 8, generator=g)
    batch = Batch(x[:2], (x[:2, 0] > 0.5).long(), x[2:])
    record = train_step(state, batch, settings, g, total_iterations=10)
    assert record.loss > 0 and record.loss_relation is not None


@pytest.mark.parametrize("backbone", ["vnet", "unet"])
@pytest.mark.parametrize("topology", [{}, ANISOTROPIC])
def test_instance_norm_and_leaky_relu_build_and_run(backbone, topology):
    patch = (32, 32, 8) if topology else (32, 32, 32)
    settings = tiny(model={"backbone": backbone, "norm": "instance", "activation": "leaky_relu",
                           **topology}, train={"patch": patch})
    model = build_model(settings)
    kinds = {type(m) for m in model.backbone.modules()}
    assert torch.nn.InstanceNorm3d in kinds and torch.nn.LeakyReLU in kinds
    assert torch.nn.BatchNorm3d not in kinds and torch.nn.ReLU not in kinds
    x = torch.randn(2, 1, *patch)
    out = model.train()(x)
    assert out.logits.shape == (2, 3, *patch) and torch.isfinite(out.logits).all()
    out.logits.sum().backward()
    with torch.no_grad():
        assert torch.isfinite(model.eval()(x).relation).all()


def test_default_backbone_keeps_batch_norm_and_relu():
    kinds = {type(m) for m in build_backbone(tiny().model).modules()}
    assert torch.nn.BatchNorm3d in kinds and torch.nn.ReLU in kinds
    assert torch.nn.InstanceNorm3d not in kinds and torch.nn.LeakyReLU not in kinds


def test_instance_norm_needs_more_than_one_bottleneck_voxel():
    with pytest.raises(ValueError, match="more than one bottleneck voxel"):
        tiny(model={"norm": "instance"}, train={"patch": (16, 16, 16)})
    tiny(model={"norm": "instance"}, train={"patch": (32, 16, 16)})
    with pytest.raises(ValueError):
        tiny(model={"norm": "group"})
    with pytest.raises(ValueError):
        tiny(model={"activation": "gelu"})
