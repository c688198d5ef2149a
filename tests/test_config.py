"""Settings resolution: precedence, --set parsing, files, presets and one-line errors."""

from __future__ import annotations

import json

import pytest

from crlnseg.config import deep_merge, parse_set, resolve_settings
from crlnseg.errors import ConfigError
from crlnseg.settings import PRESETS, RunSettings


def test_defaults_are_the_reference():
    s = resolve_settings()
    assert s == RunSettings()
    assert s.train.patch == (112, 112, 80) and s.optim.lr == 2.5e-3
    assert s.model.prototypes_per_class == 16


def test_precedence_preset_file_options_set(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  iterations: 50\n  seed: 7\nmethod:\n  xi: 0.2\n")
    s = resolve_settings("cpu", cfg, {"train": {"seed": 9, "iterations": None}},
                         ["method.xi=0.4"])
    assert s.model.base_filters == PRESETS["cpu"]["model"]["base_filters"]  # preset
    assert s.train.iterations == 50  # file beats preset; None option does not hide it
    assert s.train.seed == 9  # option beats file
    assert s.method.xi == 0.4  # --set beats everything


def test_base_layer_is_below_preset():
    base = RunSettings(train={"iterations": 5, "seed": 3}).model_dump(mode="json")
    s = resolve_settings(None, None, {"train": {"iterations": 8}}, [], base=base)
    assert (s.train.iterations, s.train.seed) == (8, 3)


def test_json_config(tmp_path):
    cfg = tmp_path / "run.json"
    cfg.write_text(json.dumps({"train": {"patch": [32, 32, 16]}}))
    assert resolve_settings(config=cfg).train.patch == (32, 32, 16)


def test_parse_set_values():
    out = parse_set(["train.patch=16,32,48", "train.amp=false", "model.backbone=unet",
                     "train.val_stride=[8, 8, 4]", "prepare.target_spacing=null"])
    assert out == {"train": {"patch": [16, 32, 48], "amp": False, "val_stride": [8, 8, 4]},
                   "model": {"backbone": "unet"}, "prepare": {"target_spacing": None}}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


@pytest.mark.parametrize("sets, words", [
    (["method.method=foo"], ["method.method", "'crln', 'mean-teacher' or 'supervised'"]),
    (["train.bogus=1"], ["train.bogus", "iterations"]),
    (["train.iterations=0"], ["train.iterations", "greater than or equal to 1"]),
    (["train.patch=20,16,16"], ["train.patch", "multiple of 16"]),
    (["iterations"], ["section.key=value"]),
])
def test_errors_name_field_and_allowed(sets, words):
    with pytest.raises(ConfigError) as err:
        resolve_settings("cpu", overrides=sets)
    message = str(err.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_bad_preset_and_files(tmp_path):
    with pytest.raises(ConfigError, match="allowed: la8"):
        resolve_settings("nope")
    with pytest.raises(ConfigError, match="not found"):
        resolve_settings(config=tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        resolve_settings(config=bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        resolve_settings(config=listy)


def test_every_preset_validates():
    for name in PRESETS:
        resolve_settings(name)


@pytest.mark.parametrize("item, words", [
    ("train.patch=[16,16,16", ["--set", "train.patch=[16,16,16", "not valid YAML"]),
    ("train.patch=16,[16,16", ["--set", "element '[16'", "not valid YAML"]),
    ("train.patch={16", ["--set", "not valid YAML"]),
])
def test_malformed_set_values_are_config_errors(item, words):
    # They used to escape as yaml's ParserError (exit 1).
    with pytest.raises(ConfigError) as err:
        resolve_settings(overrides=[item])
    assert "\n" not in str(err.value) and all(w in str(err.value) for w in words), str(err.value)


def test_unreadable_config_files_name_the_option(tmp_path):
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("train:\n  iterations: 5 # d\xe9j\xe0\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"^--config .*latin.yaml: not UTF-8 text"):
        resolve_settings(config=latin)
    with pytest.raises(ConfigError, match=r"^--config .*: is a folder, not a settings file"):
        resolve_settings(config=tmp_path)


def test_settings_errors_drop_pydantics_value_error_prefix():
    with pytest.raises(ConfigError) as err:
        resolve_settings(overrides=["train.patch=17,16,16"])
    assert "Value error" not in str(err.value)
    assert str(err.value).endswith("each side must be a positive multiple of 16, got (17, 16, 16)")


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64])
def test_seed_outside_the_generators_range_is_refused(seed):
    # numpy's SeedSequence / torch.manual_seed used to fail at iteration 0 (exit 1).
    with pytest.raises(ConfigError, match="train.seed"):
        resolve_settings(overrides=[f"train.seed={seed}"])
    assert resolve_settings(overrides=[f"train.seed={2**63 - 1}"]).train.seed == 2**63 - 1
