"""``crlnseg demo``: the whole pipeline on a generated dataset, in a few minutes on a CPU.

generate (``crlnseg.synthetic``) -> prepare -> train (CRLN, ``cpu`` preset) -> rectify
(pseudo-labels of the unlabelled cases, scored against their hidden truth) -> predict (test
cases) -> evaluate.
Every artefact stays in the output folder::

    DIR/data/{labelled,unlabelled,test}/...     the generated NIfTI cases (see crlnseg.synthetic)
    DIR/prepared/{labelled,unlabelled}/         the training caches (prepare)
    DIR/run/                                    checkpoints, metrics.jsonl, training.png, settings
    DIR/pseudo_labels/                          rectify: raw/rectified pseudo-labels, summary.csv
    DIR/predictions/                            predict: one mask per test case
    DIR/evaluation.json                         evaluate: per case and summary metrics

Stages call the library functions (the same ones the commands call) and log on stderr.
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from crlnseg.console import log
from crlnseg.errors import ConfigError, OutputExistsError

__all__ = ["DemoPlan", "FULL", "QUICK", "ARTEFACTS", "MARKER", "DemoResult", "check_output",
           "run_demo", "EXPECTED_TIME", "QUICK_TIME"]

# What a run takes, stated at its start and in `crlnseg demo --help`. Measured wall times of the
# default demo (240 iterations, --device cpu): 93-110 s on a quiet 2-core CPU, 150 s on a busy
# one (benchmarks/RESULTS.md, "demo"); --quick: 5 s, interpreter start included.
EXPECTED_TIME = "about 2 minutes on a 2-core CPU"
QUICK_TIME = "under 10 s"


@dataclass(frozen=True)
class DemoPlan:
    """Dataset size and training budget of a demo run."""

    shape: tuple[int, int, int]
    labelled: int
    unlabelled: int
    test: int
    iterations: int
    overrides: dict[str, Any]  # nested RunSettings overrides on top of the cpu preset


# Measured on 2 shared CPU cores: see benchmarks/RESULTS.md ("demo").
FULL = DemoPlan(shape=(64, 64, 48), labelled=4, unlabelled=8, test=4, iterations=240,
                overrides={"train": {"patch": (48, 48, 32), "log_every": 10,
                                     "checkpoint_every": 100}})
# The test's setting: the same stages on tiny volumes, seconds instead of minutes.
QUICK = DemoPlan(shape=(32, 32, 32), labelled=2, unlabelled=2, test=1, iterations=4,
                 overrides={"model": {"base_filters": 4, "prototypes_per_class": 2,
                                      "prototype_dim": 8},
                            "method": {"anchors": 16, "negatives": 32},
                            "train": {"patch": (32, 32, 32), "log_every": 2,
                                      "checkpoint_every": 2, "num_workers": 0}})
ARTEFACTS = ("data", "prepared", "run", "pseudo_labels", "predictions", "evaluation.json")


@dataclass
class DemoResult:
    out: Path
    report: Any  # crlnseg.evaluate.Report of the test predictions
    pseudo: dict[str, float]  # mean rectify summary over the unlabelled cases
    seconds: dict[str, float]  # per stage


MARKER = ".crlnseg-demo"  # written first: only a folder that has it holds the demo's artefacts


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out`` unless ``overwrite``, which removes only the artefacts of an
    earlier demo (a folder marked by :data:`MARKER`); a folder whose ``data/``, ``run/``... the
    demo did not write is never cleared."""
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(p.name != MARKER for p in out.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{out}: folder exists and is not empty (use --overwrite)")
        present = [n for n in ARTEFACTS if (out / n).exists() or (out / n).is_symlink()]
        if present and not (out / MARKER).is_file():
            raise OutputExistsError(f"{out}: holds {present[0]} but no earlier demo wrote it "
                                    f"(no {MARKER}); choose another folder")
        for name in present:  # anything else in the folder is the user's: left alone
            path = out / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    from crlnseg.io.writers import make_folder  # numpy: not at CLI start-up

    make_folder(out)
    (out / MARKER).write_text("crlnseg demo artefacts: data prepared run pseudo_labels "
                              "predictions evaluation.json\n")


@contextlib.contextmanager
def _stage(number: int, title: str, what: str, seconds: dict[str, float]) -> Iterator[None]:
    log(f"[{number}/6] {title}: {what}")
    start = time.perf_counter()
    # Stage functions print per-case result lines on stdout; the demo's stdout is the final table.
    with contextlib.redirect_stdout(sys.stderr):
        yield
    seconds[title] = time.perf_counter() - start
    log(f"      done in {seconds[title]:.1f} s")


def run_demo(out: Path, seed: int = 0, iterations: int | None = None, quick: bool = False,
             overwrite: bool = False, device: str = "cpu",
             train: Callable[..., Any] | None = None) -> DemoResult:
    """Run every stage into ``out``; returns the test-set report and the pseudo-label summary."""
    from crlnseg.evaluate import EvaluateSettings, evaluate, write_text
    from crlnseg.inference.predictor import resolve_device
    from crlnseg.predict import predict_paths
    from crlnseg.prepare import prepare_dataset
    from crlnseg.rectify import rectify_paths
    from crlnseg.settings import PrepareSettings
    from crlnseg.synthetic import generate_dataset

    plan = QUICK if quick else FULL
    plan = replace(plan, iterations=iterations or plan.iterations)
    out = Path(out)
    if device not in ("auto", "cpu", "cuda"):  # checked before anything is written
        raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")
    if not 0 <= seed < 2**63:
        raise ConfigError(f"--seed {seed}: expected 0 .. 2**63-1")
    resolve_device(device)
    check_output(out, overwrite)
    log(_timing(quick, plan.iterations))
    data, prepared, run = out / "data", out / "prepared", out / "run"
    t: dict[str, float] = {}
    cases = plan.labelled + plan.unlabelled + plan.test
    with _stage(1, "generate", f"{cases} synthetic scans {'x'.join(map(str, plan.shape))} "
                f"(seed {seed}) -> {data}", t):
        generate_dataset(data, plan.labelled, plan.unlabelled, plan.test, shape=plan.shape,
                         seed=seed)
    with _stage(2, "prepare", f"validate and normalise -> {prepared}", t):
        for split in ("labelled", "unlabelled"):
            prepare_dataset(data / split, prepared / split, PrepareSettings())
    with _stage(3, "train", f"CRLN, cpu preset, {plan.iterations} iterations, "
                f"{plan.labelled} labelled + {plan.unlabelled} unlabelled -> {run}", t):
        _train(prepared, run, plan, seed, device, train)
    with _stage(4, "rectify", "pseudo-labels of the unlabelled scans, raw vs rectified, "
                f"scored against their hidden labels -> {out / 'pseudo_labels'}", t):
        rows = rectify_paths([data / "unlabelled" / "images"], out / "pseudo_labels", run,
                             labels=data / "unlabelled" / "labels_hidden")
    with _stage(5, "predict", f"{plan.test} test scans -> {out / 'predictions'}", t):
        predict_paths([data / "test" / "images"], out / "predictions", run)
    with _stage(6, "evaluate", f"predictions vs test labels -> {out / 'evaluation.json'}", t):
        report = evaluate(out / "predictions", data / "test" / "labels", EvaluateSettings())
        write_text(out / "evaluation.json", report.to_json())
    keys = ("dice_raw", "dice_rectified", "reliable_raw", "reliable_rectified", "mu")
    pseudo = {k: sum(r[k] for r in rows) / len(rows) for k in keys
              if rows and k in rows[0] and all(r[k] is not None for r in rows)}
    return DemoResult(out, report, pseudo, t)


def _timing(quick: bool, iterations: int) -> str:
    if quick:
        return f"crlnseg demo --quick: {QUICK_TIME}"
    if iterations == FULL.iterations:
        return f"crlnseg demo: {EXPECTED_TIME}"
    return (f"crlnseg demo: {EXPECTED_TIME} at {FULL.iterations} iterations; training takes "
            f"most of it and grows with the iterations ({iterations} here)")


def _train(prepared: Path, run: Path, plan: DemoPlan, seed: int, device: str,
           train: Callable[..., Any] | None) -> None:
    from crlnseg.config import resolve_settings

    overrides = {**plan.overrides, "train": {**plan.overrides.get("train", {}),
                                             "iterations": plan.iterations, "seed": seed,
                                             "device": device}}
    settings = resolve_settings(preset="cpu", options=overrides)
    if train is None:
        from crlnseg.train import train
    train(prepared / "labelled", prepared / "unlabelled", run, settings)
