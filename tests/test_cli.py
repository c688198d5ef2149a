"""The CLI skeleton: help, version, error mapping."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from crlnseg import __version__
from crlnseg.cli.app import app

runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in ("prepare", "train", "rectify", "predict", "evaluate", "demo"):
        assert name in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"crlnseg {__version__}"


def test_python_dash_m_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "crlnseg", "--version"], capture_output=True,
                         text=True, check=True)
    assert __version__ in out.stdout


def _app_raising(exc: Exception):
    import typer

    from crlnseg.cli.app import handle_errors

    tiny = typer.Typer()

    @tiny.command()
    @handle_errors
    def boom() -> None:
        raise exc

    @tiny.command()
    def other() -> None:  # a second command keeps Typer in multi-command mode
        pass

    return tiny


def test_data_error_is_one_line_exit_2() -> None:
    from crlnseg.errors import DataError

    result = CliRunner().invoke(_app_raising(DataError("scan.nii.gz: not a 3D image")), ["boom"])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == ["error: scan.nii.gz: not a 3D image"]
    assert "Traceback" not in result.output


def test_unexpected_error_exits_1_with_hint() -> None:
    result = CliRunner().invoke(_app_raising(ValueError("bad")), ["boom"])
    assert result.exit_code == 1
    assert "ValueError: bad" in result.output and "--debug" in result.output


def test_debug_adds_the_traceback_and_keeps_the_exit_status(monkeypatch) -> None:
    from crlnseg.cli.app import state
    from crlnseg.errors import DataError

    monkeypatch.setitem(state, "debug", True)
    result = CliRunner().invoke(_app_raising(DataError("scan.nii.gz: not a 3D image")), ["boom"])
    assert result.exit_code == 2
    assert "Traceback" in result.output
    assert result.output.strip().splitlines()[-1] == "error: scan.nii.gz: not a 3D image"
    result = CliRunner().invoke(_app_raising(ValueError("bad")), ["boom"])
    assert result.exit_code == 1 and "Traceback" in result.output
    assert result.output.strip().splitlines()[-1] == "error: ValueError: bad"


def test_debug_option_keeps_exit_2_for_bad_input(tmp_path, monkeypatch) -> None:
    from crlnseg.cli.app import state

    monkeypatch.setitem(state, "debug", False)  # restored afterwards: --debug sets it
    missing = tmp_path / "none.nii.gz"
    result = runner.invoke(app, ["--debug", "evaluate", str(missing), str(missing)])
    assert result.exit_code == 2, result.output
    assert "Traceback" in result.output
    assert result.output.strip().splitlines()[-1].startswith("error: ")


def test_sigterm_is_handled_like_ctrl_c() -> None:
    import os
    import signal
    import time

    import typer

    from crlnseg.cli.app import handle_errors

    tiny, cleaned = typer.Typer(), []

    @tiny.command()
    @handle_errors
    def slow() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
        except KeyboardInterrupt:  # the cleanup paths written for Ctrl-C run for SIGTERM too
            cleaned.append(True)
            raise

    @tiny.command()
    def other() -> None:
        pass

    def unhandled(signum, frame):  # without the fix: fail this test, not kill pytest
        raise RuntimeError("SIGTERM reached the handler outside the command")

    before = signal.signal(signal.SIGTERM, unhandled)
    try:
        started = time.monotonic()
        result = CliRunner().invoke(tiny, ["slow"])
        assert signal.getsignal(signal.SIGTERM) is unhandled  # restored after the command
    finally:
        signal.signal(signal.SIGTERM, before)
    assert time.monotonic() - started < 4
    assert result.exit_code == 128 + signal.SIGTERM
    assert result.output.strip() == "error: terminated"
    assert cleaned == [True]


def test_entry_point_usage_errors_are_one_line_and_exit_codes_propagate(tmp_path) -> None:
    """Through ``main`` (what the ``crlnseg`` script runs), not CliRunner: click's usage errors
    are one line (no framed block) with exit 2, and a command's exit status comes through."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(root), os.environ.get("PYTHONPATH")]))}

    def run(*args: str) -> tuple[int, list[str]]:
        done = subprocess.run([sys.executable, "-m", "crlnseg", *args], capture_output=True,
                              text=True, env=env, timeout=120)
        return done.returncode, done.stderr.strip().splitlines()

    code, lines = run("train", "--iterations", "abc")
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: Invalid value"), lines
    assert "crlnseg train --help'" in lines[0]
    code, lines = run("bogus")
    assert code == 2 and len(lines) == 1 and "No such command" in lines[0]
    code, lines = run("evaluate", str(tmp_path / "none"), str(tmp_path / "none2"))
    assert code == 2 and lines == [f"error: {tmp_path / 'none'}: prediction path does not exist"]
    assert run("--version")[0] == 0


@pytest.mark.parametrize("module", ["prepare", "train", "rectify", "predict", "evaluate", "demo"])
def test_each_command_module_imports_on_its_own(module):
    # A fresh interpreter: importing a command module first used to be a circular import.
    proc = subprocess.run([sys.executable, "-c", f"import crlnseg.cli.{module}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
