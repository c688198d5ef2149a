"""`crlnseg demo`: the whole pipeline on tiny generated volumes, every artefact written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from crlnseg.cli.app import app
from crlnseg.demo import check_output


@pytest.mark.slow
def test_quick_demo_runs_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out), "--seed", "1"])
    assert result.exit_code == 0, result.output
    for split, n in (("labelled", 2), ("unlabelled", 2), ("test", 1)):
        assert len(list((out / "data" / split / "images").glob("*.nii.gz"))) == n
    assert (out / "prepared" / "labelled" / "dataset.json").is_file()
    assert (out / "prepared" / "unlabelled" / "dataset.json").is_file()
    assert (out / "run" / "checkpoints" / "last.pt").is_file()
    assert (out / "run" / "metrics.jsonl").is_file()
    for kind in ("rectified", "raw", "confidence", "reliable"):
        assert len(list((out / "pseudo_labels").glob(f"*_{kind}.nii.gz"))) == 2
    summary = json.loads((out / "pseudo_labels" / "summary.json").read_text())
    assert {"dice_raw", "dice_rectified"} <= set(summary["cases"][0])
    assert [p.name for p in (out / "predictions").iterdir()] == ["test_00.nii.gz"]
    report = json.loads((out / "evaluation.json").read_text())
    assert [row["case"] for row in report["cases"]] == ["test_00"]
    assert 0.0 <= report["summary"]["1"]["dice"]["mean"] <= 1.0
    # stdout carries the final table (and the pseudo-label line), stage logs go to stderr.
    assert "test_00" in result.stdout and "Pseudo-labels" in result.stdout
    assert "[3/6] train" in result.stderr and "[3/6]" not in result.stdout

    again = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.stderr


def test_check_output_refuses_and_keeps_user_files(tmp_path: Path) -> None:
    from crlnseg.errors import OutputExistsError

    check_output(tmp_path / "new", overwrite=False)  # absent: created
    assert (tmp_path / "new").is_dir()
    check_output(tmp_path / "new", overwrite=False)  # empty: fine
    (tmp_path / "new" / "notes.txt").write_text("mine")
    (tmp_path / "new" / "run").mkdir()
    (tmp_path / "new" / "run" / "x").write_text("old")
    with pytest.raises(OutputExistsError, match="not empty"):
        check_output(tmp_path / "new", overwrite=False)
    check_output(tmp_path / "new", overwrite=True)
    assert (tmp_path / "new" / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "new" / "run").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError, match="not a folder"):
        check_output(tmp_path / "file", overwrite=True)
    # A folder the demo never wrote keeps its data/ even with --overwrite.
    (tmp_path / "proj" / "data").mkdir(parents=True)
    (tmp_path / "proj" / "data" / "my_scans.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="no earlier demo wrote it"):
        check_output(tmp_path / "proj", overwrite=True)
    assert (tmp_path / "proj" / "data" / "my_scans.txt").read_text() == "mine"


def test_bad_device_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(tmp_path / "d"),
                                      "--device", "bogus"])
    assert result.exit_code == 2 and "--device" in result.stderr, result.output
    assert not (tmp_path / "d").exists()
    result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(tmp_path / "d"),
                                      "--seed", "-1"])
    assert result.exit_code == 2 and "--seed" in result.stderr, result.output
    assert not (tmp_path / "d").exists()


def test_unwritable_output_exit_2(tmp_path: Path) -> None:
    (tmp_path / "plain").write_text("x")
    out = tmp_path / "plain" / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "-o", str(out)])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == f"error: {out}: cannot write (Not a directory)"
