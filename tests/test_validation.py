"""Validation during training scores the run the way `crlnseg predict` will segment with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crlnseg.config import resolve_settings
from crlnseg.data.manifest import load_manifest
from crlnseg.inference.postprocess import keep_largest_component
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
    result = validate(model, manifest, settings, torch.device("cpu"))

    predict = (PredictSettings(device="cpu", mode="uniform", stride=stride) if stride
               else PredictSettings(device="cpu"))
    predictor = Predictor(model, predict, settings.train.patch, PrepareSettings(), 1,
                          ["background", "fg"])
    largest = []
    for case in manifest.cases:
        probs = predictor.probabilities(np.array(manifest.image(case.id)))
        mask = probs.argmax(0).numpy().astype(np.uint8)
        label = np.asarray(manifest.label(case.id))
        assert result.per_case[case.id] == pytest.approx(dice(mask, label), abs=1e-6)
        largest.append(dice(keep_largest_component(mask, [1]), label))
    assert result.dice == pytest.approx(np.mean(list(result.per_case.values())))
    assert result.dice_largest == pytest.approx(np.mean(largest), abs=1e-6)


def test_blending_follows_predict_defaults() -> None:
    assert blending(None) == {"blend": "gaussian", "overlap": PredictSettings().overlap,
                              "sigma_scale": PredictSettings().sigma_scale}
    assert blending((18, 18, 4)) == {"blend": "uniform", "stride": (18, 18, 4)}
