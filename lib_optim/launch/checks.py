"""The checker's engine: findings, the check context, the rule registry and :func:`run_checks`.

The rules themselves live in :mod:`lib_optim.launch.rules_flags` (launch flags) and
:mod:`lib_optim.launch.rules_system` (exposure, environment variables, the machine); :mod:`lib_optim.launch.checker`
loads them all. Severity: ``error`` — the WebUI will not start or will crash; ``warning`` — known-bad, ignored by
this host, or costly; ``info`` — redundant or obsolete.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any

from lib_optim.host_specs import HostKind, checked_hosts
from lib_optim.launch.cmdline import ParsedArgs, parse_args
from lib_optim.launch.flagspec import FlagSpec

A1111 = HostKind.A1111
FORGE = HostKind.FORGE
FORGE_PREVIOUS = HostKind.FORGE_PREVIOUS
REFORGE = HostKind.REFORGE
FORGE_HOSTS = (FORGE, FORGE_PREVIOUS, REFORGE)
# A rule's or a note's hosts: every host the checker covers (lib_optim.host_specs.checked_hosts()), a fake fifth
# host registered later included.
EVERY_HOST = None
# reForge keeps A1111's xformers import hook and checks it (reForge modules/import_hook.py:4-5,
# ldm_patched/modules/model_management.py:1095-1111): an installed xformers is used only with --xformers, so the
# notes that say Forge uses xformers whenever it is installed are not true there.
XFORMERS_WHEN_INSTALLED = (FORGE, FORGE_PREVIOUS)


class Severity(str, Enum):
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return {"info": 0, "warning": 1, "error": 2}[self.value]


@dataclass(frozen=True)
class Finding:
    rule: str  # stable rule id, e.g. "unknown-flag"
    severity: Severity
    subject: str  # the flag or variable, e.g. "--all-in-fp32" or "PYTORCH_CUDA_ALLOC_CONF"
    message: str  # what it does on this host
    fix: str  # what to do instead

    @property
    def key(self) -> str:
        """Stable identity of this finding: rule and subject."""
        return f"{self.rule}:{self.subject}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["severity"] = self.severity.value
        data["key"] = self.key
        return data


@dataclass(frozen=True)
class RuntimeFacts:
    """What is known about the machine; None = unknown (the rules that need it stay quiet)."""

    torch_version: str | None = None
    torch_has_cuda: bool | None = None  # torch build with CUDA (or ROCm) support
    cuda_available: bool | None = None
    nvidia_driver: str | None = None
    # The driver was asked (NVML, nvidia-smi, the kernel module) and did not answer: why. With nvidia_driver
    # None and no error, nothing here could ask it (no pynvml, no nvidia-smi): unknown, not broken.
    nvidia_driver_error: str | None = None
    nvidia_gpu_expected: bool | None = None  # an NVIDIA card is present (e.g. seen on the PCI bus)
    gpu_total_mb: int | None = None
    compute_capability: tuple[int, int] | None = None
    xformers_version: str | None = None  # None = not installed (when xformers_known)
    xformers_known: bool = False
    xformers_built_for_torch: str | None = None
    xformers_matches_torch: bool | None = None
    directml_installed: bool | None = None
    mps_available: bool | None = None


@dataclass
class CheckInput:
    host: HostKind
    argv: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    facts: RuntimeFacts = field(default_factory=RuntimeFacts)
    extra_flags: Sequence[FlagSpec] = ()  # flags extensions add in their preload
    # what reading webui-user.sh/.bat found that the checker cannot follow (lib_optim.webui_user's notes),
    # as findings of the rule launcher-file, with "file:line" in the message
    launcher_notes: Sequence[Finding] = ()


class CheckContext:
    """What the rules look at: the parsed command line, the environment and the runtime facts."""

    def __init__(self, data: CheckInput):
        self.host = data.host
        self.env = dict(data.env)
        self.facts = data.facts
        self.args: ParsedArgs = parse_args(list(data.argv), data.host, data.extra_flags)
        self.launcher_notes = tuple(data.launcher_notes)

    def has(self, *options: str) -> bool:
        return self.args.has(*options)

    def value(self, option: str) -> str | None:
        return self.args.value(option)

    @cached_property
    def exposed(self) -> str | None:
        """Why the server is reachable from other machines, or None when it listens on loopback only."""
        if self.has("--share"):
            return "--share"
        if self.has("--ngrok"):
            return "--ngrok"
        if self.has("--listen"):
            return "--listen"
        name = self.value("--server-name")
        if name and not _is_loopback(name):
            return f"--server-name {name}"
        return None

    @cached_property
    def cpu_only(self) -> bool:
        # A1111 lower-cases the values (type=str.lower, modules/cmd_args.py:74).
        use_cpu = (self.value("--use-cpu") or "").lower().split()
        return (self.host is A1111 and ("all" in use_cpu or "sd" in use_cpu)) or (
            self.host is not A1111 and self.has("--always-cpu")
        )


def _is_loopback(name: str) -> bool:
    if name.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


RuleCheck = Callable[[CheckContext], Iterable[Finding]]


# None: every checked host; a callable: the hosts it answers when asked (registered hosts can change)
RuleHosts = Sequence[HostKind] | Callable[[], Sequence[HostKind]] | None


@dataclass(frozen=True)
class Rule:
    id: str
    severity: Severity  # the highest severity it reports
    host_set: RuleHosts
    title: str  # one line for README's rule table
    check: RuleCheck

    @property
    def hosts(self) -> tuple[HostKind, ...]:
        """The hosts it applies to, now."""
        if self.host_set is None:
            return checked_hosts()
        return tuple(self.host_set() if callable(self.host_set) else self.host_set)


RULES: dict[str, Rule] = {}


def rule(rule_id: str, severity: Severity, hosts: RuleHosts, title: str) -> Callable[[RuleCheck], RuleCheck]:
    def register(fn: RuleCheck) -> RuleCheck:
        if rule_id in RULES:
            raise ValueError(f"rule id {rule_id!r} registered twice")
        frozen = hosts if hosts is None or callable(hosts) else tuple(hosts)
        RULES[rule_id] = Rule(rule_id, severity, frozen, title, fn)
        return fn

    return register


def run_checks(data: CheckInput) -> list[Finding]:
    """Every finding for ``data``, most severe first, each (rule, subject) once."""
    if data.host not in checked_hosts():
        return [
            Finding(
                "host-not-covered",
                Severity.INFO,
                data.host.value,
                f"{data.host.display_name} is detected but its flags are not covered by the checker.",
                "Check flags against the host's own --help output.",
            )
        ]
    ctx = CheckContext(data)
    seen: set[str] = set()
    findings: list[Finding] = []
    for r in RULES.values():
        if ctx.host not in r.hosts:
            continue
        for finding in r.check(ctx):
            if finding.key not in seen:
                seen.add(finding.key)
                findings.append(finding)
    findings.sort(key=lambda f: -f.severity.rank)
    return findings


def worst_severity(findings: Iterable[Finding]) -> Severity | None:
    worst: Severity | None = None
    for f in findings:
        if worst is None or f.severity.rank > worst.rank:
            worst = f.severity
    return worst


def exit_code(findings: Iterable[Finding]) -> int:
    """0 when nothing above info, 1 for warnings, 2 for errors (the CLI's exit status)."""
    worst = worst_severity(findings)
    return 0 if worst in (None, Severity.INFO) else worst.rank


def rules_markdown() -> str:
    """The rule table for README.md."""
    lines = ["| Rule | Severity | Hosts | What it finds |", "|---|---|---|---|"]
    for r in RULES.values():
        hosts = ", ".join(h.value for h in r.hosts)
        lines.append(f"| `{r.id}` | {r.severity.value} | {hosts} | {r.title} |")
    return "\n".join(lines)


def format_findings(findings: Sequence[Finding], host: HostKind) -> str:
    """The findings as text, for the command line."""
    if not findings:
        return f"No problems found for {host.display_name}."
    lines = [f"{len(findings)} finding(s) for {host.display_name}:"]
    for f in findings:
        lines += [f"  [{f.severity.value}] {f.subject}  ({f.rule})", f"      {f.message}", f"      fix: {f.fix}"]
    return "\n".join(lines)
