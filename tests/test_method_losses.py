"""Losses and collaborative positive supervision."""

from __future__ import annotations

import pytest
import torch

from crlnseg.method.losses import pseudo_label_loss, segmentation_loss, soft_dice_loss
from crlnseg.method.positive_supervision import (
    class_mean_features,
    info_nce,
    positive_supervision_loss,
)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_dice_zero_for_perfect_prediction_binary_and_multiclass():
    for c in (2, 4):
        y = torch.randint(0, c, (2, 8, 8, 8), generator=gen())
        probs = torch.nn.functional.one_hot(y, c).movedim(-1, 1).float()
        assert soft_dice_loss(probs, y) < 1e-6
        assert soft_dice_loss(1 - probs, y) > 0.99


def test_dice_ignores_ignored_voxels_and_segmentation_loss_decreases_with_fit():
    y = torch.randint(0, 3, (2, 8, 8, 8), generator=gen())
    good = torch.nn.functional.one_hot(y, 3).movedim(-1, 1).float() * 8
    bad = torch.zeros_like(good)
    assert segmentation_loss(good, y) < segmentation_loss(bad, y)
    probs = torch.nn.functional.one_hot(y, 3).movedim(-1, 1).float()
    y_ign = y.clone()
    y_ign[:, :4] = -1
    probs[:, :, :4] = torch.rand_like(probs[:, :, :4])  # garbage where ignored
    assert soft_dice_loss(probs, y_ign) < 1e-6


def test_pseudo_label_loss_weights_by_confident_share_and_ignores():
    logits = torch.randn(2, 2, 4, 4, 4, generator=gen())
    label = torch.randint(0, 2, (2, 4, 4, 4), generator=gen(1))
    conf = torch.zeros(2, 4, 4, 4)
    assert pseudo_label_loss(logits, label, conf, 0.97) == 0
    conf[0] = 1.0  # image 0 fully confident, image 1 not at all
    ce0 = torch.nn.functional.cross_entropy(logits[:1], label[:1])
    torch.testing.assert_close(pseudo_label_loss(logits, label, conf, 0.97), ce0 / 2)
    label_ign = label.clone()
    label_ign[0, :2] = -1
    ce0_valid = torch.nn.functional.cross_entropy(logits[:1], label_ign[:1], ignore_index=-1)
    torch.testing.assert_close(pseudo_label_loss(logits, label_ign, conf, 0.97), ce0_valid / 2)


def cps(hidden, labels, probs, summary=None, xi=0.0, seed=0, **kw):
    return positive_supervision_loss(hidden, lambda t: t, labels, probs, summary, xi, gen(seed),
                                     anchors=kw.get("anchors", 32), negatives=kw.get("neg", 64))


def test_positive_supervision_zero_with_one_class():
    hidden = torch.randn(2, 8, 4, 4, 4, requires_grad=True)
    labels = torch.zeros(2, 4, 4, 4, dtype=torch.long)
    labels[0, 0] = -1  # invalid voxels do not count as a class
    loss = cps(hidden, labels, torch.full((2, 3, 4, 4, 4), 1 / 3))
    assert float(loss.detach()) == 0.0
    loss.backward()  # still part of a graph


def test_positive_supervision_finite_with_three_classes_and_differentiable():
    hidden = torch.randn(2, 8, 4, 4, 4, generator=gen(), requires_grad=True)
    labels = torch.randint(0, 3, (2, 4, 4, 4), generator=gen(1))
    loss = cps(hidden, labels, torch.full((2, 3, 4, 4, 4), 1 / 3))
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert hidden.grad is not None and hidden.grad.abs().sum() > 0


def test_positive_supervision_lower_when_anchors_sit_on_their_key():
    labels = torch.randint(0, 3, (2, 6, 6, 6), generator=gen(2))
    probs = torch.full((2, 3, 6, 6, 6), 1 / 3)
    # Every voxel of class c is the basis vector e_c: anchors coincide with rbar_c = e_c.
    on_key = torch.nn.functional.one_hot(labels, 8).movedim(-1, 1).float()
    off_key = torch.randn(on_key.shape, generator=gen(3))
    assert cps(on_key, labels, probs) < cps(off_key, labels, probs) - 1.0
    # With the prototype summary blended in, anchors on rbar_c are off the key when m_c differs.
    summary = -torch.eye(3, 8)
    assert cps(on_key, labels, probs, summary, xi=1.0) > cps(on_key, labels, probs) + 0.5


def test_certain_anchors_are_skipped():
    labels = torch.randint(0, 2, (1, 4, 4, 4), generator=gen())
    certain = torch.nn.functional.one_hot(labels, 2).movedim(-1, 1).float()
    hidden = torch.randn(1, 8, 4, 4, 4, generator=gen(1), requires_grad=True)
    assert float(cps(hidden, labels, certain).detach()) == 0.0


def test_info_nce_matches_definition():
    a, p, n = torch.randn(5, 4), torch.randn(4), torch.randn(5, 7, 4)
    cos = torch.nn.functional.cosine_similarity
    pos = cos(a, p[None].expand_as(a), dim=-1)
    neg = cos(a[:, None], n, dim=-1)
    expected = -(pos / 0.5 - torch.logsumexp(torch.cat([pos[:, None], neg], 1) / 0.5, 1)).mean()
    torch.testing.assert_close(info_nce(a, p, n, 0.5), expected)


@pytest.mark.parametrize("shape", [(2, 5, 6, 7, 3), (3, 4, 1, 9, 2), (2, 3, 11)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_class_mean_features_match_a_float64_reference(shape, channels_last):
    features = torch.randn(shape, generator=gen(3))
    if channels_last and features.dim() == 5:
        features = features.contiguous(memory_format=torch.channels_last_3d)
    labels = torch.randint(-1, 3, (shape[0], *shape[2:]), generator=gen(4))
    labels[labels == 1] = 2  # class 1 absent: count 0, mean 0
    means, counts = class_mean_features(features, labels, 3)
    f = features.double().flatten(2).movedim(1, -1)  # (B, N, H)
    lab = labels.flatten(1)
    for c in range(3):
        mask = lab == c
        assert counts[c] == mask.sum()
        expected = f[mask].mean(0) if mask.any() else torch.zeros(shape[1], dtype=torch.double)
        torch.testing.assert_close(means[c].double(), expected, rtol=1e-5, atol=1e-6)
