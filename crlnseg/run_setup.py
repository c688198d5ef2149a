"""Before the loop: check the run folder and the inputs, adopt the dataset, write the run's files.

Everything that can refuse a run does so here, once, before any process is spawned, with a
one-line error (exit 2): RUN_DIR exists without ``--resume`` / ``--overwrite``, bad data, settings
inconsistent with the data, a resume whose settings changed what the checkpoint means. A folder
this step created is removed again when it fails, so bad input leaves nothing behind.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import torch

from crlnseg.console import log
from crlnseg.errors import CheckpointError, ConfigError, CrlnsegError, DataError, OutputExistsError
from crlnseg.settings import RunSettings
from crlnseg.train import RunPlan

__all__ = ["RESUME_MAY_CHANGE", "OUTPUTS", "resolve_world", "prepared_folder", "adopt_dataset",
           "check_resume", "plan_run", "plan_on_rank0"]

# Settings a resumed run may change; anything else would make it a different run.
RESUME_MAY_CHANGE = ("train.iterations", "train.log_every", "train.checkpoint_every",
                     "train.val_every", "train.val_stride", "train.num_workers", "train.device",
                     "train.amp")
OUTPUTS = ("checkpoints", "metrics.jsonl", "training.png", "settings.json", "environment.json")


def resolve_world(device: str, gpus: int, nproc: int) -> tuple[str, int]:
    """(device type, number of processes) from ``--device``, ``--gpus`` and ``--nproc``."""
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


def prepared_folder(folder: Path, cache: Path, settings: RunSettings) -> Path:
    """``folder`` when it is a prepare output, else ``cache`` after preparing it (reused later)."""
    from crlnseg.data.manifest import is_prepared
    from crlnseg.prepare import prepare_dataset

    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such file or folder")
    if is_prepared(folder):
        return folder
    log(f"preparing {folder} into {cache} (cached for later runs)")
    prepare_dataset(folder, cache, settings.prepare)
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


def _check_run_dir(out: Path, resume: bool, overwrite: bool) -> dict[str, Any] | None:
    from crlnseg.checkpoint import load_checkpoint

    last = out / "checkpoints" / "last.pt"
    if resume:
        if not last.is_file():
            raise CheckpointError(f"{out}: nothing to resume (no checkpoints/last.pt)")
        return load_checkpoint(last)
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder")
    if any((out / name).exists() for name in OUTPUTS) and not overwrite:
        raise OutputExistsError(f"{out} already holds a run; use --resume to continue it or "
                                "--overwrite to start again")
    return None


def _load_inputs(settings: RunSettings, out: Path, labelled: Path, unlabelled: Path | None,
                 val: Path | None) -> tuple[RunSettings, Path, Path | None, Path | None, int]:
    from crlnseg.data.manifest import load_manifest
    from crlnseg.data.sampling import check_training_data

    lab_dir = prepared_folder(labelled, out / "prepared" / "labelled", settings)
    lab = load_manifest(lab_dir)
    settings = adopt_dataset(settings, lab, labelled)
    unl_dir = unl = None
    if unlabelled is not None and settings.method.method != "supervised":
        unl_dir = prepared_folder(unlabelled, out / "prepared" / "unlabelled", settings)
        unl = load_manifest(unl_dir)
        if unl.settings != lab.settings:
            raise DataError(f"{unlabelled} was prepared with other settings than {labelled}")
    names = (Path(labelled), None if unlabelled is None else Path(unlabelled))
    channels = check_training_data(lab, unl, settings.train.patch, settings.model.num_classes,
                                   names)
    val_dir = None
    if val is not None:
        val_dir = prepared_folder(val, out / "prepared" / "val", settings)
        vm = load_manifest(val_dir)
        if vm.settings != lab.settings:
            raise DataError(f"{val} was prepared with other settings than {labelled}")
        check_training_data(vm, None, (16, 16, 16), settings.model.num_classes, (Path(val), None))
        if vm.channels != channels:
            raise DataError(f"{val} has {vm.channels} channel(s), the training data {channels}")
    return settings, lab_dir, unl_dir, val_dir, channels


def plan_run(labelled: Path, unlabelled: Path | None, out: Path, settings: RunSettings,
             val: Path | None = None, gpus: int = 0, nproc: int = 1, resume: bool = False,
             overwrite: bool = False) -> RunPlan:
    """All checks, on-the-fly preparation and the run's files; the plan every rank follows."""
    from crlnseg.io.writers import make_folder
    from crlnseg.run_folder import environment_info, write_json

    out = Path(out)
    device_type, world = resolve_world(settings.train.device, gpus, nproc)
    if unlabelled is None and settings.method.method != "supervised":
        raise ConfigError(f"--unlabelled is required for method {settings.method.method} "
                          "(or use --method supervised)")
    _check_batch_norm(settings)
    saved = _check_run_dir(out, resume, overwrite)
    created = not out.exists()
    try:
        make_folder(out)
        settings, lab_dir, unl_dir, val_dir, channels = _load_inputs(settings, out, labelled,
                                                                     unlabelled, val)
        if saved is not None:
            check_resume(saved["settings"], settings, int(saved["meta"]["iteration"]))
    except (CrlnsegError, KeyboardInterrupt):
        if created:
            shutil.rmtree(out, ignore_errors=True)
        raise
    if saved is None:
        for name in OUTPUTS:
            path = out / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    make_folder(out / "checkpoints")
    write_json(out / "settings.json", settings.model_dump(mode="json"))
    write_json(out / "environment.json", environment_info(device_type, world))
    meta = {"classes": list(range(settings.model.num_classes)), "channels": channels,
            "prepare": settings.prepare.model_dump(mode="json"),
            "method": settings.method.method,
            "best_val_dice": None if saved is None else saved["meta"].get("best_val_dice"),
            "inference": None if saved is None else saved["meta"].get("inference")}
    return RunPlan(out, settings, lab_dir, unl_dir, val_dir, meta, saved is not None, device_type,
                   world)


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
            plan = plan_run(labelled, unlabelled, out, settings, val, 0, 1, resume, overwrite)
            plan.world_size, plan.device_type = d.world_size, device_type
            from crlnseg.run_folder import environment_info, write_json

            write_json(plan.out / "environment.json", environment_info(device_type, d.world_size))
            box[0] = plan
        except CrlnsegError as err:
            box[0] = err
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], CrlnsegError):
        raise box[0]
    return box[0]
