"""The GPU measurements of RESULTS.md "GPU checks", in one run.

Each step runs in its own process with its own time limit (a failing or slow step does not cost
the others), and writes its log and a summary under ``--out``:

1. ``crlnseg predict`` seconds per case at full LA resolution: synthetic volumes of the two
   ``la_h5`` cases' shapes (183 x 140 x 88 and 199 x 143 x 88 at 0.625 mm), a ``la8``-size CRLN
   model (randomly initialised: the cost does not depend on the weights), Gaussian overlap 0.5
   against the literature's uniform stride 18 x 18 x 4, each with and without AMP; one warm-up
   pass per protocol, then ``--repeats`` passes, protocols alternating.
2. CRLN iteration vs mean-teacher iteration (``benchmarks/iteration_speed.py``): V-Net 16, R 16,
   F 64, 2 + 2 crops; 112 x 112 x 80 in fp32 (plain layout) and with AMP + channels-last,
   64 x 64 x 48 with AMP + channels-last. Time per iteration, the ratio to mean teacher, CUDA
   allocator peak.
3. ``crlnseg train`` against a bare ``train_step`` loop (``benchmarks/train_throughput.py``,
   AMP, 112 x 112 x 80): the loader's and bookkeeping's overhead where an iteration is short.
Between 1 and 2, ``tests/test_cuda.py`` (CUDA against the CPU: predict with AMP, a training step
with and without AMP, ``crlnseg train`` / ``predict --device cuda``), which CI cannot run.

On a GPU machine whose Python lacks some of crlnseg's dependencies (wheels fetched first with
``benchmarks/gpu_wheels.sh`` into ``.whl``):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \\
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit
    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT

Check the script itself on the CPU, with tiny sizes, before spending GPU time:

    python benchmarks/gpu_check.py --smoke --out /tmp/gpu_smoke
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
FULL_RESOLUTION_SHAPES = ((183, 140, 88), (199, 143, 88))  # the two la_h5 cases
SPACING = (0.625, 0.625, 0.625)


def steps(smoke: bool) -> list[tuple[str, list[str], int]]:
    """(name, command, seconds allowed) of each step; ``smoke``: tiny sizes on the CPU."""
    py = sys.executable
    if smoke:
        tiny = ["--base-filters", "4", "--prototypes", "2", "--prototype-dim", "8"]
        return [
            ("iteration_cpu", [py, str(HERE / "iteration_speed.py"), "--device", "cpu",
                               "--sizes", "32x32x32", "--iterations", "1", *tiny], 300),
            ("throughput_cpu", [py, str(HERE / "train_throughput.py"), "--patch", "32", "32",
                                "32", "--base-filters", "4", "--iterations", "2", "--rounds",
                                "1", "--workers", "1"], 300),
            ("predict_cpu", [py, __file__, "--predict-worker", "--device", "cpu", "--smoke",
                             "--repeats", "1"], 300),
            ("pytest_cpu", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            str(HERE.parent / "tests" / "test_cuda.py")], 300),  # all skip here
            ("profile_crln_cpu", [py, str(HERE / "profile_step.py"), "--size", "32x32x32",
                                  "--iterations", "1", "--warmup", "1", *tiny], 300),
        ]
    it = [py, str(HERE / "iteration_speed.py"), "--device", "cuda", "--iterations", "10",
          "--warmup", "3"]
    prof = [py, str(HERE / "profile_step.py"), "--device", "cuda", "--size", "112x112x80", "--amp",
            "--channels-last", "--iterations", "5", "--warmup", "3"]
    # The open issue's step first: if the budget runs out, it is the one that got measured.
    return [
        ("predict_full_resolution", [py, __file__, "--predict-worker", "--device", "cuda",
                                     "--repeats", "3"], 110),
        ("pytest_cuda", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                         str(HERE.parent / "tests" / "test_cuda.py")], 80),
        ("iteration_112_amp_cl", [*it, "--sizes", "112x112x80", "--amp", "--channels-last"], 90),
        ("iteration_112_fp32", [*it, "--sizes", "112x112x80", "--no-amp", "--no-channels-last"],
         90),
        ("iteration_64_amp_cl", [*it, "--sizes", "64x64x48", "--amp", "--channels-last"], 60),
        ("throughput_amp", [py, str(HERE / "train_throughput.py"), "--patch",
                            "112", "112", "80", "--iterations", "20", "--rounds", "2",
                            "--workers", "4"], 110),
        # Added after the first GPU run (CRLN 2.4x mean teacher there, 1.3-1.4x on the CPU):
        # channels-last's worth under AMP, and where a CRLN iteration's time goes.
        ("iteration_112_amp_layouts", [*it, "--sizes", "112x112x80", "--amp", "--methods",
                                       "mean-teacher+ncdhw", "crln+ncdhw", "mean-teacher+cl",
                                       "crln+cl"], 90),
        ("iteration_112_fp32_layouts", [*it, "--sizes", "112x112x80", "--no-amp", "--methods",
                                        "mean-teacher+ncdhw", "crln+ncdhw", "mean-teacher+cl",
                                        "crln+cl"], 100),
        ("profile_crln_112_amp_cl", [*prof, "--method", "crln"], 60),
        ("profile_mt_112_amp_cl", [*prof, "--method", "mean-teacher"], 60),
    ]


def predict_worker(args: argparse.Namespace) -> dict:
    """Seconds per case of ``Predictor.predict_volume`` (preprocess, sliding window, restore,
    argmax: what ``crlnseg predict`` does between reading and writing) per protocol."""
    import numpy as np
    import torch

    from crlnseg.config import resolve_settings
    from crlnseg.inference.predictor import Predictor
    from crlnseg.io.volume import Geometry, Volume
    from crlnseg.method.crln import build_model
    from crlnseg.settings import PredictSettings, PrepareSettings

    torch.manual_seed(0)
    if args.smoke:
        shapes, patch, stride = ((40, 36, 36), (44, 40, 33)), (32, 32, 32), (8, 8, 4)
        run = resolve_settings(overrides=["model.base_filters=4", "model.prototypes_per_class=2",
                                          "model.prototype_dim=8", "train.patch=32,32,32"])
    else:
        shapes, patch, stride = FULL_RESOLUTION_SHAPES, (112, 112, 80), (18, 18, 4)
        run = resolve_settings(preset="la8")
    model = build_model(run)
    protocols = {}
    for amp in (False, True):
        tag = "amp" if amp else "fp32"
        protocols[f"gaussian overlap 0.5, {tag}"] = PredictSettings(
            device=args.device, amp=amp, batch_size=args.batch_size)
        protocols[f"uniform stride {' '.join(map(str, stride))}, {tag}"] = PredictSettings(
            device=args.device, amp=amp, batch_size=args.batch_size, mode="uniform",
            stride=stride)
    predictors = {name: Predictor(copy.deepcopy(model), s, patch, PrepareSettings(), 1,
                                  ["background", "la"]) for name, s in protocols.items()}
    # With AMP on CUDA: the channels-last default against the plain layout (smoke: the code path).
    if args.device == "cuda" or args.smoke:
        for name in [n for n in protocols if n.endswith("amp")]:
            p = Predictor(copy.deepcopy(model), protocols[name], patch, PrepareSettings(), 1,
                          ["background", "la"])
            p.channels_last = False
            p.model.to(memory_format=torch.contiguous_format)
            predictors[f"{name}, NCDHW"] = p
            protocols[f"{name}, NCDHW"] = protocols[name]
    rng = np.random.default_rng(0)
    volumes = [Volume(rng.normal(0, 1, shape).astype(np.float32), Geometry(spacing=SPACING))
               for shape in shapes]
    seconds: dict[str, dict[str, list[float]]] = {n: {} for n in protocols}
    for volume in volumes:  # warm-up: CUDA context, kernel loading, allocator growth
        for p in predictors.values():
            p.predict_volume(volume)
    for r in range(args.repeats):
        order = list(protocols) if r % 2 == 0 else list(reversed(protocols))
        for volume in volumes:
            key = "x".join(map(str, volume.spatial_shape))
            for name in order:
                out = predictors[name].predict_volume(volume)
                seconds[name].setdefault(key, []).append(out.seconds)
    device = torch.device(args.device)
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "patch": list(patch), "batch_size": args.batch_size,
            # "fp32" rows run convolutions in TF32 where PyTorch allows it (its default).
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "seconds": seconds,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda"
            else None}


def summarise_predict(result: dict) -> list[str]:
    lines = [f"predict, {result['device']}, torch {result['torch']}, patch {result['patch']}, "
             f"batch {result['batch_size']}, CUDA peak {result['peak_gib'] or 0:.2f} GiB, "
             f"cuDNN TF32 allowed: {result['cudnn_allow_tf32']}:",
             "| protocol | " + " | ".join(f"{k} s (median)" for k in
                                         next(iter(result["seconds"].values()))) + " | mean |",
             "|---|" + "---|" * (1 + len(next(iter(result["seconds"].values()))))]
    for name, per_case in result["seconds"].items():
        medians = [sorted(v)[len(v) // 2] for v in per_case.values()]
        lines.append(f"| {name} | " + " | ".join(f"{m:.2f}" for m in medians)
                     + f" | {sum(medians) / len(medians):.2f} |")
    return lines


def run_step(cmd: list[str], limit: float, env: dict[str, str]) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``cmd``; past ``limit`` seconds its whole process group
    is killed (status 124): loader and benchmark workers must not hold the GPU for the next step."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=limit)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return 124, out, err + f"\nkilled after {limit:.0f} s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU (checks the script)")
    p.add_argument("--only", nargs="+", default=None, help="run only these steps")
    p.add_argument("--budget", type=float, default=540,
                   help="seconds for all steps together (the device allows 600 per command)")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--repeats", type=int, default=3, help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--predict-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.predict_worker:
        print(json.dumps(predict_worker(args)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent),
                                                       os.environ.get("PYTHONPATH")]))}
    summary = [f"gpu_check {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
               f"python {sys.version.split()[0]}"]
    failed, deadline = 0, time.perf_counter() + args.budget
    for name, cmd, limit in steps(args.smoke):
        if args.only and name not in args.only:
            continue
        start, first = time.perf_counter(), len(summary)
        limit = min(limit, deadline - start)
        if limit < 20:
            summary.append(f"\n## {name}: skipped, the budget is spent")
            failed += 1
            continue
        rc, out, err = run_step(cmd, limit, env)
        wall = time.perf_counter() - start
        (args.out / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n--- stdout\n{out}\n"
                                              f"--- stderr\n{err}\n")
        summary.append(f"\n## {name}: rc {rc}, {wall:.0f} s")
        if rc == 0 and name.startswith("predict"):
            try:
                result = json.loads(out.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                rc = 1
                summary.append("no JSON result on the last line of stdout")
            else:
                (args.out / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")
                summary += summarise_predict(result)
        elif rc == 0 and name.startswith("profile"):
            from profile_step import table

            summary.append(table(json.loads(out.strip().splitlines()[-1])))
        elif rc == 0:
            summary.append(out.strip())
        else:  # pytest reports on stdout, Python tracebacks go to stderr
            summary.append("\n".join((out + err).strip().splitlines()[-8:]))
        failed += rc != 0
        print("\n".join(summary[first:]), flush=True)
        # After every step: the device's own limit may stop this script before the end.
        (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    (args.out / "summary.md").write_text("\n".join(summary) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
