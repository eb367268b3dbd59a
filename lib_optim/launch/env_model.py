"""The environment notes' model: a row (:class:`EnvNote`, :class:`QuietNote`), what a row may look at, and the
value helpers the rows share. The rows are :mod:`lib_optim.launch.env_rows`; applying them is
:mod:`lib_optim.launch.env_notes`."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from lib_optim.host_specs import HostKind, host_spec, host_specs

A1111 = HostKind.A1111
FORGE = HostKind.FORGE
FORGE_PREVIOUS = HostKind.FORGE_PREVIOUS
FORGE_HOSTS = (FORGE, FORGE_PREVIOUS)
# A row's hosts: every host whose environment the notes were read against (a spec with default_torch).
EVERY_HOST = None


def env_hosts() -> tuple[HostKind, ...]:
    """The hosts the environment notes cover: those whose launcher's torch is known (HostSpec.default_torch)."""
    return tuple(s.kind for s in host_specs() if s.default_torch is not None)


def host_torch(host: HostKind) -> str | None:
    """The torch ``host`` installs when TORCH_COMMAND is not set (its spec's default_torch)."""
    return host_spec(host).default_torch if host in HostKind else None


RULE_IDS = ("no-effect-env", "redundant-env", "costly-env", "obsolete-env")


class FactsView(Protocol):
    """The runtime facts the rows look at (lib_optim.launch.checker.RuntimeFacts has them)."""

    @property
    def torch_version(self) -> str | None: ...

    @property
    def mps_available(self) -> bool | None: ...

    @property
    def xformers_known(self) -> bool: ...

    @property
    def xformers_version(self) -> str | None: ...


class EnvContext(Protocol):
    """What a row may look at besides the value (lib_optim.launch.checker.CheckContext has it)."""

    @property
    def host(self) -> HostKind: ...

    @property
    def env(self) -> Mapping[str, str]: ...

    @property
    def facts(self) -> FactsView: ...

    @property
    def cpu_only(self) -> bool: ...

    def has(self, *options: str) -> bool: ...

    def value(self, option: str) -> str | None: ...


Condition = Callable[[str, EnvContext], bool]
Explain = Callable[[str, str, EnvContext], str]  # (variable as written, value, context) -> message


@dataclass(frozen=True)
class EnvNote:
    key: str  # stable id of the row (tests and README refer to it)
    names: tuple[str, ...]  # upper-case names; a trailing "*" matches a prefix
    host_set: tuple[HostKind, ...] | None  # None (EVERY_HOST): every host of env_hosts()
    rule: str  # one of RULE_IDS
    severity: str  # "warning" or "info"
    when: Condition  # does the row apply to this value here?
    fires_on: str  # README: the values it applies to, in words
    summary: str  # README: what the variable does here, one line
    message: str | Explain  # the finding; a str may use {name}, {value}, {torch}, {host}
    fix: str
    source: str  # where this is read or documented

    @property
    def hosts(self) -> tuple[HostKind, ...]:
        return env_hosts() if self.host_set is None else self.host_set

    def applies_to(self, host: HostKind) -> bool:
        return host in self.hosts

    def matches(self, name: str) -> bool:
        upper = name.upper()
        return any(upper.startswith(n[:-1]) if n.endswith("*") else upper == n for n in self.names)

    def explain(self, name: str, value: str, ctx: EnvContext) -> str:
        if callable(self.message):
            return self.message(name, value, ctx)
        return self.message.format(name=name, value=value, torch=torch_text(ctx), host=ctx.host.display_name)


@dataclass(frozen=True)
class QuietNote:
    names: tuple[str, ...]
    summary: str  # what it does
    why_quiet: str  # why the checker says nothing
    source: str


# --- value helpers ------------------------------------------------------------------------------------


def torch_release(ctx: EnvContext) -> tuple[int, int]:
    """(major, minor) of the torch in use: the probed one, else the one the host installs."""
    text = ctx.facts.torch_version or (host_torch(ctx.host) or "2.3.1")
    match = re.match(r"(\d+)\.(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (2, 3)


def torch_text(ctx: EnvContext) -> str:
    if ctx.facts.torch_version:
        return ctx.facts.torch_version
    return f"{host_torch(ctx.host) or '?'} (what {ctx.host.display_name} installs)"


def glibc_number(value: str) -> int | None:
    """A MALLOC_*_ value the way glibc reads it: leading digits (0x for hex), nothing → 0, negative → None.

    Measured with glibc 2.36: "1e9" and "100k" act as 1 and 100, "" and "abc" as 0, "-1" is ignored.
    """
    text = value.strip()
    if text.startswith("-"):
        return None  # wraps to a huge number, which glibc refuses: the variable is ignored
    match = re.match(r"0[xX]([0-9a-fA-F]+)", text)
    if match:
        return int(match.group(1), 16)
    match = re.match(r"\d+", text)
    return int(match.group(0)) if match else 0
