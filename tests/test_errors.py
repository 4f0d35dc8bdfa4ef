"""User errors: one torch-free hierarchy that `zdepth` catches by type (exit 2, one line, no traceback)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from zdepth import cli, errors


def _main_raising(exc: BaseException, monkeypatch) -> int:
    """`zdepth.cli.main` running a command that raises `exc`."""
    parser = cli.build_parser()
    parser.set_defaults(func=lambda _args: (_ for _ in ()).throw(exc))
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    return cli.main([])


@pytest.mark.parametrize(
    "error",
    [errors.ConfigError, errors.CheckpointNotFound, errors.DownloadError, errors.KeysError, errors.CommandError],
)
def test_user_errors_exit_2_with_their_message(error, monkeypatch, capsys):
    assert _main_raising(error("what to do"), monkeypatch) == 2
    assert capsys.readouterr().err == "zdepth: error: what to do\n"


def test_other_exceptions_keep_their_traceback(monkeypatch):
    with pytest.raises(ValueError, match="a bug"):
        _main_raising(ValueError("a bug"), monkeypatch)


def test_the_modules_raise_the_shared_types_and_stay_torch_free():
    code = (
        "import sys, zdepth.errors, zdepth.checkpoint_files, zdepth.weights, zdepth.keys_cli, zdepth.config, zdepth.serve, zdepth.stream_tools\n"
        "print(sorted(m for m in ('torch', 'cv2') if m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
    )
    from zdepth import engine, keys_cli, serve, weights
    from zdepth.model import checkpoints

    assert issubclass(engine.ConfigError, errors.UserError) and issubclass(
        checkpoints.CheckpointError, errors.UserError
    )
    for raised in (weights.DownloadError, keys_cli.KeysError, serve.ServeError):
        assert issubclass(raised, errors.UserError)
