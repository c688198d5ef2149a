"""Properties of one training iteration, of checkpoint selection and of the cache that a change
elsewhere could silently break: what the student learns from, the EMA teacher's formula, which
checkpoint becomes best.pt, and that a failed re-prepare leaves the old cache alone."""

from __future__ import annotations

import copy
import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from test_train import _base, _run, data  # noqa: F401  (``data`` is a fixture)
from typer.testing import CliRunner

import crlnseg.method.train_step as train_step_module
from crlnseg.checkpoint import load_checkpoint
from crlnseg.cli.app import app
from crlnseg.inference.choice import candidates, choose
from crlnseg.method.mean_teacher import ema_decay
from crlnseg.method.rectification import confident_share, pseudo_labels, rectify
from crlnseg.method.train_step import Batch, train_step
from crlnseg.settings import RunSettings
from crlnseg.train.state import init_state
from crlnseg.train.validation import Validation

CPU = torch.device("cpu")


def tiny(**method) -> RunSettings:
    return RunSettings.model_validate({
        "model": {"base_filters": 4, "prototypes_per_class": 2, "prototype_dim": 4,
                  "num_classes": 3},
        "method": {"method": "crln", "warmup_fraction": 0.0, "anchors": 4, "negatives": 4,
                   **method},
        "train": {"patch": (16, 16, 16)}})


def batch(seed: int, labelled: int = 2, unlabelled: int = 2) -> Batch:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(labelled + unlabelled, 1, 16, 16, 16, generator=g)
    smooth = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2)[:labelled, 0]
    label = (smooth > 0.05).long() + (smooth > 0.25).long()
    return Batch(x[:labelled], label, x[labelled:])


# --- the student learns from rectified pseudo-labels -------------------------------------------

def _strong_relation(state) -> None:
    """Give the teacher a relation map M large enough to change many pseudo-labels: random
    prototypes (zero ones give M = 0) and a scaled-up final upsampling layer."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        protos = state.teacher.prototypes.weight
        protos.copy_(torch.randn(protos.shape, generator=g))
        state.teacher.interaction.upsample.weight.mul_(100.0)
        state.student.mu_raw.fill_(0.25)  # rectification uses the student's mu: (1 - mu) = 0.75


@pytest.mark.parametrize("mu_view", ["weak", "strong"])
def test_student_is_trained_on_rectified_pseudo_labels(monkeypatch, mu_view):
    settings = tiny(mu_view=mu_view, confidence_threshold=0.5)  # shares far from 0, 1
    state = init_state(settings, CPU)
    _strong_relation(state)
    teacher = copy.deepcopy(state.teacher)  # the step updates the teacher by EMA afterwards
    mu = state.student.mu.detach().clone()
    seen = []
    real = train_step_module.apply_strong

    def recording(image, label, confidence, params):
        seen.append((image.clone(), label.clone(), confidence.clone()))
        return real(image, label, confidence, params)

    monkeypatch.setattr(train_step_module, "apply_strong", recording)
    record = train_step(state, batch(0), settings, torch.Generator().manual_seed(0), 10)
    # The strong view of the unlabelled crops (mu_view "strong" also makes one of the labelled
    # crops; its image is not the unlabelled weak view and it is made first).
    x_u, label, conf = seen[-1]
    assert x_u.shape == batch(0).unlabelled_image.shape
    with torch.no_grad():
        out = teacher(x_u, with_relation=True, embed="none")
    raw_label, _ = pseudo_labels(out.logits)
    want_label, want_conf = pseudo_labels(rectify(out.logits, out.relation, mu))
    # Rectification changes the labels here, so the check below tells the two apart.
    assert (raw_label != want_label).float().mean() > 0.05
    if mu_view == "weak":
        assert torch.equal(label, want_label)
    else:  # the teacher saw x_u batched with the mu view: the same up to float rounding
        assert (label != want_label).float().mean() < 1e-3
    torch.testing.assert_close(conf, want_conf, rtol=1e-4, atol=1e-5)
    thr = settings.method.confidence_threshold
    assert record.confident_rectified == pytest.approx(confident_share(want_conf, thr), abs=1e-3)
    assert record.confident_raw != record.confident_rectified


# --- the EMA teacher -----------------------------------------------------------------------------

def test_teacher_after_a_step_is_the_ema_of_the_stepped_student():
    settings = tiny()
    state = init_state(settings, CPU)
    state.iteration = 3
    d = ema_decay(3, settings.method.ema_decay)
    assert d == pytest.approx(0.75)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():  # a teacher that differs from the student in every entry
        for name, t in [*state.teacher.named_parameters(), *state.teacher.named_buffers()]:
            if "running_var" in name:
                t.mul_(1.5)
            elif t.is_floating_point():
                t.add_(0.1 * torch.randn(t.shape, generator=g))
            else:
                t.fill_(100)
    before = copy.deepcopy(state.teacher.state_dict())
    stepped = {}
    real_step = state.optimizer.step

    def step_and_snapshot(*args, **kwargs):
        result = real_step(*args, **kwargs)
        stepped.update(copy.deepcopy(state.student.state_dict()))
        return result

    state.optimizer.step = step_and_snapshot
    train_step(state, batch(0), settings, torch.Generator().manual_seed(0), 10)
    assert state.iteration == 4 and stepped
    after = state.teacher.state_dict()
    floating = 0
    for key, value in after.items():
        if value.is_floating_point():
            want = d * before[key] + (1 - d) * stepped[key]
            torch.testing.assert_close(value, want, rtol=1e-5, atol=1e-6, msg=key)
            floating += 1
        else:  # batch counters are the student's
            assert torch.equal(value, stepped[key]), key
    buffers = {k for k, _ in state.teacher.named_buffers()}
    assert floating > len(buffers) > 0


# --- best.pt ------------------------------------------------------------------------------------

@pytest.mark.parametrize("scores, best", [((0.8, 0.5), 1), ((0.5, 0.8), 2)])
def test_best_checkpoint_is_the_best_validation_not_the_newest(
        data, tmp_path, monkeypatch, scores, best):  # noqa: F811
    calls = []

    def scored(model, manifest, settings, device, rank=0, world_size=1, iteration=None):
        dice = scores[len(calls)]
        calls.append(iteration)
        options = candidates(True)  # the built-in default first, and the best of them
        choice = choose({c: dice - 0.1 * (i > 0) for i, c in enumerate(options)}, iteration)
        per_case = {c.id: dice for c in manifest.cases}
        return Validation(dice, per_case, dice - 0.1, choice)

    monkeypatch.setattr("crlnseg.train.loop.validate", scored)
    out = tmp_path / "run"
    code, output = _run([*_base(data, out, iterations=2, val=True),
                         "--set", "train.val_every=1", "--set", "train.checkpoint_every=100"])
    assert code == 0, output
    assert calls == [1, 2]
    folder = out / "checkpoints"
    best_meta = load_checkpoint(folder / "best.pt")["meta"]
    last_meta = load_checkpoint(folder / "last.pt")["meta"]
    assert last_meta["iteration"] == 2
    assert best_meta["iteration"] == best
    assert best_meta["inference"]["iteration"] == best  # its own validation's choice
    assert best_meta["best_val_dice"] == last_meta["best_val_dice"] == pytest.approx(max(scores))


# --- a failed re-prepare keeps the old cache ---------------------------------------------------

def _write_source(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    for sub in ("images", "labels"):
        (root / sub).mkdir(parents=True)
    for i in range(n):
        label = np.zeros((12, 10, 8), np.uint8)
        label[3:8, 3:7, 2:6] = 1
        image = (100 * label + rng.normal(50, 10, label.shape)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, affine), root / "images" / f"case{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labels" / f"case{i}.nii.gz")
    return root


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every entry under ``folder`` by relative name: a file's bytes, None for a folder."""
    return {str(p.relative_to(folder)): p.read_bytes() if p.is_file() else None
            for p in sorted(folder.rglob("*"))}


def test_failed_overwrite_of_a_cache_leaves_the_old_cache_byte_identical(tmp_path):
    runner = CliRunner()
    src, out = _write_source(tmp_path / "src"), tmp_path / "work" / "cache"
    first = runner.invoke(app, ["prepare", str(src), "-o", str(out)])
    assert first.exit_code == 0, first.output
    before = _snapshot(out)
    assert "dataset.json" in before and len([k for k in before if k.endswith(".npy")]) == 6
    # The second case (in the order cases are prepared) becomes unreadable.
    bad = src / "images" / "case1.nii.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes()))[:-300])
    result = runner.invoke(app, ["prepare", str(src), "-o", str(out), "--overwrite",
                                 "--normalize", "minmax"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(bad) in lines[0], lines
    assert _snapshot(out) == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["cache"]  # no staging left over
