"""Throughput of ``crlnseg train`` against a bare loop over the same training step.

    python benchmarks/train_throughput.py [--patch 112 112 80] [--iterations 3] [--rounds 2]

Mode "train": the real machinery (``crlnseg.train.train``: memory-mapped cache, loader workers,
per-iteration seeding, device transfer, metrics.jsonl, progress, plot) on a prepared synthetic
dataset whose volumes are larger than the patch. Its rate is the ``it_per_s`` of the second
metrics window (the first one holds start-up and warm-up).
Mode "bare": ``init_state`` + ``train_step`` on one in-memory batch of the same shape.
Both use the same settings (default: the reference model, 2 + 2 crops of 112 x 112 x 80) and run
alternately ``--rounds`` times in one process, so the ratio is measured under the same load.
Prints one JSON line; overhead = 1 - rate(train) / rate(bare); on CUDA also each mode's peak
of the allocator (``torch.cuda.max_memory_allocated``, reset before each run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def make_dataset(root: Path, patch: tuple[int, int, int], channels: int = 1) -> tuple[Path, Path]:
    """Prepared caches (4 labelled, 4 unlabelled cases) of volumes a bit larger than the patch."""
    from crlnseg.prepare import prepare_dataset
    from crlnseg.settings import PrepareSettings
    from crlnseg.synthetic import generate_dataset

    shape = tuple(p + 16 for p in patch)
    raw = root / "raw"
    generate_dataset(raw, n_labelled=4, n_unlabelled=4, n_test=0, shape=shape, seed=0)
    out = []
    for split in ("labelled", "unlabelled"):
        out.append(root / f"p_{split}")
        prepare_dataset(raw / split, out[-1], PrepareSettings())
    return out[0], out[1]


def rate_train(settings, labelled: Path, unlabelled: Path, root: Path, n: int) -> float:
    from crlnseg.train import train
    from crlnseg.train.logging import read_metrics

    run = root / "run"
    shutil.rmtree(run, ignore_errors=True)
    s = settings.model_copy(deep=True)
    s.train.iterations, s.train.log_every = 2 * n, n
    train(labelled, unlabelled, run, s)
    lines = [x for x in read_metrics(run / "metrics.jsonl") if "it_per_s" in x]
    return float(lines[1]["it_per_s"])


def rate_bare(settings, n: int) -> float:
    from crlnseg.method.train_step import Batch, train_step
    from crlnseg.train.state import init_state

    t, device = settings.train, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    state = init_state(settings, device)
    c = settings.model.in_channels
    g = torch.Generator().manual_seed(0)
    label = torch.zeros((t.batch_labelled, *t.patch), dtype=torch.long)
    label[:, t.patch[0] // 4: t.patch[0] // 2, t.patch[1] // 4: t.patch[1] // 2] = 1
    batch = Batch(torch.randn((t.batch_labelled, c, *t.patch), generator=g), label,
                  torch.randn((t.batch_unlabelled, c, *t.patch), generator=g))
    for _ in range(n):  # warm-up, as the first metrics window of mode "train"
        train_step(state, batch, settings, g, 2 * n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        train_step(state, batch, settings, g, 2 * n)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    from crlnseg.config import resolve_settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patch", type=int, nargs=3, default=(112, 112, 80))
    parser.add_argument("--base-filters", type=int, default=16)
    parser.add_argument("--iterations", type=int, default=3, help="measured per mode and round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2, help="loader workers of mode train")
    args = parser.parse_args()
    settings = resolve_settings(overrides=[
        f"train.patch={','.join(map(str, args.patch))}", f"model.base_filters={args.base_filters}",
        f"train.num_workers={args.workers}"])
    root = Path(tempfile.mkdtemp(prefix="crlnseg_bench_"))
    try:
        labelled, unlabelled = make_dataset(root, tuple(args.patch))
        rates: dict[str, list[float]] = {"train": [], "bare": []}
        peaks: dict[str, float] = {"train": 0.0, "bare": 0.0}
        for _ in range(args.rounds):
            for mode in ("bare", "train"):
                if torch.cuda.is_available():
                    torch.cuda.reset_peak_memory_stats()
                rates[mode].append(rate_bare(settings, args.iterations) if mode == "bare" else
                                   rate_train(settings, labelled, unlabelled, root,
                                              args.iterations))
                if torch.cuda.is_available():
                    peaks[mode] = max(peaks[mode], torch.cuda.max_memory_allocated() / 2**30)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    train_rate, bare_rate = float(np.mean(rates["train"])), float(np.mean(rates["bare"]))
    print(json.dumps({"patch": args.patch, "base_filters": args.base_filters,
                      "batch": "2+2", "device": "cuda" if torch.cuda.is_available() else "cpu",
                      "threads": torch.get_num_threads(), "rates": rates,
                      "train_it_per_s": train_rate, "bare_it_per_s": bare_rate,
                      "overhead": 1 - train_rate / bare_rate,
                      "peak_gib": peaks if torch.cuda.is_available() else None}))


if __name__ == "__main__":
    main()
