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

import errno
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from crlnseg import __version__
from crlnseg.errors import CheckpointError

if TYPE_CHECKING:
    from crlnseg.settings import RunSettings

__all__ = ["FORMAT", "FORMAT_VERSION", "save_checkpoint", "copy_checkpoint", "load_checkpoint",
           "resolve_checkpoint", "rng_state", "set_rng_state", "clean_message"]

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
        with warnings.catch_warnings():  # e.g. "Detected pickle protocol 4": the error says it
            warnings.simplefilter("ignore")
            data = torch.load(path, map_location=map_location, weights_only=True)
    except MemoryError:  # a runtime failure, not a bad file
        raise
    except Exception as err:  # noqa: BLE001 - any unreadable file is "not a checkpoint"
        raise CheckpointError(f"{path}: {_load_problem(err, path)}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a crlnseg checkpoint")
    if data.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {data.get('format_version')} is "
                              f"not supported (this crlnseg reads version {FORMAT_VERSION})")
    missing = [k for k in ("settings", "meta", "state") if not isinstance(data.get(k), dict)]
    if missing:
        raise CheckpointError(f"{path}: damaged crlnseg checkpoint (no {', '.join(missing)})")
    return data


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_GLOBAL = re.compile(r"Unsupported global: GLOBAL ([\w.]+)")


def _load_problem(err: Exception, path: Path) -> str:
    """What ``torch.load(weights_only=True)`` refused, as one short clause (no torch advice)."""
    texts = [str(e) for e in (err, err.__cause__, err.__context__) if e is not None]
    needs = next((m.group(1) for t in texts if (m := _GLOBAL.search(t))), None)
    if needs is not None:  # a pickle of Python objects: never unpickled, whatever the source
        return (f"not a weights-only crlnseg checkpoint (it needs the Python object {needs} to "
                "load, which is refused for safety)")
    if isinstance(err, OSError) and err.errno != errno.EINVAL:  # EINVAL: a seek in a short zip
        return f"cannot read the checkpoint ({err.strerror or clean_message(str(err))})"
    text = clean_message(str(err))
    try:
        with open(path, "rb") as f:
            zip_start = f.read(4) == b"PK\x03\x04"
        size, is_zip = path.stat().st_size, zipfile.is_zipfile(path)
    except OSError:
        size, is_zip, zip_start = -1, False, False
    if size == 0:
        why = "empty file"
    elif ("central directory" in text or isinstance(err, EOFError)
          or (zip_start and not is_zip)):  # a zip without its end: cut short
        why = "truncated or corrupt file"
    elif "not in a subdirectory" in text:
        why = "a zip archive, but not a PyTorch file"
    elif not is_zip or isinstance(err, pickle.UnpicklingError):
        why = "not a PyTorch file, or a damaged one"  # torch read it as a legacy pickle
    else:
        why = text or type(err).__name__
    return f"not a readable crlnseg checkpoint ({why})"


def clean_message(text: str, limit: int = 120) -> str:
    """The first sentence of a library message: no ANSI codes, no ``[enforce fail at ...]``
    prefix, one line, cut at a word boundary (with ``...``) when longer than ``limit``."""
    text = _ANSI.sub("", text)
    text = re.sub(r"\[enforce fail at [^\]]*\]\s*\.?\s*", "", text)
    text = " ".join(text.split())
    text = re.split(r"(?<=[a-z0-9)])\.\s+(?=[A-Z])", text, maxsplit=1)[0].rstrip(".")
    if len(text) > limit:
        text = text[:limit + 1].rsplit(" ", 1)[0].rstrip(",;:") + "..."
    return text


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
