"""The README's console examples are what the commands really print, in the order they print it."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from test_cli import _base_env

ROOT = Path(__file__).resolve().parent.parent


def test_check_example_matches_the_output() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"<!-- check-example:[^>]*-->\n```console\n\$ (?P<cmd>[^\n]+)\n(?P<out>.*?)```", text, re.DOTALL)
    assert match, "README: the check example is gone"
    argv = shlex.split(match["cmd"])
    assert argv[:3] == ["python", "-m", "lib_optim"]
    result = subprocess.run(
        [sys.executable, *argv[1:]], cwd=ROOT, env=_base_env(), capture_output=True, text=True, check=False
    )
    assert result.stdout == match["out"]
    assert result.returncode == 1
