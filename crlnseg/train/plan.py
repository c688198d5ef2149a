"""Before the loop: check the run folder and the inputs, adopt the dataset, write the run's files.

Everything that can refuse a run does so here, once, before any process is spawned, with a
one-line error (exit 2): the run folder's rules (:mod:`crlnseg.train.run_dir`), bad data,
settings inconsistent with the data, a resume that changes what the checkpoint means
(:mod:`crlnseg.train.resume`). The result is the :class:`RunPlan` every rank follows.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from crlnseg import signals
from crlnseg.console import log
from crlnseg.data import planner
from crlnseg.data.cache import prepare_dataset
from crlnseg.data.manifest import Manifest, is_prepared, load_manifest
from crlnseg.data.planner import Plan
from crlnseg.data.sampling import check_training_data
from crlnseg.errors import ConfigError, CrlnsegError, DataError, on_failure
from crlnseg.io.writers import make_folder
from crlnseg.settings import RunSettings
from crlnseg.train import overwrite as aside
from crlnseg.train import resume as resumption
from crlnseg.train.logging import environment_info, read_metrics, write_json
from crlnseg.train.run_dir import (
    CACHES,
    OUTPUTS,
    Created,
    check_inputs,
    check_run_dir,
    discard_unsaved_run,
    interrupted,
    remove,
)

__all__ = ["RunPlan", "resolve_world", "prepared_folder", "check_consecutive", "adopt_dataset",
           "plan_run", "plan_on_rank0", "planned_settings"]


@dataclass
class RunPlan:
    """What every rank needs (picklable; sent to spawned processes)."""

    out: Path
    settings: RunSettings
    labelled: Path
    unlabelled: Path | None
    val: Path | None
    meta: dict[str, Any]
    resume: bool
    device_type: str
    world_size: int
    created: Created = field(default_factory=Created)



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
                    overwrite: bool = False,
                    accept: Callable[[Manifest], None] | None = None) -> Path:
    """``folder`` when it is a prepare output, else ``cache`` after preparing it (reused later;
    ``overwrite``: a cache prepared with other settings is replaced, as ``train --overwrite``
    starts the run afresh; ``accept``: checks the prepared data before ``cache`` changes)."""
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"{folder}: no such file or folder")
    if is_prepared(folder):
        return folder
    log(f"preparing {folder} into {cache} (cached for later runs)")
    prepare_dataset(folder, cache, settings.prepare, overwrite=overwrite, accept=accept)
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


def _check_batch_norm(settings: RunSettings) -> None:
    t = settings.train
    crops = t.batch_labelled + (t.batch_unlabelled if settings.method.method != "supervised" else 0)
    deepest = zip(t.patch, settings.model.total_stride, strict=True)
    if crops * math.prod(p // s for p, s in deepest) < 2:
        raise ConfigError(f"patch {t.patch} with {crops} crop(s) per step leaves BatchNorm one "
                          "value per channel at the deepest level; use a larger patch or batch")


def _load_inputs(settings: RunSettings, out: Path, labelled: Path, unlabelled: Path | None,
                 val: Path | None, overwrite: bool = False, meta: dict[str, Any] | None = None
                 ) -> tuple[RunSettings, Path, Path | None, Path | None, int, dict[str, Any]]:
    """``meta``: a resumed checkpoint's; each input must be the data it was trained on, which
    is checked before the input's cache in the run folder is replaced."""

    def accept(key: str) -> Callable[[Manifest], None] | None:
        if meta is None:
            return None
        return lambda manifest: resumption.check_resume_set(meta, key,
                                                            resumption.identity(manifest))

    lab_dir = prepared_folder(labelled, out / "prepared" / "labelled", settings, overwrite,
                              accept("labelled"))
    lab = load_manifest(lab_dir)
    settings = adopt_dataset(settings, lab, labelled)
    unl_dir = unl = None
    if unlabelled is not None and settings.method.method != "supervised":
        unl_dir = prepared_folder(unlabelled, out / "prepared" / "unlabelled", settings,
                                  overwrite, accept("unlabelled"))
        unl = load_manifest(unl_dir)
        if unl.settings != lab.settings:
            raise DataError(f"{unlabelled} was prepared with other settings than {labelled}")
    names = (Path(labelled), None if unlabelled is None else Path(unlabelled))
    channels = check_training_data(lab, unl, settings.train.patch, settings.model.num_classes,
                                   names, settings.model.total_stride)
    val_dir = None
    if val is not None:
        val_dir = prepared_folder(val, out / "prepared" / "val", settings, overwrite,
                                  accept("val"))
        vm = load_manifest(val_dir)
        if vm.settings != lab.settings:
            raise DataError(f"{val} was prepared with other settings than {labelled}")
        check_training_data(vm, None, settings.model.total_stride, settings.model.num_classes,
                            (Path(val), None))
        if vm.channels != channels:
            raise DataError(f"{val} has {vm.channels} channel(s), the training data {channels}")
    data = {"labelled": resumption.identity(lab), "unlabelled": resumption.identity(unl),
            "val": resumption.identity(vm) if val is not None else None}
    return settings, lab_dir, unl_dir, val_dir, channels, data


def planned_settings(settings: RunSettings, labelled: Path, unlabelled: Path | None,
                     device: str) -> tuple[RunSettings, Plan]:
    """``settings`` with the dataset's plan where nothing else set the values, and the plan."""
    if unlabelled is not None and settings.method.method == "supervised":
        unlabelled = None  # not trained on, so not planned from
    plan = planner.plan_folders(settings, [labelled, unlabelled], device)
    return planner.apply(settings, plan), plan


def plan_run(labelled: Path, unlabelled: Path | None, out: Path, settings: RunSettings,
             val: Path | None = None, gpus: int = 0, nproc: int = 1, resume: bool = False,
             overwrite: bool = False, world_size: int | None = None) -> RunPlan:
    """All checks, on-the-fly preparation and the run's files; the plan every rank follows.

    ``world_size``: the processes already started (torchrun) instead of ``gpus`` / ``nproc``.
    """
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
    check_inputs(out, {"--labelled": labelled, "--unlabelled": unlabelled, "--val": val})
    aside.settle(out)
    saved = check_run_dir(out, resume, overwrite)
    planned = None
    if saved is None and settings.train.plan:  # a resumed run keeps its saved settings
        planned = planned_settings(settings, labelled, unlabelled, device_type)
        settings = planned[0]
    _check_batch_norm(settings)
    if saved is not None:  # every refusal of a resume before anything in RUN is written
        resumption.check_resume_world(saved["meta"], world)
        resumption.check_resume_prepare(saved["settings"], settings)
        resumption.check_resume(saved["settings"], settings, int(saved["meta"]["iteration"]),
                                adopted=False)
        read_metrics(out / "metrics.jsonl", warn=False)  # a damaged file is refused here
    # What this invocation creates, removed again if the run fails before its first checkpoint.
    parents = [p for p in [out, *out.parents] if not p.exists()]
    caches = [c for c in [out / "prepared", *(out / "prepared" / n for n in CACHES)]
              if not c.exists()]

    def undo_inputs(err: BaseException) -> BaseException:
        with signals.held():
            remove(parents[:1] if parents else caches, parents[1:])
        return interrupted(err, out, bool(parents))

    with on_failure(undo_inputs):
        make_folder(out)
        # A resumed run's own caches follow its saved settings (an --overwrite that failed
        # may have re-prepared them with others); --resume refuses other prepare settings.
        settings, lab_dir, unl_dir, val_dir, channels, data = _load_inputs(
            settings, out, labelled, unlabelled, val, overwrite or saved is not None,
            None if saved is None else saved["meta"])
        if saved is not None:
            resumption.check_resume(saved["settings"], settings, int(saved["meta"]["iteration"]))
            resumption.check_resume_data(saved["meta"], data)
    if saved is None:
        def undo_aside(err: BaseException) -> BaseException:
            restored = False
            with signals.held():
                try:
                    restored = aside.restore(out)
                except OSError:
                    pass
                remove(caches, [])
            return interrupted(err, out, False, None, restored)

        with on_failure(undo_aside):
            aside.set_aside(out, OUTPUTS)
    created = Created() if saved is not None else Created(
        parents[:1] if parents else [*(out / name for name in OUTPUTS), *caches], parents[1:])
    with on_failure(lambda err: discard_unsaved_run(out, created, err)):
        make_folder(out / "checkpoints")
        write_json(out / "settings.json", settings.model_dump(mode="json"))
        write_json(out / "environment.json", environment_info(device_type, world))
    if planned is not None:  # after every refusal: an error stays one line
        log("plan (crlnseg plan for the reasons): " + "; ".join(
            f"{k} {planner.show(getattr(getattr(settings, k.split('.')[0]), k.split('.')[1]))}"
            for k in ("prepare.target_spacing", "model.strides", "train.patch")))
    meta = {"classes": list(range(settings.model.num_classes)), "channels": channels,
            "prepare": settings.prepare.model_dump(mode="json"),
            "method": settings.method.method, "data": data,
            "best_val_dice": None if saved is None else saved["meta"].get("best_val_dice"),
            "inference": None if saved is None else saved["meta"].get("inference"),
            "plan": planned[1].to_dict() if planned else (saved or {}).get("meta", {}).get("plan")}
    return RunPlan(out, settings, lab_dir, unl_dir, val_dir, meta, saved is not None,
                   device_type, world, created)


def plan_on_rank0(labelled: Path, unlabelled: Path | None, out: Path, settings: RunSettings,
                  val: Path | None, resume: bool, overwrite: bool) -> RunPlan:
    """Under torchrun: rank 0 plans, every rank receives the plan (or rank 0's error)."""
    import torch.distributed as dist

    from crlnseg.train.parallel import init_process

    device_type, _ = resolve_world(settings.train.device, 0, 1)
    d = init_process(device_type)
    planned: list[RunPlan | CrlnsegError | None] = [None]  # broadcast_object_list's container
    if d.is_main:
        try:
            planned[0] = plan_run(labelled, unlabelled, out, settings, val, 0, 1, resume,
                                  overwrite, world_size=d.world_size)
        except CrlnsegError as err:
            planned[0] = err
    dist.broadcast_object_list(planned, src=0)
    if isinstance(planned[0], CrlnsegError):
        raise planned[0]
    assert planned[0] is not None
    return planned[0]
