"""The CUDA paths (mixed precision, device transfers): skipped without a GPU.

`benchmarks/gpu_check.py` runs this file on a GPU machine. Each test compares against the CPU in
fp32, so a wrong result on CUDA fails, not only a crash.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from crlnseg.cli.app import app
from crlnseg.inference.predictor import Predictor
from crlnseg.io.volume import Geometry, Volume
from crlnseg.method.crln import build_model
from crlnseg.method.train_step import Batch, train_step
from crlnseg.settings import PredictSettings, PrepareSettings, RunSettings
from crlnseg.train.state import init_state

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def tiny(**train) -> RunSettings:
    # No dropout: its masks come from each device's own RNG, so they could not be compared.
    return RunSettings.model_validate({
        "model": {"base_filters": 4, "prototypes_per_class": 2, "prototype_dim": 8,
                  "dropout": False},
        "method": {"warmup_fraction": 0.0, "anchors": 16, "negatives": 32},
        "train": {"patch": (32, 32, 32), **train}})


def test_predict_with_amp_on_cuda_matches_fp32_on_the_cpu() -> None:
    rng = np.random.default_rng(0)
    volume = Volume(rng.normal(0, 1, (50, 44, 40)).astype(np.float32),
                    Geometry(spacing=(0.8, 0.8, 1.2)))
    out = {}
    for device, amp in (("cpu", False), ("cuda", True), ("cuda", False)):
        torch.manual_seed(0)  # the same weights, a fresh model: each device keeps its own layout
        model = build_model(tiny()).eval()
        p = Predictor(model, PredictSettings(device=device, amp=amp), (32, 32, 32),
                      PrepareSettings(), 1, ["background", "fg"])
        out[device, amp] = p.predict_volume(volume, save_probabilities=True)
    ref = out["cpu", False]
    for key in (("cuda", True), ("cuda", False)):
        assert out[key].mask.shape == ref.mask.shape
        # fp16 logits carry ~3 significant digits; "fp32" convolutions may run in TF32.
        tol = 2e-2 if key[1] else 1e-3
        assert np.abs(out[key].probabilities - ref.probabilities).max() < tol, key
        assert (out[key].mask == ref.mask).mean() > 0.99, key


@pytest.mark.parametrize("amp", [False, "bf16-or-fp16", "fp16"])
def test_train_step_on_cuda_learns_and_agrees_with_the_cpu(amp, monkeypatch) -> None:
    if amp == "fp16":  # the grad-scaler path, which GPUs with bf16 (A100, H100) never take
        monkeypatch.setattr("crlnseg.train.state.amp_dtype", lambda device: torch.float16)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32, 32, generator=g)
    label = (torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2)[:2, 0] > 0.05).long()
    batch = Batch(x[:2], label, x[2:])
    records = {}
    for device in ("cpu", "cuda"):
        settings = tiny(amp=bool(amp) and device == "cuda")
        state = init_state(settings, torch.device(device))
        if device == "cuda":
            assert (state.scaler is not None) == (amp == "fp16")
        on_device = Batch(**{f.name: getattr(batch, f.name).to(device) for f in fields(batch)})
        records[device] = [train_step(state, on_device, settings,
                                      torch.Generator().manual_seed(1), 100)
                           for _ in range(3)]
        assert all(np.isfinite(r.loss) for r in records[device])
        assert all(r.loss_relation is not None and r.mu is not None for r in records[device])
    # Same weights, same labelled crops: the first supervised loss agrees (the unlabelled views'
    # noise comes from each device's generator; TF32 convolutions and fp16 round differently).
    tol = 3e-2 if amp else 1e-2
    assert records["cuda"][0].loss_supervised == pytest.approx(records["cpu"][0].loss_supervised,
                                                               rel=tol)


def test_cli_train_then_predict_on_cuda(tmp_path: Path) -> None:
    from crlnseg.synthetic import generate_dataset

    raw = tmp_path / "raw"
    generate_dataset(raw, n_labelled=2, n_unlabelled=2, n_test=1, shape=(40, 36, 36), seed=0)
    run = tmp_path / "run"
    common = ["--patch", "32", "32", "32", "--base-filters", "4", "--iterations", "3",
              "--set", "model.prototypes_per_class=2", "--set", "model.prototype_dim=8",
              "--set", "train.num_workers=0", "--device", "cuda"]
    result = CliRunner().invoke(app, ["train", "--labelled", str(raw / "labelled"),
                                      "--unlabelled", str(raw / "unlabelled"), "-o", str(run),
                                      *common])
    assert result.exit_code == 0, result.output
    test_image = next((raw / "test" / "images").glob("*.nii.gz"))
    mask = tmp_path / "mask.nii.gz"
    result = CliRunner().invoke(app, ["predict", str(test_image), "-o", str(mask), "-m", str(run),
                                      "--device", "cuda"])
    assert result.exit_code == 0, result.output
    assert mask.is_file()
