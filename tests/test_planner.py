"""The plan from the dataset fingerprint: rules, CT normalisation, application to settings."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crlnseg.cli.app import app
from crlnseg.config import resolve_settings
from crlnseg.data.discovery import discover_cases
from crlnseg.data.planner import (
    VOXEL_BUDGET,
    Fingerprint,
    apply,
    ct_foreground,
    plan,
    plan_folders,
)
from crlnseg.data.preprocessing import preprocess
from crlnseg.io.readers import read_image, read_label
from crlnseg.method.crln import build_model
from crlnseg.settings import PRESETS, RunSettings

runner = CliRunner()


def check_patch_rules(p, median_shape, device="cpu"):
    patch, strides = p.values["train.patch"], p.values["model.strides"]
    total = [math.prod(level[a] for level in strides) for a in range(3)]
    assert all(s % t == 0 and s >= t for s, t in zip(patch, total, strict=True))
    assert math.prod(patch) <= VOXEL_BUDGET[device]
    # At most the median shape, rounded up to the pooling (as nnU-Net pads its patch).
    assert all(s <= math.ceil(n / t) * t for s, n, t in zip(patch, median_shape, total,
                                                              strict=True))


def test_isotropic_dataset():
    fp = Fingerprint([(1.0, 1.0, 1.0)] * 3 + [(1.2, 1.2, 1.2)] * 2, [(160, 160, 120)] * 5, 2, 3)
    p = plan(fp)
    assert p.values["prepare.target_spacing"] == (1.0, 1.0, 1.0)  # per-axis median
    assert p.values["model.strides"] == [(2, 2, 2)] * 4
    assert p.values["model.kernels"] == [(3, 3, 3)] * 5
    assert p.values["prepare.normalize"] == "zscore"
    check_patch_rules(p, (160, 160, 120))
    # Aspect kept: 160:160:120 -> X = Y >= Z; the GPU budget gives a larger patch.
    x, y, z = p.values["train.patch"]
    assert x == y >= z
    assert math.prod(plan(fp, "cuda").values["train.patch"]) > math.prod((x, y, z))
    assert all(p.reasons[k] for k in p.values)


def test_anisotropic_dataset_takes_the_10th_percentile_and_skips_pooling_z():
    spacings = [(0.8, 0.8, 4.0)] * 6 + [(0.7, 0.7, 5.0)] * 2 + [(0.8, 0.8, 2.5)] * 2
    fp = Fingerprint(spacings, [(256, 256, 40)] * 10, 4, 6)
    p = plan(fp)
    target = p.values["prepare.target_spacing"]
    assert target[:2] == (0.8, 0.8)
    assert target[2] == pytest.approx(np.percentile([s[2] for s in spacings], 10))
    assert "anisotropic" in p.reasons["prepare.target_spacing"]
    # 0.8 x 0.8 x 2.5...4 mm: Z is not pooled until X/Y have caught up.
    strides = p.values["model.strides"]
    assert strides[0] == (2, 2, 1) and strides[-1] == (2, 2, 2)
    assert p.values["model.kernels"][0] == (3, 3, 1)
    median = np.median(np.asarray([(256, 256, 40)] * 10) * np.asarray(spacings) / target, axis=0)
    check_patch_rules(p, median)


def test_anisotropic_plan_builds_a_model_with_matching_shapes():
    fp = Fingerprint([(0.8, 0.8, 4.0)] * 4, [(96, 96, 16)] * 4, 2, 2)
    p = plan(fp)
    strides = p.values["model.strides"]
    assert strides[0] == (2, 2, 1) and strides[1] == (2, 2, 1)
    settings = apply(RunSettings(model={"base_filters": 4, "prototypes_per_class": 2,
                                        "prototype_dim": 8}), p)
    assert settings.model.strides == tuple(tuple(s) for s in strides)
    model = build_model(settings).eval()
    patch = settings.train.patch
    with torch.no_grad():
        out = model(torch.randn(2, 1, *patch))
    assert out.logits.shape == (2, 2, *patch) and out.relation.shape == (2, 2, *patch)


def _ct_case(folder: Path, i: int, rng) -> None:
    shape = (20, 18, 10)
    label = np.zeros(shape, np.uint8)
    label[5:12, 4:11, 2:8] = 1  # 294 voxels: every one is sampled
    image = rng.normal(-600, 200, shape)
    image[label > 0] = rng.normal(40 + 30 * i, 60, int(label.sum()))
    image[0, 0, 0] = 3000  # a metal streak far outside the foreground range
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    for sub, arr, dtype in (("imagesTr", image, np.float32), ("labelsTr", label, np.uint8)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        name = f"ct_{i:03d}_0000.nii.gz" if sub == "imagesTr" else f"ct_{i:03d}.nii.gz"
        nib.save(nib.Nifti1Image(arr.astype(dtype), affine), folder / sub / name)


def test_ct_normalisation_follows_its_formula(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(3):
        _ct_case(tmp_path, i, rng)
    (tmp_path / "dataset.json").write_text(json.dumps(
        {"channel_names": {"0": "CT"}, "labels": {"background": 0, "organ": 1},
         "numTraining": 3, "file_ending": ".nii.gz"}))
    p = plan_folders(RunSettings(), [tmp_path], "cpu")
    assert p.values["prepare.normalize"] == "ct" and p.fingerprint["modality"] == "ct"
    cases = discover_cases(tmp_path)
    fg = np.concatenate([read_image(c.images[0]).array[read_label(c.label).array > 0]
                         for c in cases]).astype(np.float64)
    lo, hi = np.percentile(fg, (0.5, 99.5))
    assert p.values["prepare.ct_window"] == pytest.approx((lo, hi))
    assert p.values["prepare.ct_stats"] == pytest.approx((fg.mean(), fg.std()))
    settings = apply(RunSettings(), p)
    image = read_image(cases[1].images[0])
    out = preprocess(image, None, settings.prepare).image[0]
    expected = (np.clip(image.array, lo, hi) - fg.mean()) / fg.std()
    np.testing.assert_allclose(out, expected.astype(np.float32), rtol=1e-4, atol=1e-4)
    # Without the dataset's word, or with --modality other, CT is not assumed.
    (tmp_path / "dataset.json").unlink()
    assert plan_folders(RunSettings(), [tmp_path], "cpu").values["prepare.normalize"] == "zscore"
    forced = resolve_settings(options={"prepare": {"modality": "ct"}})
    assert plan_folders(forced, [tmp_path], "cpu").values["prepare.normalize"] == "ct"
    assert ct_foreground(cases)["mean"] == pytest.approx(fg.mean())


def test_given_values_win_and_the_rest_follows_them():
    fp = Fingerprint([(0.8, 0.8, 4.0)] * 4, [(256, 256, 40)] * 4, 2, 2)
    settings = resolve_settings(options={"prepare": {"target_spacing": (1.0, 1.0, 1.0)}})
    from crlnseg.data.planner import explicit

    p = plan(fp, fixed=explicit(settings))
    assert p.values["prepare.target_spacing"] == (1.0, 1.0, 1.0)
    assert p.reasons["prepare.target_spacing"].startswith("set")
    assert p.values["model.strides"] == [(2, 2, 2)] * 4  # follows the given isotropic spacing
    la8 = resolve_settings("la8")
    planned = apply(la8, plan(fp, "cuda", fixed=explicit(la8)))
    assert planned.train.patch == PRESETS["la8"]["train"]["patch"]
    assert planned.method.xi == la8.method.xi


def test_the_budgets_give_the_presets_patches_on_la():
    """Half-resolution LA on the CPU: the cpu preset's patch; full resolution on a GPU: la8's."""
    half = Fingerprint([(1.25,) * 3] * 80, [(96, 72, 44)] * 80, 8, 72)
    assert plan(half, "cpu").values["train.patch"] == PRESETS["cpu"]["train"]["patch"]
    full = Fingerprint([(0.625,) * 3] * 80, [(224, 224, 88)] * 80, 8, 72)
    assert plan(full, "cuda").values["train.patch"] == PRESETS["la8"]["train"]["patch"]


def test_la_presets_on_la_like_data_give_their_settings():
    """la8 / la16 on isotropic 0.625 mm LA scans: the preset's patch, the default topology."""
    fp = Fingerprint([(0.625,) * 3] * 80, [(224, 224, 88)] * 80, 8, 72)
    for name in ("la8", "la16"):
        preset = resolve_settings(name)
        from crlnseg.data.planner import explicit

        planned = apply(preset, plan(fp, "cuda", fixed=explicit(preset)))
        today = RunSettings.model_validate({**preset.model_dump(mode="json"),
                                            "prepare": {"target_spacing": (0.625,) * 3}})
        assert planned == today


def _write(folder: Path, n: int, spacing, labels: bool, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    for i in range(n):
        shape = (48, 48, 8)
        label = np.zeros(shape, np.uint8)
        label[14:34, 12:30, 2:6] = 1
        image = (label * 2.0 + rng.normal(0, 0.5, shape)).astype(np.float32)
        affine = np.diag([*spacing, 1.0])
        (folder / "images").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(image, affine), folder / "images" / f"c{i}.nii.gz")
        if labels:
            (folder / "labels").mkdir(exist_ok=True)
            nib.save(nib.Nifti1Image(label, affine), folder / "labels" / f"c{i}.nii.gz")
    return folder


def test_train_applies_and_stores_the_plan_and_predict_follows_it(tmp_path):
    lab = _write(tmp_path / "lab", 2, (0.8, 0.8, 4.0), True, 0)
    unl = _write(tmp_path / "unl", 2, (0.8, 0.8, 4.0), False, 1)
    tiny = ["--base-filters", "4", "--batch-labelled", "1", "--batch-unlabelled", "1",
            "--iterations", "2", "--device", "cpu",
            "--set", "model.prototypes_per_class=2", "--set", "model.prototype_dim=4",
            "--set", "method.anchors=4", "--set", "method.negatives=4",
            "--set", "train.num_workers=0", "--set", "train.checkpoint_every=2"]
    shown = runner.invoke(app, ["train", "--labelled", str(lab), "--unlabelled", str(unl),
                                *tiny, "--print-config"])
    assert shown.exit_code == 0, shown.output
    assert "model.strides" in shown.stderr and "2 x 2 x 1" in shown.stderr
    printed = json.loads(shown.stdout)
    assert printed["model"]["strides"][0] == [2, 2, 1]
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--labelled", str(lab), "--unlabelled", str(unl),
                                 "-o", str(run), *tiny])
    assert result.exit_code == 0, result.output
    saved = json.loads((run / "settings.json").read_text())
    assert saved["model"]["strides"] == printed["model"]["strides"]
    assert saved["train"]["patch"] == printed["train"]["patch"]
    assert saved["prepare"]["target_spacing"] == [0.8, 0.8, 4.0]
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["meta"]["plan"]["values"]["model.strides"][0] == [2, 2, 1]
    assert "reasons" in ckpt["meta"]["plan"]
    # A scan at another spacing is resampled to the planned spacing and back.
    other = _write(tmp_path / "new", 1, (0.5, 0.5, 3.0), False, 5) / "images" / "c0.nii.gz"
    out = tmp_path / "mask.nii.gz"
    predicted = runner.invoke(app, ["predict", str(other), "-o", str(out), "-m", str(run),
                                    "--device", "cpu"])
    assert predicted.exit_code == 0, predicted.output
    assert nib.load(str(out)).shape == (48, 48, 8)


def test_plan_command(tmp_path):
    lab = _write(tmp_path / "lab", 2, (0.8, 0.8, 4.0), True, 0)
    unl = _write(tmp_path / "unl", 3, (0.7, 0.7, 5.0), False, 1)
    result = runner.invoke(app, ["plan", str(lab), str(unl), "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["fingerprint"]["labelled"] == 2 and data["fingerprint"]["unlabelled"] == 3
    assert data["plan"]["prepare.target_spacing"]["value"][2] == pytest.approx(
        np.percentile([4.0, 4.0, 5.0, 5.0, 5.0], 10))
    assert all(v["reason"] for v in data["plan"].values())
    table = runner.invoke(app, ["plan", str(lab), "--device", "cpu", "--preset", "cpu"])
    assert table.exit_code == 0 and "train.patch" in table.stdout
    assert "64 x 64 x 32" in table.stdout and "set (preset" in table.stdout
    bad = runner.invoke(app, ["plan", str(tmp_path / "missing")])
    assert bad.exit_code == 2 and "missing" in bad.output


def test_the_coarse_axis_never_becomes_finer_than_the_others():
    """A few thin-slice cases must not turn a 5 mm axis into a 0.6 mm one (nnU-Net's limit)."""
    fp = Fingerprint([(0.8, 0.8, 5.0)] * 70 + [(0.8, 0.8, 0.6)] * 10, [(256, 256, 40)] * 80, 8, 72)
    assert plan(fp).values["prepare.target_spacing"] == (0.8, 0.8, 0.8)


def test_normalize_ct_given_still_gets_the_dataset_statistics(tmp_path):
    rng = np.random.default_rng(0)
    for i in range(2):
        _ct_case(tmp_path, i, rng)
    given = resolve_settings(options={"prepare": {"normalize": "ct"}})
    p = plan_folders(given, [tmp_path], "cpu")
    assert p.values["prepare.normalize"] == "ct"
    assert p.reasons["prepare.normalize"].startswith("set")
    assert "prepare.ct_stats" in p.values and "prepare.ct_window" in p.values
    table = dict((k, v) for k, v, _ in p.table())
    assert " x " not in table["prepare.ct_window"]


def test_a_huge_claimed_shape_plans_within_the_budget_without_enumerating_it():
    fp = Fingerprint([(1.0, 1.0, 1.0)], [(30000, 30000, 30000)], 1, 0)
    p = plan(fp, "cuda")
    check_patch_rules(p, (30000, 30000, 30000), "cuda")


def test_prepare_orientation_option_keeps_the_array_order(tmp_path):
    lab = _write(tmp_path / "lab", 1, (0.8, 0.8, 4.0), True, 0)
    flipped = np.diag([-0.8, 0.8, 4.0, 1.0])  # X runs towards L: canonical order flips it
    img = nib.load(str(lab / "images" / "c0.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), flipped), str(lab / "images" / "c0.nii.gz"))
    lbl = nib.load(str(lab / "labels" / "c0.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(lbl.dataobj), flipped), str(lab / "labels" / "c0.nii.gz"))
    from crlnseg.data.manifest import load_manifest

    orders = {}
    for way in ("canonical", "input"):
        out = tmp_path / f"cache_{way}"
        result = runner.invoke(app, ["prepare", str(lab), "-o", str(out), "--orientation", way])
        assert result.exit_code == 0, result.output
        orders[way] = load_manifest(out).cases[0].orientation["flips"]
    assert orders == {"canonical": [True, False, False], "input": [False, False, False]}


def test_a_patch_for_anisotropic_strides_alone_names_model_strides():
    with pytest.raises(Exception, match="needs model.strides too"):
        resolve_settings(options={"train": {"patch": (128, 128, 8)}})
    given = resolve_settings(options={"train": {"patch": (128, 128, 8)},
                                      "model": {"strides": [[2, 2, 1]] * 2 + [[2, 2, 2]] * 2}})
    assert given.train.patch == (128, 128, 8)
