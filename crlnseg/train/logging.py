"""The run's bookkeeping: settings.json, environment.json, metrics.jsonl and progress.

``metrics.jsonl`` holds one JSON line per logging step (window means) and per validation. A
resumed run first drops the lines written after the checkpoint it continues from (a run killed
outright logged them, and logs them again), so each iteration appears once; a half-written last
line (power loss) is dropped with a warning.
"""

from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from crlnseg.console import console, is_interactive, log
from crlnseg.errors import DataError
from crlnseg.io.writers import write_atomic

__all__ = ["write_json", "environment_info", "MetricsLog", "Progress", "read_metrics"]


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (:func:`crlnseg.io.writers.write_atomic`), replacing ``path``."""
    text = json.dumps(data, indent=2) + "\n"
    write_atomic(Path(path), lambda tmp: tmp.write_text(text, encoding="utf-8"), overwrite=True)


def _git_commit() -> str | None:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def environment_info(device: str, world_size: int) -> dict[str, Any]:
    """What produced the run: versions, host, device (and GPU names), processes."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    packages = {}
    for name in ("crlnseg", "torch", "numpy", "scipy", "pydantic", "nibabel", "SimpleITK"):
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    gpus = ([torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if torch.cuda.is_available() else [])
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "host": platform.node(), "packages": packages, "torch_version": torch.__version__,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if gpus else None,
            "device": device, "gpus": gpus, "world_size": world_size,
            "cpu_threads": torch.get_num_threads(), "git_commit": _git_commit(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv}


def _finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


class MetricsLog:
    """Window means of every StepRecord field, one ``metrics.jsonl`` line per logging step."""

    def __init__(self, path: Path | None, start: int = 0) -> None:
        self.path = path
        if path is not None and path.exists():
            keep = [line for line in read_metrics(path) if line.get("iteration", 0) <= start]
            text = "".join(json.dumps(line) + "\n" for line in keep)
            write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"),
                         overwrite=True)
        self.sums: dict[str, float] = {}
        self.counts: dict[str, int] = {}
        self.window_start = time.perf_counter()
        self.window_iterations = 0

    def add(self, record: Any) -> None:
        fields = asdict(record) if is_dataclass(record) else dict(record)
        for key, value in fields.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.sums[key] = self.sums.get(key, 0.0) + float(value)
                self.counts[key] = self.counts.get(key, 0) + 1
            else:
                self.sums.setdefault(key, math.nan)
        self.window_iterations += 1

    def flush(self, iteration: int) -> dict[str, Any]:
        """Write (rank 0) and return the window's line; start a new window."""
        elapsed = time.perf_counter() - self.window_start
        line: dict[str, Any] = {"iteration": iteration}
        for key in self.sums:
            line[key] = _finite(self.sums[key] / self.counts[key]) if self.counts.get(key) else None
        line["it_per_s"] = self.window_iterations / elapsed if elapsed > 0 else None
        self.write(line)
        self.sums, self.counts, self.window_iterations = {}, {}, 0
        self.window_start = time.perf_counter()
        return line

    def write(self, line: dict[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(line) + "\n")


def read_metrics(path: Path, warn: bool = True) -> list[dict[str, Any]]:
    """The lines of ``metrics.jsonl``; a damaged last line is dropped with a warning (a write
    cut short; ``warn=False``: silently), a damaged line before it is an error naming the file
    and the line."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError as err:
        raise DataError(f"{path}: cannot read ({err.strerror or err})") from None
    rows: list[dict[str, Any]] = []
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    for k, (n, line) in enumerate(numbered):
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("iteration"), int):
                raise ValueError("not a metrics line")
        except ValueError:
            if k == len(numbered) - 1:
                if warn:
                    log(f"warning: {path}: line {n} is incomplete (a write cut short); ignored")
                break
            raise DataError(f"{path}: line {n} is not a metrics line; the file is damaged "
                            "(repair or remove that line)") from None
        rows.append(row)
    return rows


def _losses(line: dict[str, Any]) -> str:
    keys = ("loss", "loss_supervised", "loss_relation", "loss_unsup", "loss_cps", "mu")
    return " ".join(f"{k.removeprefix('loss_')}={line[k]:.4f}" for k in keys
                    if isinstance(line.get(k), float))


class Progress:
    """A rich bar (it/s, ETA, current losses) on a terminal; else a plain line per log step."""

    def __init__(self, total: int, start: int, enabled: bool) -> None:
        self.total, self.bar = total, None
        self.enabled = enabled
        if enabled and is_interactive():
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )
            from rich.progress import Progress as Bar

            self.bar = Bar(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("{task.fields[rate]}"),
                           TimeElapsedColumn(), TimeRemainingColumn(),
                           TextColumn("{task.fields[losses]}"), console=console)
            self.task = self.bar.add_task("train", total=total, completed=start, rate="",
                                          losses="")
            self.bar.start()

    def advance(self, iteration: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=iteration)

    def logged(self, line: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rate = line.get("it_per_s") or 0.0
        if self.bar is not None:
            self.bar.update(self.task, rate=f"{rate:.2f} it/s", losses=_losses(line))
            return
        left = (self.total - line["iteration"]) / rate if rate else math.nan
        eta = time.strftime("%H:%M:%S", time.gmtime(left)) if math.isfinite(left) else "?"
        print(f"iteration {line['iteration']}/{self.total} {rate:.2f} it/s ETA {eta} "
              f"{_losses(line)}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled and self.bar is not None:
            self.bar.console.print(text)
        elif self.enabled:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
