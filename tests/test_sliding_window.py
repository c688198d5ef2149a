"""Sliding window, Gaussian importance map, flips and keep-largest on synthetic tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crlnseg.inference.postprocess import keep_largest_component
from crlnseg.inference.sliding_window import (
    gaussian_importance_map,
    overlap_starts,
    pad_to_patch,
    patch_origins,
    sliding_window,
    stride_starts,
)
from crlnseg.inference.tta import flip_sets, with_flips


def identity(x: torch.Tensor) -> torch.Tensor:
    return x


@pytest.mark.parametrize("blend,stride", [("gaussian", None), ("uniform", (5, 4, 3)),
                                          ("uniform", None), ("gaussian", (3, 3, 3))])
@pytest.mark.parametrize("batch_size", [1, 3])
def test_identity_model_returns_its_input(blend, stride, batch_size):
    gen = torch.Generator().manual_seed(0)
    image = torch.rand((2, 21, 17, 13), generator=gen)
    out = sliding_window(image, identity, (8, 8, 6), out_channels=2, blend=blend,
                         stride=stride, batch_size=batch_size)
    assert out.shape == image.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, image, rtol=1e-5, atol=1e-6)


def test_volume_smaller_than_patch_is_padded_and_cropped_back():
    image = torch.rand((1, 5, 20, 7))
    seen = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x * 2

    out = sliding_window(image, record, (8, 8, 8), out_channels=1, overlap=0.5)
    assert out.shape == image.shape
    torch.testing.assert_close(out, image * 2)
    assert all(s == (1, 1, 8, 8, 8) for s in seen)
    padded, crop = pad_to_patch(image, (8, 8, 8))
    assert padded.shape == (1, 8, 20, 8)
    torch.testing.assert_close(padded[(slice(None), *crop)], image)


def test_patches_are_seen_at_their_position():
    # A patch function that returns its input's mean everywhere would blur; one that returns the
    # input detects misplaced patches, so check with a position-coded image.
    xs = torch.arange(30, dtype=torch.float32)
    image = xs[None, :, None, None].expand(1, 30, 9, 9).clone()
    out = sliding_window(image, identity, (10, 9, 9), out_channels=1, stride=(7, 1, 1),
                         blend="uniform")
    torch.testing.assert_close(out, image)


def test_starts_follow_nnunet_and_the_literature():
    assert overlap_starts(100, 64, 0.5) == [0, 18, 36]
    assert overlap_starts(64, 64, 0.5) == [0]
    assert overlap_starts(65, 64, 0.5) == [0, 1]
    # Reference test_single_case: min(stride * i, size - patch), ceil((size - patch) / s) + 1 steps.
    assert stride_starts(100, 64, 18) == [0, 18, 36]
    assert stride_starts(44, 32, 4) == [0, 4, 8, 12]
    assert stride_starts(45, 32, 4) == [0, 4, 8, 12, 13]
    assert len(patch_origins((100, 70, 44), (64, 64, 32), stride=(18, 18, 4))) == 3 * 2 * 4


def test_gaussian_map_is_centred_positive_and_separable():
    weight = gaussian_importance_map((16, 12, 8))
    assert weight.shape == (16, 12, 8)
    assert float(weight.max()) == pytest.approx(1.0)
    assert tuple(int(i) for i in np.unravel_index(int(weight.argmax()), weight.shape)) == (8, 6, 4)
    assert float(weight.min()) > 0
    # sigma = size / 8: one sigma from the centre the weight is exp(-1/2).
    assert float(weight[8 + 2, 6, 4]) == pytest.approx(np.exp(-0.5), rel=1e-5)


def test_sigma_scale_widens_the_map_and_flattens_the_blend():
    wide = gaussian_importance_map((16, 12, 8), 0.25)
    # sigma = size / 4: two voxels of a 16-voxel side from the centre is half a sigma.
    assert float(wide[8 + 2, 6, 4]) == pytest.approx(np.exp(-0.125), rel=1e-5)
    assert float(wide.min()) > float(gaussian_importance_map((16, 12, 8)).min())
    image = torch.zeros((1, 24, 8, 8))

    def blend(sigma: float) -> float:
        calls = iter(range(100))

        def disagree(x: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.full_like(q, float(next(calls))) for q in x])

        out = sliding_window(image, disagree, (16, 8, 8), 1, overlap=0.5, sigma_scale=sigma)
        return float(out[0, 10, 0, 0])

    # Nearer the first patch's centre: a wider Gaussian gives the second patch more say.
    assert blend(1 / 8) < blend(1 / 4) < blend(1 / 2) < 0.5


def test_gaussian_blending_differs_from_uniform_where_patches_disagree():
    image = torch.zeros((1, 24, 8, 8))
    calls = iter(range(100))

    def disagree(x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.full_like(p, float(next(calls))) for p in x])

    g = sliding_window(image, disagree, (16, 8, 8), 1, blend="gaussian", overlap=0.5)
    calls = iter(range(100))
    u = sliding_window(image, disagree, (16, 8, 8), 1, blend="uniform", overlap=0.5)
    # Overlap region [8, 16): uniform averages 0 and 1; Gaussian favours the nearer centre.
    assert float(u[0, 10, 0, 0]) == pytest.approx(0.5)
    assert float(g[0, 10, 0, 0]) < 0.5 < float(g[0, 14, 0, 0])


def test_flips_cover_all_axis_subsets_and_average():
    assert len(flip_sets(True)) == 8 and flip_sets(False) == [()]
    x = torch.rand((2, 1, 4, 5, 6))
    torch.testing.assert_close(with_flips(identity, flip_sets(True))(x), x)
    # An orientation-dependent function is symmetrised: the mean over flips is flip-invariant.
    ramp = torch.arange(4, dtype=torch.float32)[None, None, :, None, None]

    def biased(t: torch.Tensor) -> torch.Tensor:
        return t + ramp

    out = with_flips(biased, flip_sets(True))(x)
    torch.testing.assert_close(out, x + 1.5)


def test_keep_largest_component_per_class():
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[0:4, 0:4, 0:4] = 1          # 64 voxels
    mask[8:10, 8:10, 8:10] = 1       # 8 voxels: removed
    mask[5, 5, 5] = 2                # class 2 single voxel: kept (largest of its class)
    mask[6, 6, 6] = 2                # diagonal neighbour: 26-connected, same component
    mask[10, 0, 0] = 2               # isolated: removed
    out = keep_largest_component(mask)
    assert out.dtype == mask.dtype
    assert np.count_nonzero(out == 1) == 64
    assert out[9, 9, 9] == 0 and out[10, 0, 0] == 0
    assert out[5, 5, 5] == 2 and out[6, 6, 6] == 2
    empty = np.zeros((3, 3, 3), np.uint8)
    assert np.array_equal(keep_largest_component(empty), empty)
