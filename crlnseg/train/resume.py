"""What a resumed run may change: the same settings (but :data:`RESUME_MAY_CHANGE`), the same
data and the same number of processes as the checkpoint it continues."""

from __future__ import annotations

from typing import Any

from crlnseg.errors import ConfigError
from crlnseg.settings import RunSettings

__all__ = ["RESUME_MAY_CHANGE", "identity", "check_resume", "check_resume_world",
           "check_resume_data", "check_resume_set", "check_resume_prepare"]

DATA_OPTIONS = {"labelled": "--labelled", "unlabelled": "--unlabelled", "val": "--val"}

# Settings a resumed run may change; anything else would make it a different run.
RESUME_MAY_CHANGE = ("train.iterations", "train.log_every", "train.checkpoint_every",
                     "train.val_every", "train.val_stride", "train.num_workers", "train.device",
                     "train.amp")


def identity(manifest: Any) -> dict[str, Any] | None:
    """What a resume must train on again: the case IDs and the dataset fingerprint."""
    if manifest is None:
        return None
    return {"cases": list(manifest.ids), "fingerprint": manifest.fingerprint}


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume(saved: dict[str, Any], settings: RunSettings, done: int,
                 adopted: bool = True) -> None:
    """Refuse a resume that changes more than RESUME_MAY_CHANGE or shrinks below ``done``.

    ``adopted=False``: ``settings`` before the dataset's preprocessing, channels and classes
    are adopted (so that the check can come before anything is prepared); those are then
    compared only where given explicitly.
    """
    old, new = _flat(saved), _flat(settings.model_dump(mode="json"))
    free = set(RESUME_MAY_CHANGE)
    if not adopted:
        free |= {k for k in old if k.startswith("prepare.")}  # check_resume_prepare's
        free |= {f"model.{k}" for k in ("in_channels", "num_classes")
                 if k not in settings.model.model_fields_set}
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in free]
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigError(f"--resume: {k} was {old.get(k)!r}, now {new.get(k)!r}{more}; a resumed "
                          f"run may change only {', '.join(RESUME_MAY_CHANGE)}")
    if settings.train.iterations < done:
        raise ConfigError(f"--resume: the run already did {done} iterations; "
                          f"--iterations {settings.train.iterations} is fewer")


def check_resume_world(meta: dict[str, Any], world: int) -> None:
    """A resume must use as many processes: they set the effective batch and the random
    streams (one per rank)."""
    saved = meta.get("world_size")
    if saved is not None and int(saved) != world:
        raise ConfigError(f"--resume: the run was trained with {saved} process(es), now {world}; "
                          "that changes the effective batch and the random streams: resume with "
                          "the same --gpus / --nproc / --device")


def check_resume_data(meta: dict[str, Any], data: dict[str, Any]) -> None:
    """A resume must train on the data the checkpoint was trained on (checkpoints written
    before this was recorded are not checked)."""
    for key in DATA_OPTIONS:
        check_resume_set(meta, key, data.get(key))


def check_resume_set(meta: dict[str, Any], key: str, now: dict[str, Any] | None) -> None:
    """One input (``labelled``, ``unlabelled``, ``val``) of :func:`check_resume_data`: ``now``
    its :func:`identity`; usable before the input's cache is written."""
    old = meta.get("data")
    # --val too: best.pt compares Dice across validations, which must score the same cases.
    if not isinstance(old, dict) or key not in old:  # not recorded by the checkpoint's version
        return
    was, option = old.get(key), DATA_OPTIONS[key]
    if was == now:
        return
    if was is None or now is None:
        what = f"the run was trained {'without' if was is None else 'with'} {option}"
    elif was["cases"] != now["cases"]:
        what = (f"{len(was['cases'])} case(s) before, {len(now['cases'])} now"
                if len(was["cases"]) != len(now["cases"]) else "other case IDs")
    else:
        what = "same case IDs, other contents"
    raise ConfigError(f"--resume: {option} is not the data the run was trained on ({what}); "
                      "resume with the same data, or start a new run")


def check_resume_prepare(saved: dict[str, Any], settings: RunSettings) -> None:
    """Before anything is prepared: a resume keeps the run's preprocessing."""
    old = saved.get("prepare", {})
    for key in sorted(settings.prepare.model_fields_set):
        new = settings.prepare.model_dump(mode="json")[key]
        if key in old and old[key] != new:
            raise ConfigError(f"--resume: prepare.{key} was {old[key]!r}, now {new!r}; a resumed "
                              f"run may change only {', '.join(RESUME_MAY_CHANGE)}")
