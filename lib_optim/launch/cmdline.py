"""Read a WebUI command line the way the host's argparse parser will.

The hosts parse strictly (``docs/hosts.md §2.1``: ``parser.parse_args()``), so anything this
module cannot match to a flag of the host makes the WebUI exit at start-up. We emulate the parts of argparse
the hosts' flags use — exact long options, ``--flag=value``, unique-prefix abbreviations (argparse's
``allow_abbrev`` is on in every host), store_true flags, one value, an optional value, several values,
choices — instead of running argparse itself, because argparse stops at the first problem and we want to
report every one of them with the token that caused it.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lib_optim.host_specs import HostKind
from lib_optim.launch.flagspec import FlagSpec, flags_by_option


@dataclass(frozen=True)
class GivenFlag:
    """One flag as the user gave it."""

    token: str  # as typed, e.g. "--medvr" or "--precision=full"
    option: str  # the host's canonical option string ("--medvram"), or the typed name if unknown
    value: str | None  # the value given (several values joined by a space), None for switches
    spec: FlagSpec | None  # None when the host does not know the flag
    index: int  # position in the argument list


@dataclass(frozen=True)
class ArgProblem:
    """Something argparse would exit on, other than an unknown flag."""

    kind: str  # "missing-value" | "bad-choice" | "bad-type" | "ambiguous" | "stray-argument"
    token: str
    detail: str


@dataclass
class ParsedArgs:
    host: HostKind
    argv: tuple[str, ...]
    known: list[GivenFlag] = field(default_factory=list)
    unknown: list[GivenFlag] = field(default_factory=list)
    problems: list[ArgProblem] = field(default_factory=list)

    def given(self, option: str) -> GivenFlag | None:
        """The last occurrence of ``option`` (argparse keeps the last value), or None."""
        hits = [f for f in self.known if f.option == option]
        return hits[-1] if hits else None

    def has(self, *options: str) -> bool:
        return any(self.given(o) is not None for o in options)

    def value(self, option: str) -> str | None:
        flag = self.given(option)
        return flag.value if flag else None

    def options(self) -> list[str]:
        """Canonical options given, first occurrence order, without repeats."""
        seen: dict[str, None] = {}
        for f in self.known:
            seen.setdefault(f.option, None)
        return list(seen)


def split_command_line(text: str) -> list[str]:
    """Split ``COMMANDLINE_ARGS`` as the host does (``shlex.split``, docs/hosts.md §2.2)."""
    return shlex.split(text)


# argparse's test for "this word is a negative number, not an option" (argparse.py, _negative_number_matcher,
# Python 3.10-3.12): "-5" and "-.5" are values, "-1e5", "-inf" and "-1_000" are not.
_NEGATIVE_NUMBER = re.compile(r"^-\d+$|^-\d*\.\d+$")


def _looks_like_option(token: str, table: Mapping[str, FlagSpec] | None = None) -> bool:
    """argparse's ``_parse_optional``: whether ``token`` is an option word rather than a value."""
    if not token.startswith("-") or token == "-":
        return False
    if table is not None:
        name = token.partition("=")[0]
        if name in table or (name.startswith("--") and any(o.startswith(name) for o in table)):
            return True
        if not name.startswith("--") and any(o == token[:2] for o in table):
            return True  # a short option with its value attached ("-fx")
    if _is_negative_number(token):
        return False  # no host option looks like a negative number
    # argparse: an unmatched word with a space in it is a value ("-my model"), not an option.
    return " " not in token


def _is_negative_number(token: str) -> bool:
    return _NEGATIVE_NUMBER.match(token) is not None


def parse_args(
    argv: Sequence[str] | str,
    host: HostKind,
    extra_flags: Iterable[FlagSpec] = (),
) -> ParsedArgs:
    """Parse ``argv`` (a list, or one command-line string) against ``host``'s flags.

    ``extra_flags`` are flags that extensions add in their preload (ours, and — inside the WebUI — every
    flag the real parser knows).
    """
    tokens = split_command_line(argv) if isinstance(argv, str) else list(argv)
    table = _flag_table(host, extra_flags)
    long_options = sorted(o for o in table if o.startswith("--"))
    result = ParsedArgs(host=host, argv=tuple(tokens))

    i = 0
    while i < len(tokens):
        token = tokens[i]
        index = i
        i += 1
        if token == "--":
            # argparse: everything after "--" is positional; the hosts take no positionals, and Python 3.10/3.11
            # leave the "--" itself among the unrecognized arguments too.
            result.problems.append(ArgProblem("stray-argument", token, "the WebUI takes no positional arguments"))
            for rest in tokens[i:]:
                result.problems.append(ArgProblem("stray-argument", rest, "after '--' every word is positional"))
            break
        if not _looks_like_option(token, table):
            result.problems.append(ArgProblem("stray-argument", token, "the WebUI takes no positional arguments"))
            continue
        name, has_inline, inline_value = token.partition("=")
        inline = inline_value if has_inline else None
        spec, problem = _lookup(name, token, table, long_options)
        if problem is not None:
            result.problems.append(problem)
            continue
        if spec is None:
            result.unknown.append(GivenFlag(token, name, inline, None, index))
            continue
        value, i, problem = _take_value(spec, token, inline, tokens, i, table)
        if problem is None:
            problem = _check_value(spec, token, value)
        if problem is not None:
            result.problems.append(problem)
            continue
        result.known.append(GivenFlag(token, spec.option, value, spec, index))
    return result


def _flag_table(host: HostKind, extra_flags: Iterable[FlagSpec]) -> dict[str, FlagSpec]:
    """Every option string ``host`` knows (aliases included) with its flag; the host's own win over extras."""
    table: dict[str, FlagSpec] = flags_by_option(host)
    for extra in extra_flags:
        for option in (extra.option, *extra.aliases):
            table.setdefault(option, extra)
    return table


def _lookup(
    name: str, token: str, table: Mapping[str, FlagSpec], long_options: Sequence[str]
) -> tuple[FlagSpec | None, ArgProblem | None]:
    """The flag ``name`` means: an exact option, or (argparse's abbreviations) the one long option it is a
    prefix of; an ``ambiguous`` problem when it abbreviates several flags; ``(None, None)`` when unknown."""
    spec: FlagSpec | None = table.get(name)
    if spec is None and name.startswith("--"):
        matches = [o for o in long_options if o.startswith(name)]
        distinct = {table[o].dest: o for o in matches}
        if len(distinct) > 1:
            return None, ArgProblem("ambiguous", token, "could be " + ", ".join(sorted(distinct.values())))
        if len(distinct) == 1:
            spec = table[next(iter(distinct.values()))]
    return spec, None


def _take_value(
    spec: FlagSpec, token: str, inline: str | None, tokens: Sequence[str], i: int, table: Mapping[str, FlagSpec]
) -> tuple[str | None, int, ArgProblem | None]:
    """The value ``spec`` takes from ``inline`` (``--flag=value``) or from the words from ``tokens[i]`` on, as
    argparse would: ``(value, the index of the next word, a problem or None)``."""
    value: str | None = None
    if spec.takes_value == "none":
        if inline is not None:
            return None, i, ArgProblem("bad-type", token, f"{spec.option} takes no value")
    elif spec.takes_value == "one":
        if inline is not None:
            value = inline
        elif i < len(tokens) and not _looks_like_option(tokens[i], table):
            value = tokens[i]
            i += 1
        else:
            return None, i, ArgProblem("missing-value", token, f"{spec.option} expects one value")
    elif spec.takes_value == "optional":
        if inline is not None:
            value = inline
        elif i < len(tokens) and not _looks_like_option(tokens[i], table):
            value = tokens[i]
            i += 1
    else:  # many
        # argparse: "--use-cpu=all sd" gives the flag only "all"; the words after it are not its values.
        values = [inline] if inline is not None else []
        while inline is None and i < len(tokens) and not _looks_like_option(tokens[i], table):
            values.append(tokens[i])
            i += 1
        if not values:
            return None, i, ArgProblem("missing-value", token, f"{spec.option} expects at least one value")
        value = " ".join(values)
    return value, i, None


def _check_value(spec: FlagSpec, token: str, value: str | None) -> ArgProblem | None:
    if value is None:
        return None
    parts = value.split(" ") if spec.takes_value == "many" else [value]
    for part in parts:
        if spec.choices is not None and part not in spec.choices:
            return ArgProblem("bad-choice", token, f"{spec.option}: {part!r} is not one of {', '.join(spec.choices)}")
        if spec.value_type == "int":
            try:
                int(part)
            except ValueError:
                return ArgProblem("bad-type", token, f"{spec.option}: {part!r} is not a whole number")
        if spec.value_type == "float":
            try:
                float(part)
            except ValueError:
                return ArgProblem("bad-type", token, f"{spec.option}: {part!r} is not a number")
    return None


def environment_command_line(env: Mapping[str, str]) -> list[str]:
    """The tokens ``COMMANDLINE_ARGS`` adds to ``sys.argv`` (docs/hosts.md §2.2)."""
    text = env.get("COMMANDLINE_ARGS", "")
    return split_command_line(text) if text.strip() else []
