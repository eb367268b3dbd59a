"""What the environment variables that optimisation notes recommend really do on each WebUI: applying the rows.

The rows (one :class:`EnvNote` per variable or family and situation, with the source that makes it so) are
:mod:`lib_optim.launch.env_rows`; their model is :mod:`lib_optim.launch.env_model`.
``lib_optim.launch.checker`` turns them into findings (rules ``no-effect-env``, ``redundant-env``, ``costly-env``,
``obsolete-env``); README.md's environment table is :func:`env_notes_markdown`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from lib_optim.host_specs import HostKind
from lib_optim.launch import env_readers
from lib_optim.launch.env_model import RULE_IDS, EnvContext, EnvNote, QuietNote, env_hosts, glibc_number
from lib_optim.launch.env_rows import ENV_NOTES, QUIET_NOTES

__all__ = [
    "ENV_NOTES",
    "QUIET_NOTES",
    "RULE_IDS",
    "EnvItem",
    "EnvNote",
    "QuietNote",
    "applicable",
    "env_hosts",
    "env_items",
    "env_notes_json",
    "env_notes_markdown",
    "glibc_number",
    "has_row",
    "researched",
    "rule_hosts",
    "rule_severity",
]

# The rules whose findings also come from the generated table (lib_optim.launch.env_readers).
TABLE_RULES = ("no-effect-env", "redundant-env")

# --- applying the rows --------------------------------------------------------------------------------

# GLIBC_TUNABLES entries that are the same knobs as MALLOC_* variables (glibc manual, "Memory Allocation
# Tunables": each tunable names its environment alias).
_GLIBC_TUNABLE_ALIASES = {
    "glibc.malloc.mmap_threshold": "MALLOC_MMAP_THRESHOLD_",
    "glibc.malloc.perturb": "MALLOC_PERTURB_",
    "glibc.malloc.check": "MALLOC_CHECK_",
}


@dataclass(frozen=True)
class EnvItem:
    lookup: str  # the name the rows know it by (a GLIBC_TUNABLES entry by its MALLOC_* alias)
    shown: str  # the name as the user wrote it (or the tunable's name)
    value: str
    subject: str  # what a finding names


def env_items(env: Mapping[str, str]) -> Iterator[EnvItem]:
    """Every variable, with GLIBC_TUNABLES split into the malloc knobs it sets."""
    for name, value in env.items():
        if name.upper() != "GLIBC_TUNABLES":
            yield EnvItem(name, name, value, name)
            continue
        for entry in value.split(":"):
            tunable, sep, tunable_value = (part.strip() for part in entry.partition("="))
            alias = _GLIBC_TUNABLE_ALIASES.get(tunable)
            if sep and alias:
                yield EnvItem(alias, tunable, tunable_value, f"{name} {tunable}")


def applicable(rule_id: str, ctx: EnvContext) -> Iterator[tuple[EnvNote, EnvItem]]:
    """Every (row of ``rule_id``, variable) that applies to ``ctx``'s host and environment."""
    for item in env_items(ctx.env):
        for note in ENV_NOTES:
            if note.rule != rule_id or not note.applies_to(ctx.host) or not note.matches(item.lookup):
                continue
            if note.when(item.value, ctx):
                yield note, item


def _name_matches(patterns: tuple[str, ...], name: str) -> bool:
    upper = name.upper()
    return any(upper.startswith(p[:-1]) if p.endswith("*") else upper == p for p in patterns)


def researched(name: str) -> bool:
    """A hand-written row (of any rule, for any host) or a quiet note knows ``name``: the table stays out."""
    return any(n.matches(name) for n in ENV_NOTES) or any(_name_matches(q.names, name) for q in QUIET_NOTES)


def has_row(name: str, rule_id: str) -> bool:
    """A hand-written row of ``rule_id`` (for any host) knows ``name``."""
    return any(n.rule == rule_id and n.matches(name) for n in ENV_NOTES)


def rule_hosts(rule_id: str) -> tuple[HostKind, ...]:
    """The hosts that rows of ``rule_id`` cover, now (in registration order); the generated table's hosts too for
    the rules it feeds."""
    table = env_readers.covered_hosts() if rule_id in TABLE_RULES else ()
    return tuple(
        h for h in HostKind if h.value in table or any(n.rule == rule_id and n.applies_to(h) for n in ENV_NOTES)
    )


def rule_severity(rule_id: str) -> str:
    return "warning" if any(n.rule == rule_id and n.severity == "warning" for n in ENV_NOTES) else "info"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def env_notes_markdown() -> str:
    """The environment-variable table for docs/rules.md (``python -m lib_optim rules --env``), then the families
    and sources of the generated table that judges the variables no row names."""
    lines = [
        "| Variable | Hosts | Rule | Applies to | What it does here | Fix | Source |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in ENV_NOTES:
        names = ", ".join(f"`{name}`" for name in n.names)
        hosts = ", ".join(h.value for h in n.hosts)
        lines.append(
            f"| {names} | {hosts} | `{n.rule}` ({n.severity}) | {_cell(n.fires_on)} | {_cell(n.summary)} "
            f"| {_cell(n.fix)} | {_cell(n.source)} |"
        )
    for q in QUIET_NOTES:
        names = ", ".join(f"`{name}`" for name in q.names)
        what = _cell(f"{q.summary} {q.why_quiet}")
        lines.append(f"| {names} | all | none | — | {what} | — | {_cell(q.source)} |")
    return "\n".join(lines) + "\n\n" + env_readers.sources_markdown()


def env_notes_json() -> str:
    """The same table as JSON (``python -m lib_optim rules --env --json``)."""
    rows: list[dict[str, object]] = [
        {
            "key": n.key,
            "names": list(n.names),
            "hosts": [h.value for h in n.hosts],
            "rule": n.rule,
            "severity": n.severity,
            "applies_to": n.fires_on,
            "summary": n.summary,
            "fix": n.fix,
            "source": n.source,
        }
        for n in ENV_NOTES
    ]
    rows += [
        {"names": list(q.names), "rule": None, "summary": q.summary, "why_quiet": q.why_quiet, "source": q.source}
        for q in QUIET_NOTES
    ]
    return json.dumps(rows, indent=2, ensure_ascii=False)
