"""Data-parallel training on two CPU processes (gloo): one iteration on each rank's own batch
equals one single-process iteration whose gradient is the mean of the two ranks' gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_train import TINY, _run, data  # noqa: F401  (``data`` is a fixture)

from crlnseg.method.mean_teacher import ema_decay, ema_update
from crlnseg.method.train_step import Batch, poly_lr, train_step
from crlnseg.settings import RunSettings
from crlnseg.train.parallel import cleanup, distribute, init_process, spawn, sync_buffers
from crlnseg.train.state import init_state, seed_iteration

CPU = torch.device("cpu")
TOTAL = 10
WORLD = 2
# "supervised": the projection head gets no gradient; "crln" with positive supervision: every
# part of the student learns, and mu's gradient has its own all-reduce.
METHODS = ["supervised", "crln"]


def settings_for(method: str) -> RunSettings:
    return RunSettings.model_validate({
        "model": {"base_filters": 4, "prototypes_per_class": 2, "prototype_dim": 4,
                  "num_classes": 3},
        "method": {"method": method, "warmup_fraction": 0.0, "anchors": 4, "negatives": 4,
                   "confidence_threshold": 0.5, "mu_lr": 5.0},
        # A large learning rate: a sum instead of a mean of the gradients moves weights far.
        "optim": {"lr": 0.1},
        "train": {"patch": (16, 16, 16)}})


def rank_batch(rank: int) -> Batch:
    """Each rank's own crops (3 classes, so positive supervision uses its projection)."""
    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(4, 1, 16, 16, 16, generator=g)
    smooth = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2)[:2, 0]
    label = (smooth > 0.05).long() + (smooth > 0.25).long()
    return Batch(x[:2], label, x[2:])


def initial_state(settings: RunSettings):
    state = init_state(settings, CPU)
    if state.mu_optimizer is not None:
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for model in (state.student, state.teacher):
                # inside (0, 1), so mu's clamp cannot hide its step
                model.mu_raw.fill_(0.5)
                # Zero prototypes give M = 0, and mu no gradient: random ones, a larger M.
                model.prototypes.weight.copy_(torch.randn(model.prototypes.weight.shape,
                                                          generator=g.manual_seed(3)))
                model.interaction.upsample.weight.mul_(10.0)
    return state


def rank_generator(settings: RunSettings, rank: int) -> torch.Generator:
    """The loop's seeding of iteration 0 on ``rank`` (global RNG for dropout, and the step's)."""
    generator = torch.Generator()
    seed_iteration(settings.train.seed, rank, 0, generator)
    return generator


def snapshot(state) -> dict[str, torch.Tensor]:
    out = {f"student.{k}": v.clone() for k, v in state.student.state_dict().items()}
    out.update({f"teacher.{k}": v.clone() for k, v in state.teacher.state_dict().items()})
    return out


def _rank_main(folder: str) -> None:
    torch.set_num_threads(1)
    d = init_process("cpu")
    try:
        for method in METHODS:
            settings = settings_for(method)
            state = initial_state(settings)
            distribute(state, d, find_unused_parameters=True)  # as training does
            train_step(state, rank_batch(d.rank), settings, rank_generator(settings, d.rank),
                       TOTAL)
            sync_buffers(state, d)  # as the loop does after every step
            torch.save(snapshot(state), Path(folder) / f"{method}.rank{d.rank}.pt")
    finally:
        cleanup()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> dict[str, list[dict[str, torch.Tensor]]]:
    folder = tmp_path_factory.mktemp("ranks")
    spawn(_rank_main, WORLD, (str(folder),))
    return {method: [torch.load(folder / f"{method}.rank{r}.pt", weights_only=True)
                     for r in range(WORLD)] for method in METHODS}


def _gradients_of_rank(settings: RunSettings, rank: int):
    """One iteration on ``rank``'s batch alone, without applying it: the gradients the student's
    and mu's optimisers would receive, and the student's BatchNorm buffers after its forward."""
    state = initial_state(settings)
    grads: dict[str, list[torch.Tensor]] = {}

    def capture(name, optimizer):
        def step(*args, **kwargs):
            grads[name] = [p.grad.clone() if p.grad is not None else None
                           for group in optimizer.param_groups for p in group["params"]]
        return step

    state.optimizer.step = capture("student", state.optimizer)
    if state.mu_optimizer is not None:
        state.mu_optimizer.step = capture("mu", state.mu_optimizer)
    train_step(state, rank_batch(rank), settings, rank_generator(settings, rank), TOTAL)
    buffers = {k: v.clone() for k, v in state.student.named_buffers()}
    return grads, buffers


def _mean(a: torch.Tensor | None, b: torch.Tensor | None) -> torch.Tensor | None:
    if a is None and b is None:
        return None
    a = torch.zeros_like(b) if a is None else a
    b = torch.zeros_like(a) if b is None else b
    return (a + b) / 2


def reference(settings: RunSettings) -> dict[str, torch.Tensor]:
    """The same iteration in one process: mean of the ranks' gradients, one optimiser step,
    rank 0's BatchNorm statistics (what every rank keeps), EMA, then mu's step."""
    per_rank = [_gradients_of_rank(settings, r) for r in range(WORLD)]
    state = initial_state(settings)
    lr = poly_lr(settings.optim.lr, 0, TOTAL, settings.optim.poly_power)
    params = [p for group in state.optimizer.param_groups for p in group["params"]]
    for group in state.optimizer.param_groups:
        group["lr"] = lr
    for p, g0, g1 in zip(params, per_rank[0][0]["student"], per_rank[1][0]["student"],
                         strict=True):
        p.grad = _mean(g0, g1)
    state.optimizer.step()
    with torch.no_grad():
        for name, buf in state.student.named_buffers():
            buf.copy_(per_rank[0][1][name])
    ema_update(state.teacher, state.student, ema_decay(0, settings.method.ema_decay))
    if state.mu_optimizer is not None:
        (g0,), (g1,) = per_rank[0][0]["mu"], per_rank[1][0]["mu"]
        state.student.mu_raw.grad = _mean(g0, g1)
        state.mu_optimizer.step()
        state.student.clamp_mu_()
    return snapshot(state)


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_ranks_agree_and_average_their_gradients(ranks, method):
    r0, r1 = ranks[method]
    assert r0.keys() == r1.keys()
    for key, value in r0.items():
        assert torch.equal(value, r1[key]), f"{key} differs between ranks"
    settings = settings_for(method)
    want = reference(settings)
    start = snapshot(initial_state(settings))
    assert want.keys() == r0.keys()
    moved = 0
    for key, value in want.items():
        if value.is_floating_point():
            torch.testing.assert_close(r0[key], value, rtol=1e-5, atol=1e-6, msg=key)
            moved += int(not torch.allclose(value, start[key], rtol=0, atol=1e-4))
        else:
            assert torch.equal(r0[key], value), key
    assert moved > len(want) // 4  # the step changed the models: the comparison has teeth
    if method == "crln":  # mu learned from both ranks' labelled crops
        assert abs(float(r0["student.mu_raw"]) - 0.5) > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("method", [["--method", "supervised", "--batch-labelled", "2"],
                                    ["--method", "crln", "--set",
                                     "method.positive_supervision=false"]],
                         ids=["supervised", "crln-without-positive-supervision"])
def test_two_processes_train_methods_without_positive_supervision(
        data, tmp_path, monkeypatch, method):  # noqa: F811
    """Without positive supervision the projection head gets no gradient; training still runs
    on two processes past the first iteration and leaves the same weights on both."""
    monkeypatch.setenv("CRLNSEG_DEBUG_RANK_STATE", str(tmp_path))
    out = tmp_path / "run"
    code, output = _run(["--labelled", str(data["plab"]), "--unlabelled", str(data["punl"]),
                         "-o", str(out), "--iterations", "2", *TINY, *method,
                         "--device", "cpu", "--nproc", "2"])
    assert code == 0, output
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD))
    for part in ("student", "teacher"):
        for key, value in r0[part].items():
            assert torch.equal(value, r1[part][key]), f"{part}.{key} differs between ranks"
