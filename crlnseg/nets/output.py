"""The one output type of every backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from torch import Tensor

from crlnseg.nets.checkpointing import checkpointed

if TYPE_CHECKING:
    from crlnseg.nets.heads import ProjectionHead

__all__ = ["EmbedMode", "NetOutput", "check_input"]

# dense: the (B, F, X, Y, Z) embedding; hidden: only the head's hidden features (training projects
# sampled voxels itself); none: no head at all (teacher, inference).
EmbedMode = Literal["dense", "hidden", "none"]


@dataclass
class NetOutput:
    """Backbone outputs, shapes for ``base`` filters, C classes and F embedding features.

    logits: (B, C, X, Y, Z); feat_quarter: (B, 4*base, X/4, Y/4, Z/4);
    feat_half: (B, 2*base, X/2, Y/2, Z/2); embedding: (B, F, X, Y, Z) when ``embed="dense"``,
    else None; embed_hidden: the projection head's hidden features (B, H, X, Y, Z) when ``embed``
    is "dense" or "hidden", else None.
    """

    logits: Tensor
    feat_quarter: Tensor
    feat_half: Tensor
    embedding: Tensor | None = None
    embed_hidden: Tensor | None = None

    @staticmethod
    def build(logits: Tensor, feat_quarter: Tensor, feat_half: Tensor, last: Tensor,
              head: ProjectionHead, embed: EmbedMode, checkpoint: bool = False) -> NetOutput:
        if embed not in ("dense", "hidden", "none"):
            raise ValueError(f"embed must be dense, hidden or none, got {embed!r}")
        hidden = (checkpointed(head.hidden, head.hidden, last, enabled=checkpoint)
                  if embed != "none" else None)
        dense = head.project(hidden) if embed == "dense" else None
        return NetOutput(logits, feat_quarter, feat_half, dense, hidden)


def check_input(x: Tensor, multiple: tuple[int, int, int]) -> None:
    if x.dim() != 5 or any(s % m for s, m in zip(x.shape[2:], multiple, strict=True)):
        raise ValueError(f"expected input (B, C, X, Y, Z) with sides multiples of "
                         f"{tuple(multiple)}, got {tuple(x.shape)}")
