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

from crlnseg.console import log
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


def _losses(line: dict[str, Any], room: int | None = None) -> str:
    """``loss=... supervised=... mu=...``: the step's losses, or as many whole fields (first ones
    first) as fit in ``room`` characters."""
    keys = ("loss", "loss_supervised", "loss_relation", "loss_unsup", "loss_cps", "mu")
    text = ""
    for k in keys:
        if isinstance(line.get(k), float):
            field = f"{k.removeprefix('loss_')}={line[k]:.4f}"
            longer = f"{text} {field}" if text else field
            if room is not None and len(longer) > room:
                break
            text = longer
    return text


class Progress:
    """A rich bar on a terminal, else a plain line per log step (``console``: where they go,
    default the stderr console).

    The bar reads ``train  bar  M/N  rate it/s  elapsed  ETA h:mm:ss  losses``: count, rate,
    elapsed time and ETA always keep their width; the current losses get what is left after the
    bar's least width, as many whole fields as fit (none on a narrow terminal), and the bar takes
    the rest up to its greatest width. The fit is made at every refresh, so a resized terminal is
    followed.
    """

    BAR_WIDTH = (10, 40)  # least and greatest

    def __init__(self, total: int, start: int, enabled: bool, console: Any = None) -> None:
        from crlnseg.console import console as stderr_console

        self.total, self.bar = total, None
        self.enabled = enabled
        self.console = stderr_console if console is None else console
        if enabled and self.console.is_terminal:
            self.bar = self._rich_bar(total, start, self.console)
            self.task = self.bar.task_ids[0]
            self.bar.start()

    @staticmethod
    def clock(seconds: float) -> str:
        """``H:MM:SS``, hours past 24 kept."""
        s = max(0, int(round(seconds)))
        return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"

    @classmethod
    def _rich_bar(cls, total: int, start: int, console: Any) -> Any:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            ProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )
        from rich.progress import Progress as RichProgress
        from rich.text import Text

        def rate_of(task: Any) -> float | None:
            return task.fields.get("rate") or task.speed  # the logged window's, else rich's

        class Rate(ProgressColumn):
            def render(self, task: Any) -> Text:
                rate = rate_of(task)
                return Text(f"{rate:.2f} it/s" if rate else "-.-- it/s")

        class Eta(ProgressColumn):
            def render(self, task: Any) -> Text:
                rate = rate_of(task)
                left = (task.total - task.completed) / rate if rate and task.total else None
                return Text("ETA " + (cls.clock(left) if left is not None else "-:--:--"))

        class Losses(ProgressColumn):
            def render(self, task: Any) -> Text:
                return Text(task.fields.get("fitted", ""), no_wrap=True, overflow="crop")

        least, greatest = cls.BAR_WIDTH

        class Fitted(RichProgress):
            def get_renderables(self) -> Any:
                width = console.width  # (self.console exists only once rich has set up)
                for task in self.tasks:  # one column gap (1) after each column
                    used = sum(console.measure(c(task)).maximum + 1 for c in essential)
                    fitted = _losses(task.fields.get("line", {}), width - used - least - 1)
                    task.fields["fitted"] = fitted
                    # (rich sizes an empty last column as 1 wide: one more to spare)
                    spare = width - used - (len(fitted) + 1 if fitted else 1) - 1
                    bar.bar_width = max(1, min(greatest, spare))
                yield from super().get_renderables()

        essential = [TextColumn("train"), MofNCompleteColumn(), Rate(), TimeElapsedColumn(),
                     Eta()]
        bar = BarColumn(bar_width=greatest)
        progress = Fitted(essential[0], bar, *essential[1:], Losses(), console=console)
        progress.add_task("train", total=total, completed=start, rate=None, line={}, fitted="")
        return progress

    def advance(self, iteration: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=iteration)

    def logged(self, line: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rate = line.get("it_per_s") or 0.0
        if self.bar is not None:
            self.bar.update(self.task, rate=rate or None, line=line)
            return
        left = (self.total - line["iteration"]) / rate if rate else math.nan
        eta = self.clock(left).zfill(8) if math.isfinite(left) else "?"
        print(f"iteration {line['iteration']}/{self.total} {rate:.2f} it/s ETA {eta} "
              f"{_losses(line)}", file=self.console.file, flush=True)

    def message(self, text: str) -> None:
        if self.enabled and self.bar is not None:
            self.bar.console.print(text)
        elif self.enabled:
            print(text, file=self.console.file, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
