"""The compatibility checker: launch flags and environment variables against what a host really does.

The engine (findings, context, the rule registry, :func:`run_checks`) is :mod:`lib_optim.launch.checks`; the
rules are :mod:`lib_optim.launch.rules_flags` and :mod:`lib_optim.launch.rules_system` (environment rows:
:mod:`lib_optim.launch.env_notes`). Importing this module registers every rule, in README's order.
"""

from __future__ import annotations

from lib_optim.launch.checks import (
    RULES,
    CheckContext,
    CheckInput,
    Finding,
    Rule,
    RuntimeFacts,
    Severity,
    exit_code,
    format_findings,
    rules_markdown,
    run_checks,
    worst_severity,
)
from lib_optim.launch.rules_flags import FLAG_NOTES, UNKNOWN_FLAG_HINTS, FlagNote, a1111_automatic_attention
from lib_optim.launch.rules_system import LAUNCHER_FILE_RULE, parse_alloc_conf

__all__ = [
    "FLAG_NOTES",
    "LAUNCHER_FILE_RULE",
    "RULES",
    "UNKNOWN_FLAG_HINTS",
    "CheckContext",
    "CheckInput",
    "Finding",
    "FlagNote",
    "Rule",
    "RuntimeFacts",
    "Severity",
    "a1111_automatic_attention",
    "exit_code",
    "format_findings",
    "parse_alloc_conf",
    "rules_markdown",
    "run_checks",
    "worst_severity",
]
