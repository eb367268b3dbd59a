"""The examples in README.md and docs/ are what the code really prints and accepts today.

A console example is marked ``<!-- example (exit N) ... -->`` (add ``, empty folder`` to run it in an empty
folder instead of the repository root) right above a ```console block whose first line is ``$ python -m
lib_optim …``; the command runs and its output and exit status must match. The README's API example must pass
our request validation on every host and show every field; the error, infotext and positional examples in
docs/ are checked against the functions that produce them.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import _base_env

from lib_optim.api import validation_error
from lib_optim.host_specs import HostKind
from lib_optim.settings import FIELD_NAMES, format_infotext, from_dict, from_positional, parse_infotext

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
EXAMPLE = re.compile(
    r"<!-- example \(exit (?P<exit>\d+)(?P<empty>, empty folder)?\)[^>]*-->\n"
    r"```console\n\$ (?P<cmd>[^\n]+)\n(?P<out>.*?)```",
    re.DOTALL,
)


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def console_examples() -> list[tuple[str, re.Match[str]]]:
    return [(path.relative_to(ROOT).as_posix(), m) for path in PAGES for m in EXAMPLE.finditer(_text(path))]


def _json_blocks(text: str) -> list[str]:
    return re.findall(r"```json\n(.*?)```", text, re.DOTALL)


def test_the_readme_has_a_checked_console_example():
    assert any(page == "README.md" for page, _ in console_examples()), "README: the check example is gone"
    assert len(console_examples()) >= 2


@pytest.mark.parametrize(("page", "example"), console_examples(), ids=lambda v: v if isinstance(v, str) else "")
def test_console_example_matches_the_output(page: str, example: re.Match[str], tmp_path: Path) -> None:
    argv = shlex.split(example["cmd"])
    assert argv[:3] == ["python", "-m", "lib_optim"], f"{page}: {example['cmd']}"
    env = _base_env(PYTHONPATH=str(ROOT)) if example["empty"] else _base_env()
    result = subprocess.run(
        [sys.executable, *argv[1:]],
        cwd=tmp_path if example["empty"] else ROOT,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )
    assert result.stdout == example["out"], f"{page}: `{example['cmd']}` now prints\n{result.stdout}"
    assert result.returncode == int(example["exit"]), f"{page}: {result.stderr}"


def test_readme_api_example_is_valid_and_shows_every_field():
    blocks = [b for b in _json_blocks(_text(ROOT / "README.md")) if "alwayson_scripts" in b]
    assert len(blocks) == 1, "README: one JSON example of the API"
    body = json.loads(blocks[0])
    args = body["alwayson_scripts"]["optim"]["args"]
    assert len(args) == 1 and isinstance(args[0], dict), "README's example is the dict form"
    assert list(args[0]) == list(FIELD_NAMES), "README's example shows every field, in FIELDS order"
    for host in HostKind:
        assert validation_error(body, host) is None, host
    settings = from_dict(args[0])
    assert settings.to_dict() == args[0]  # every value means what it says


def test_fields_error_example_is_the_real_answer():
    text = _text(ROOT / "docs" / "fields.md")
    answer = json.loads(next(b for b in _json_blocks(text) if '"detail"' in b))
    assert answer["error"] == "OptimSettingsError"
    match = re.match(r"\[Optim\] (\w+): '([^']*)' is not allowed", answer["detail"])
    assert match, answer["detail"]
    assert "on A1111" in text  # the host the example is for
    body = {"alwayson_scripts": {"optim": {"args": [{match[1]: match[2]}]}}}
    assert validation_error(body, HostKind.A1111) == answer["detail"]


def test_fields_positional_example_and_order():
    text = _text(ROOT / "docs" / "fields.md")
    order = re.search(r"order `\[([^\]]+)\]`", text)
    assert order, "docs/fields.md: the positional order is gone"
    assert [name.strip() for name in order[1].split(",")] == list(FIELD_NAMES)
    body = json.loads(next(b for b in _json_blocks(text) if "alwayson_scripts" in b))
    args = body["alwayson_scripts"]["optim"]["args"]
    assert isinstance(args, list) and not isinstance(args[0], dict)
    from_positional(args)  # raises on a value the code no longer accepts
    for host in HostKind:
        assert validation_error(body, host) is None, host


@pytest.mark.parametrize("page", ["docs/fields.md", "docs/api.md"])
def test_infotext_examples_round_trip(page: str):
    found = re.findall(r'Optim: "([^"]+)"', _text(ROOT / page))
    assert found, f"{page}: the infotext example is gone"
    for text in found:
        assert format_infotext(parse_infotext(text)) == text
