"""Validation during training scores the run the way `crlnseg predict` will segment with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from crlnseg.config import resolve_settings
from crlnseg.data.manifest import load_manifest
from crlnseg.inference.choice import apply_choice, check_choice, choose, variant_name
from crlnseg.inference.postprocess import keep_largest_component
from crlnseg.inference.predictor import Predictor
from crlnseg.method.crln import build_model
from crlnseg.metrics import dice
from crlnseg.prepare import prepare_dataset
from crlnseg.settings import PredictSettings, PrepareSettings
from crlnseg.synthetic import generate_dataset
from crlnseg.train.validation import blending, validate


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


def test_every_candidate_scores_as_predict_and_the_best_is_chosen(manifest) -> None:
    settings = resolve_settings(overrides=[
        "model.base_filters=4", "model.prototypes_per_class=2", "model.prototype_dim=4",
        "train.patch=16,16,16", "train.amp=false"])
    torch.manual_seed(1)
    model = build_model(settings).eval()
    result = validate(model, manifest, settings, torch.device("cpu"), iteration=7)
    scores = result.choice["val_dice"]
    assert set(scores) == {"sigma 1/8", "sigma 1/3", "sigma 1/8 + largest", "sigma 1/3 + largest"}
    for sigma in (1 / 8, 1 / 3):
        for largest in (False, True):
            predictor = Predictor(model, PredictSettings(device="cpu", sigma_scale=sigma,
                                                         keep_largest=largest),
                                  settings.train.patch, PrepareSettings(), 1, ["bg", "fg"])
            dices = []
            for case in manifest.cases:
                probs = predictor.probabilities(np.array(manifest.image(case.id)))
                mask = probs.argmax(0).numpy().astype(np.uint8)
                if predictor.settings.keep_largest:
                    mask = keep_largest_component(mask, [1])
                dices.append(dice(mask, np.asarray(manifest.label(case.id))))
            assert scores[variant_name(sigma, largest)] == pytest.approx(np.mean(dices), abs=1e-5)
    best = max(scores.values())
    chosen = variant_name(result.choice["sigma_scale"], result.choice["keep_largest"])
    assert scores[chosen] == best and result.choice["iteration"] == 7
    assert result.dice == pytest.approx(scores["sigma 1/8"], abs=1e-6)
    assert result.dice_largest == pytest.approx(scores["sigma 1/8 + largest"], abs=1e-6)


def test_choose_prefers_the_default_on_ties() -> None:
    tie = {(1 / 8, False): 0.8, (1 / 3, False): 0.8, (1 / 8, True): 0.8}
    assert choose(tie)["sigma_scale"] == 1 / 8 and not choose(tie)["keep_largest"]
    better = {(1 / 8, False): 0.8, (1 / 3, False): 0.79, (1 / 3, True): 0.81}
    assert choose(better)["sigma_scale"] == 1 / 3 and choose(better)["keep_largest"]


def test_a_choice_applies_only_with_the_blending_it_was_scored_with() -> None:
    uniform = choose({(None, False): 0.7, (None, True): 0.8})
    assert uniform["blend"] == "uniform"
    gauss, note = apply_choice(PredictSettings(), uniform)
    assert (gauss.sigma_scale, gauss.keep_largest) == (1 / 8, False) and "not using" in note
    strided, note = apply_choice(PredictSettings(mode="uniform", stride=(4, 4, 4)), uniform)
    assert strided.keep_largest and "largest component kept" in note


def test_an_explicit_sigma_outside_the_candidates_keeps_the_chosen_post_processing() -> None:
    choice = choose({(1 / 8, False): 0.7, (1 / 3, False): 0.6, (1 / 8, True): 0.8,
                     (1 / 3, True): 0.9})
    s, _ = apply_choice(PredictSettings(sigma_scale=0.25), choice)
    assert (s.sigma_scale, s.keep_largest) == (0.25, True)
    s, _ = apply_choice(PredictSettings(sigma_scale=1 / 8), choice)  # best with 1/8: largest
    assert (s.sigma_scale, s.keep_largest) == (1 / 8, True)
    s, note = apply_choice(PredictSettings(keep_largest=False), choice)  # best without: 1/8
    assert (s.sigma_scale, s.keep_largest) == (1 / 8, False) and note is None


def test_damaged_choices_are_named() -> None:
    good = choose({(1 / 8, False): 0.7, (1 / 3, True): 0.8})
    assert check_choice(good) is None and check_choice(None) is None
    assert "blending" in check_choice({"sigma_scale": "x"})
    assert "bad score" in check_choice({**good, "scores": [["x", True, 0.8]]})
    assert "bad score" in check_choice({**good, "scores": [[-2.0, True, 0.8]]})


def test_explicit_settings_beat_the_runs_choice() -> None:
    choice = choose({(1 / 8, False): 0.7, (1 / 3, True): 0.8})
    tuned, note = apply_choice(PredictSettings(), choice)
    assert (tuned.sigma_scale, tuned.keep_largest) == (1 / 3, True) and "sigma 1/3" in note
    plain, note = apply_choice(PredictSettings(tuned=False), choice)
    assert (plain.sigma_scale, plain.keep_largest) == (1 / 8, False) and note is None
    mixed, _ = apply_choice(PredictSettings(sigma_scale=0.25, keep_largest=False), choice)
    assert (mixed.sigma_scale, mixed.keep_largest) == (0.25, False)
    untrained, note = apply_choice(PredictSettings(), None)  # a run without --val
    assert (untrained.sigma_scale, untrained.keep_largest) == (1 / 8, False) and note is None


def test_blending_follows_predict_defaults() -> None:
    untuned = apply_choice(PredictSettings(), None)[0]
    assert blending(None) == {"blend": "gaussian", "overlap": untuned.overlap,
                              "sigma_scale": untuned.sigma_scale}
    assert blending((18, 18, 4)) == {"blend": "uniform", "stride": (18, 18, 4)}
