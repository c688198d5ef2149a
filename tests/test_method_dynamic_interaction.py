"""The Dynamic Interaction Module: M(x) >= 0 and learnable with the method's optimiser."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from crlnseg.method.dynamic_interaction import DynamicInteraction
from crlnseg.method.losses import segmentation_loss
from crlnseg.method.prototypes import Prototypes


def _blob_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features at 1/4 and 1/2 of a 16^3 crop that carry a ball label plus noise."""
    g = torch.Generator().manual_seed(seed)
    ax = torch.arange(16, dtype=torch.float32)
    grid = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"))
    centres = 5 + 6 * torch.rand(2, 3, 1, 1, 1, generator=g)
    y = (((grid[None] - centres) ** 2).sum(1) < 16).long()

    def feat(channels: int, factor: int) -> torch.Tensor:
        down = F.avg_pool3d(y[:, None].float(), factor)
        direction = torch.randn(1, channels, 1, 1, 1, generator=g)
        return down * direction + 0.5 * torch.randn(2, channels, *down.shape[2:], generator=g)

    return feat(16, 4), feat(8, 2), y


def test_relation_map_is_nonnegative_and_full_size() -> None:
    torch.manual_seed(0)
    dim = DynamicInteraction(2, 4, 16, 16, 8)
    m = dim(Prototypes(2, 4, 16)(), torch.randn(2, 16, 4, 4, 2), torch.randn(2, 8, 8, 8, 4))
    assert m.shape == (2, 2, 16, 16, 8) and bool((m >= 0).all())


@pytest.mark.parametrize("seed", [0, 2, 3])
def test_dim_fits_relation_loss_on_a_fixed_batch(seed: int) -> None:
    """P + DIM alone, SGD at the method's lr 2.5e-3: with PyTorch's default init of the output
    layers the foreground channel of M sits under the final ReLU and the loss stays > 1.1."""
    torch.manual_seed(seed)
    fq, fh, y = _blob_batch(seed)
    protos, dim = Prototypes(2, 4, 16), DynamicInteraction(2, 4, 16, 16, 8)
    opt = torch.optim.SGD([*protos.parameters(), *dim.parameters()], lr=2.5e-3, momentum=0.9,
                          nesterov=True)
    first = None
    for _ in range(100):
        loss = segmentation_loss(dim(protos(), fq, fh), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert first > 1.3 and loss.item() < 0.5
