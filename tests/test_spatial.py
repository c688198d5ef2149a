"""Spatial augmentation: one transform for image and label, IGNORE from outside, exact replay."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from crlnseg.data.spatial import (
    SpatialParams,
    apply_spatial,
    draw_spatial_params,
    sample_points,
    source_points,
    spatial_enabled,
)
from crlnseg.settings import AugmentSettings
from crlnseg.types import IGNORE

SHAPE = (16, 16, 8)
ALL_ON = AugmentSettings(rotation_p=1.0, scale_p=1.0, elastic_p=1.0, elastic_sigma=(2.0, 3.0),
                         elastic_alpha=(20.0, 40.0), mirror_p=(0.5, 0.5, 0.5))


def coordinates(batch: int = 2, shape=SHAPE) -> torch.Tensor:
    """An image whose channels are the voxel's X, Y, Z: trilinear resampling of a linear
    function is exact, so the output's channels are the source point q of every voxel."""
    axes = [torch.arange(n, dtype=torch.float32) for n in shape]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    return grid[None].repeat(batch, 1, 1, 1, 1)


def one(angles=(0.0, 0.0, 0.0), scale=1.0, elastic=None, mirror=(False, False, False)):
    return SpatialParams([angles], [scale], [elastic], [mirror])


def test_a_known_point_maps_where_the_rotation_sends_it():
    q = source_points((5, 5, 3), (0.0, 0.0, math.pi / 2), 1.0)
    # p - c = (2, 0, 0) turns a quarter about Z to (0, 2, 0): q = c + (0, 2, 0).
    torch.testing.assert_close(q[4, 2, 1], torch.tensor([2.0, 4.0, 1.0]))
    q = source_points((5, 5, 3), (0.0, 0.0, 0.0), 2.0)
    torch.testing.assert_close(q[3, 2, 1], torch.tensor([4.0, 2.0, 1.0]))  # 2 x (1, 0, 0)


def test_identity_parameters_return_the_input_exactly():
    image = torch.randn(2, 1, *SHAPE)
    label = torch.randint(-1, 3, (2, *SHAPE))
    params = SpatialParams([(0.0,) * 3] * 2, [1.0] * 2, [None] * 2, [(False,) * 3] * 2)
    img, lab, inside = apply_spatial(image, label, params)
    assert torch.equal(img, image) and torch.equal(lab, label) and inside.all()
    off = AugmentSettings()
    assert not spatial_enabled(off)
    drawn = draw_spatial_params(2, torch.Generator().manual_seed(0), off)
    assert not any(drawn.resamples(i) for i in range(2)) and not any(map(any, drawn.mirror))


def test_a_quarter_turn_is_rot90_of_image_and_label():
    image = torch.randn(1, 2, 16, 16, 8)
    label = torch.randint(0, 3, (1, 16, 16, 8))
    img, lab, inside = apply_spatial(image, label, one((0.0, 0.0, math.pi / 2)))
    torch.testing.assert_close(img, torch.rot90(image, -1, dims=(2, 3)), atol=1e-5, rtol=0)
    assert torch.equal(lab, torch.rot90(label, -1, dims=(1, 2))) and inside.all()


@pytest.mark.parametrize("params", [
    one((0.3, -0.2, 0.5)), one(scale=0.8), one(scale=1.3), one(elastic=(7, 30.0, 2.5)),
    one((0.0, 0.0, -1.0), 1.2, (3, 20.0, 2.0), (True, False, True)),
    one(mirror=(False, False, True)),
])
def test_image_label_and_inside_mask_stay_aligned(params):
    image = coordinates(1)
    half = SHAPE[0] / 2
    label = (image[:, 0] >= half).long()  # label = a function of X
    img, lab, inside = apply_spatial(image, label, params)
    dims = [a for a in range(3) if params.mirror[0][a]]
    q = sample_points(SHAPE, params, 0)
    if q is None:  # mirroring only: an exact flip
        assert torch.equal(img, image.flip([a + 2 for a in dims])) and inside.all()
        assert torch.equal(lab, label.flip([a + 1 for a in dims]))
        return
    q = q.flip(dims)  # the source point of each output voxel, after mirroring
    within = ((q >= -1e-3) & (q <= torch.tensor(SHAPE) - 1 + 1e-3)).all(-1)
    assert torch.equal(inside[0], within) and int(within.sum()) > 0
    # Inside, the image reads its own source point: one geometry for every voxel. (Within the
    # float tolerance past the border, zero padding takes part in the interpolation.)
    strict = ((q >= 0) & (q <= torch.tensor(SHAPE) - 1)).all(-1)
    torch.testing.assert_close(img[0].movedim(0, -1)[strict], q[strict], atol=1e-4, rtol=0)
    assert (lab[~inside] == IGNORE).all() and (lab[inside] != IGNORE).all()
    assert params.scale[0] < 1 or not within.all()  # zooming out or turning reads from outside
    # The one-hot label, interpolated as the image was, changes class where q_X passes half - 1/2.
    expect = (q[..., 0] > half - 0.5).long()
    assert torch.equal(lab[0][within], expect[within])


def test_ignored_source_voxels_stay_ignored():
    label = torch.zeros(1, *SHAPE, dtype=torch.long)
    label[0, :8] = IGNORE
    _, lab, inside = apply_spatial(coordinates(1)[:, :1], label, one(scale=0.9))
    assert inside.all()  # zooming in reads only from within the crop
    assert (lab[0, :6] == IGNORE).all() and (lab[0, 10:] == 0).all()


def test_draws_respect_ranges_axes_and_probabilities():
    s = AugmentSettings(rotation_p=1.0, rotation=(-10.0, 10.0), rotation_axes="in-plane",
                        scale_p=1.0, scale=(0.7, 1.4))
    p = draw_spatial_params(64, torch.Generator().manual_seed(1), s)
    assert all(a[0] == 0 and a[1] == 0 and abs(a[2]) <= math.radians(10) for a in p.angles)
    assert len({a[2] for a in p.angles}) == 64
    assert all(0.7 <= v <= 1.4 for v in p.scale)
    assert any(v < 1 for v in p.scale) and any(v > 1 for v in p.scale)
    assert all(e is None for e in p.elastic) and not any(map(any, p.mirror))
    z_only = draw_spatial_params(64, torch.Generator().manual_seed(1),
                                 AugmentSettings(mirror_p=(0.0, 0.0, 1.0)))
    assert all(m == (False, False, True) for m in z_only.mirror)
    assert not any(z_only.resamples(i) for i in range(64))


def test_same_seed_same_transform_and_replay_is_exact():
    image = torch.randn(2, 1, *SHAPE)
    label = torch.randint(0, 2, (2, *SHAPE))
    p1 = draw_spatial_params(2, torch.Generator().manual_seed(7), ALL_ON)
    p2 = draw_spatial_params(2, torch.Generator().manual_seed(7), ALL_ON)
    assert dataclasses.asdict(p1) == dataclasses.asdict(p2)
    a, b = apply_spatial(image, label, p1), apply_spatial(image, label, p2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    p3 = draw_spatial_params(2, torch.Generator().manual_seed(8), ALL_ON)
    assert dataclasses.asdict(p1) != dataclasses.asdict(p3)


def test_unlabelled_crops_get_the_mask_without_a_label():
    img, lab, inside = apply_spatial(coordinates(2), None,
                                     draw_spatial_params(2, torch.Generator().manual_seed(0),
                                                         ALL_ON))
    assert lab is None and img.shape == (2, 3, *SHAPE) and inside.shape == (2, *SHAPE)


def test_settings_refuse_bad_ranges():
    for bad in ({"rotation": (30.0, -30.0)}, {"rotation": (-200.0, 0.0)}, {"scale": (0.0, 1.0)},
                {"elastic_alpha": (-1.0, 1.0)}, {"elastic_sigma": (3.0, 2.0)},
                {"mirror_p": (0.0, 0.0, 1.5)}, {"rotation_p": 1.1}, {"rotation_axes": "xy"}):
        with pytest.raises(ValueError):
            AugmentSettings(**bad)
