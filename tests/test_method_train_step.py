"""One CRLN iteration: gradient paths, switches, reproducibility and exact resume."""

from __future__ import annotations

import copy

import pytest
import torch

from crlnseg.method.train_step import Batch, poly_lr, student_losses, train_step
from crlnseg.settings import RunSettings
from crlnseg.train.state import init_state, seed_iteration, state_from_dict, state_to_dict


def tiny(method: str = "crln", **over) -> RunSettings:
    return RunSettings.model_validate({
        "model": {"base_filters": 4, "prototypes_per_class": 2, "prototype_dim": 8,
                  "num_classes": 3},
        "method": {"method": method, "warmup_fraction": 0.1, "anchors": 16, "negatives": 32,
                   **over},
        "train": {"patch": (32, 32, 32)}})


def batch(seed: int = 0, unlabelled: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 + unlabelled, 1, 32, 32, 32, generator=g)
    smooth = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2)[:2, 0]
    label = (smooth > 0.05).long() + (smooth > 0.25).long()
    return Batch(x[:2], label, x[2:])


def test_poly_lr():
    assert poly_lr(1.0, 0, 100, 0.9) == 1.0
    assert poly_lr(1.0, 50, 100, 0.9) == pytest.approx(0.5**0.9)
    assert poly_lr(1.0, 100, 100, 0.9) == 0.0


def test_prototypes_and_dim_learn_only_from_relation_supervision():
    settings = tiny()
    state = init_state(settings, torch.device("cpu"))
    b = batch()
    x_l, y_l = b.labelled_image, b.labelled_label
    x_s = b.unlabelled_image
    y_s = torch.randint(0, 3, (2, 32, 32, 32))
    c_s = torch.ones(2, 32, 32, 32)  # all confident: the pseudo-label loss is active
    terms, _, _ = student_losses(state, x_l, y_l, x_s, y_s, c_s, settings,
                                 torch.Generator().manual_seed(0), after_warmup=True)
    assert set(terms) == {"supervised", "relation", "unsup", "cps"}
    student = state.student
    guarded = [student.prototypes.weight, *student.interaction.parameters()]
    for name, term in terms.items():
        grads = torch.autograd.grad(term, guarded + [student.mu_raw], retain_graph=True,
                                    allow_unused=True)
        if name == "relation":
            assert grads[0] is not None and grads[0].abs().sum() > 0  # prototypes P
            assert all(g is not None for g in grads[:-1])  # every DIM parameter
        else:
            assert all(g is None for g in grads), name
        assert grads[-1] is None  # mu has its own step only


@pytest.mark.parametrize("method,over,expect", [
    ("supervised", {}, {"loss_relation": None, "loss_unsup": None, "loss_cps": None, "mu": None}),
    ("mean-teacher", {}, {"loss_relation": None, "loss_cps": None, "mu": None,
                          "confident_rectified": None}),
    ("crln", {"positive_supervision": False}, {"loss_cps": None}),
    ("crln", {"rectify": False}, {"confident_rectified": None}),
])
def test_method_switches(method, over, expect):
    settings = tiny(method, **over)
    state = init_state(settings, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    records = [train_step(state, batch(i), settings, g, total_iterations=10) for i in range(2)]
    for key, value in expect.items():
        assert getattr(records[1], key) == value, key
    assert state.iteration == 2
    assert all(r.loss == r.loss for r in records)  # not NaN


def test_crln_step_records_everything_and_rectifies_after_warmup():
    settings = tiny()
    state = init_state(settings, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    first = train_step(state, batch(0), settings, g, total_iterations=10)
    second = train_step(state, batch(1), settings, g, total_iterations=10)
    assert first.confident_rectified is None  # warm-up: 1 of 10 iterations
    assert second.confident_rectified is not None and 0 <= second.confident_rectified <= 1
    for r in (first, second):
        assert None not in (r.loss_relation, r.loss_unsup, r.loss_cps, r.loss_mu, r.mu)
        assert 0.0 <= r.mu <= 1.0
    assert second.lr < first.lr
    # The teacher follows the student: after the first step (decay 0) it equals it.
    assert not torch.equal(state.teacher.prototypes.weight, torch.zeros_like(
        state.teacher.prototypes.weight))


def run(settings: RunSettings, steps: int, resume_at: int | None = None):
    torch.manual_seed(123)
    state = init_state(settings, torch.device("cpu"))
    g = torch.Generator().manual_seed(5)
    records = []
    for i in range(steps):
        if i == resume_at:  # rebuild everything from a checkpoint dictionary
            saved = copy.deepcopy(state_to_dict(state))
            rng, gen = torch.get_rng_state(), g.get_state()
            state = init_state(tiny(), torch.device("cpu"))
            torch.manual_seed(999)
            state_from_dict(state, saved)
            torch.set_rng_state(rng)
            g = torch.Generator()
            g.set_state(gen)
        records.append(train_step(state, batch(i), settings, g, total_iterations=10))
    return records, state


def test_seeded_iterations_are_reproducible_and_resume_exactly():
    settings = tiny()
    a, sa = run(settings, 3)
    b, sb = run(settings, 3)
    c, sc = run(settings, 3, resume_at=2)
    assert a == b == c
    for other in (sb, sc):
        for (k, v), w in zip(sa.student.state_dict().items(),
                             other.student.state_dict().values(), strict=True):
            assert torch.equal(v, w), k


def test_activation_checkpointing_gives_the_same_iterations():
    settings = tiny()
    ck = tiny().model_copy(update={"train": tiny().train.model_copy(
        update={"activation_checkpointing": True})})
    a, sa = run(settings, 2)
    b, sb = run(ck, 2)
    assert sb.student.backbone.checkpoint_activations
    for ra, rb in zip(a, b, strict=True):
        for key, va in ra.as_dict().items():
            vb = rb.as_dict()[key]
            assert (va is None) == (vb is None), key
            if va is not None:
                assert vb == pytest.approx(va, rel=1e-4, abs=1e-6), key
    for (k, v), w in zip(sa.student.state_dict().items(), sb.student.state_dict().values(),
                         strict=True):
        torch.testing.assert_close(w, v, rtol=1e-4, atol=1e-6, msg=k)


def test_channels_last_is_the_default_and_can_be_switched_off():
    from crlnseg.train.state import channels_last

    def with_train(**update):
        return tiny().model_copy(update={"train": tiny().train.model_copy(update=update)})

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert channels_last(tiny(), cpu) and channels_last(with_train(amp=True), cuda)
    assert channels_last(with_train(amp=False), cuda)
    off = with_train(channels_last=False)
    assert not channels_last(off, cpu) and not channels_last(off, cuda)
    state = init_state(tiny(), cpu)
    conv = state.student.backbone.enc[1][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last_3d)
    assert not init_state(off, cpu).student.backbone.enc[1][0].weight.is_contiguous(
        memory_format=torch.channels_last_3d)


@pytest.mark.parametrize("view", ["weak", "strong"])
def test_mu_is_fitted_on_the_chosen_view(monkeypatch, view):
    """"weak": the student's detached f(x_l), M(x_l); "strong": the EMA teacher's f and M of a
    strong view of the labelled crops, whose labels carry the ignore padding of the rescale."""
    import crlnseg.method.train_step as ts

    settings = tiny(mu_view=view)
    settings = settings.model_copy(update={"augment": settings.augment.model_copy(
        update={"rescale": (0.6, 0.6)})})  # zoom out: the view is padded with ignore labels
    state = init_state(settings, torch.device("cpu"))
    with torch.no_grad():  # a teacher unlike the student, so the two sources differ
        for p in state.teacher.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher_before = copy.deepcopy(state.teacher)
    seen: dict = {}
    real_view, real_step = ts.mu_view, ts._mu_step

    def spy_view(*args, **kwargs):
        seen["view"] = real_view(*args, **kwargs)
        return seen["view"]

    def spy_step(state_, f, m, y):
        seen["step"] = (f, m, y)
        return real_step(state_, f, m, y)

    monkeypatch.setattr(ts, "mu_view", spy_view)
    monkeypatch.setattr(ts, "_mu_step", spy_step)
    b = batch()
    record = train_step(state, b, settings, torch.Generator().manual_seed(0), total_iterations=10)
    f, m, y = seen["step"]
    assert record.loss_mu is not None and not f.requires_grad and not m.requires_grad
    if view == "weak":
        assert "view" not in seen
        assert int((y == -1).sum()) == 0  # the training view's labels, unpadded
        return
    x_mu, y_mu = seen["view"]
    assert torch.equal(y, y_mu) and int((y == -1).sum()) > 0
    assert set(torch.unique(y).tolist()) <= {-1, 0, 1, 2}
    with torch.no_grad():
        out = teacher_before(x_mu, with_relation=True, embed="none")
    torch.testing.assert_close(f, out.logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m, out.relation, rtol=1e-4, atol=1e-4)


def test_mu_view_strong_is_reproducible_and_moves_mu():
    settings = tiny(mu_view="strong", mu_lr=0.5)
    runs = []
    for _ in range(2):
        state = init_state(settings, torch.device("cpu"))
        with torch.no_grad():  # inside (0, 1), where the clamp cannot hide a step either way
            state.student.mu_raw.fill_(0.5)
        g = torch.Generator()
        records = []
        for i in range(3):
            seed_iteration(0, 0, i, g)  # as the trainer does: dropout draws from the global RNG
            records.append(train_step(state, batch(i), settings, g, total_iterations=10))
        runs.append(([r.mu for r in records], [r.loss_mu for r in records]))
    (mus, losses), (mus_again, losses_again) = runs
    assert mus == mus_again and losses == losses_again
    assert abs(mus[-1] - 0.5) > 1e-5  # fitted on the strong view, mu's optimiser moves it
