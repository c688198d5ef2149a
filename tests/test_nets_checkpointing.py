"""Activation checkpointing: same outputs, gradients and BatchNorm buffers; fewer saved tensors."""

from __future__ import annotations

import copy

import pytest
import torch

from crlnseg.nets import build_backbone
from crlnseg.settings import ModelSettings


def net(backbone: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_backbone(ModelSettings(backbone=backbone, base_filters=4, num_classes=3,
                                        prototype_dim=8)).train()


def step(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict, int]:
    """Forward + backward of a loss touching every output; returns logits, grads, saved bytes."""
    saved = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel() * t.element_size())
        return t

    torch.manual_seed(1)  # dropout masks
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, embed="hidden")
    loss = (out.logits.square().mean() + out.feat_quarter.mean() + out.feat_half.mean()
            + out.embed_hidden.square().mean())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads, sum(saved)


@pytest.mark.parametrize("backbone", ["vnet", "unet"])
def test_checkpointing_changes_nothing_but_memory(backbone: str) -> None:
    plain = net(backbone)
    ck = copy.deepcopy(plain)
    ck.checkpoint_activations = True
    x = torch.randn(2, 1, 32, 32, 32, generator=torch.Generator().manual_seed(2))
    logits_a, grads_a, bytes_a = step(plain, x)
    logits_b, grads_b, bytes_b = step(ck, x)
    assert torch.equal(logits_a, logits_b)
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 10
    for name, g in grads_a.items():
        torch.testing.assert_close(grads_b[name], g, rtol=1e-5, atol=1e-7, msg=name)
    # The recompute must not update BatchNorm's running statistics a second time.
    for (name, a), b in zip(plain.state_dict().items(), ck.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert bytes_b < 0.6 * bytes_a


def test_checkpointing_only_while_training_with_grad() -> None:
    plain = net("vnet").eval()
    ck = copy.deepcopy(plain)
    ck.checkpoint_activations = True
    x = torch.randn(1, 1, 32, 32, 32)
    # Eval mode (the teacher, inference): the flag must not change what is stored.
    assert step(ck, x)[2] == step(plain, x)[2] > 0
    ck.train()
    with torch.no_grad():  # no graph: a plain forward, no checkpoint machinery
        assert ck(x, embed="none").logits.shape == (1, 3, 32, 32, 32)
