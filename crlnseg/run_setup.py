"""Before the loop: check the run folder and the inputs, adopt the dataset, write the run's files.

Everything that can refuse a run does so here, once, before any process is spawned, with a
one-line error (exit 2): RUN_DIR exists without ``--resume`` / ``--overwrite``, RUN_DIR is a
non-empty folder that is not a crlnseg run (never used or cleared, even with ``--overwrite``) or
lies inside an input, bad data, settings inconsistent with the data, a resume whose settings,
data or number of processes changed what the checkpoint means. A crlnseg run is recognised by
its own ``settings.json`` and ``environment.json`` (:func:`is_run`).

What a fresh run creates is listed in the plan (``RunPlan.discard``): when planning fails, or
the run fails or is interrupted before its first checkpoint, it is removed again
(:func:`discard_unsaved_run`), so nothing half-written blocks a retry. ``--overwrite`` replaces a
run as a whole or not at all: the old run's files wait in ``RUN_DIR/.crlnseg-previous`` until the
new run's first checkpoint (then they are deleted) and move back if it fails before.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from crlnseg.console import log
from crlnseg.errors import (
    CheckpointError,
    ConfigError,
    CrlnsegError,
    DataError,
    OutputExistsError,
    RunInterrupted,
)
from crlnseg.settings import RunSettings
from crlnseg.train import RunPlan

__all__ = ["RESUME_MAY_CHANGE", "OUTPUTS", "CACHES", "PREVIOUS", "resolve_world",
           "prepared_folder", "adopt_dataset", "check_resume", "check_resume_world",
           "check_resume_data", "is_run", "plan_run", "plan_on_rank0", "discard_unsaved_run",
           "drop_previous"]

# Settings a resumed run may change; anything else would make it a different run.
RESUME_MAY_CHANGE = ("train.iterations", "train.log_every", "train.checkpoint_every",
                     "train.val_every", "train.val_stride", "train.num_workers", "train.device",
                     "train.amp")
OUTPUTS = ("checkpoints", "metrics.jsonl", "training.png", "settings.json", "environment.json")
CACHES = ("labelled", "unlabelled", "val")  # RUN/prepared/<name>: raw inputs prepared on the fly
PREVIOUS = ".crlnseg-previous"  # an overwritten run, kept until the new one's first checkpoint


def resolve_world(device: str, gpus: int, nproc: int) -> tuple[str, int]:
    """(device type, number of processes) from ``--device``, ``--gpus`` and ``--nproc``."""
    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: must be at least 1")
    if gpus < 0:
        raise ConfigError(f"--gpus {gpus}: must be 0 (none) or more")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus and nproc > 1 and nproc != gpus:
        raise ConfigError(f"--gpus {gpus} and --nproc {nproc} disagree; give one of them")
    if gpus or device == "cuda":
        if not available:
            raise ConfigError("CUDA requested (--gpus or --device cuda) but no GPU is visible; "
                              "use --device cpu [--nproc N]")
        world = gpus or nproc
        if world > available:
            raise ConfigError(f"{world} GPU processes requested but only {available} GPU(s) "
                              "visible")
        return "cuda", world
    if device == "auto" and available:
        return "cuda", min(nproc, available) if nproc > 1 else 1
    return "cpu", nproc


def prepared_folder(folder: Path, cache: Path, settings: RunSettings,
                    overwrite: bool = False) -> Path:
    """``folder`` when it is a prepare output, else ``cache`` after preparing it (reused later;
    ``overwrite``: a cache prepared with other settings is replaced, as ``train --overwrite``
    starts the run afresh)."""
    from crlnseg.data.manifest import is_prepared
    from crlnseg.prepare import prepare_dataset

    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such file or folder")
    if is_prepared(folder):
        return folder
    log(f"preparing {folder} into {cache} (cached for later runs)")
    prepare_dataset(folder, cache, settings.prepare, overwrite=overwrite)
    return cache


def check_consecutive(classes: list[int], folder: Path) -> None:
    """Label values must be 0..K-1: a mask stored as 0/255 would otherwise silently become a
    256-class model, and a skipped value a class that is never learned."""
    missing = sorted(set(range(max([*classes, 0]) + 1)) - set(classes))
    if missing:
        hint = (" (masks stored as 0/255? convert them to 0/1)" if max(classes) == 255 else "")
        raise DataError(f"{folder}: label values {sorted(classes)} are not consecutive 0..K-1: "
                        f"no voxel has {missing[:5]}{'...' if len(missing) > 5 else ''}{hint}; "
                        "relabel, or set model.num_classes explicitly")


def adopt_dataset(settings: RunSettings, manifest: Any, folder: Path) -> RunSettings:
    """Take preprocessing, channels and classes from the labelled cache; refuse contradictions."""
    explicit_prep = {k: getattr(settings.prepare, k) for k in settings.prepare.model_fields_set}
    for key, value in explicit_prep.items():
        if getattr(manifest.settings, key) != value:
            raise ConfigError(f"{folder} was prepared with prepare.{key} = "
                              f"{getattr(manifest.settings, key)!r}, settings say {value!r}")
    model = settings.model
    if "in_channels" in model.model_fields_set and model.in_channels != manifest.channels:
        raise ConfigError(f"model.in_channels = {model.in_channels} but {folder} has "
                          f"{manifest.channels} channel(s)")
    classes = max([*manifest.classes, 1]) + 1
    if "num_classes" not in model.model_fields_set:
        check_consecutive(manifest.classes, folder)
    num_classes = model.num_classes if "num_classes" in model.model_fields_set else classes
    data = settings.model_dump(mode="json")
    data["prepare"] = manifest.settings.model_dump(mode="json")
    data["model"].update(in_channels=manifest.channels, num_classes=num_classes)
    return RunSettings.model_validate(data)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def check_resume(saved: dict[str, Any], settings: RunSettings, done: int) -> None:
    """Refuse a resume that changes more than RESUME_MAY_CHANGE or shrinks below ``done``."""
    old, new = _flat(saved), _flat(settings.model_dump(mode="json"))
    changed = [k for k in sorted(set(old) | set(new))
               if old.get(k) != new.get(k) and k not in RESUME_MAY_CHANGE]
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigError(f"--resume: {k} was {old.get(k)!r}, now {new.get(k)!r}{more}; a resumed "
                          f"run may change only {', '.join(RESUME_MAY_CHANGE)}")
    if settings.train.iterations < done:
        raise ConfigError(f"--resume: the run already did {done} iterations; "
                          f"--iterations {settings.train.iterations} is fewer")


def _check_batch_norm(settings: RunSettings) -> None:
    t = settings.train
    crops = t.batch_labelled + (t.batch_unlabelled if settings.method.method != "supervised" else 0)
    if crops * math.prod(p // 16 for p in t.patch) < 2:
        raise ConfigError(f"patch {t.patch} with {crops} crop(s) per step leaves BatchNorm one "
                          "value per channel at the deepest level; use a larger patch or batch")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_run(folder: Path) -> bool:
    """Whether ``folder`` holds a run written by ``crlnseg train``: its ``settings.json`` has the
    sections of RunSettings and its ``environment.json`` lists the crlnseg version."""
    folder = Path(folder)
    settings = _read_json(folder / "settings.json")
    env = _read_json(folder / "environment.json")
    return (isinstance(settings, dict) and all(isinstance(settings.get(k), dict)
                                               for k in RunSettings.model_fields)
            and isinstance(env, dict) and isinstance(env.get("packages"), dict)
            and "crlnseg" in env["packages"])


def _only_caches(folder: Path) -> bool:
    """A folder holding nothing but ``prepared/`` caches of crlnseg (a run that never started)."""
    from crlnseg.data.manifest import is_prepared

    if any(entry.name != "prepared" for entry in folder.iterdir()):
        return False
    prepared = folder / "prepared"
    return not prepared.exists() or (prepared.is_dir() and all(
        c.name in CACHES and is_prepared(c) for c in prepared.iterdir()))


def _check_run_dir(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    """The checkpoint to resume from, or None for a fresh run; refuses a folder it must not use:
    a non-empty folder that is not a crlnseg run is never used or cleared, even with --overwrite."""
    from crlnseg.checkpoint import load_checkpoint

    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    run = out.is_dir() and is_run(out)
    last = out / "checkpoints" / "last.pt"
    if resume:
        if not out.exists():
            raise CheckpointError(f"{out}: nothing to resume (no such run folder)")
        if not run:
            raise CheckpointError(f"{out}: nothing to resume (not a crlnseg run: no settings.json "
                                  "and environment.json written by crlnseg train)")
        if not last.is_file():
            raise CheckpointError(f"{out}: nothing to resume (no checkpoints/last.pt); start "
                                  "again with --overwrite")
        return load_checkpoint(last)
    if not out.exists() or not any(out.iterdir()):
        return None
    if run:
        if not overwrite:
            if not last.is_file():
                raise OutputExistsError(f"{out} already holds a run that saved no checkpoint; "
                                        "use --overwrite to start again (--resume needs "
                                        "checkpoints/last.pt)")
            raise OutputExistsError(f"{out} already holds a run; use --resume to continue it or "
                                    "--overwrite to start again")
        return None
    if _only_caches(out):
        return None
    raise OutputExistsError(f"{out}: exists, is not empty and is not a crlnseg run folder; "
                            "choose a new or empty folder (--overwrite never clears a folder "
                            "that crlnseg train did not write)")


def _check_inputs(out: Path, inputs: dict[str, Path | None]) -> None:
    """Every given input exists, and the run folder is neither an input nor inside one."""
    dst = out.resolve()
    for option, folder in inputs.items():
        if folder is None:
            continue
        if not Path(folder).exists():
            raise DataError(f"{option} {folder}: no such file or folder")
        src = Path(folder).resolve()
        if dst == src or src in dst.parents:
            where = "is" if dst == src else "is inside"
            raise OutputExistsError(f"-o {out}: {where} the {option} folder {folder}; the run "
                                    "folder must be outside its inputs (inputs are never "
                                    "modified)")
        if any(dst / name == src or dst / name in src.parents for name in OUTPUTS):
            raise OutputExistsError(f"{option} {folder}: lies inside the run's own outputs in "
                                    f"{out}; move it out of the run folder")


def _identity(manifest: Any) -> dict[str, Any] | None:
    """What a resume must train on again: the case IDs and the dataset fingerprint."""
    if manifest is None:
        return None
    return {"cases": list(manifest.ids), "fingerprint": manifest.fingerprint}


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
    old = meta.get("data")
    if not isinstance(old, dict):
        return
    # --val too: best.pt compares Dice across validations, which must score the same cases.
    for key, option in (("labelled", "--labelled"), ("unlabelled", "--unlabelled"),
                        ("val", "--val")):
        if key not in old:  # recorded by a later version than the checkpoint's
            continue
        was, now = old.get(key), data.get(key)
        if was == now:
            continue
        if was is None or now is None:
            what = f"the run was trained {'without' if was is None else 'with'} {option}"
        elif was["cases"] != now["cases"]:
            what = (f"{len(was['cases'])} case(s) before, {len(now['cases'])} now"
                    if len(was["cases"]) != len(now["cases"]) else "other case IDs")
        else:
            what = "same case IDs, other contents"
        raise ConfigError(f"--resume: {option} is not the data the run was trained on ({what}); "
                          "resume with the same data, or start a new run")


def _check_resume_prepare(saved: dict[str, Any], settings: RunSettings) -> None:
    """Before anything is prepared: a resume keeps the run's preprocessing."""
    old = saved.get("prepare", {})
    for key in sorted(settings.prepare.model_fields_set):
        new = settings.prepare.model_dump(mode="json")[key]
        if key in old and old[key] != new:
            raise ConfigError(f"--resume: prepare.{key} was {old[key]!r}, now {new!r}; a resumed "
                              f"run may change only {', '.join(RESUME_MAY_CHANGE)}")


def _load_inputs(settings: RunSettings, out: Path, labelled: Path, unlabelled: Path | None,
                 val: Path | None, overwrite: bool = False
                 ) -> tuple[RunSettings, Path, Path | None, Path | None, int, dict[str, Any]]:
    from crlnseg.data.manifest import load_manifest
    from crlnseg.data.sampling import check_training_data

    lab_dir = prepared_folder(labelled, out / "prepared" / "labelled", settings, overwrite)
    lab = load_manifest(lab_dir)
    settings = adopt_dataset(settings, lab, labelled)
    unl_dir = unl = None
    if unlabelled is not None and settings.method.method != "supervised":
        unl_dir = prepared_folder(unlabelled, out / "prepared" / "unlabelled", settings,
                                  overwrite)
        unl = load_manifest(unl_dir)
        if unl.settings != lab.settings:
            raise DataError(f"{unlabelled} was prepared with other settings than {labelled}")
    names = (Path(labelled), None if unlabelled is None else Path(unlabelled))
    channels = check_training_data(lab, unl, settings.train.patch, settings.model.num_classes,
                                   names)
    val_dir = None
    if val is not None:
        val_dir = prepared_folder(val, out / "prepared" / "val", settings, overwrite)
        vm = load_manifest(val_dir)
        if vm.settings != lab.settings:
            raise DataError(f"{val} was prepared with other settings than {labelled}")
        check_training_data(vm, None, (16, 16, 16), settings.model.num_classes, (Path(val), None))
        if vm.channels != channels:
            raise DataError(f"{val} has {vm.channels} channel(s), the training data {channels}")
    data = {"labelled": _identity(lab), "unlabelled": _identity(unl),
            "val": _identity(vm) if val is not None else None}
    return settings, lab_dir, unl_dir, val_dir, channels, data


def _remove(paths: list[Path], parents: list[Path]) -> None:
    # A second Ctrl-C must not cut the clean-up short (a half-removed folder blocks a retry).
    with _signals_held():
        _remove_now(paths, parents)


@contextlib.contextmanager
def _signals_held(deliver: bool = False) -> Iterator[None]:
    """SIGINT and SIGTERM cannot cut the block short: a clean-up or a move cut in half is worse
    than a stop that comes a moment late. ``deliver``: the first one received acts as usual when
    the block ends (a scheduler sends its one SIGTERM once); else it is dropped (clean-ups run on
    the way out already)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def note(signum: int, frame: Any) -> None:
        received.append(signum)

    previous = {n: signal.signal(n, note) for n in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for n, handler in previous.items():
            signal.signal(n, handler)
        if deliver and received:
            signal.raise_signal(received[0])


def _remove_now(paths: list[Path], parents: list[Path]) -> None:
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.is_file() or path.is_symlink():
            with contextlib.suppress(OSError):
                path.unlink()
    for folder in parents:
        try:
            folder.rmdir()
        except OSError:
            pass


# Moves between RUN_DIR and RUN_DIR/PREVIOUS go checkpoints first when setting aside and last
# when putting back, so checkpoints/last.pt at the top always means the top holds a whole run.
def _moves(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: n != "checkpoints")


OWNER = ".owner.json"  # in PREVIOUS: which process set the run aside (pid, host, start time)


def _start_time(pid: int) -> str | None:
    """A process's start time (Linux), so that a reused pid is not taken for the owner."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _owner_alive(previous: Path) -> dict[str, Any] | None:
    """The record of the process that set ``previous`` aside, if it still runs (another host's:
    assumed to run, since it cannot be checked)."""
    import socket

    owner = _read_json(previous / OWNER)
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    if owner.get("host") != socket.gethostname():
        return owner
    pid = owner["pid"]
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # exists, another user's
    start = owner.get("start")
    return owner if start is None or _start_time(pid) in (None, start) else None


def _set_aside(out: Path) -> None:
    """``--overwrite``: move the old run's outputs into ``out/PREVIOUS`` (all or none), with a
    record of this process, so that a concurrent ``crlnseg train`` does not take them back."""
    import socket

    previous = out / PREVIOUS
    names = _moves([n for n in OUTPUTS if (out / n).exists() or (out / n).is_symlink()])
    if not names:
        return
    moved: list[str] = []
    with _signals_held(deliver=True):
        try:
            previous.mkdir()
            (previous / OWNER).write_text(json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(),
                "start": _start_time(os.getpid())}), encoding="utf-8")
            for name in names:
                (out / name).rename(previous / name)
                moved.append(name)
        except OSError as err:
            for name in reversed(moved):
                (previous / name).rename(out / name)
            with contextlib.suppress(OSError):
                (previous / OWNER).unlink()
                previous.rmdir()
            raise OutputExistsError(f"{out}: cannot set the old run aside for --overwrite "
                                    f"({err.strerror or err})") from None


def _restore(out: Path) -> bool:
    """Move a run set aside by ``--overwrite`` back over what the new run wrote; whether one was."""
    previous = out / PREVIOUS
    if not previous.is_dir() or previous.is_symlink():
        return False
    with _signals_held():
        names = [p.name for p in previous.iterdir() if p.name != OWNER]
        for name in reversed(_moves(names)):
            _remove_now([out / name], [])
            (previous / name).rename(out / name)
        with contextlib.suppress(FileNotFoundError):
            (previous / OWNER).unlink()
        previous.rmdir()
    return True


def _drop(previous: Path) -> None:
    try:
        shutil.rmtree(previous)
    except OSError as err:
        why = err.strerror or err
        raise OutputExistsError(f"{previous}: cannot remove the run an earlier --overwrite "
                                f"replaced ({why}); remove it by hand") from None


def _settle_previous(out: Path) -> None:
    """An ``--overwrite`` killed outright (no clean-up) leaves the run it replaced in
    ``out/PREVIOUS``: put it back if the new run saved no checkpoint, else drop it; refuse while
    the process that set it aside still runs (its run has not checkpointed yet)."""
    previous = out / PREVIOUS
    if not previous.is_dir() or previous.is_symlink():
        return
    if (out / "checkpoints" / "last.pt").is_file():
        _drop(previous)
        return
    owner = _owner_alive(previous)
    if owner is not None:
        raise OutputExistsError(f"{out}: in use: crlnseg train (pid {owner['pid']} on "
                                f"{owner.get('host')}) is replacing this run (--overwrite) and "
                                "has not saved a checkpoint yet; wait for it or stop it")
    if _restore(out):
        log(f"{out}: put back the run that an interrupted --overwrite had set aside")


def drop_previous(out: Path) -> None:
    """The new run saved a checkpoint: the run it overwrote goes for good (best effort here; a
    leftover is removed, or reported, by the next ``crlnseg train`` on this folder)."""
    previous = out / PREVIOUS
    if previous.is_dir() and not previous.is_symlink():
        shutil.rmtree(previous, ignore_errors=True)


def discard_unsaved_run(plan: RunPlan, err: BaseException, signum: int | None = None
                        ) -> BaseException:
    """After a fresh run failed or was interrupted before its first checkpoint: remove what this
    invocation wrote (nothing half-written blocks a retry) and put back a run it was overwriting;
    returns the exception to raise, a one-line RunInterrupted for a signal."""
    if plan.resume or (plan.out / "checkpoints" / "last.pt").is_file():
        return err  # a checkpoint exists: --resume continues from it
    discard = plan.discard
    try:
        others = [] if plan.out in discard else [
            p for p in plan.out.iterdir()
            if p not in discard and p.name not in ("prepared", PREVIOUS)]
    except OSError:  # the folder went away meanwhile: nothing left to clean, keep the error
        return _interrupted(err, plan.out, plan.out in plan.discard, signum)
    if others:  # files of the user's own: stay a (checkpoint-less) run, --overwrite may retry
        discard = [p for p in discard if p.name not in ("settings.json", "environment.json")]
    restored = False
    with _signals_held():
        _remove_now(discard, plan.discard_parents)
        if plan.out not in plan.discard:
            try:
                restored = _restore(plan.out)
            except OSError as restore_err:  # the next crlnseg train on the folder tries again
                log(f"warning: {plan.out}: could not put back the run set aside in {PREVIOUS} "
                    f"({restore_err.strerror or restore_err}); the next crlnseg train on this "
                    "folder does")
    return _interrupted(err, plan.out, plan.out in plan.discard, signum, restored)


def _interrupted(err: BaseException, out: Path, removed_folder: bool,
                 signum: int | None = None, restored: bool = False) -> BaseException:
    from crlnseg.errors import Terminated

    if signum is None and not isinstance(err, KeyboardInterrupt):
        return err
    term = signum == signal.SIGTERM or (signum is None and isinstance(err, Terminated))
    what = (f"removed {out}" if removed_folder else f"removed what it had written in {out}")
    if restored:
        what += " and put back the run it was overwriting"
    return RunInterrupted(f"{'terminated' if term else 'interrupted'} before the first "
                          f"checkpoint: no checkpoint was saved (nothing to --resume); {what}; "
                          "run the same command again to start afresh",
                          128 + (signal.SIGTERM if term else signal.SIGINT))


def plan_run(labelled: Path, unlabelled: Path | None, out: Path, settings: RunSettings,
             val: Path | None = None, gpus: int = 0, nproc: int = 1, resume: bool = False,
             overwrite: bool = False, world_size: int | None = None) -> RunPlan:
    """All checks, on-the-fly preparation and the run's files; the plan every rank follows.

    ``world_size``: the processes already started (torchrun) instead of ``gpus`` / ``nproc``.
    """
    from crlnseg.io.writers import make_folder
    from crlnseg.run_folder import environment_info, write_json

    # Lexically normalised: "missing/../b" must be b itself, or b would look new (and be
    # removed as this run's own folder if the run failed).
    out = Path(os.path.abspath(out))
    if out.is_symlink() and not out.exists():
        raise DataError(f"{out}: -o is a broken symbolic link; give a folder")
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: --resume continues "
                          "the run, --overwrite starts it again; give one of them")
    device_type, world = resolve_world(settings.train.device, gpus, nproc)
    world = world if world_size is None else world_size
    if unlabelled is None and settings.method.method != "supervised":
        raise ConfigError(f"--unlabelled is required for method {settings.method.method} "
                          "(or use --method supervised)")
    _check_inputs(out, {"--labelled": labelled, "--unlabelled": unlabelled, "--val": val})
    _check_batch_norm(settings)
    _settle_previous(out)
    saved = _check_run_dir(out, resume, overwrite)
    if saved is not None:
        check_resume_world(saved["meta"], world)
        _check_resume_prepare(saved["settings"], settings)
    # What this invocation creates, removed again if the run fails before its first checkpoint.
    parents = [p for p in [out, *out.parents] if not p.exists()]
    fresh_caches = [c for c in [out / "prepared", *(out / "prepared" / n for n in CACHES)]
                    if not c.exists()]
    try:
        make_folder(out)
        # A resumed run's own caches follow its saved settings (an --overwrite that failed
        # may have re-prepared them with others); --resume refuses other prepare settings.
        settings, lab_dir, unl_dir, val_dir, channels, data = _load_inputs(
            settings, out, labelled, unlabelled, val, overwrite or saved is not None)
        if saved is not None:
            check_resume(saved["settings"], settings, int(saved["meta"]["iteration"]))
            check_resume_data(saved["meta"], data)
    except BaseException as err:
        _remove(parents[:1] if parents else fresh_caches, parents[1:])
        raised = _interrupted(err, out, bool(parents))
        if raised is err:
            raise
        raise raised from None
    if saved is None:
        try:
            _set_aside(out)
        except BaseException as err:  # rolled back, or a deferred stop request after the moves
            restored = False
            with _signals_held():
                with contextlib.suppress(OSError):
                    restored = _restore(out)
                _remove_now(fresh_caches, [])
            raised = _interrupted(err, out, False, None, restored)
            if raised is err:
                raise
            raise raised from None
    discard = parents[:1] if parents else [*(out / name for name in OUTPUTS), *fresh_caches]
    plan = RunPlan(out, settings, lab_dir, unl_dir, val_dir, {}, saved is not None, device_type,
                   world, discard=[] if saved else discard,
                   discard_parents=[] if saved else parents[1:])
    try:
        make_folder(out / "checkpoints")
        write_json(out / "settings.json", settings.model_dump(mode="json"))
        write_json(out / "environment.json", environment_info(device_type, world))
    except BaseException as err:
        raised = discard_unsaved_run(plan, err)
        if raised is err:
            raise
        raise raised from None
    plan.meta = {"classes": list(range(settings.model.num_classes)), "channels": channels,
                 "prepare": settings.prepare.model_dump(mode="json"),
                 "method": settings.method.method, "data": data,
                 "best_val_dice": None if saved is None else saved["meta"].get("best_val_dice"),
                 "inference": None if saved is None else saved["meta"].get("inference")}
    return plan


def plan_on_rank0(labelled: Path, unlabelled: Path | None, out: Path, settings: RunSettings,
                  val: Path | None, resume: bool, overwrite: bool) -> RunPlan:
    """Under torchrun: rank 0 plans, every rank receives the plan (or rank 0's error)."""
    import torch.distributed as dist

    from crlnseg.distributed import init_process

    device_type, _ = resolve_world(settings.train.device, 0, 1)
    d = init_process(device_type)
    box: list[Any] = [None]
    if d.is_main:
        try:
            box[0] = plan_run(labelled, unlabelled, out, settings, val, 0, 1, resume, overwrite,
                              world_size=d.world_size)
        except CrlnsegError as err:
            box[0] = err
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], CrlnsegError):
        raise box[0]
    return box[0]
