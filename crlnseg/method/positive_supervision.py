"""Collaborative Positive Supervision (paper Sec. 3.4, METHOD.md Sec. 4), vectorised.

For each class c with valid voxels (labelled, or teacher confidence >= 0.7):
  rbar_c  = mean embedding of the valid voxels of c                           (no gradient)
  key_c   = (rbar_c + xi * m_c) / (1 + xi), m_c the mean of c's R teacher prototypes
            (after warm-up; the plain class mean rbar_c before)
  anchors = ``anchors`` draws (with replacement) among valid voxels of c whose student
            probability for c is < 0.97; ``negatives`` draws per anchor among valid voxels of
            other classes (keys without gradient)
  L_c     = InfoNCE(cos / temperature) with key_c as the positive, mean over anchors
L_cps = mean of L_c over classes with anchors; 0 when fewer than two classes are valid.
Embeddings are the projection head applied to its hidden features (an affine map), so only the
sampled voxels are projected and rbar_c = project(mean of hidden features): identical values, a
fraction of the memory of a dense embedding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["info_nce", "class_mean_features", "positive_supervision_loss"]


def info_nce(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """Mean InfoNCE of anchors (K, F) with a positive (F,) or (K, F) and negatives (K, M, F)."""
    a = F.normalize(anchor.float(), dim=-1)
    p = F.normalize(positive.float(), dim=-1).expand_as(a)
    n = F.normalize(negatives.float(), dim=-1)
    logits = torch.cat([(a * p).sum(-1, keepdim=True), torch.einsum("kf,kmf->km", a, n)], dim=1)
    target = torch.zeros(a.shape[0], dtype=torch.long, device=a.device)
    return F.cross_entropy(logits / temperature, target)


@torch.no_grad()
def class_mean_features(features: Tensor, labels: Tensor,
                        num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class mean of features (B, H, X, ...) over voxels labelled c in labels (B, X, ...)
    (-1 skipped). Returns means (C, H) in fp32 and counts (C,).

    The sums are one matrix product per sample, batched over the first spatial axis: a single
    (H x N) @ (N x C) product reduces over all N voxels in one long inner loop that cuBLAS spreads
    over few thread blocks (31 ms of a 104 ms CRLN iteration on an H100 at 112 x 112 x 80,
    benchmarks/RESULTS.md "GPU checks"); X products of length N / X run in parallel. The views
    copy nothing in either memory format.
    """
    b, h, *spatial = features.shape
    f = features.reshape(b, h, spatial[0] if len(spatial) > 1 else 1, -1)
    lab = labels.reshape(b, f.shape[2], -1)
    valid = lab >= 0
    onehot = F.one_hot(lab.clamp_min(0), num_classes).float() * valid.unsqueeze(-1)
    sums = features.new_zeros((h, num_classes), dtype=torch.float32)
    with torch.autocast(features.device.type, enabled=False):
        for i in range(b):  # (X, H, N/X) @ (X, N/X, C): a sample at a time bounds the fp32 copy
            sums += torch.bmm(f[i].transpose(0, 1).float(), onehot[i]).sum(0)
    counts = onehot.sum((0, 1, 2))
    return sums.T / counts.clamp_min(1).unsqueeze(1), counts


def _rows(features: Tensor, flat_index: Tensor) -> Tensor:
    """Rows of features (B, H, X, Y, Z) at flat voxel indices into B*X*Y*Z -> (K, H).

    Indexing the 5-D tensor directly copies nothing, whatever its memory format.
    """
    b, _, *size = features.shape
    index = torch.unravel_index(flat_index, (b, *size))
    return features[index[0], :, index[1], index[2], index[3]]


def _draw(pool: Tensor, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """``shape`` draws with replacement from the index tensor ``pool``."""
    pick = torch.randint(pool.numel(), shape, generator=generator, device=generator.device)
    return pool[pick.to(pool.device)]


def positive_supervision_loss(
    hidden: Tensor, project: Callable[[Tensor], Tensor], labels: Tensor, probs: Tensor,
    summary: Tensor | None, xi: float, generator: torch.Generator, *, anchors: int = 256,
    negatives: int = 512, temperature: float = 0.5, uncertain_below: float = 0.97,
) -> Tensor:
    """L_cps from hidden features (B, H, X, Y, Z), labels (B, X, Y, Z) with -1 for invalid voxels,
    detached student probabilities (B, C, X, Y, Z) and class summaries m (C, F) or None."""
    num_classes = probs.shape[1]
    lab = labels.flatten(1)
    means, counts = class_mean_features(hidden, labels, num_classes)
    zero = hidden.sum() * 0.0
    if int((counts > 0).sum()) < 2:
        return zero
    with torch.no_grad():
        keys = project(means.to(hidden.dtype)).float()
        if summary is not None:
            keys = (keys + xi * summary.float()) / (1 + xi)
    prob = probs.flatten(2)
    lab, valid = lab.flatten(), (lab >= 0).flatten()
    losses = []
    for c in range(num_classes):
        uncertain = (valid & (lab == c) & (prob[:, c].flatten() < uncertain_below)).nonzero()[:, 0]
        others = (valid & (lab != c)).nonzero()[:, 0]
        if uncertain.numel() == 0 or others.numel() == 0:
            continue
        anchor = project(_rows(hidden, _draw(uncertain, (anchors,), generator)))
        with torch.no_grad():
            neg_index = _draw(others, (anchors * negatives,), generator)
            neg = project(_rows(hidden, neg_index)).view(anchors, negatives, -1)
        losses.append(info_nce(anchor, keys[c], neg, temperature))
    return torch.stack(losses).mean() if losses else zero
