"""README.md is the user's manual: it must list every checker rule, field, route, profile and CLI command."""

from __future__ import annotations

import re
from pathlib import Path

from lib_optim.cli import build_parser
from lib_optim.launch.checker import RULES, rules_markdown
from lib_optim.launch.env_notes import ENV_NOTES, QUIET_NOTES, env_notes_markdown
from lib_optim.launch.profiles import PROFILES
from lib_optim.settings import FIELDS, Attention

README = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")


def test_rules_table_is_the_generated_one():
    match = re.search(r"<!-- rules-table:[^>]*-->\n(.*?)\n<!-- /rules-table -->", README, re.S)
    assert match, "README lost its rules-table markers"
    assert match.group(1).strip() == rules_markdown().strip(), "run `python -m lib_optim rules` and paste the table"
    for rule_id in RULES:
        assert f"`{rule_id}`" in README


def test_env_table_is_the_generated_one():
    match = re.search(r"<!-- env-table:[^>]*-->\n(.*?)\n<!-- /env-table -->", README, re.S)
    assert match, "README lost its env-table markers"
    assert match.group(1).strip() == env_notes_markdown().strip(), "run `python -m lib_optim rules --env` and paste"
    for note in (*ENV_NOTES, *QUIET_NOTES):
        for name in note.names:
            assert f"`{name}`" in match.group(1), name


def test_every_api_field_and_attention_name_is_documented():
    for field in FIELDS:
        assert f"`{field.name}`" in README, field.name
    for attention in Attention:
        assert f"`{attention.value}`" in README, attention.value


def test_every_route_is_documented_with_curl():
    for route in (
        "/optim/v1/status",
        "/optim/v1/check",
        "/optim/v1/schema",
        "/optim/v1/profiles",
        "/optim/v1/bench",
        "/optim/v1/bench/default",
    ):
        assert route in README
        assert re.search(r"curl[^\n]*" + re.escape(route), README), f"no curl example for {route}"
    assert '"alwayson_scripts": {"optim": {"args": [{' in README.replace("\n    ", "")


def test_every_profile_and_cli_command_is_documented():
    for name in [*PROFILES, "auto"]:
        assert f"`{name}`" in README, name
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    for command in sub.choices:
        assert f"python -m lib_optim {command}" in README, command
    for action in ("list", "show", "apply", "remove"):
        assert f"python -m lib_optim profile {action}" in README


def test_the_two_commands():
    assert "python -m lib_optim doctor" in README
    assert "bash tools/test.sh" in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert "tools/test.sh" in ci
