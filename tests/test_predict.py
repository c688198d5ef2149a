"""Predictor and `crlnseg predict`: geometry, small volumes, TTA / batch invariance, bad inputs."""

from __future__ import annotations

import os

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from inference_helpers import StandIn, blob_image, make_tiny_run, oblique_affine, write_nifti
from typer.testing import CliRunner

from crlnseg.cli.app import app
from crlnseg.errors import ConfigError, DataError
from crlnseg.inference.predictor import Predictor
from crlnseg.io import Geometry, Volume
from crlnseg.metrics import dice
from crlnseg.settings import PredictSettings, PrepareSettings

runner = CliRunner()


def stand_in_predictor(**settings) -> Predictor:
    prepare = settings.pop("prepare", PrepareSettings())
    s = PredictSettings(device="cpu", **settings)
    return Predictor(StandIn(), s, (8, 8, 8), prepare, channels=1, classes=["bg", "fg"])


def blob_volume(shape=(20, 18, 12), seed=0) -> tuple[Volume, np.ndarray]:
    image, label = blob_image(shape, seed)
    return Volume(image, Geometry(spacing=(0.7, 1.3, 2.5))), label


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


# -- the predictor with a stand-in network -------------------------------------------------------
def test_predict_volume_segments_and_rectification_adds_the_prior():
    volume, label = blob_volume()
    rect = stand_in_predictor().predict_volume(volume)
    raw = stand_in_predictor(rectify=False).predict_volume(volume, save_probabilities=True)
    assert rect.mask.shape == label.shape and rect.mask.dtype == np.uint8
    assert dice(raw.mask, label) > 0.9
    # M favours the foreground by (1 - mu) * shift = 1 logit: the rectified mask grows.
    assert rect.mask.sum() > raw.mask.sum() and np.all(rect.mask >= raw.mask)
    assert raw.probabilities.shape == (2, *label.shape)
    np.testing.assert_allclose(raw.probabilities.sum(0), 1.0, atol=1e-5)
    assert rect.probabilities is None and rect.seconds > 0


@pytest.mark.parametrize("mode", ["gaussian", "uniform"])
def test_tta_and_batch_size_give_the_same_mask(mode):
    volume, _ = blob_volume((23, 17, 11), seed=1)
    runs = [stand_in_predictor(mode=mode, tta=tta, batch_size=b, overlap=0.5)
            .predict_volume(volume, save_probabilities=True)
            for tta, b in [(False, 1), (False, 5), (True, 1), (True, 3)]]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.mask, runs[0].mask)
        np.testing.assert_allclose(other.probabilities, runs[0].probabilities, atol=1e-5)


def test_resampled_and_cropped_case_comes_back_on_the_input_grid():
    image, label = blob_image((26, 22, 14), seed=2)
    image = np.pad(image - image.min() + 1, ((3, 2), (0, 4), (1, 0)))  # zero border: cropped
    label = np.pad(label, ((3, 2), (0, 4), (1, 0)))
    volume = Volume(image, Geometry(spacing=(0.8, 0.8, 2.0)))
    prepare = PrepareSettings(target_spacing=(1.2, 1.2, 1.2), crop_nonzero=True)
    pred = stand_in_predictor(prepare=prepare, rectify=False).predict_volume(volume)
    assert pred.mask.shape == image.shape
    assert dice(pred.mask, label) > 0.85
    assert not pred.mask[:3].any() and not pred.mask[:, -4:].any()  # outside the crop box


def test_keep_largest_and_channel_check():
    image, _ = blob_image((24, 16, 12), seed=3)
    image[1:4, 1:4, 1:4] = 150.0  # a second, small bright component
    volume = Volume(image, Geometry())
    plain = stand_in_predictor(rectify=False).predict_volume(volume).mask
    kept = stand_in_predictor(rectify=False, keep_largest=True).predict_volume(volume).mask
    assert plain[2, 2, 2] == 1 and kept[2, 2, 2] == 0
    assert kept.sum() > 0.8 * plain.sum()
    with pytest.raises(DataError, match="2 channel"):
        stand_in_predictor().predict_volume(Volume(np.stack([image, image]), Geometry()))


# -- the command with a real (tiny, untrained) run ----------------------------------------------
def test_mask_keeps_anisotropic_oblique_geometry(tmp_path, tiny_run):
    image, _ = blob_image((20, 18, 12))  # Z = 12 < patch 16: padded, then cropped back
    src = write_nifti(tmp_path / "scan.nii.gz", image)
    out = tmp_path / "out" / "mask.nii.gz"
    result = runner.invoke(app, ["predict", str(src), "-o", str(out), "-m", str(tiny_run),
                                 "--device", "cpu"])
    assert result.exit_code == 0, result.output
    case, seconds, *counts = result.stdout.strip().split("\t")
    assert case == "scan" and float(seconds) > 0
    assert [c.split("=")[0] for c in counts] == ["background", "foreground"]
    assert sum(int(c.split("=")[1]) for c in counts) == image.size

    ref, got = sitk.ReadImage(str(src)), sitk.ReadImage(str(out))
    assert got.GetSize() == ref.GetSize() == (20, 18, 12)
    np.testing.assert_allclose(got.GetSpacing(), ref.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(got.GetOrigin(), ref.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(got.GetDirection(), ref.GetDirection(), atol=1e-6)
    assert got.GetPixelID() == sitk.sitkUInt8
    nref, ngot = nib.load(str(src)), nib.load(str(out))
    np.testing.assert_allclose(ngot.affine, oblique_affine(), atol=1e-5)
    np.testing.assert_allclose(ngot.header.get_sform(), nref.header.get_sform(), atol=1e-6)
    np.testing.assert_allclose(ngot.header.get_qform(), nref.header.get_qform(), atol=1e-6)
    assert ngot.shape == nref.shape and ngot.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(ngot.dataobj))) <= {0, 1}


def test_predict_uses_the_runs_validated_choice_unless_told_otherwise(tmp_path):
    from crlnseg.inference.choice import choose

    choice = choose({(1 / 8, False): 0.70, (1 / 3, True): 0.75}, iteration=9)
    run = make_tiny_run(tmp_path / "run", inference=choice)
    src = write_nifti(tmp_path / "scan.nii.gz", blob_image((30, 26, 20))[0])

    def predict(name: str, *flags: str) -> tuple[np.ndarray, str]:
        out = tmp_path / name / "m.nii.gz"
        result = runner.invoke(app, ["predict", str(src), "-o", str(out), "-m", str(run),
                                     "--device", "cpu", "--save-probabilities", *flags])
        assert result.exit_code == 0, result.output
        with np.load(out.with_name("m_probabilities.npz")) as npz:
            return npz["probabilities"].astype(np.float32), result.stderr

    tuned, log = predict("tuned")
    assert "sigma 1/3, largest component kept (validation Dice 0.7500 at iteration 9)" in log
    assert "--no-tuned" in log
    explicit, log = predict("explicit", "--sigma", str(1 / 3), "--keep-largest")
    np.testing.assert_array_equal(tuned, explicit)
    assert "run's choice" not in log
    plain, _ = predict("plain", "--no-tuned")
    builtin, _ = predict("builtin", "--sigma", "0.125", "--no-keep-largest")
    np.testing.assert_array_equal(plain, builtin)
    assert not np.allclose(tuned, plain)  # the sigma reached the blending
    # Overriding one half re-chooses the other among the candidates that agree with it: without
    # the largest component, 1/8 scored best (0.70; 1/3 alone was not better).
    unkept, _ = predict("unkept", "--no-keep-largest")
    np.testing.assert_array_equal(unkept, builtin)
    # A choice scored with Gaussian blending is not applied to the literature's uniform stride.
    _, log = predict("stride", "--stride", "8", "8", "8")
    assert "not using the run's validated choice" in log


def test_folder_input_writes_one_mask_per_case(tmp_path, tiny_run):
    for i in range(2):
        write_nifti(tmp_path / "in" / f"case{i}.nii.gz", blob_image((18, 17, 16), seed=i)[0])
    out = tmp_path / "masks"
    args = ["predict", str(tmp_path / "in"), "-o", str(out), "-m", str(tiny_run),
            "--device", "cpu", "--save-probabilities", "--stride", "4", "4", "8"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert [line.split("\t")[0] for line in result.stdout.splitlines()] == ["case0", "case1"]
    assert sorted(p.name for p in out.iterdir()) == [
        "case0.nii.gz", "case0_probabilities.npz", "case1.nii.gz", "case1_probabilities.npz"]
    with np.load(out / "case1_probabilities.npz") as npz:
        probs = npz["probabilities"]
        assert probs.shape == (2, 18, 17, 16) and list(npz["classes"]) == ["background",
                                                                             "foreground"]
    mask = np.asarray(nib.load(str(out / "case1.nii.gz")).dataobj)
    np.testing.assert_array_equal(mask, np.argmax(probs.astype(np.float32), axis=0))


def _fails(args: list[str], text: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    # Progress lines may precede it; the error itself is one line, without a traceback.
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and text in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_bad_checkpoints_exit_2(tmp_path, tiny_run):
    src = write_nifti(tmp_path / "scan.nii.gz", blob_image()[0])
    base = ["predict", str(src), "-o", str(tmp_path / "m.nii.gz"), "--device", "cpu", "-m"]
    _fails(base + [str(tmp_path / "missing")], "no such run folder or checkpoint")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    _fails(base + [str(foreign)], "not a crlnseg checkpoint")
    data = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
    data["format_version"] = 999
    future = tmp_path / "future.pt"
    torch.save(data, future)
    _fails(base + [str(future)], "format version 999")
    for key, damage, text in [("settings", None, "no settings"), ("meta", None, "no meta"),
                              ("meta", {**data["meta"], "classes": ["a", "b", "c"]},
                               "3 classes in its meta, 2 in its model"),
                              ("meta", {**data["meta"], "inference": {"sigma_scale": "x"}},
                               "inference choice without a blending")]:
        broken = torch.load(tiny_run / "checkpoints" / "last.pt", weights_only=True)
        if damage is None:
            del broken[key]
        else:
            broken[key] = damage
        torch.save(broken, tmp_path / "broken.pt")
        _fails(base + [str(tmp_path / "broken.pt")], text)
    _fails(base + [str(tiny_run), "--checkpoint", "best"], "best.pt")
    assert not (tmp_path / "m.nii.gz").exists()


def test_sigma_option_reaches_the_predictor_and_is_validated(tmp_path, tiny_run):
    from crlnseg.cli.predict import predict_settings

    # Without a validated choice in the checkpoint: nnU-Net's 1/8.
    assert stand_in_predictor().settings.sigma_scale == pytest.approx(1 / 8)
    assert predict_settings(0.5, None, None, 2, False, "cpu", True, 0.25).sigma_scale == 0.25
    with pytest.raises(ConfigError, match="--sigma: only Gaussian"):  # would be ignored
        predict_settings(0.5, (4, 4, 4), None, 2, False, "cpu", True, 0.25)
    src = write_nifti(tmp_path / "scan.nii.gz", blob_image()[0])
    _fails(["predict", str(src), "-o", str(tmp_path / "m.nii.gz"), "-m", str(tiny_run),
            "--device", "cpu", "--sigma", "0"], "--sigma")
    assert not (tmp_path / "m.nii.gz").exists()
    volume, _ = blob_volume((23, 17, 11), seed=1)
    narrow, wide = (stand_in_predictor(sigma_scale=s, overlap=0.5)
                    .predict_volume(volume, save_probabilities=True).probabilities
                    for s in (0.125, 0.25))
    assert not np.allclose(narrow, wide)


def test_stride_outside_1_to_patch_is_refused(tmp_path, tiny_run):
    # A stride longer than the patch left voxels no patch covers (NaN probabilities, exit 0);
    # 0 divided by zero.
    src = write_nifti(tmp_path / "scan.nii.gz", blob_image((40, 20, 20))[0])
    base = ["predict", str(src), "-o", str(tmp_path / "m.nii.gz"), "-m", str(tiny_run),
            "--device", "cpu", "--stride"]
    _fails(base + ["17", "4", "4"], "at most the patch size (16, 16, 16)")
    _fails(base + ["0", "4", "4"], "at least 1")
    assert not (tmp_path / "m.nii.gz").exists()
    from crlnseg.config import resolve_settings

    with pytest.raises(ConfigError, match="val_stride: each side must be at most"):
        resolve_settings(overrides=["train.patch=16,16,16", "train.val_stride=18,18,4"])


def test_bad_images_exit_2(tmp_path, tiny_run):
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"this is not a NIfTI file")
    run = ["-m", str(tiny_run), "--device", "cpu"]
    _fails(["predict", str(bad), "-o", str(tmp_path / "o.nii.gz"), *run], "bad.nii.gz")
    image = blob_image()[0]
    channels = [write_nifti(tmp_path / f"two_{c:04d}.nii.gz", image) for c in range(2)]
    _fails(["predict", *map(str, channels), "-o", str(tmp_path / "o.nii.gz"), *run],
           "trained on 1 channel")
    assert not (tmp_path / "o.nii.gz").exists()


def test_existing_output_refused_before_anything_is_written(tmp_path, tiny_run):
    for i in range(2):
        write_nifti(tmp_path / "in" / f"case{i}.nii.gz", blob_image(seed=i)[0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "case1.nii.gz").write_bytes(b"precious")
    args = ["predict", str(tmp_path / "in"), "-o", str(out), "-m", str(tiny_run),
            "--device", "cpu"]
    _fails(args, "--overwrite")
    assert not (out / "case0.nii.gz").exists()
    assert (out / "case1.nii.gz").read_bytes() == b"precious"
    result = runner.invoke(app, args + ["--overwrite"])
    assert result.exit_code == 0, result.output
    assert nib.load(str(out / "case1.nii.gz")).shape == (20, 18, 12)


def test_output_folder_under_a_file_is_not_writable(tmp_path, tiny_run):
    src = write_nifti(tmp_path / "scan.nii.gz", blob_image()[0])
    (tmp_path / "plain").write_text("a file, not a folder")
    _fails(["predict", str(src), "-o", str(tmp_path / "plain" / "m.nii.gz"), "-m", str(tiny_run),
            "--device", "cpu"], "not writable")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_output_folder(tmp_path, tiny_run):
    src = write_nifti(tmp_path / "scan.nii.gz", blob_image()[0])
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        _fails(["predict", str(src), "-o", str(locked / "sub" / "m.nii.gz"), "-m", str(tiny_run),
                "--device", "cpu"], "not writable")
    finally:
        locked.chmod(0o700)


def test_output_that_is_an_input_is_refused_even_with_overwrite(tmp_path, tiny_run):
    folder = tmp_path / "scans"
    for i in range(2):
        write_nifti(folder / f"case{i}.nii.gz", blob_image(seed=i)[0])
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    run = ["-m", str(tiny_run), "--device", "cpu", "--overwrite"]
    _fails(["predict", str(folder), "-o", str(folder), *run], "input files are never overwritten")
    scan = folder / "case0.nii.gz"
    _fails(["predict", str(scan), "-o", str(scan), *run], "input files are never overwritten")
    # A folder OUTPUT holding the input: OUTPUT/case0.nii.gz is the input itself.
    _fails(["predict", str(scan), "-o", str(folder), *run], "input files are never overwritten")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before


@pytest.mark.parametrize("names, text", [
    (["p1_0000", "q9_0001"], "case 'q9' differs from 'p1'"),
    (["p1_0000", "p1_0000"], "given twice"),
    (["p1_0000", "p1_0002"], "channels [0, 2], expected 0..1"),
    (["p1_0000", "p1"], "no channel suffix"),
])
def test_explicit_channel_files_are_checked_as_folder_discovery_does(tmp_path, names, text):
    from crlnseg.inference.cases import input_cases

    image = blob_image()[0]
    paths = [write_nifti(tmp_path / f"{name}.nii.gz", image) for name in names]
    with pytest.raises(DataError, match=text.replace("[", r"\[").replace("]", r"\]")):
        input_cases(paths)
    # The same file under two names (a link) is the same file given twice.
    (tmp_path / "p1_0001.nii.gz").unlink(missing_ok=True)
    (tmp_path / "p1_0001.nii.gz").symlink_to(paths[0])
    with pytest.raises(DataError, match="given twice"):
        input_cases([paths[0], tmp_path / "p1_0001.nii.gz"])


def test_explicit_channel_files_in_any_order(tmp_path):
    from crlnseg.inference.cases import input_cases

    image = blob_image()[0]
    paths = [write_nifti(tmp_path / f"p1_{c:04d}.nii.gz", image) for c in (1, 0)]
    (case,), from_folder = input_cases(paths)
    assert case.id == "p1" and case.images == paths[::-1] and not from_folder


def test_bad_case_found_before_any_mask_is_written(tmp_path, tiny_run):
    folder = tmp_path / "scans"
    write_nifti(folder / "a.nii.gz", blob_image()[0])
    write_nifti(folder / "b.nii.gz", blob_image()[0][..., None].repeat(20, axis=3))  # 20 volumes
    out = tmp_path / "masks"
    _fails(["predict", str(folder), "-o", str(out), "-m", str(tiny_run), "--device", "cpu"],
           "b.nii.gz: 4D image with 20 volumes")
    assert not out.exists()


def test_corrupt_body_mid_run_says_what_was_written(tmp_path, tiny_run):
    folder = tmp_path / "scans"
    for name in ("a", "b"):
        write_nifti(folder / f"{name}.nii.gz", blob_image()[0])
    whole = (folder / "b.nii.gz").read_bytes()
    (folder / "b.nii.gz").write_bytes(whole[: len(whole) // 2])  # the header still reads
    out = tmp_path / "masks"
    args = ["predict", str(folder), "-o", str(out), "-m", str(tiny_run), "--device", "cpu"]
    _fails(args, "1 case(s) before it were already written")
    _fails(args, "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["a.nii.gz"]


def test_output_with_a_non_image_extension_is_refused(tmp_path, tiny_run):
    src = write_nifti(tmp_path / "scan.nii.gz", blob_image()[0])
    run = ["-m", str(tiny_run), "--device", "cpu"]
    _fails(["predict", str(src), "-o", str(tmp_path / "a.png"), *run], "not an image extension")
    assert not (tmp_path / "a.png").exists()
    (tmp_path / "masks.v1").mkdir()  # an existing folder with a dot is a folder
    result = runner.invoke(app, ["predict", str(src), "-o", str(tmp_path / "masks.v1"), *run])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "masks.v1" / "scan.nii.gz").is_file()


def test_folder_output_keeps_the_input_extension(tmp_path, tiny_run):
    from crlnseg.cli.predict import HELP

    image = sitk.GetImageFromArray(blob_image()[0].transpose(2, 1, 0))
    sitk.WriteImage(image, str(tmp_path / "img.mha"))
    result = runner.invoke(app, ["predict", str(tmp_path / "img.mha"), "-o", str(tmp_path / "o"),
                                 "-m", str(tiny_run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert [p.name for p in (tmp_path / "o").iterdir()] == ["img.mha"]
    assert "<ID>.nii.gz" not in HELP and "input's extension" in HELP


def test_sigterm_mid_run_removes_temporaries_and_exits_143(tmp_path, tiny_run):
    from process_helpers import hidden, terminate_when

    image = blob_image((24, 24, 16))[0]
    for i in range(80):  # enough cases that the run is still going when the first one is done
        write_nifti(tmp_path / "in" / f"s{i:03d}.nii.gz", image)
    out = tmp_path / "out"
    code, err = terminate_when(["predict", str(tmp_path / "in"), "-o", str(out), "-m",
                                str(tiny_run), "--device", "cpu", "--save-probabilities"],
                               lambda: (out / "s000_probabilities.npz").exists())
    assert code == 128 + 15, err
    assert err.strip().splitlines()[-1] == "error: terminated" and "Traceback" not in err
    assert hidden(out) == [] and hidden(tmp_path) == []
    assert len(list(out.glob("*.nii.gz"))) < 80


def test_folder_where_the_mask_goes_is_refused_even_with_overwrite(tmp_path, tiny_run):
    src = write_nifti(tmp_path / "scan.nii.gz", blob_image()[0])
    (tmp_path / "m.nii.gz").mkdir()
    for extra in ([], ["--overwrite"]):
        _fails(["predict", str(src), "-o", str(tmp_path / "m.nii.gz"), "-m", str(tiny_run),
                "--device", "cpu", *extra], "m.nii.gz: is a folder")
