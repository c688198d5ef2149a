"""What a person sees: the train bar at 80 columns, the train summary and JSON, help metavars,
labelled per-case lines, the evaluate summary title, the demo's expected time."""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path

import pytest
from inference_helpers import blob_image, make_tiny_run, write_nifti
from rich.console import Console
from typer.testing import CliRunner

from crlnseg.cli.app import app
from crlnseg.train.logging import Progress

runner = CliRunner()
COMMANDS = ("prepare", "train", "rectify", "predict", "evaluate", "demo")

LINE = {"iteration": 7500, "loss": 0.51234, "loss_supervised": 0.3, "loss_relation": 0.125,
        "loss_unsup": 0.05, "loss_cps": None, "mu": 0.2, "it_per_s": 2.5}


def _bar_lines(width: int, total: int = 15000, line: dict | None = None) -> list[str]:
    console = Console(file=io.StringIO(), width=width, force_terminal=True)
    progress = Progress(total, 0, enabled=True, console=console)
    try:
        assert progress.bar is not None  # a terminal: the rich bar, not plain lines
        progress.advance(total // 2)
        progress.logged(line or {**LINE, "iteration": total // 2})
        rendered = console.render_lines(progress.bar.get_renderable(), console.options,
                                        pad=False)
    finally:
        progress.close()
    return ["".join(segment.text for segment in row) for row in rendered]


@pytest.mark.parametrize("total", [240, 15000, 100000])
def test_train_bar_keeps_count_rate_and_eta_at_80_columns(total):
    lines = _bar_lines(80, total)
    assert len(lines) == 1, lines
    text = lines[0]
    assert len(text) <= 80
    assert f"{total // 2}/{total}" in text
    assert "2.50 it/s" in text
    left = (total - total // 2) / 2.5
    eta = f"{int(left) // 3600}:{int(left) // 60 % 60:02d}:{int(left) % 60:02d}"
    assert re.search(rf"ETA {eta}\b", text), text
    # Whole loss fields only: a field is never cut.
    fields = re.findall(r"\b(\w+)=(\S*)", text)
    assert all(re.fullmatch(r"\d+\.\d{4}", value) for _, value in fields), text


def test_train_bar_shows_the_losses_where_they_fit():
    wide = _bar_lines(160)[0]
    assert len(wide) <= 160
    for field in ("loss=0.5123", "supervised=0.3000", "relation=0.1250", "unsup=0.0500",
                  "mu=0.2000"):
        assert field in wide, wide
    assert "7500/15000" in wide and "2.50 it/s" in wide and "ETA 0:50:00" in wide
    narrow = _bar_lines(60)[0]  # nothing fits beside the essential columns: no loss at all
    assert len(narrow) <= 60 and "=" not in narrow
    assert "7500/15000" in narrow and "it/s" in narrow and "ETA 0:50:00" in narrow


def test_train_bar_before_the_first_log_step():
    console = Console(file=io.StringIO(), width=80, force_terminal=True)
    progress = Progress(100, 0, enabled=True, console=console)
    try:
        rows = console.render_lines(progress.bar.get_renderable(), console.options, pad=False)
    finally:
        progress.close()
    text = "".join(segment.text for segment in rows[0])
    assert "0/100" in text and "it/s" in text and "ETA -:--:--" in text


def test_plain_progress_without_a_terminal():
    out = io.StringIO()
    progress = Progress(10, 0, enabled=True, console=Console(file=out, width=80))
    assert progress.bar is None
    progress.logged({"iteration": 5, "loss": 1.5, "it_per_s": 2.0})
    assert out.getvalue() == "iteration 5/10 2.00 it/s ETA 00:00:02 loss=1.5000\n"


# -- crlnseg train: summary on stderr, JSON on stdout when piped or with --json --------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> dict[str, Path]:
    import torch
    from test_train import _write_split

    from crlnseg.prepare import prepare_dataset
    from crlnseg.settings import PrepareSettings

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("data")
    out = {}
    for key, labels, seed in (("lab", True, 0), ("unl", False, 1)):
        raw = _write_split(root / key, 2, labels, seed)
        out[key] = root / f"p{key}"
        prepare_dataset(raw, out[key], PrepareSettings())
    return out


def test_train_prints_json_when_piped_and_a_summary_on_stderr(prepared, tmp_path):
    from test_train import TINY

    run = tmp_path / "run"
    result = runner.invoke(app, ["train", "--labelled", str(prepared["lab"]), "--unlabelled",
                                 str(prepared["unl"]), "-o", str(run), "--iterations", "2",
                                 *TINY])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout.strip())  # stdout: the JSON result and nothing else
    assert summary["run_dir"] == str(run) and summary["iteration"] == summary["iterations"] == 2
    err = result.stderr
    assert f"trained 2/2 iterations into {run}" in err
    assert f"checkpoints: {run / 'checkpoints' / 'last.pt'}" in err
    assert (run / "checkpoints" / "last.pt").is_file()
    assert f"next: crlnseg predict IMAGES -m {run} -o MASKS" in err
    assert "{" not in err  # the JSON is not repeated on stderr


def _train_on_a_terminal(monkeypatch, tmp_path, *extra: str):
    """`crlnseg train` as run on a terminal (stdout a tty), the training itself stubbed."""
    import crlnseg.train
    from crlnseg.train.loop import TrainResult

    def fake_train(labelled, unlabelled, output, settings, **kwargs):
        monkeypatch.setattr(sys.stdout, "isatty", lambda: True)  # the runner's stdout
        return TrainResult(Path(output), 4, 4)

    monkeypatch.setattr(crlnseg.train, "train", fake_train)
    (tmp_path / "lab").mkdir(exist_ok=True)
    return runner.invoke(app, ["train", "--labelled", str(tmp_path / "lab"), "-o",
                               str(tmp_path / "run"), "--iterations", "4", *extra])


def test_train_on_a_terminal_prints_json_only_with_the_option(monkeypatch, tmp_path):
    result = _train_on_a_terminal(monkeypatch, tmp_path)
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    assert "trained 4/4 iterations" in result.stderr and "next: crlnseg predict" in result.stderr

    result = _train_on_a_terminal(monkeypatch, tmp_path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["iteration"] == 4
    assert "trained 4/4 iterations" in result.stderr


# -- --help: flags bare, three-number options as X Y Z ----------------------------------------

PLACEHOLDERS = ("BOOLEAN", "<bool>", "INTEGER INTEGER INTEGER", "FLOAT FLOAT FLOAT",
                "<int,int,int>", "<float,float,float>", "list[str]")


def _help(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_flags_as_flags_and_no_type_lists(command):
    text = _help(*([command] if command else []))
    for placeholder in PLACEHOLDERS:
        assert placeholder not in text, f"{command}: {placeholder}"
    # A flag's row goes from the option straight to its description.
    assert re.search(r"--help\s+-h\s+Show this message", text), text


@pytest.mark.parametrize(("command", "option"), [("train", "--patch"), ("predict", "--stride"),
                                                 ("rectify", "--stride"),
                                                 ("prepare", "--target-spacing")])
def test_three_number_options_read_x_y_z(command, option):
    assert re.search(rf"{option}\s+X Y Z\s", _help(command))


def test_flags_in_help_take_no_value():
    text = _help("predict")
    assert re.search(r"--overwrite\s+Replace existing outputs", text)
    assert re.search(r"--amp\s+--no-amp\s+Mixed precision", text)
    assert re.search(r"--tta\s+Average the softmax", text)


# -- per-case lines say what they count -------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory.mktemp("run"))


def _cases(folder: Path, n: int = 2) -> Path:
    for i in range(n):
        image, label = blob_image((18, 17, 16), seed=i)
        write_nifti(folder / "images" / f"scan{i}.nii.gz", image)
        write_nifti(folder / "labels" / f"scan{i}.nii.gz", label)
    return folder


@pytest.mark.parametrize("command", ["predict", "rectify"])
def test_per_case_lines_name_what_they_count(tmp_path, tiny_run, command):
    data = _cases(tmp_path / "in")
    result = runner.invoke(app, [command, str(data / "images"), "-o", str(tmp_path / "out"),
                                 "-m", str(tiny_run), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert "case 1/2: scan0" in lines and "case 2/2: scan1" in lines, lines
    assert not any(re.match(r"\[\d+/\d+\]", line) for line in lines), lines
    batches = [line for line in lines if re.fullmatch(r"scan\d\.nii\.gz: batch (\d+)/\1", line)]
    assert len(batches) == 2, lines


# -- evaluate: the interval header only with --bootstrap --------------------------------------


def _summary_title(stdout: str) -> str:
    return next(line for line in stdout.splitlines() if "Summary:" in line).strip()


def test_evaluate_title_shows_the_interval_only_with_bootstrap(tmp_path):
    data = _cases(tmp_path / "masks", n=3)
    args = ["evaluate", str(data / "labels"), str(data / "labels"), "--format", "table"]
    plain = runner.invoke(app, args, env={"COLUMNS": "200"})
    assert plain.exit_code == 0, plain.output
    title = _summary_title(plain.stdout)
    assert title == "Summary: mean ± std (median); n/a = undefined", title
    assert "CI" not in plain.stdout

    boot = runner.invoke(app, [*args, "--bootstrap", "50"], env={"COLUMNS": "200"})
    assert boot.exit_code == 0, boot.output
    assert _summary_title(boot.stdout) == "Summary: mean ± std (median) [95% CI]; n/a = undefined"
    assert "[1.0000, 1.0000]" in boot.stdout  # the interval itself, below its header


# -- demo: the expected time at the start and in --help ---------------------------------------


def test_demo_states_its_expected_time(tmp_path, monkeypatch):
    from crlnseg import demo

    result = runner.invoke(app, ["demo", "--quick", "-o", str(tmp_path / "quick")])
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[0] == f"crlnseg demo --quick: {demo.QUICK_TIME}"
    assert demo.QUICK_TIME not in result.stdout

    import crlnseg.synthetic
    from crlnseg.errors import DataError

    def stop(*args, **kwargs):
        raise DataError("stopped after the start message")

    monkeypatch.setattr(crlnseg.synthetic, "generate_dataset", stop)
    full = runner.invoke(app, ["demo", "-o", str(tmp_path / "full")])
    assert full.exit_code == 2
    assert full.stderr.splitlines()[0] == f"crlnseg demo: {demo.EXPECTED_TIME}"
    longer = runner.invoke(app, ["demo", "-o", str(tmp_path / "longer"), "--overwrite",
                                 "--iterations", "600"])
    first = longer.stderr.splitlines()[0]
    assert first.startswith(f"crlnseg demo: {demo.EXPECTED_TIME} at 240 iterations")
    assert "(600 here)" in first
    assert f"synthetic dataset: {demo.EXPECTED_TIME}." in _help("demo").replace("\n", " ")


def test_a_closed_pipe_exits_quietly_with_141():
    """`crlnseg ... | head`: the reader leaving is no error message, status 128 + SIGPIPE."""
    from crlnseg.cli.common import handle_errors

    @handle_errors
    def command() -> None:
        raise BrokenPipeError(32, "Broken pipe")

    with pytest.raises(SystemExit) as stop:
        command()
    assert stop.value.code == 141
