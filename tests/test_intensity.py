"""Intensity augmentation: identity at probability 0, each operation's effect, ranges, replay."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from crlnseg.data.intensity import (
    IntensityParams,
    apply_intensity,
    contrast_transform,
    draw_intensity_params,
    gamma_transform,
    intensity_enabled,
)
from crlnseg.settings import AugmentSettings

P_FIELDS = ("gaussian_noise_p", "blur_p", "brightness_p", "contrast_p", "gamma_inverted_p",
            "gamma_p")
ALL_ON = AugmentSettings(**dict.fromkeys(P_FIELDS, 1.0))
ALL_OFF = AugmentSettings(**dict.fromkeys(P_FIELDS, 0.0))


def only(**fields) -> IntensityParams:
    """Parameters of one crop with the given operations and nothing else."""
    empty = {f.name: [None] for f in dataclasses.fields(IntensityParams)}
    return IntensityParams(**{**empty, **{k: [v] for k, v in fields.items()}})


def image(batch: int = 2, channels: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, channels, 16, 16, 8, generator=torch.Generator().manual_seed(seed))


def test_probability_zero_is_the_identity_and_draws_nothing_when_off():
    off = ALL_OFF
    assert not intensity_enabled(off) and intensity_enabled(ALL_ON)
    params = draw_intensity_params(3, 2, torch.Generator().manual_seed(0), off)
    assert all(v is None for field in dataclasses.astuple(params) for v in field)
    x = image(3)
    assert torch.equal(apply_intensity(x, params), x)


def test_draws_lie_in_their_ranges():
    s = ALL_ON.model_copy(update={"gamma": (0.7, 1.5), "contrast": (0.75, 1.25),
                                  "brightness": (0.9, 1.1), "blur_sigma": (0.5, 1.0),
                                  "gaussian_noise_sigma": (0.0, 0.1)})
    p = draw_intensity_params(200, 2, torch.Generator().manual_seed(1), s)
    flat = {name: [v for per_crop in getattr(p, name) for v in per_crop]
            for name in ("blur", "brightness", "contrast", "gamma_inverted", "gamma")}
    assert all(0.5 <= v <= 1.0 for v in flat["blur"])
    assert all(0.9 <= v <= 1.1 for v in flat["brightness"])
    assert all(0.75 <= v <= 1.25 for v in flat["contrast"])
    for g in (flat["gamma"], flat["gamma_inverted"]):
        assert all(0.7 <= v <= 1.5 for v in g)
        below = sum(v < 1 for v in g) / len(g)
        assert 0.4 < below < 0.6  # batchgenerators: below 1 half the time
    assert all(0 <= sigma <= 0.1 for _, sigma in p.noise)
    half = draw_intensity_params(400, 1, torch.Generator().manual_seed(2),
                                 ALL_OFF.model_copy(update={"gamma_p": 0.5}))
    share = sum(g is not None for g in half.gamma) / 400
    assert 0.4 < share < 0.6 and all(b is None for b in half.blur)


def test_gamma_keeps_mean_std_and_order_and_one_is_the_identity():
    x = image(1, 1)[0, 0]
    for gamma in (0.7, 1.5):
        for invert in (False, True):
            y = gamma_transform(x, gamma, invert)
            torch.testing.assert_close(y.mean(), x.mean(), atol=1e-5, rtol=0)
            torch.testing.assert_close(y.std(), x.std(), atol=1e-4, rtol=1e-4)
            order = torch.argsort(x.flatten())
            assert (y.flatten()[order].diff() >= -1e-5).all()  # monotonic
            assert not torch.allclose(y, x, atol=1e-3)
    torch.testing.assert_close(gamma_transform(x, 1.0), x, atol=1e-5, rtol=1e-5)
    # gamma < 1 compresses the top of the range (before the std is restored): the maximum moves
    # closer to the mean in units of the std, the minimum further; inversion mirrors that.
    def spread(v):
        return float((v.max() - v.mean()) / (v.mean() - v.min()))

    assert spread(gamma_transform(x, 0.7)) < spread(x) < spread(gamma_transform(x, 1.5))
    assert spread(gamma_transform(x, 0.7, invert=True)) > spread(x)


def test_contrast_keeps_the_range_brightness_multiplies():
    x = image(1, 1)[0, 0]
    y = contrast_transform(x, 1.25)
    assert y.min() >= x.min() and y.max() <= x.max() and y.std() > x.std()
    assert contrast_transform(x, 0.75).std() < x.std()
    torch.testing.assert_close(contrast_transform(x, 1.0), x)
    batch = image(1, 2)
    out = apply_intensity(batch, only(brightness=[1.2, 0.8]))
    torch.testing.assert_close(out[0, 0], batch[0, 0] * 1.2)
    torch.testing.assert_close(out[0, 1], batch[0, 1] * 0.8)


def test_blur_smooths_and_keeps_constants_noise_has_its_sigma():
    x = image(1, 1)
    blurred = apply_intensity(x, only(blur=[1.0]))
    assert blurred.std() < 0.6 * x.std()
    constant = torch.full((1, 1, 16, 16, 8), 3.0)
    torch.testing.assert_close(apply_intensity(constant, only(blur=[1.0])), constant)
    noisy = apply_intensity(torch.zeros(1, 1, 32, 32, 32), only(noise=(5, 0.1)))
    assert float(noisy.std()) == pytest.approx(0.1, rel=0.05)


def test_same_seed_same_output():
    x = image()
    p1 = draw_intensity_params(2, 2, torch.Generator().manual_seed(3), ALL_ON)
    p2 = draw_intensity_params(2, 2, torch.Generator().manual_seed(3), ALL_ON)
    assert dataclasses.asdict(p1) == dataclasses.asdict(p2)
    assert torch.equal(apply_intensity(x, p1), apply_intensity(x, p2))
    p3 = draw_intensity_params(2, 2, torch.Generator().manual_seed(4), ALL_ON)
    assert not torch.equal(apply_intensity(x, p1), apply_intensity(x, p3))


def test_settings_refuse_bad_ranges():
    for bad in ({"gamma": (0.0, 1.5)}, {"gamma": (1.5, 0.7)}, {"blur_sigma": (0.0, 1.0)},
                {"gaussian_noise_sigma": (-0.1, 0.1)}, {"brightness": (1.2, 0.8)},
                {"contrast_p": -0.1}, {"gamma_p": 2.0}):
        with pytest.raises(ValueError):
            AugmentSettings(**bad)
