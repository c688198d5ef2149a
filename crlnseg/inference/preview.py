"""A review image per case: axial slices with raw and rectified pseudo-label contours, and the
confidence map (matplotlib, Agg backend, written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["preview_slices", "save_preview"]


def preview_slices(mask: np.ndarray, count: int = 3) -> list[int]:
    """``count`` Z indices spread over the foreground's Z extent (the whole volume if empty)."""
    z = np.flatnonzero(mask.any(axis=(0, 1)))
    lo, hi = (int(z[0]), int(z[-1])) if z.size else (0, mask.shape[2] - 1)
    picks = np.linspace(lo, hi, count + 2)[1:-1] if hi > lo else np.full(count, lo)
    return sorted({int(round(v)) for v in picks})


def save_preview(image: np.ndarray, pred: Any, path: Path, overwrite: bool = False) -> None:
    """``image`` (X, Y, Z) and a RectifiedPrediction -> PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crlnseg.io.writers import write_atomic

    slices = preview_slices(pred.rectified)
    fig, axes = plt.subplots(len(slices), 2, figsize=(7, 3.2 * len(slices)), squeeze=False)
    lo, hi = np.percentile(image, [1, 99])
    for row, z in zip(axes, slices, strict=True):
        # Transpose: X to the right, Y up, as viewers show an axial slice.
        row[0].imshow(image[:, :, z].T, cmap="gray", vmin=lo, vmax=hi, origin="lower")
        for mask, colour in ((pred.raw, "tab:orange"), (pred.rectified, "tab:cyan")):
            if mask[:, :, z].any():
                row[0].contour(mask[:, :, z].T > 0, levels=[0.5], colors=colour, linewidths=1)
        row[0].set_title(f"z={z}: raw (orange), rectified (cyan)", fontsize=8)
        shown = row[1].imshow(pred.confidence[:, :, z].T, cmap="viridis", vmin=0.5, vmax=1.0,
                              origin="lower")
        mu = "no M(x)" if pred.mu is None else f"mu={pred.mu:.3f}"
        row[1].set_title(f"confidence ({mu})", fontsize=8)
        fig.colorbar(shown, ax=row[1], fraction=0.046)
        for ax in row:
            ax.set_axis_off()
    fig.tight_layout()
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=80), overwrite)
    plt.close(fig)
