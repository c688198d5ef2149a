"""Where the time of one training iteration goes: torch.profiler over ``train_step``.

Each phase of the iteration (the weak views, the teacher's pass, the strong view, the student's
losses and inside them M(x) and the positive supervision, the optimiser step, the EMA update, the
mu step, the step's closing ``float()`` reads) runs inside a ``record_function`` range, patched in
here so that the library carries no profiling code. Prints one JSON line: per phase the CPU time
(host time, which includes waiting at a synchronisation), the time of the kernels it launched and
its span on the GPU timeline, the
top operators by self device time (self CPU time on the CPU), how often the host waited for the
device (``aten::item``/``_local_scalar_dense``, ``aten::nonzero``, stream synchronisations), and
the wall time per iteration next to the device's busy time: busy far below wall means the host
(kernel launches, Python, synchronisations) bounds the iteration, not the GPU.

    python benchmarks/profile_step.py --device cuda --amp --channels-last --size 112x112x80
    python benchmarks/profile_step.py --size 32x32x32 --base-filters 4   # CPU check
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from iteration_speed import _settings  # noqa: E402  (same crop, batch and method settings)

PHASES = ("_views", "teacher_pseudo_labels", "apply_strong", "student_losses", "_optimise",
          "ema_update", "_mu_step", "positive_supervision_loss")
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense", "aten::nonzero", "cudaStreamSynchronize",
            "cudaDeviceSynchronize", "cudaMemcpyAsync")


def _ranged(fn, name: str):
    import torch

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.profiler.record_function(f"phase::{name}"):
            return fn(*args, **kwargs)
    return wrapper


def _device_us(event, self_only: bool) -> float:
    # torch >= 2.4 names it "device", older releases "cuda".
    for name in (("self_device_time_total", "self_cuda_time_total") if self_only
                 else ("device_time_total", "cuda_time_total")):
        if hasattr(event, name):
            return float(getattr(event, name))
    return 0.0


def profile(args: argparse.Namespace) -> dict:
    import torch
    from torch.autograd import DeviceType

    import crlnseg.method.train_step as ts
    from crlnseg.method.crln import CRLNModel
    from crlnseg.method.train_step import Batch, train_step
    from crlnseg.train.state import channels_last, init_state

    for name in PHASES:
        setattr(ts, name, _ranged(getattr(ts, name), name))
    CRLNModel.relation = _ranged(CRLNModel.relation, "relation M(x)")
    device = torch.device(args.device)
    size = tuple(int(s) for s in args.size.split("x"))
    settings = _settings(args, args.method, size)
    torch.manual_seed(0)
    x = torch.randn(4, 1, *size)
    smooth = torch.nn.functional.avg_pool3d(x, 9, stride=1, padding=4)
    batch = Batch(x[:2], (smooth[:2, 0] > 0.05).long(), x[2:])
    gen = torch.Generator().manual_seed(0)
    state = init_state(settings, device)
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        train_step(state, batch, settings, gen, total_iterations=1000)
    sync()
    start = time.perf_counter()
    for _ in range(args.iterations):  # unprofiled: the profiler's own cost stays out of wall
        train_step(state, batch, settings, gen, total_iterations=1000)
    sync()
    wall = (time.perf_counter() - start) / args.iterations
    activities = [torch.profiler.ProfilerActivity.CPU]
    if cuda:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.iterations):
            with torch.profiler.record_function("phase::train_step"):
                record = train_step(state, batch, settings, gen, total_iterations=1000)
        sync()
    events = prof.key_averages()
    n = args.iterations
    # A range appears twice on CUDA: the host-side range (its CPU time, which includes waiting at
    # synchronisations, and the kernels its operators launched) and the GPU-side annotation (the
    # span from its first to its last kernel on the device, idle gaps included).
    phases: dict[str, dict[str, float]] = {}
    for e in events:
        if not e.key.startswith("phase::"):
            continue
        row = phases.setdefault(e.key.removeprefix("phase::"),
                                {"calls": 0.0, "cpu_ms": 0.0, "kernel_ms": 0.0, "gpu_span_ms": 0.0})
        if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU:
            row.update(calls=e.count / n, cpu_ms=e.cpu_time_total / n / 1e3,
                       kernel_ms=_device_us(e, False) / n / 1e3)
        else:
            row["gpu_span_ms"] = _device_us(e, False) / n / 1e3
    ops = [e for e in events if not e.key.startswith("phase::")]
    if cuda:
        top = sorted(ops, key=lambda e: _device_us(e, True), reverse=True)[:args.rows]
    else:
        top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:args.rows]
    # The device's busy time: kernels, copies and fills, each once (an operator's self device
    # time repeats its kernels').
    busy = sum(_device_us(e, True) for e in ops
               if getattr(e, "device_type", None) not in (None, DeviceType.CPU)) / n / 1e3
    return {
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "size": args.size, "method": args.method, "amp": args.amp,
        "channels_last": channels_last(settings, device), "iterations": n,
        "wall_ms_per_iteration": wall * 1e3, "device_busy_ms_per_iteration": busy,
        "mu": record.mu, "phases": phases,
        "waits_per_iteration": {e.key: e.count / n for e in ops if e.key in SYNC_OPS},
        "top_ops": [{"op": e.key[:60], "calls": e.count / n,
                     "self_device_ms": _device_us(e, True) / n / 1e3,
                     "self_cpu_ms": e.self_cpu_time_total / n / 1e3} for e in top],
    }


def table(result: dict) -> str:
    lines = [f"{result['method']} {result['size']}, {result['device']}, amp {result['amp']}, "
             f"channels-last {result['channels_last']}: wall "
             f"{result['wall_ms_per_iteration']:.1f} ms/iteration (unprofiled), device busy "
             f"{result['device_busy_ms_per_iteration']:.1f} ms; host waits per iteration "
             f"{result['waits_per_iteration']}",
             "| phase | calls | CPU ms | kernel ms | GPU span ms |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['calls']:.0f} | {v['cpu_ms']:.1f} | {v['kernel_ms']:.1f} | "
              f"{v['gpu_span_ms']:.1f} |"
              for k, v in sorted(result["phases"].items(), key=lambda kv: -kv[1]["cpu_ms"])]
    lines += ["| op | calls | self device ms | self CPU ms |", "|---|---|---|---|"]
    lines += [f"| {o['op']} | {o['calls']:.0f} | {o['self_device_ms']:.2f} | "
              f"{o['self_cpu_ms']:.2f} |" for o in result["top_ops"]]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="112x112x80")
    p.add_argument("--method", default="crln", help="as iteration_speed.py's, suffixes included")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iterations", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="unset: the default layout (channels-last)")
    p.add_argument("--base-filters", type=int, default=16)
    p.add_argument("--prototypes", type=int, default=16)
    p.add_argument("--prototype-dim", type=int, default=64)
    args = p.parse_args()
    result = profile(args)
    print(table(result), file=sys.stderr)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
