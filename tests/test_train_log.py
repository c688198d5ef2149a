"""Run-folder bookkeeping: window means in metrics.jsonl, plain progress lines, training.png."""

from __future__ import annotations

import json

from crlnseg.method.train_step import StepRecord
from crlnseg.train.logging import MetricsLog, Progress, environment_info, read_metrics
from crlnseg.train.plot import plot_training


def _record(loss: float, mu: float | None) -> StepRecord:
    return StepRecord(loss=loss, loss_supervised=loss / 2, loss_relation=None, loss_unsup=0.0,
                      loss_cps=None, loss_mu=None, mu=mu, lr=0.01, confident_raw=0.5,
                      confident_rectified=None)


def test_metrics_lines_are_window_means(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.add(_record(1.0, 0.2))
    log.add(_record(3.0, 0.4))
    line = log.flush(2)
    assert line["loss"] == 2.0 and abs(line["mu"] - 0.3) < 1e-9 and line["loss_relation"] is None
    assert line["it_per_s"] > 0
    log.add(_record(5.0, None))
    log.flush(3)
    log.write({"iteration": 3, "val_dice": 0.5, "val_per_case": {"a": 0.5}})
    lines = read_metrics(path)
    assert [x["iteration"] for x in lines] == [2, 3, 3]
    assert lines[1]["loss"] == 5.0 and lines[1]["mu"] is None
    assert all(json.dumps(x) for x in lines)


def test_plain_progress_lines_on_stderr(capsys):
    progress = Progress(10, 0, enabled=True)
    progress.logged({"iteration": 5, "loss": 1.5, "loss_cps": 0.25, "it_per_s": 2.0})
    err = capsys.readouterr().err
    assert "iteration 5/10" in err and "2.00 it/s" in err and "ETA 00:00:02" in err
    assert "loss=1.5000" in err and "cps=0.2500" in err
    Progress(10, 0, enabled=False).logged({"iteration": 5, "it_per_s": 1.0})
    assert capsys.readouterr().err == ""


def test_training_png_and_environment(tmp_path):
    lines = [{"iteration": i, "loss": 1.0 / i, "mu": 0.1, "lr": 0.01, "confident_raw": 0.5}
             for i in range(1, 5)] + [{"iteration": 4, "val_dice": 0.7}]
    assert plot_training(lines, tmp_path / "training.png")
    assert (tmp_path / "training.png").read_bytes()[:4] == b"\x89PNG"
    assert not plot_training([], tmp_path / "empty.png")
    env = environment_info("cpu", 1)
    assert env["packages"]["torch"] and env["device"] == "cpu" and "git_commit" in env
