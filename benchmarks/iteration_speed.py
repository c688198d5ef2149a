"""Time and peak memory of one CRLN iteration against one plain mean-teacher iteration.

Peak memory: one fresh subprocess per crop size and method builds the state, runs the warm-up
iteration(s) and reads the peak (process RSS on the CPU, a running maximum; CUDA allocator peak on
a GPU). Time: one more subprocess per crop size alternates the timed iterations between the
methods, so a noisy shared machine slows all alike and the ratio of medians is fair. Suffixes
switch options per method: ``+ckpt`` (``train.activation_checkpointing``), ``+cl`` / ``+ncdhw``
(``train.channels_last`` true / false; unset: ``--channels-last/--no-channels-last``, else the
default, channels-last), ``+strongmu`` / ``+weakmu``
(``method.mu_view``; unset: the default, "weak"), e.g. ``crln+ckpt+ncdhw``.
Like ``crlnseg train`` on the CPU, a worker whose methods all checkpoint fixes glibc's mmap
threshold (:mod:`crlnseg.train.allocator`); the mixed timing process does not, unless
``CRLNSEG_GLIBC_MMAP=1`` (``=0``: never).
Run by hand, not by pytest:

    OMP_NUM_THREADS=2 python benchmarks/iteration_speed.py --threads 2
    OMP_NUM_THREADS=2 python benchmarks/iteration_speed.py --methods mean-teacher crln crln+ckpt
    python benchmarks/iteration_speed.py --device cuda --amp --channels-last
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def _peak_gib(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _settings(args: argparse.Namespace, method: str, size: tuple[int, ...]):
    from crlnseg.settings import RunSettings

    method, *flags = method.split("+")
    view = next((v for v in ("strong", "weak") if f"{v}mu" in flags), None)
    return RunSettings.model_validate({
        "model": {"base_filters": args.base_filters, "prototypes_per_class": args.prototypes,
                  "prototype_dim": args.prototype_dim},
        # warm-up 0: every timed iteration rectifies, the full CRLN path.
        "method": {"method": method, "warmup_fraction": 0.0,
                   **({"mu_view": view} if view else {})},
        "train": {"patch": size, "amp": args.amp,
                  "channels_last": True if "cl" in flags else False if "ncdhw" in flags
                  else args.channels_last,
                  "activation_checkpointing": "ckpt" in flags}})


def worker(args: argparse.Namespace) -> list[dict]:
    import torch

    from crlnseg.method.train_step import Batch, train_step
    from crlnseg.train.state import channels_last, init_state

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cpu":  # as `crlnseg train` does; process-wide, so decided per process
        from crlnseg.train.allocator import release_freed_memory, wanted

        if wanted(all(m.endswith("+ckpt") or "+ckpt+" in m for m in args.methods)):
            release_freed_memory()
    size = tuple(int(s) for s in args.size.split("x"))
    torch.manual_seed(0)
    x = torch.randn(4, 1, *size)
    smooth = torch.nn.functional.avg_pool3d(x, 9, stride=1, padding=4)
    batch = Batch(x[:2], (smooth[:2, 0] > 0.05).long(), x[2:])
    gen = torch.Generator().manual_seed(0)

    def step(method: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(states[method], batch, settings[method], gen, total_iterations=1000)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    settings, states, peaks = {}, {}, {}
    for method in args.methods:
        settings[method] = _settings(args, method, size)
        states[method] = init_state(settings[method], device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for _ in range(args.warmup):
            step(method)
        peaks[method] = _peak_gib(device)
    if args.memory_only:
        return [{"method": m, "peak_gib": round(peaks[m], 3)} for m in args.methods]
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for _ in range(args.iterations):
        for method in args.methods:
            times[method].append(step(method))
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    return [{"method": m, "size": args.size, "median_s": statistics.median(times[m]),
             "times_s": [round(t, 3) for t in times[m]],
             "device": name, "amp": args.amp,
             "channels_last": channels_last(settings[m], device),
             "activation_checkpointing": settings[m].train.activation_checkpointing}
            for m in args.methods]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["64x64x48", "112x112x80"])
    p.add_argument("--methods", nargs="+", default=["mean-teacher", "crln"])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="layout of every method without +cl/+ncdhw; unset: the default (on)")
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--prototypes", type=int, default=16)
    p.add_argument("--prototype-dim", type=int, default=64)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    passthrough = [a for a in sys.argv[1:]]
    if "--methods" in passthrough:  # the workers get their methods one by one below
        i = passthrough.index("--methods")
        passthrough = passthrough[:i] + passthrough[i + 1 + len(args.methods):]

    def run(size: str, methods: list[str], extra: list[str]) -> list[dict]:
        cmd = [sys.executable, __file__, *passthrough, "--worker", "--size", size,
               "--methods", *methods, *extra]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        print(out.strip().splitlines()[-1], file=sys.stderr)
        return json.loads(out.strip().splitlines()[-1])

    rows = []
    for size in args.sizes:
        peaks = {m: run(size, [m], ["--memory-only"])[0]["peak_gib"] for m in args.methods}
        timed = run(size, args.methods, [])
        rows += [{**r, "peak_gib": peaks[r["method"]]} for r in timed]
    print("| size | method | median s/iter | peak GiB | x mean-teacher time | x MT memory |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        base = next(b for b in rows if b["size"] == r["size"] and b["method"] == args.methods[0])
        print(f"| {r['size']} | {r['method']} | {r['median_s']:.2f} | {r['peak_gib']:.2f} | "
              f"{r['median_s'] / base['median_s']:.2f} | {r['peak_gib'] / base['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
