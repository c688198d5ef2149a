"""``training.png``: the curves of ``metrics.jsonl`` (losses, mu and lr, confident shares, Dice).

Matplotlib with the Agg backend (no display needed); written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["plot_training", "PANELS"]

# (title, metrics.jsonl keys, log scale)
PANELS: list[tuple[str, tuple[str, ...], bool]] = [
    ("losses", ("loss", "loss_supervised", "loss_relation", "loss_unsup", "loss_cps", "loss_mu"),
     True),
    ("mu and learning rate (x100)", ("mu", "lr"), False),
    ("confident voxel share", ("confident_raw", "confident_rectified"), False),
    ("validation Dice", ("val_dice", "val_dice_largest", "val_dice_tuned"), False),
]


def _series(lines: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(line["iteration"], float(line[key])) for line in lines
              if isinstance(line.get(key), int | float) and not isinstance(line.get(key), bool)]
    return [p[0] for p in points], [p[1] * (100 if key == "lr" else 1) for p in points]


def plot_training(lines: list[dict[str, Any]], path: Path) -> bool:
    """Draw the panels that have data; return False (and write nothing) when none has."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from crlnseg.io.writers import write_atomic

    panels = [(t, [k for k in keys if _series(lines, k)[0]], log) for t, keys, log in PANELS]
    panels = [p for p in panels if p[1]]
    if not panels:
        return False
    fig, axes = plt.subplots(len(panels), 1, figsize=(8, 2.6 * len(panels)), sharex=True,
                             squeeze=False)
    for ax, (title, keys, log) in zip(axes[:, 0], panels, strict=True):
        for key in keys:
            x, y = _series(lines, key)
            ax.plot(x, y, label=key, marker="o" if len(x) < 3 else None)
        if log and all(v > 0 for k in keys for v in _series(lines, k)[1]):
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[-1, 0].set_xlabel("iteration")
    fig.tight_layout()
    try:
        write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=100),
                     overwrite=True)
    finally:
        plt.close(fig)
    return True
