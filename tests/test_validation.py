"""Validation during training scores the run the way `crlnseg predict` will segment with it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from crlnseg.config import resolve_settings
from crlnseg.data.manifest import load_manifest
from crlnseg.inference.predictor import Predictor
from crlnseg.method.crln import build_model
from crlnseg.metrics import dice
from crlnseg.prepare import prepare_dataset
from crlnseg.settings import PredictSettings, PrepareSettings
from crlnseg.synthetic import generate_dataset
from crlnseg.validation import blending, validate


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("val")
    generate_dataset(root / "raw", n_labelled=2, n_unlabelled=0, n_test=0, shape=(40, 36, 28),
                     seed=3)
    prepare_dataset(root / "raw" / "labelled", root / "prepared", PrepareSettings())
    return load_manifest(root / "prepared")


@pytest.mark.parametrize("stride", [None, (8, 8, 4)])
def test_validation_dice_equals_predict_on_the_same_grid(manifest, stride) -> None:
    settings = resolve_settings(overrides=[
        "model.base_filters=4", "model.prototypes_per_class=2", "model.prototype_dim=4",
        "train.patch=16,16,16", "train.amp=false",
        *([f"train.val_stride={','.join(map(str, stride))}"] if stride else [])])
    torch.manual_seed(0)
    model = build_model(settings).eval()
    mean, per_case = validate(model, manifest, settings, torch.device("cpu"))

    predict = (PredictSettings(device="cpu", mode="uniform", stride=stride) if stride
               else PredictSettings(device="cpu"))
    predictor = Predictor(model, predict, settings.train.patch, PrepareSettings(), 1,
                          ["background", "fg"])
    for case in manifest.cases:
        probs = predictor.probabilities(np.array(manifest.image(case.id)))
        expected = dice(probs.argmax(0).numpy(), np.asarray(manifest.label(case.id)))
        assert per_case[case.id] == pytest.approx(expected, abs=1e-6)
    assert mean == pytest.approx(np.mean(list(per_case.values())))


def test_blending_follows_predict_defaults() -> None:
    assert blending(None) == {"blend": "gaussian", "overlap": PredictSettings().overlap,
                              "sigma_scale": PredictSettings().sigma_scale}
    assert blending((18, 18, 4)) == {"blend": "uniform", "stride": (18, 18, 4)}
