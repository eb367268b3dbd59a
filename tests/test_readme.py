"""README.md is the short manual (at most 250 lines); the long tables live in docs/ and are linked from it.

Every checker rule and environment variable (docs/rules.md), field (docs/fields.md), control per host
(docs/hosts-matrix.md), route (docs/api.md), profile (docs/profiles.md), wing and core module
(docs/architecture.md) and CLI command (README) must be documented where this test looks for it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import _base_env

from lib_optim.cli import build_parser
from lib_optim.host_specs import HostKind
from lib_optim.launch.checker import RULES, rules_markdown
from lib_optim.launch.env_notes import ENV_NOTES, QUIET_NOTES, env_notes_markdown
from lib_optim.launch.profiles import PROFILES
from lib_optim.settings import FIELD_NAMES, FIELDS, SETTING_FIELDS, Attention

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
README = (ROOT / "README.md").read_text(encoding="utf-8")
README_MAX_LINES = 250
ROUTES = (
    "/optim/v1/status",
    "/optim/v1/check",
    "/optim/v1/schema",
    "/optim/v1/profiles",
    "/optim/v1/bench",
    "/optim/v1/bench/default",
)


def doc(name: str) -> str:
    return (DOCS / name).read_text(encoding="utf-8")


def _generated(text: str, marker: str) -> str:
    match = re.search(rf"<!-- {marker}:[^>]*-->\n(.*?)\n<!-- /{marker} -->", text, re.S)
    assert match, f"docs/rules.md lost its {marker} markers"
    return match.group(1)


def _subparsers(parser):  # the subcommands of a parser, or None
    sub = next((a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"), None)
    return None if sub is None else sub.choices


# --- README: short, and linking to everything ----------------------------------------------------------------


def test_readme_is_short():
    lines = README.count("\n") + (not README.endswith("\n"))
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; at most {README_MAX_LINES}: move detail to docs/"


def test_readme_links_every_doc_and_every_link_resolves():
    linked = set(re.findall(r"\]\((docs/[^)#\s]+)", README))
    for path in linked:
        assert (ROOT / path).exists(), f"README links {path}, which does not exist"
    for page in DOCS.glob("*.md"):
        assert f"docs/{page.name}" in linked, f"docs/{page.name} is not linked from README"
    for page in DOCS.glob("*.md"):  # relative links between the docs pages
        for target in re.findall(r"\]\(([^)#\s:]+\.md)", page.read_text(encoding="utf-8")):
            assert (page.parent / target).resolve().exists(), f"docs/{page.name} links {target}, which does not exist"


def test_the_two_commands():
    assert "python -m lib_optim doctor" in README
    assert "bash tools/test.sh" in README
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "tools/test.sh" in ci


# --- the checker: docs/rules.md -----------------------------------------------------------------------------


def test_rules_table_is_the_generated_one():
    rules = doc("rules.md")
    assert _generated(rules, "rules-table").strip() == rules_markdown().strip(), (
        "run `python -m lib_optim rules` and paste the table into docs/rules.md"
    )
    for rule_id in RULES:
        assert f"`{rule_id}`" in rules, rule_id


def test_env_table_is_the_generated_one():
    table = _generated(doc("rules.md"), "env-table")
    assert table.strip() == env_notes_markdown().strip(), "run `python -m lib_optim rules --env` and paste"
    for note in (*ENV_NOTES, *QUIET_NOTES):
        for name in note.names:
            assert f"`{name}`" in table, name


# --- fields and controls: README's accordion, docs/fields.md, docs/hosts-matrix.md ----------------------------


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    start = text.index(f"| {first_header} |")
    rows = []
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def test_fields_table_is_every_field_with_its_default():
    rows = _table_rows(doc("fields.md"), "Field")
    assert [row[0] for row in rows] == [f"`{name}`" for name in FIELD_NAMES]
    defaults = {row[0].strip("`"): row[2] for row in rows}
    for spec in SETTING_FIELDS:
        assert defaults[spec.name] == f"`{json.dumps(spec.kind.to_api(spec.default))}`", spec.name
    fields_doc = doc("fields.md")
    for attention in Attention:
        assert f"`{attention.value}`" in fields_doc, attention.value


def test_readme_accordion_has_every_control():
    rows = _table_rows(README, "Control")
    labels = [row[0] for row in rows]
    for spec in FIELDS:
        assert f"**{spec.label}**" in labels, spec.label
    attention_row = next(row for row in rows if row[0] == f"**{FIELDS[1].label}**")
    for attention in Attention:
        assert f"`{attention.value}`" in attention_row[1], attention.value


def test_hosts_matrix_has_every_control_on_every_host():
    rows = _table_rows(doc("hosts-matrix.md"), "Control")
    for spec in SETTING_FIELDS:
        row = next((r for r in rows if r[0] == f"**{spec.label}**"), None)
        assert row is not None, f"docs/hosts-matrix.md: no row for {spec.label}"
        assert len(row) == 2 + len(HostKind) and all(row), spec.label  # values + one column per host


# --- API, profiles, architecture -----------------------------------------------------------------------------


def test_every_route_is_in_readme_and_has_a_curl_example():
    api = doc("api.md")
    for route in ROUTES:
        assert f"`GET {route}`" in README or f"`POST {route}`" in README, route
        assert re.search(r"curl[^\n]*" + re.escape(route), api), f"docs/api.md: no curl example for {route}"


def test_every_profile_is_documented():
    profiles = doc("profiles.md")
    for name in [*PROFILES, "auto"]:
        assert f"`{name}`" in README, name
        assert f"`{name}`" in profiles, name


def test_architecture_lists_every_wing_and_core_module():
    text = doc("architecture.md")
    package = ROOT / "lib_optim"
    for wing in sorted(p.name for p in package.iterdir() if (p / "__init__.py").is_file()):
        assert f"| `{wing}/` |" in text, f"docs/architecture.md: no row for the wing {wing}/"
        for module in sorted((package / wing).glob("*.py")):
            if module.name != "__init__.py":
                assert f"`{module.name}`" in text, f"docs/architecture.md: {wing}/{module.name} is not named"
    for module in sorted(package.glob("*.py")):
        assert f"| `{module.name}` |" in text, f"docs/architecture.md: no row for the core module {module.name}"


# --- the command line: README's table ------------------------------------------------------------------------


def readme_commands() -> list[str]:
    """Every ``python -m lib_optim …`` README shows (in code spans and code blocks), as written."""
    found = re.findall(r"python -m lib_optim(?=[ `\n])([^`\n#]*)", README)
    return sorted({("python -m lib_optim" + rest).rstrip() for rest in found})


def _command_path(command: str) -> tuple[list[str], list[str]]:
    """The subcommand path (e.g. ``profile apply``) and the options shown before a bare ``--``."""
    words = command.split()[3:]
    path: list[str] = []
    choices = _subparsers(build_parser())
    while words and choices is not None and words[0] in choices:
        path.append(words[0])
        choices = _subparsers(choices[words.pop(0)])
    options = []
    for word in words:
        if word.strip("[]") == "--":
            break
        options += re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", word)
    return path, options


def test_every_subcommand_is_in_readme():
    parser = build_parser()
    shown = {" ".join(_command_path(c)[0]) for c in readme_commands()}
    for command, subparser in (_subparsers(parser) or {}).items():
        assert any(s == command or s.startswith(command + " ") for s in shown), f"README: no `lib_optim {command}`"
        for action in _subparsers(subparser) or {}:
            assert f"{command} {action}" in shown, f"README: no `python -m lib_optim {command} {action}`"


@pytest.mark.parametrize("path", sorted({" ".join(_command_path(c)[0]) for c in readme_commands()}))
def test_readme_commands_answer_help(path: str):
    argv = [sys.executable, "-m", "lib_optim", *path.split(), "--help"]
    result = subprocess.run(argv, cwd=ROOT, env=_base_env(), capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, f"`python -m lib_optim {path} --help`: exit {result.returncode}\n{result.stderr}"
    assert result.stdout.startswith("usage: python -m lib_optim"), result.stdout
    for command in readme_commands():
        command_path, options = _command_path(command)
        if " ".join(command_path) != path:
            continue
        for option in options:
            if option not in result.stdout:
                pytest.fail(f"README shows `{command}`, but `{path} --help` has no {option}")


def test_host_help_lists_every_host():
    parser_help = subprocess.run(
        [sys.executable, "-m", "lib_optim", "check", "--help"],
        cwd=ROOT,
        env=_base_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    hosts = [kind.value for kind in HostKind]
    for name in hosts:
        assert name in parser_help, f"`check --help` does not list the host {name}"
    lists = [line for line in README.splitlines() if "--host" in line and "a1111" in line]
    assert lists, "README: nowhere says which hosts --host takes"
    for page in (README, *(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md") if p.name != "hosts.md")):
        for line in page.splitlines():
            if ("--host" in line and re.search(r"--host [a-z0-9-]+(\\?\|[a-z0-9-]+)+", line)) or line in lists:
                missing = [name for name in hosts if name not in line]
                assert not missing, f"this line lists the hosts without {missing}: {line}"


def test_no_page_says_a_host_lacks_profiles_it_has():
    # Issue 15 §4: reForge got its profiles; the README said "launch profiles on all but reForge".
    from lib_optim.host_specs import host_spec, profiled_hosts

    for page in (README, *(p.read_text(encoding="utf-8") for p in DOCS.glob("*.md"))):
        text = " ".join(page.split())
        for kind in profiled_hosts():
            name = host_spec(kind).display_name
            for claim in (f"all but {name}", f"No launch profiles for {name}", f"{name} has no launch profiles"):
                assert claim not in text, claim
