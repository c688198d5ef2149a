"""Self-describing checkpoints: save atomically, load weights-only, resume exactly.

A checkpoint is one ``torch.save`` of plain containers, tensors, numbers and strings (so
``torch.load(weights_only=True)`` reads it)::

    {"format": "crlnseg-checkpoint", "format_version": 1, "crlnseg_version", "torch_version",
     "settings": RunSettings as JSON, "meta": {"classes", "channels", "prepare", "iteration", ...},
     "state": {"student", "teacher", "optimizer", ...}, "rng": {"torch", "numpy", "python"}}

The training loop draws its randomness from generators seeded by ``(seed, rank, iteration)``, so
``state`` + ``meta.iteration`` are enough to resume exactly; the global RNG states are stored too
(restored on resume) so that code outside the loop's control also replays.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from crlnseg import __version__
from crlnseg.errors import CheckpointError

if TYPE_CHECKING:
    from crlnseg.settings import RunSettings

__all__ = ["FORMAT", "FORMAT_VERSION", "save_checkpoint", "copy_checkpoint", "load_checkpoint",
           "resolve_checkpoint", "rng_state", "set_rng_state"]

FORMAT = "crlnseg-checkpoint"
FORMAT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """Global torch / numpy / python RNG states as weights-only-loadable values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {"torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)),
                      "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
            "python": {"version": version, "internal": list(internal), "gauss": gauss}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))


def _atomic_save(obj: Any, path: Path) -> None:
    from crlnseg.io.writers import make_folder, write_atomic

    def save_synced(tmp: Path) -> None:
        with open(tmp, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())  # a crash right after the rename keeps a whole checkpoint

    make_folder(path.parent)
    write_atomic(path, save_synced, overwrite=True)


def save_checkpoint(path: Path, state: dict[str, Any], settings: RunSettings, meta: dict) -> None:
    """Write ``path`` atomically (temporary file in the same folder, then ``os.replace``);
    ``state``: the training state as plain containers and tensors."""
    _atomic_save({"format": FORMAT, "format_version": FORMAT_VERSION,
                  "crlnseg_version": __version__, "torch_version": str(torch.__version__),
                  "settings": settings.model_dump(mode="json"), "meta": dict(meta),
                  "state": state, "rng": rng_state()}, Path(path))


def copy_checkpoint(src: Path, dst: Path) -> None:
    """Atomic copy (periodic ``iter_<N>.pt`` and ``best.pt`` from ``last.pt``)."""
    from crlnseg.io.writers import write_atomic

    write_atomic(Path(dst), lambda tmp: shutil.copyfile(src, tmp), overwrite=True)


def load_checkpoint(path: Path, map_location: Any = "cpu") -> dict:
    """Read a checkpoint (weights only); anything else is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:  # a runtime failure, not a bad file
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is "not a checkpoint"
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{path}: not a readable crlnseg checkpoint "
                              f"({first[:120]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a crlnseg checkpoint")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {data.get('format_version')} is "
                              f"not supported (this crlnseg reads version {FORMAT_VERSION})")
    missing = [k for k in ("settings", "meta", "state") if not isinstance(data.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path}: damaged crlnseg checkpoint (no {', '.join(missing)})")
    return data


def resolve_checkpoint(model: Path, which: str = "last") -> Path:
    """A run folder (``RUN/checkpoints/<which>.pt``) or a ``.pt`` file; ``which`` may be a path."""
    model = Path(model)
    if which not in ("last", "best"):
        return Path(which)
    if model.is_dir():
        path = model / "checkpoints" / f"{which}.pt"
        if not path.is_file():
            hint = " (best.pt exists only for runs trained with --val)" if which == "best" else ""
            raise CheckpointError(f"{model}: no checkpoints/{which}.pt in this run folder{hint}")
        return path
    if not model.exists():
        raise CheckpointError(f"{model}: no such run folder or checkpoint")
    return model
