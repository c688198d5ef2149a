"""Rectification and mu: mu stays in [0, 1]; mu = 1 gives the plain teacher prediction back."""

from __future__ import annotations

import torch

from crlnseg.method.crln import build_model, predict_logits
from crlnseg.method.rectification import pseudo_labels, rectify
from crlnseg.method.train_step import _mu_step
from crlnseg.settings import RunSettings
from crlnseg.train.state import init_state

TINY = {"model": {"base_filters": 4, "prototypes_per_class": 2, "prototype_dim": 8}}


def test_mu_one_returns_plain_prediction():
    logits = torch.randn(2, 3, 4, 4, 4)
    relation = torch.rand(2, 3, 4, 4, 4) * 10
    label, conf = pseudo_labels(rectify(logits, relation, torch.tensor(1.0)))
    plain_label, plain_conf = pseudo_labels(logits)
    assert torch.equal(label, plain_label) and torch.allclose(conf, plain_conf)
    assert not torch.equal(pseudo_labels(rectify(logits, relation, 0.0))[0], plain_label)


def test_model_mu_is_clamped_and_mu_one_predicts_plain():
    model = build_model(RunSettings.model_validate(TINY)).eval()
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        model.mu_raw.fill_(3.0)
        assert float(model.mu) == 1.0
        torch.testing.assert_close(predict_logits(model, x), model(x).logits)
        model.mu_raw.fill_(-2.0)
        assert float(model.mu) == 0.0


def test_mu_step_keeps_mu_in_unit_interval():
    settings = RunSettings.model_validate({**TINY, "method": {"mu_lr": 50.0}})
    state = init_state(settings, torch.device("cpu"))
    y = torch.randint(0, 2, (2, 8, 8, 8))
    onehot = torch.nn.functional.one_hot(y, 2).movedim(-1, 1).float()
    f = torch.zeros(2, 2, 8, 8, 8)
    # M pointing at the wrong class: mu should rise (distrust M) but never above 1.
    for _ in range(5):
        _mu_step(state, f, 5 * (1 - onehot), y)
        assert 0.0 <= float(state.student.mu_raw.detach()) <= 1.0
    assert float(state.student.mu_raw.detach()) == 1.0
    # M pointing at the right class: mu should fall (trust M) but never below 0.
    for _ in range(20):
        _mu_step(state, f, 5 * onehot, y)
        assert 0.0 <= float(state.student.mu_raw.detach()) <= 1.0
    assert float(state.student.mu_raw.detach()) < 0.5
