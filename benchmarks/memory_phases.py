"""Resident memory over one CRLN iteration, phase by phase (CPU).

A thread samples the process RSS every 2 ms while a second iteration runs (the first warms up);
the teacher pass, the student's forward (``student_losses``), the backward and optimiser step
(``_optimise``) and the mu step are marked by wrapping those functions of
``crlnseg.method.train_step``. Shows where the peak of ``benchmarks/iteration_speed.py`` is
reached. Run by hand:

    python benchmarks/memory_phases.py --size 112x112x80                  # default settings
    python benchmarks/memory_phases.py --size 112x112x80 --checkpointing  # + memory mode
    CRLNSEG_GLIBC_MMAP=1 python benchmarks/memory_phases.py ...           # force the 1 MB threshold
"""

from __future__ import annotations

import argparse
import os
import threading
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="112x112x80")
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    import crlnseg.method.train_step as ts
    from crlnseg.settings import RunSettings
    from crlnseg.train.allocator import release_freed_memory, wanted

    torch.set_num_threads(args.threads)
    mmap = wanted(args.checkpointing) and release_freed_memory()  # as `crlnseg train` does
    page = os.sysconf("SC_PAGE_SIZE")
    samples: list[tuple[float, float]] = []
    marks: list[tuple[float, str]] = []

    def sample() -> None:
        while True:
            with open("/proc/self/statm") as f:
                samples.append((time.perf_counter(), int(f.read().split()[1]) * page / 2**30))
            time.sleep(0.002)

    def marked(name: str) -> None:
        fn = getattr(ts, name)

        def wrapper(*a, **k):
            marks.append((time.perf_counter(), f"{name} begins"))
            out = fn(*a, **k)
            marks.append((time.perf_counter(), f"{name} ends"))
            return out

        setattr(ts, name, wrapper)

    for name in ("teacher_pseudo_labels", "student_losses", "_optimise", "_mu_step"):
        marked(name)
    threading.Thread(target=sample, daemon=True).start()
    size = tuple(int(s) for s in args.size.split("x"))
    settings = RunSettings.model_validate({
        "method": {"method": "crln", "warmup_fraction": 0.0},
        "train": {"patch": size, "activation_checkpointing": args.checkpointing}})
    torch.manual_seed(0)
    x = torch.randn(4, 1, *size)
    smooth = torch.nn.functional.avg_pool3d(x, 9, stride=1, padding=4)
    batch = ts.Batch(x[:2], (smooth[:2, 0] > 0.05).long(), x[2:])
    from crlnseg.train.state import init_state

    state = init_state(settings, torch.device("cpu"))
    generator = torch.Generator().manual_seed(0)
    ts.train_step(state, batch, settings, generator, total_iterations=1000)
    marks.clear()
    start = time.perf_counter()
    ts.train_step(state, batch, settings, generator, total_iterations=1000)
    time.sleep(0.05)
    mine = [(t, r) for t, r in samples if t >= start]
    print(f"{args.size}, checkpointing {args.checkpointing}, 1 MB mmap threshold {bool(mmap)}: "
          f"RSS at start {mine[0][1]:.2f} GiB, peak {max(r for _, r in mine):.2f} GiB")
    bounds = [start] + [t for t, _ in marks] + [mine[-1][0]]
    names = ["start"] + [m for _, m in marks]
    for a, b, name in zip(bounds[:-1], bounds[1:], names, strict=True):
        rss = [r for t, r in mine if a <= t < b]
        if rss:
            print(f"  from '{name}': {b - a:6.2f} s, max {max(rss):.2f} GiB, end {rss[-1]:.2f} GiB")


if __name__ == "__main__":
    main()
