"""The CLI skeleton: help, version, error mapping."""

from __future__ import annotations

import subprocess
import sys

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
