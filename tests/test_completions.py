"""The shell completion scripts in completions/ are what the CLI generates now."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

COMPLETIONS = Path(__file__).resolve().parents[1] / "completions"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_script_is_current(shell: str) -> None:
    env = {**os.environ, "_VLACL_COMPLETE": f"source_{shell}"}
    fresh = subprocess.run([sys.executable, "-m", "vlacl"], capture_output=True, text=True, env=env, check=True).stdout
    assert "vlacl" in fresh
    stored = (COMPLETIONS / f"vlacl.{shell}").read_text()
    assert stored == fresh, f"completions/vlacl.{shell} is stale: run `make completions`"


def test_completion_lists_commands() -> None:
    env = {**os.environ, "_VLACL_COMPLETE": "complete_bash", "COMP_WORDS": "vlacl cl-", "COMP_CWORD": "1"}
    out = subprocess.run([sys.executable, "-m", "vlacl"], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["cl-metrics"]
