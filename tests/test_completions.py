"""The shell completions in completions/ are what the command line generates now."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli

COMPLETIONS = Path(__file__).resolve().parents[1] / "completions"
FILES = {"bash": "celslm.bash", "zsh": "_celslm", "fish": "celslm.fish"}


@pytest.mark.parametrize("shell", sorted(FILES))
def test_completion_file_matches_the_cli(shell):
    generated = run_cli(check=True, env={"_CELSLM_COMPLETE": f"source_{shell}"}).stdout
    assert generated, f"no {shell} completion generated"
    assert (COMPLETIONS / FILES[shell]).read_bytes() == generated, "regenerate with: make completions"
