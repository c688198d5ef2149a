"""Checkpoints: weights-only round trip, atomic writes, one-line errors, inference loading."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from crlnseg.checkpoint import (
    FORMAT_VERSION,
    copy_checkpoint,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from crlnseg.errors import CheckpointError
from crlnseg.inference.model import load_inference_model
from crlnseg.settings import RunSettings
from crlnseg.train.state import state_to_dict

SETTINGS = RunSettings.model_validate({
    "model": {"base_filters": 4, "prototypes_per_class": 2, "prototype_dim": 4},
    "train": {"patch": (16, 16, 16)}})


@pytest.fixture(scope="module")
def state():
    from crlnseg.train.state import init_state

    torch.set_num_threads(1)
    s = init_state(SETTINGS, torch.device("cpu"))
    with torch.no_grad():  # make teacher and student differ, as after training
        for p in s.teacher.parameters():
            p.add_(0.5)
    s.iteration = 7
    return s


def test_round_trip_is_weights_only_and_self_describing(tmp_path, state):
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(path, state_to_dict(state), SETTINGS,
                    {"classes": [0, 1], "channels": 1, "iteration": 7})
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]  # no temporary left
    data = torch.load(path, weights_only=True)  # plain containers only
    assert data["format"] == "crlnseg-checkpoint" and data["format_version"] == FORMAT_VERSION
    assert data["settings"]["model"]["base_filters"] == 4 and data["meta"]["iteration"] == 7
    again = load_checkpoint(path)
    for key, value in state.teacher.state_dict().items():
        assert torch.equal(again["state"]["teacher"][key], value)


def test_rng_state_round_trip():
    saved = rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(saved)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def test_inference_model_is_the_teacher_in_eval_mode(tmp_path, state):
    run = tmp_path / "run"
    save_checkpoint(run / "checkpoints" / "last.pt", state_to_dict(state), SETTINGS,
                    {"classes": [0, 1]})
    model, settings, meta = load_inference_model(run)
    assert not model.training and settings == SETTINGS and meta["classes"] == [0, 1]
    for key, value in state.teacher.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    with pytest.raises(CheckpointError, match="--val"):
        resolve_checkpoint(run, "best")
    copy_checkpoint(run / "checkpoints" / "last.pt", run / "checkpoints" / "best.pt")
    assert resolve_checkpoint(run, "best") == run / "checkpoints" / "best.pt"
    assert resolve_checkpoint(run / "checkpoints" / "last.pt") == run / "checkpoints" / "last.pt"


def test_errors_are_one_line(tmp_path, state):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.pt")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable") as err:
        load_checkpoint(junk)
    assert "\n" not in str(err.value)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a crlnseg checkpoint"):
        load_checkpoint(foreign)
    future = tmp_path / "future.pt"
    save_checkpoint(future, state_to_dict(state), SETTINGS, {})
    data = torch.load(future, weights_only=True)
    data["format_version"] = FORMAT_VERSION + 1
    torch.save(data, future)
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(future)
    with pytest.raises(CheckpointError, match="no such run"):
        resolve_checkpoint(tmp_path / "nope")
