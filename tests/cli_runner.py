"""Shared by the CLI tests: run ``vlpretrain ARGS`` in-process and capture its exit code and output."""

from __future__ import annotations

import pytest

from vlpretrain.cli import main


def run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``vlpretrain ARGS``; a normal return is exit code 0."""
    try:
        main(args)
        code = 0
    except SystemExit as stop:
        code = stop.code or 0
    out, err = capsys.readouterr()
    return code, out, err
