"""Weak and strong views: alignment of image, label and confidence; padding; exact replay."""

from __future__ import annotations

import dataclasses

import torch

from crlnseg.data.views import (
    StrongParams,
    apply_strong,
    apply_weak,
    draw_strong_params,
    draw_weak_params,
)
from crlnseg.settings import AugmentSettings

AUG = AugmentSettings()


def blocky(batch: int, size=(32, 32, 16), seed: int = 0) -> torch.Tensor:
    """Image of 4^3 blocks with values of magnitude >= 0.5, so noise cannot flip a sign."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, *(s // 4 for s in size), generator=g) + 0.5
    sign = torch.where(torch.rand(coarse.shape, generator=g) < 0.5, -1.0, 1.0)
    return torch.nn.functional.interpolate(coarse * sign, size=size, mode="nearest")


def test_weak_view_keeps_image_and_label_aligned_exactly():
    image = blocky(3, (32, 32, 16))
    image = image + torch.linspace(0, 0.1, 16)  # break the block symmetry along z
    label = (image[:, 0] > 0).long()
    for seed in range(4):
        params = draw_weak_params(3, torch.Generator().manual_seed(seed), AUG)
        img, lab = apply_weak(image, label, params)
        assert torch.equal(lab, (img[:, 0] > 0).long())
    rect = blocky(2, (32, 16, 16))
    params = draw_weak_params(2, torch.Generator().manual_seed(0), AUG, square=False)
    assert all(k % 2 == 0 for k in params.rot90)
    assert apply_weak(rect, None, params)[0].shape == rect.shape


def test_strong_view_keeps_image_label_confidence_aligned():
    image = blocky(2)
    label = (image[:, 0] > 0).long()
    conf = 0.5 + 0.25 * label.float()  # a confidence that encodes its label
    agreement = []
    for seed in range(6):
        params = draw_strong_params(2, torch.Generator().manual_seed(seed), AUG)
        img, lab, cf = apply_strong(image, label, conf, params)
        assert img.shape == image.shape and lab.shape == label.shape and cf.shape == conf.shape
        valid = lab != -1
        assert torch.equal(cf[valid], 0.5 + 0.25 * lab[valid].float())
        assert (cf[~valid] == 0).all()
        agreement.append(float(((img[:, 0] > 0).long() == lab)[valid].float().mean()))
    # Linear image vs nearest label interpolation may differ on block edges only.
    assert min(agreement) > 0.9, agreement


def test_strong_view_pads_label_with_ignore_and_confidence_with_zero():
    image = blocky(2)
    label = (image[:, 0] > 0).long()
    conf = torch.ones(2, 32, 32, 16)
    params = StrongParams(rescale=[0.5, 0.5], offset=[(0.5, 0.5), (0.0, 1.0)], box=[],
                          intensity=[1.0, 1.0], noise_seed=[None, None], rot90=[0, 0],
                          flip=[-1, -1])
    img, lab, cf = apply_strong(image, label, conf, params)
    inside = torch.zeros(2, 32, 32, 16, dtype=torch.bool)
    inside[0, 8:24, 8:24] = True
    inside[1, 0:16, 16:32] = True
    assert (lab[~inside] == -1).all() and (lab[inside] != -1).all()
    assert (cf[~inside] == 0).all() and (cf[inside] == 1).all()
    assert (img[:, 0][~inside] == 0).all()


def test_cutmix_takes_the_box_from_the_next_sample():
    image = torch.stack([torch.zeros(1, 16, 16, 16), torch.ones(1, 16, 16, 16)])
    label = torch.stack([torch.zeros(16, 16, 16), torch.ones(16, 16, 16)]).long()
    params = StrongParams(rescale=[1.0, 1.0], offset=[(0, 0)] * 2,
                          box=[(0.0, 0.5, 0.25, 0.75), (0.0, 0.0, 0.0, 0.0)],
                          intensity=[1.0, 1.0], noise_seed=[None, None], rot90=[0, 0],
                          flip=[-1, -1])
    img, lab, _ = apply_strong(image, label, torch.ones(2, 16, 16, 16), params)
    assert (img[0, 0, :8, 4:12] == 1).all() and img[0].sum() == 8 * 8 * 16
    assert torch.equal(lab[0], img[0, 0].long()) and (lab[1] == 1).all()


def test_same_seed_same_view_and_params_replay_exactly():
    image = blocky(2)
    label = (image[:, 0] > 0).long()
    conf = torch.rand(2, 32, 32, 16)
    p1 = draw_strong_params(2, torch.Generator().manual_seed(7), AUG)
    p2 = draw_strong_params(2, torch.Generator().manual_seed(7), AUG)
    assert dataclasses.asdict(p1) == dataclasses.asdict(p2)
    a = apply_strong(image, label, conf, p1)
    b = apply_strong(image, label, conf, p1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    p3 = draw_strong_params(2, torch.Generator().manual_seed(8), AUG)
    assert dataclasses.asdict(p1) != dataclasses.asdict(p3)
