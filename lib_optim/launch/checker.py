"""The compatibility checker: launch flags and environment variables against what a host really does.

Rules are data where the knowledge is data (:data:`FLAG_NOTES`: one row per flag and host, citing the host
code that makes it so) and small functions where a rule looks at several things at once (two attention
flags, exposure without authentication, the allocator configuration). Every rule is registered in
:data:`RULES` with a stable id; README.md lists them all (a test keeps the two in sync).

Severity: ``error`` — the WebUI will not start or will crash; ``warning`` — known-bad, ignored by this
host, or costly; ``info`` — redundant or obsolete.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from functools import cached_property
from typing import Any

from lib_optim.attention import A1111_NONE_TITLE, Attention, algorithms, backend
from lib_optim.host_specs import HostKind
from lib_optim.launch import env_notes
from lib_optim.launch.cmdline import ParsedArgs, parse_args
from lib_optim.launch.flagspec import FlagSpec

A1111 = HostKind.A1111
FORGE = HostKind.FORGE
FORGE_PREVIOUS = HostKind.FORGE_PREVIOUS
REFORGE = HostKind.REFORGE
FORGE_HOSTS = (FORGE, FORGE_PREVIOUS, REFORGE)
ALL_HOSTS = (A1111, FORGE, FORGE_PREVIOUS, REFORGE)
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


@dataclass(frozen=True)
class Rule:
    id: str
    severity: Severity  # the highest severity it reports
    hosts: tuple[HostKind, ...]
    title: str  # one line for README's rule table
    check: RuleCheck


RULES: dict[str, Rule] = {}


def rule(rule_id: str, severity: Severity, hosts: Sequence[HostKind], title: str) -> Callable[[RuleCheck], RuleCheck]:
    def register(fn: RuleCheck) -> RuleCheck:
        if rule_id in RULES:
            raise ValueError(f"rule id {rule_id!r} registered twice")
        RULES[rule_id] = Rule(rule_id, severity, tuple(hosts), title, fn)
        return fn

    return register


def run_checks(data: CheckInput) -> list[Finding]:
    """Every finding for ``data``, most severe first, each (rule, subject) once."""
    if data.host not in ALL_HOSTS:
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


# --- start-up exits -------------------------------------------------------------------------------------

# Why a flag is unknown, and what to use instead, per host (keys: the flag as users write it).
UNKNOWN_FLAG_HINTS: dict[str, dict[HostKind, str]] = {
    "--use-cuda-dsa": dict.fromkeys(
        ALL_HOSTS,
        "TORCH_USE_CUDA_DSA is a PyTorch *build* option (device-side assertions), not a WebUI flag; no host "
        "defines it. Remove it; for debugging a CUDA error set CUDA_LAUNCH_BLOCKING=1 for one run instead.",
    ),
    "--all-in-fp32": {A1111: "On A1111 use --no-half (fp32 weights) or --precision full."},
    "--all-in-fp16": {A1111: "A1111 runs fp16 by default; use --precision half to force it."},
    "--cuda-malloc": {
        A1111: "A1111 has no such flag; set PYTORCH_CUDA_ALLOC_CONF=backend:cudaMallocAsync in webui-user instead."
    },
    "--cuda-stream": {A1111: "A Forge-only flag; A1111 has no equivalent. Remove it."},
    "--pin-shared-memory": {A1111: "A Forge-only flag; A1111 has no equivalent. Remove it."},
    "--attention-split": {A1111: "On A1111 use --opt-split-attention."},
    "--attention-quad": {A1111: "On A1111 use --opt-sub-quad-attention."},
    "--attention-pytorch": {A1111: "On A1111 use --opt-sdp-attention."},
    "--vae-in-cpu": {A1111: "A1111 has no VAE-only CPU flag; use this extension's per-generation 'VAE on CPU'."},
    "--vae-in-fp32": {A1111: "On A1111 use --no-half-vae."},
    "--always-low-vram": {A1111: "On A1111 use --medvram (or --lowvram for 4 GB cards)."},
    "--always-no-vram": {A1111: "On A1111 use --lowvram."},
    "--always-cpu": {A1111: "On A1111 use --use-cpu all --no-half --skip-torch-cuda-test."},
    "--always-offload-from-vram": {A1111: "On A1111 use --medvram."},
    "--directml": {
        A1111: "Stock A1111 v1.10 has no DirectML support; use the DirectML fork of A1111 or Forge (--directml)."
    },
    "--force-channels-last": {
        A1111: "On A1111 use --opt-channelslast.",
        FORGE: "A reForge flag; Forge has none.",
    },
    "--use-directml": {
        A1111: "A flag of the DirectML fork of A1111, not of stock v1.10; use that fork or Forge.",
        FORGE: "On Forge use --directml.",
        FORGE_PREVIOUS: "On Forge use --directml.",
    },
    "--gpu-device-id": {A1111: "On A1111 use --device-id."},
    "--cuda-device": {A1111: "On A1111 use --device-id.", FORGE: "On Forge use --gpu-device-id."},
    "--reserve-vram": {FORGE: "A reForge flag; on Forge set the 'GPU Weights' slider or inference memory."},
}


@rule("unknown-flag", Severity.ERROR, ALL_HOSTS, "A flag the host does not define: start-up exits.")
def _unknown_flags(ctx: CheckContext) -> Iterator[Finding]:
    ignored = bool(ctx.env.get("IGNORE_CMD_ARGS_ERRORS"))
    for flag in ctx.args.unknown:
        hint = UNKNOWN_FLAG_HINTS.get(flag.option, {}).get(ctx.host)
        fix = hint or "Remove it, or install the extension that adds it (an extension's preload can add flags)."
        if ignored:
            yield Finding(
                "unknown-flag",
                Severity.WARNING,
                flag.option,
                f"{ctx.host.display_name} does not define {flag.option}; IGNORE_CMD_ARGS_ERRORS is set, so it is "
                "silently ignored (modules/shared_cmd_options.py:12-15).",
                fix,
            )
        else:
            yield Finding(
                "unknown-flag",
                Severity.ERROR,
                flag.option,
                f"{ctx.host.display_name} does not define {flag.option}: the WebUI exits at start-up with "
                "'unrecognized arguments' (modules/shared_cmd_options.py:12-15).",
                fix,
            )


@rule(
    "bad-flag-value",
    Severity.ERROR,
    ALL_HOSTS,
    "A flag with a missing, invalid or ambiguous value: start-up exits.",
)
def _bad_values(ctx: CheckContext) -> Iterator[Finding]:
    what = {
        "missing-value": "is missing its value",
        "bad-choice": "has a value the host does not accept",
        "bad-type": "has a value of the wrong type",
        "ambiguous": "is an abbreviation that matches several flags",
        "stray-argument": "is a word that is not a flag",
    }
    for problem in ctx.args.problems:
        yield Finding(
            "bad-flag-value",
            Severity.ERROR,
            problem.token,
            f"{problem.token!r} {what[problem.kind]} ({problem.detail}); argparse makes the WebUI exit at start-up.",
            "Fix or remove it; quote values that contain spaces.",
        )


@rule(
    "exclusive-flags",
    Severity.ERROR,
    FORGE_HOSTS,
    "Two flags of one Forge mutually exclusive group (e.g. --attention-split with --attention-pytorch).",
)
def _exclusive_groups(ctx: CheckContext) -> Iterator[Finding]:
    by_group: dict[str, list[str]] = {}
    for option in ctx.args.options():
        spec = ctx.args.given(option)
        if spec is not None and spec.spec is not None and spec.spec.group:
            by_group.setdefault(spec.spec.group, []).append(option)
    for group, options in by_group.items():
        if len(options) > 1:
            yield Finding(
                "exclusive-flags",
                Severity.ERROR,
                " ".join(options),
                f"{' and '.join(options)} belong to Forge's mutually exclusive '{group}' group: the launcher "
                "exits with 'not allowed with argument' before anything loads (backend/args.py).",
                f"Keep one of {', '.join(options)}.",
            )


@rule("a1111-precision-conflict", Severity.ERROR, (A1111,), "--precision half with --no-half or --no-half-vae.")
def _precision_conflict(ctx: CheckContext) -> Iterator[Finding]:
    if ctx.value("--precision") == "half":
        for option in ("--no-half", "--no-half-vae"):
            if ctx.has(option):
                yield Finding(
                    "a1111-precision-conflict",
                    Severity.ERROR,
                    f"--precision half {option}",
                    f"A1111 asserts that {option} and --precision half are not combined: start-up fails "
                    "(modules/shared_init.py:34-38).",
                    f"Drop {option} or --precision half.",
                )


# --- per-flag facts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlagNote:
    option: str
    hosts: tuple[HostKind, ...]
    rule: str
    severity: Severity
    effect: str  # what it does on those hosts (with the host code that makes it so)
    fix: str
    unless: Callable[[CheckContext], bool] | None = None  # a near miss: the note does not apply


def _forge_ignored(option: str, effect: str, fix: str, hosts: tuple[HostKind, ...] = FORGE_HOSTS) -> FlagNote:
    return FlagNote(option, hosts, "ignored-by-host", Severity.WARNING, effect, fix)


_FORGE_DOES_NOT_READ = "Forge parses it but no code reads it"

FLAG_NOTES: tuple[FlagNote, ...] = (
    # A1111 attention flags: Forge's backend picks attention itself (backend/memory_management.py:150-199).
    _forge_ignored(
        "--opt-sub-quad-attention",
        f"{_FORGE_DOES_NOT_READ}: attention is chosen by the backend from its own --attention-* flags.",
        "Use --attention-quad.",
    ),
    _forge_ignored(
        "--opt-split-attention",
        f"{_FORGE_DOES_NOT_READ}: attention is chosen by the backend from its own --attention-* flags.",
        "Use --attention-split.",
    ),
    _forge_ignored(
        "--opt-sdp-attention",
        f"{_FORGE_DOES_NOT_READ}; Forge already uses PyTorch SDPA on NVIDIA with torch 2 unless xformers is installed.",
        "Use --attention-pytorch (it also stops xformers from being used).",
        XFORMERS_WHEN_INSTALLED,
    ),
    _forge_ignored(
        "--opt-sdp-no-mem-attention",
        f"{_FORGE_DOES_NOT_READ}.",
        "Use --attention-pytorch.",
    ),
    _forge_ignored("--opt-split-attention-v1", f"{_FORGE_DOES_NOT_READ}.", "Use --attention-split."),
    _forge_ignored("--opt-split-attention-invokeai", f"{_FORGE_DOES_NOT_READ}.", "Use --attention-split."),
    _forge_ignored(
        "--disable-opt-split-attention",
        f"{_FORGE_DOES_NOT_READ}.",
        "Remove it; Forge has no 'no optimization' switch.",
    ),
    _forge_ignored("--xformers-flash-attention", f"{_FORGE_DOES_NOT_READ}.", "Remove it.", (FORGE,)),
    # Memory schemes replaced by Forge's automatic memory management (modules_forge/initialization.py).
    *(
        _forge_ignored(
            option,
            "Removed in Forge: it is parsed, Forge prints 'Arg ... is removed in Forge' and manages memory "
            "automatically (modules_forge/initialization.py).",
            "Remove it. To keep more free for computation lower 'GPU Weights' (or this extension's inference "
            "memory); to force offloading use --always-offload-from-vram or --always-low-vram.",
            (FORGE, FORGE_PREVIOUS),  # reForge prints another message (modules_forge/initialization.py:28-35)
        )
        for option in ("--medvram", "--medvram-sdxl", "--lowvram")
    ),
    _forge_ignored(
        "--opt-channelslast",
        f"{_FORGE_DOES_NOT_READ}; Forge never converts the UNet to channels-last.",
        "Remove it; use this extension's per-generation 'Channels-last UNet'.",
        (FORGE, FORGE_PREVIOUS),  # reForge does not define it (unknown-flag)
    ),
    _forge_ignored(
        "--disable-nan-check",
        "Harmless but does nothing: Forge's NaN test is a no-op (modules/devices.py:97-98).",
        "Remove it.",
    ),
    *(
        _forge_ignored(
            option,
            "Forge decides weight and compute dtypes in its backend; this flag is read only by the upscalers "
            "(modules/upscaler.py:34).",
            "For fp32 use --unet-in-* / --vae-in-fp32 / --all-in-fp32 (costly), or remove it.",
            (FORGE,),
        )
        for option in ("--no-half", "--upcast-sampling")
    ),
    _forge_ignored(
        "--no-half-vae",
        f"{_FORGE_DOES_NOT_READ}: the VAE dtype comes from --vae-in-* (backend/memory_management.py).",
        "Use --vae-in-fp32 if the VAE produces black images.",
        (FORGE,),
    ),
    _forge_ignored(
        "--precision",
        f"{_FORGE_DOES_NOT_READ}.",
        "Remove it; use --unet-in-* / --vae-in-* for dtypes.",
        (FORGE,),
    ),
    _forge_ignored(
        "--use-cpu",
        f"{_FORGE_DOES_NOT_READ}: modules/devices.py get_device_for always returns the GPU.",
        "Use --always-cpu to run everything on the CPU.",
        (FORGE,),
    ),
    FlagNote(
        "--xformers",
        XFORMERS_WHEN_INSTALLED,
        "xformers-flag-semantics",
        Severity.INFO,
        "On Forge --xformers only makes the launcher install xformers; the backend uses xformers whenever it "
        "can import it, with or without this flag (backend/memory_management.py:150-188).",
        "To stop Forge using an installed xformers add --disable-xformers (or --attention-pytorch).",
    ),
    # Obsolete
    FlagNote(
        "--force-enable-xformers",
        (A1111,),
        "obsolete-flag",
        Severity.WARNING,
        "Obsolete: it makes A1111 offer xformers even where xformers cannot run (GPU outside compute capability "
        "6.0-9.0, or xformers not importable), and without the literal --xformers flag the import is blocked "
        "(modules/import_hook.py:4-5, modules/sd_hijack_optimizations.py:56-57), so selecting it fails.",
        "Use --xformers.",
    ),
    FlagNote(
        "--force-enable-xformers",
        XFORMERS_WHEN_INSTALLED,
        "obsolete-flag",
        Severity.INFO,
        f"Obsolete: {_FORGE_DOES_NOT_READ}.",
        "Remove it; Forge uses xformers whenever it is installed.",
    ),
    FlagNote(
        "--max-batch-count",
        ALL_HOSTS,
        "obsolete-flag",
        Severity.INFO,
        "Its own help says 'does not do anything': no code reads it (modules/cmd_args.py).",
        "Remove it.",
    ),
    # Costly
    FlagNote(
        "--no-half",
        (A1111,),
        "costly-flag",
        Severity.WARNING,
        "Loads the whole model in fp32: about twice the VRAM and much slower sampling on GPUs with fp16 "
        "(modules/shared_init.py:30-31, modules/sd_models.py:465-470).",
        "Use --upcast-sampling, or only --no-half-vae if the VAE produces black/NaN images; keep --no-half only "
        "for GPUs without working fp16 (GTX 16xx) or CPU runs.",
        unless=lambda ctx: ctx.cpu_only,
    ),
    FlagNote(
        "--precision",
        (A1111,),
        "costly-flag",
        Severity.WARNING,
        "--precision full computes in fp32 without autocast (modules/shared_init.py:32): slower and more memory.",
        "Remove it (autocast is the default).",
        unless=lambda ctx: ctx.value("--precision") != "full" or ctx.cpu_only,
    ),
    FlagNote(
        "--all-in-fp32",
        FORGE_HOSTS,
        "costly-flag",
        Severity.WARNING,
        "Forces fp32 weights and compute everywhere (FORCE_FP32, backend/memory_management.py:229-231, "
        "1084-1085): about double the memory, much slower, and CUDA kernel errors have been reported with it.",
        "Remove it; if one part produces NaNs use --vae-in-fp32 or --unet-in-bf16 instead.",
        unless=lambda ctx: ctx.cpu_only,
    ),
    FlagNote(
        "--lowvram",
        (A1111,),
        "costly-flag",
        Severity.WARNING,
        "Moves every UNet block to the GPU and back on each step (modules/lowvram.py): several times slower. "
        "Only worth it on 4 GB cards.",
        "Use --medvram (or --medvram-sdxl) on 6 GB and larger cards.",
        unless=lambda ctx: ctx.facts.gpu_total_mb is None or ctx.facts.gpu_total_mb < 5500,
    ),
    FlagNote(
        "--medvram",
        (A1111,),
        "costly-flag",
        Severity.WARNING,
        "Keeps only one part of the model on the GPU at a time (modules/lowvram.py): slower, and not needed "
        "for SD1.5/SDXL on 12 GB and larger cards.",
        "Remove it, or use --medvram-sdxl to limit it to SDXL models.",
        unless=lambda ctx: ctx.facts.gpu_total_mb is None or ctx.facts.gpu_total_mb < 11500,
    ),
    # Redundant
    FlagNote(
        "--medvram-sdxl",
        (A1111,),
        "redundant-flag",
        Severity.INFO,
        "--medvram already applies to every model, SDXL included (modules/lowvram.py:20-21).",
        "Keep one of --medvram, --medvram-sdxl.",
        unless=lambda ctx: not ctx.has("--medvram"),
    ),
    FlagNote(
        "--medvram",
        (A1111,),
        "redundant-flag",
        Severity.INFO,
        "--lowvram takes precedence over --medvram (modules/lowvram.py:20-31).",
        "Keep one of --lowvram, --medvram.",
        unless=lambda ctx: not ctx.has("--lowvram"),
    ),
    FlagNote(
        "--no-half-vae",
        (A1111,),
        "redundant-flag",
        Severity.INFO,
        "--no-half already keeps the VAE in fp32 (modules/shared_init.py:31).",
        "Drop --no-half-vae.",
        unless=lambda ctx: not ctx.has("--no-half"),
    ),
    FlagNote(
        "--upcast-sampling",
        (A1111,),
        "redundant-flag",
        Severity.INFO,
        "With --no-half everything is fp32 already; upcasting has nothing to do.",
        "Drop one of them (--upcast-sampling alone is usually the better choice).",
        unless=lambda ctx: not ctx.has("--no-half"),
    ),
)


def _flag_note_rule(rule_id: str) -> RuleCheck:
    def check(ctx: CheckContext) -> Iterator[Finding]:
        for note in FLAG_NOTES:
            if note.rule != rule_id or ctx.host not in note.hosts or not ctx.has(note.option):
                continue
            if note.unless is not None and note.unless(ctx):
                continue
            prefix = "" if note.rule != "ignored-by-host" else f"{ctx.host.display_name} ignores {note.option}: "
            yield Finding(rule_id, note.severity, note.option, prefix + note.effect, note.fix)

    return check


def _note_hosts(rule_id: str) -> tuple[HostKind, ...]:
    return tuple(h for h in ALL_HOSTS if any(n.rule == rule_id and h in n.hosts for n in FLAG_NOTES))


for _rule_id, _severity, _title in (
    (
        "ignored-by-host",
        Severity.WARNING,
        "An A1111 flag that Forge parses but ignores; names the Forge equivalent.",
    ),
    (
        "xformers-flag-semantics",
        Severity.INFO,
        "--xformers on Forge only installs xformers; what really decides.",
    ),
    ("obsolete-flag", Severity.WARNING, "Obsolete flags (--force-enable-xformers, --max-batch-count)."),
    (
        "costly-flag",
        Severity.WARNING,
        "Flags that cost memory or speed: --no-half, --precision full, --all-in-fp32, "
        "--lowvram/--medvram on cards that do not need them.",
    ),
    ("redundant-flag", Severity.INFO, "A flag made redundant by another one given with it."),
):
    rule(_rule_id, _severity, _note_hosts(_rule_id), _title)(_flag_note_rule(_rule_id))


@rule("duplicate-flag", Severity.INFO, ALL_HOSTS, "The same flag given more than once (the last value wins).")
def _duplicates(ctx: CheckContext) -> Iterator[Finding]:
    counts: dict[str, list[str | None]] = {}
    for flag in ctx.args.known:
        counts.setdefault(flag.option, []).append(flag.value)
    for option, values in counts.items():
        if len(values) > 1:
            last = f" (value {values[-1]!r} wins)" if values[-1] is not None else ""
            yield Finding(
                "duplicate-flag",
                Severity.INFO,
                option,
                f"{option} is given {len(values)} times{last}; "
                "often COMMANDLINE_ARGS and the command line both set it.",
                "Give it once.",
            )


# --- attention --------------------------------------------------------------------------------------


def _a1111_optimizers() -> list[tuple[str, str, int, int]]:
    """A1111's optimizers with a launch flag: (A1111's name, flag, priority, list order), from the registry
    (docs/hosts.md §3.1). "None" is not an optimizer: --disable-opt-split-attention turns them all off."""
    out = []
    for entry in algorithms():
        opt = entry.a1111
        if opt is not None and opt.flag and opt.title != A1111_NONE_TITLE:
            out.append((opt.title.split(" - ")[0], opt.flag, opt.priority, opt.order))
    return out


def a1111_automatic_attention(ctx: CheckContext) -> tuple[str, str]:
    """Which optimizer A1111's 'Automatic' setting applies, and why (docs/hosts.md §3.1)."""
    if ctx.has("--disable-opt-split-attention"):
        return "none", "--disable-opt-split-attention disables every optimization under 'Automatic'"
    facts = ctx.facts
    no_cuda = facts.cuda_available is False or ctx.cpu_only
    available: list[tuple[str, str, int, int]] = []
    for name, option, base_priority, order in _a1111_optimizers():
        priority = base_priority
        if name == "xformers":
            if ctx.has("--force-enable-xformers"):
                pass
            elif not ctx.has("--xformers") or facts.xformers_matches_torch is False or no_cuda:
                continue  # without --xformers the import is blocked (docs/hosts.md §2.4)
            elif facts.compute_capability is not None and not (6, 0) <= facts.compute_capability <= (9, 0):
                continue
        if name == "sub-quadratic" and facts.mps_available:
            priority = 1000
        if name == "InvokeAI" and no_cuda and not facts.mps_available:
            priority = 1000
        available.append((name, option, priority, order))
    # sorted by priority, ties in the built-in list's order, as sd_hijack.list_optimizers sorts them
    ordered = sorted(available, key=lambda x: (-x[2], x[3]))
    for name, option, _, _ in ordered:
        if ctx.has(option):
            return name, f"{option} is the highest-priority attention flag given"
    return ordered[0][0], "no attention flag applies, so the highest-priority available optimizer is used"


@rule(
    "several-attention-flags",
    Severity.WARNING,
    (A1111,),
    "More than one attention flag; says which one the host actually uses.",
)
def _several_attention(ctx: CheckContext) -> Iterator[Finding]:
    given = [option for _, option, _, _ in sorted(_a1111_optimizers(), key=lambda x: x[3]) if ctx.has(option)]
    if ctx.has("--disable-opt-split-attention"):
        given.append("--disable-opt-split-attention")
    if len(given) < 2:
        return
    name, why = a1111_automatic_attention(ctx)
    yield Finding(
        "several-attention-flags",
        Severity.WARNING,
        " ".join(given),
        f"A1111 applies one attention optimization: with the setting 'Cross attention optimization' on "
        f"'Automatic' it uses {name} ({why}; modules/sd_hijack.py apply_optimizations). The other flags do nothing.",
        "Keep one attention flag (or none, and pick it per generation in the Optim accordion).",
    )


def _forge_attention_flags(host: HostKind) -> list[str]:
    """The launch flags that choose a Forge backend's attention function (the registry's Forge bindings)."""
    out = []
    for entry in algorithms():
        binding = entry.forge if host is FORGE else entry.ldm_patched
        if binding is not None and binding.flag and binding.flag not in out:
            out.append(binding.flag)
    return out


@rule(
    "attention-flag-overridden",
    Severity.WARNING,
    XFORMERS_WHEN_INSTALLED,
    "A Forge attention flag that an installed xformers overrides.",
)
def _attention_flag_overridden(ctx: CheckContext) -> Iterator[Finding]:
    flags = [o for o in _forge_attention_flags(ctx.host) if ctx.has(o)]
    sdp = backend(Attention.SDP).flag(ctx.host)
    if len(flags) != 1 or flags[0] == sdp or ctx.has("--disable-xformers"):
        return  # two of the group: the launcher exits (exclusive-flags); --attention-pytorch also stops xformers
    if ctx.has("--directml") or ctx.cpu_only:
        return  # xformers is never used with DirectML or on the CPU (docs/hosts.md §3.3, §4.8)
    if ctx.facts.xformers_known and ctx.facts.xformers_version is None:
        return  # xformers is not installed, so the flag is what decides
    known = bool(ctx.facts.xformers_version)
    yield Finding(
        "attention-flag-overridden",
        Severity.WARNING if known else Severity.INFO,
        flags[0],
        f"On Forge an installed xformers beats {flags[0]}: "
        + (
            "xformers is installed, so the backend uses xformers for attention"
            if known
            else "if xformers is "
            "installed in the WebUI's Python, the backend uses it instead (check with --probe from that Python)"
        )
        + " (backend/attention.py, docs/hosts.md §3.3).",
        f"Add --disable-xformers to make {flags[0]} take effect.",
    )


@rule(
    "directml-xformers",
    Severity.WARNING,
    FORGE_HOSTS,
    "xformers requested together with DirectML (AMD/Intel).",
)
def _directml_xformers(ctx: CheckContext) -> Iterator[Finding]:
    if not ctx.has("--directml"):
        return
    if ctx.has("--xformers") or ctx.has("--force-enable-xformers"):
        yield Finding(
            "directml-xformers",
            Severity.WARNING,
            "--directml --xformers",
            "xformers has CUDA kernels only; with DirectML it cannot run, and an installed xformers built for "
            "CUDA torch can break the import of the backend.",
            "Remove --xformers; with DirectML use --attention-split or --attention-quad.",
        )


# --- exposure ---------------------------------------------------------------------------------------------


@rule(
    "insecure-extension-access",
    Severity.WARNING,
    ALL_HOSTS,
    "Reachable from the network with --enable-insecure-extension-access and no --gradio-auth.",
)
def _insecure_extensions(ctx: CheckContext) -> Iterator[Finding]:
    exposed = ctx.exposed
    if not exposed or not ctx.has("--enable-insecure-extension-access"):
        return
    if ctx.has("--gradio-auth") or ctx.has("--gradio-auth-path"):
        return
    yield Finding(
        "insecure-extension-access",
        Severity.WARNING,
        "--enable-insecure-extension-access",
        f"The UI is reachable from other machines ({exposed}) and anyone who reaches it can install "
        "extensions — i.e. run any code on this machine (modules/shared_cmd_options.py:17-18).",
        "Add --gradio-auth user:password, or drop --enable-insecure-extension-access.",
    )


@rule("api-without-auth", Severity.WARNING, ALL_HOSTS, "--api reachable from the network without --api-auth.")
def _api_without_auth(ctx: CheckContext) -> Iterator[Finding]:
    exposed = ctx.exposed
    if not exposed or not (ctx.has("--api") or ctx.has("--nowebui")) or ctx.has("--api-auth"):
        return
    yield Finding(
        "api-without-auth",
        Severity.WARNING,
        "--api",
        f"The HTTP API is reachable from other machines ({exposed}) with no authentication: --gradio-auth "
        "does not cover /sdapi routes (modules/api/api.py).",
        "Add --api-auth user:password.",
    )


# --- environment ----------------------------------------------------------------------------------------


@rule("cuda-launch-blocking", Severity.WARNING, ALL_HOSTS, "CUDA_LAUNCH_BLOCKING=1 left set.")
def _launch_blocking(ctx: CheckContext) -> Iterator[Finding]:
    value = ctx.env.get("CUDA_LAUNCH_BLOCKING", "").strip()
    if value and value != "0":
        yield Finding(
            "cuda-launch-blocking",
            Severity.WARNING,
            "CUDA_LAUNCH_BLOCKING",
            f"CUDA_LAUNCH_BLOCKING={value} makes every CUDA kernel launch wait for the previous one: "
            "generation is much slower. It is a debugging aid only.",
            "Unset it (remove it from webui-user).",
        )


# Keys and value checks of the CUDA caching allocator config (c10/cuda/CUDAAllocatorConfig.cpp).
_ALLOC_KEYS: dict[str, str] = {
    "backend": "native or cudaMallocAsync",
    "max_split_size_mb": "a whole number of MB above 20",
    "max_non_split_rounding_mb": "a whole number of MB",
    "garbage_collection_threshold": "a number between 0 and 1 (exclusive)",
    "roundup_power2_divisions": "a power of two, or a list like [256:1,512:2,>:4]",
    "expandable_segments": "True or False",
    "release_lock_on_cudamalloc": "True or False",
    "pinned_use_cuda_host_register": "True or False",
    "pinned_num_register_threads": "a power of two up to 128",
    "pinned_use_background_threads": "True or False",
}


def parse_alloc_conf(text: str) -> tuple[dict[str, str], list[str]]:
    """Split PYTORCH_CUDA_ALLOC_CONF into {key: value} and a list of problems (one sentence each)."""
    values: dict[str, str] = {}
    problems: list[str] = []
    # roundup_power2_divisions may hold a bracketed list with commas and colons inside.
    parts: list[str] = []
    depth = 0
    current = ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for raw in parts:
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            problems.append(f"'{item}' is not key:value")
            continue
        if key not in _ALLOC_KEYS:
            problems.append(f"'{key}' is not an allocator option (known: {', '.join(_ALLOC_KEYS)})")
            continue
        if key in values and key != "backend":
            problems.append(f"'{key}' is given twice")
        values[key] = value if key != "backend" else values.get(key, "") + ("," if key in values else "") + value
        reason = _alloc_value_problem(key, value)
        if reason:
            problems.append(f"{key}:{value} — expected {reason}")
    return values, problems


def _alloc_value_problem(key: str, value: str) -> str | None:
    allowed = _ALLOC_KEYS[key]
    if key == "backend":
        return None if value in ("native", "cudaMallocAsync") else allowed
    if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
        if not value.isdigit() or (key == "max_split_size_mb" and int(value) <= 20):
            return allowed
        return None
    if key == "garbage_collection_threshold":
        try:
            number = float(value)
        except ValueError:
            return allowed
        return None if 0 < number < 1 else allowed
    if key == "roundup_power2_divisions":
        if value.startswith("["):
            return None if value.endswith("]") else allowed
        return None if value.isdigit() and int(value) > 0 and int(value) & (int(value) - 1) == 0 else allowed
    if key == "pinned_num_register_threads":
        ok = value.isdigit() and 0 < int(value) <= 128 and int(value) & (int(value) - 1) == 0
        return None if ok else allowed
    return None if value in ("True", "False") else allowed


_ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


@rule(
    "alloc-conf",
    Severity.ERROR,
    ALL_HOSTS,
    "Malformed or conflicting PYTORCH_CUDA_ALLOC_CONF (unknown keys, bad values, backend vs --cuda-malloc).",
)
def _alloc_conf(ctx: CheckContext) -> Iterator[Finding]:
    for var in _ALLOC_VARS:
        text = ctx.env.get(var)
        if text is None:
            continue
        values, problems = parse_alloc_conf(text)
        for problem in problems:
            yield Finding(
                "alloc-conf",
                Severity.ERROR,
                var,
                f"{var}={text!r}: {problem}. PyTorch rejects the whole setting with a RuntimeError at the first "
                "CUDA allocation, so the WebUI crashes when it loads the model.",
                "Fix the value (comma-separated key:value pairs) or unset it.",
            )
        backend = values.get("backend", "")
        if "," in backend and len(set(backend.split(","))) > 1:
            yield Finding(
                "alloc-conf",
                Severity.WARNING,
                var,
                f"{var} names two allocator backends ({backend}); the later one wins.",
                "Name one backend.",
            )
        async_backend = "cudaMallocAsync" in backend or (ctx.host is not A1111 and ctx.has("--cuda-malloc"))
        if "native" in backend and ctx.host is not A1111 and ctx.has("--cuda-malloc"):
            yield Finding(
                "alloc-conf",
                Severity.WARNING,
                f"{var} --cuda-malloc",
                f"{var} asks for backend:native, but --cuda-malloc appends ',backend:cudaMallocAsync' to it "
                "before torch loads (modules_forge/cuda_malloc.py:80-87), overriding your choice.",
                "Drop --cuda-malloc or the backend entry.",
            )
        if async_backend:
            for key in ("expandable_segments", "garbage_collection_threshold", "max_split_size_mb"):
                if key in values:
                    yield Finding(
                        "alloc-conf",
                        Severity.WARNING,
                        f"{var} {key}",
                        f"{key} configures PyTorch's native caching allocator; with the cudaMallocAsync backend "
                        "it has no effect.",
                        f"Drop {key}, or drop the cudaMallocAsync backend"
                        + (" (--cuda-malloc)." if ctx.has("--cuda-malloc") else "."),
                    )


@rule(
    "cuda-module-loading",
    Severity.WARNING,
    ALL_HOSTS,
    "CUDA_MODULE_LOADING set to EAGER or an invalid value.",
)
def _module_loading(ctx: CheckContext) -> Iterator[Finding]:
    value = ctx.env.get("CUDA_MODULE_LOADING")
    if value is None:
        return
    if value.upper() == "EAGER":
        yield Finding(
            "cuda-module-loading",
            Severity.WARNING,
            "CUDA_MODULE_LOADING",
            "EAGER loads every CUDA kernel of torch at start-up: slower start and hundreds of MB more GPU "
            "memory. PyTorch sets LAZY by default.",
            "Unset it (or set LAZY).",
        )
    elif value.upper() != "LAZY":
        yield Finding(
            "cuda-module-loading",
            Severity.WARNING,
            "CUDA_MODULE_LOADING",
            f"{value!r} is not a value CUDA knows (LAZY or EAGER); it is ignored.",
            "Unset it.",
        )


# Variables that optimisation notes recommend, against what really reads them (lib_optim/launch/env_notes.py).
_ENV_RULE_TITLES = {
    "no-effect-env": "Environment variables that nothing in this WebUI reads (or not at these values).",
    "redundant-env": "Environment variables set to what is already the default, or that the host replaces.",
    "costly-env": "Environment variables that slow generation down (debugging switches, malloc tuning, …).",
    "obsolete-env": "Environment variables read only by older versions of PyTorch, safetensors or glibc.",
}


def _env_note_rule(rule_id: str) -> RuleCheck:
    def check(ctx: CheckContext) -> Iterator[Finding]:
        for note, item in env_notes.applicable(rule_id, ctx):
            message = note.explain(item.shown, item.value, ctx)
            yield Finding(rule_id, Severity(note.severity), item.subject, message, note.fix)

    return check


for _rule_id in env_notes.RULE_IDS:
    rule(
        _rule_id,
        Severity(env_notes.rule_severity(_rule_id)),
        env_notes.rule_hosts(_rule_id),
        _ENV_RULE_TITLES[_rule_id],
    )(_env_note_rule(_rule_id))


# --- runtime facts --------------------------------------------------------------------------------------


@rule("xformers-mismatch", Severity.WARNING, ALL_HOSTS, "xformers installed but built for another torch.")
def _xformers_mismatch(ctx: CheckContext) -> Iterator[Finding]:
    f = ctx.facts
    if f.xformers_version is None or f.xformers_matches_torch is not False:
        return
    if ctx.host is A1111 and not ctx.has("--xformers"):
        return  # not imported at all without the flag (modules/import_hook.py:4-5)
    used = (
        "A1111 fails to use it and falls back to another optimizer"
        if ctx.host is A1111
        else "Forge imports it whenever it is installed, so its C++/CUDA parts fail to load"
    )
    yield Finding(
        "xformers-mismatch",
        Severity.WARNING,
        "xformers",
        f"xformers {f.xformers_version} was built for torch {f.xformers_built_for_torch or '?'}, but torch "
        f"{f.torch_version or '?'} is installed: {used}.",
        "Reinstall the xformers that matches your torch (launch once with --reinstall-xformers), "
        "or uninstall xformers and use sdp attention.",
    )


@rule("torch-without-cuda", Severity.ERROR, ALL_HOSTS, "torch cannot use a GPU and the launcher's CUDA test is on.")
def _torch_without_cuda(ctx: CheckContext) -> Iterator[Finding]:
    f = ctx.facts
    if f.cuda_available is not False:
        return
    # --use-cpu/--always-cpu/--directml do not switch the launcher's CUDA test off; only --skip-torch-cuda-test
    # and --use-ipex do (A1111 modules/launch_utils.py:384-390, Forge f2 :431-439, Forge previous :428-434).
    intended = ctx.cpu_only or ctx.has("--directml") or bool(f.mps_available) or ctx.has("--use-ipex")
    # No NVIDIA card on the bus and no driver: a CPU-only machine, where a CUDA torch is not the problem.
    no_gpu = f.nvidia_gpu_expected is False and not f.nvidia_driver
    cpu_flags = "--use-cpu all --no-half" if ctx.host is A1111 else "--always-cpu"
    if ctx.has("--skip-torch-cuda-test") or ctx.has("--use-ipex"):
        if intended:
            return
        yield Finding(
            "torch-without-cuda",
            Severity.WARNING,
            "torch",
            "torch cannot use a CUDA GPU here, and --skip-torch-cuda-test hides that: generation will run "
            "on the CPU, very slowly.",
            f"This machine has no NVIDIA GPU: add {cpu_flags} to run on the CPU on purpose (the cpu profile)."
            if no_gpu
            else f"Install a CUDA build of torch (TORCH_COMMAND) or, for CPU on purpose, use {cpu_flags}.",
        )
        return
    if f.mps_available:
        return  # webui-macos-env.sh adds --skip-torch-cuda-test to COMMANDLINE_ARGS
    why = "torch is a CPU-only build" if f.torch_has_cuda is False else "torch cannot reach a CUDA GPU"
    says = (
        "'Your device does not support the current version of Torch/CUDA!'"
        if ctx.host is FORGE
        else "'Torch is not able to use GPU'"
    )
    if intended:
        mode = "--directml" if ctx.has("--directml") else ("--use-cpu" if ctx.host is A1111 else "--always-cpu")
        yield Finding(
            "torch-without-cuda",
            Severity.ERROR,
            "torch",
            f"{why}, and {mode} does not switch off the launcher's CUDA test: start-up stops with {says} "
            "(modules/launch_utils.py, prepare_environment).",
            "Add --skip-torch-cuda-test.",
        )
        return
    cpu_profile = (
        "run on the CPU with the cpu profile (python -m lib_optim profile apply cpu --file <webui-user file>), "
        f"which adds {cpu_flags} --skip-torch-cuda-test"
    )
    if no_gpu:
        fix = f"This machine has no NVIDIA GPU, so a CUDA torch cannot help: {cpu_profile}."
    elif f.torch_has_cuda is False:
        fix = (
            "Install a CUDA build of torch matching your driver; for AMD on Windows use Forge with --directml "
            f"(and --skip-torch-cuda-test). Without a GPU: {cpu_profile}."
        )
    else:
        fix = (
            "torch is a CUDA build: check that the NVIDIA driver works (nvidia-smi) and is new enough for torch's "
            f"CUDA. Without a GPU: {cpu_profile}."
        )
    yield Finding(
        "torch-without-cuda",
        Severity.ERROR,
        "torch",
        f"{why}: the launcher's CUDA test stops start-up with {says} (modules/launch_utils.py, prepare_environment).",
        fix,
    )


@rule("no-nvidia-driver", Severity.ERROR, ALL_HOSTS, "An NVIDIA GPU is present but its driver does not answer.")
def _no_driver(ctx: CheckContext) -> Iterator[Finding]:
    f = ctx.facts
    if not f.nvidia_gpu_expected or f.nvidia_driver is not None or ctx.cpu_only:
        return
    if f.nvidia_driver_error is None:
        # Nothing here could ask the driver (no pynvml, no CUDA torch, no nvidia-smi): that says nothing about it.
        yield Finding(
            "no-nvidia-driver",
            Severity.INFO,
            "NVIDIA driver",
            "An NVIDIA GPU is present, but this Python cannot ask its driver (no pynvml, no nvidia-smi on the "
            "PATH): its memory and driver version are unknown here.",
            "Run the command with the WebUI's Python (<WebUI folder>/venv/bin/python, on Windows "
            "<WebUI folder>\\venv\\Scripts\\python) for exact figures.",
        )
        return
    yield Finding(
        "no-nvidia-driver",
        Severity.ERROR,
        "NVIDIA driver",
        f"An NVIDIA GPU is present but its driver does not answer ({f.nvidia_driver_error}): the driver is "
        "missing or broken, so CUDA cannot start.",
        "Install or repair the NVIDIA driver (nvidia-smi must work; after a driver update, reboot), then restart.",
    )


def rules_markdown() -> str:
    """The rule table for README.md."""
    lines = ["| Rule | Severity | Hosts | What it finds |", "|---|---|---|---|"]
    for r in RULES.values():
        hosts = ", ".join(h.value for h in r.hosts)
        lines.append(f"| `{r.id}` | {r.severity.value} | {hosts} | {r.title} |")
    return "\n".join(lines)


LAUNCHER_FILE_RULE = "launcher-file"


@rule(
    LAUNCHER_FILE_RULE,
    Severity.WARNING,
    ALL_HOSTS,
    "webui-user.sh/.bat: what bash or cmd would read differently or the checker cannot follow (CRLF line endings, "
    "`$(…)`, lines after `call webui.bat`, …).",
)
def _launcher_file(ctx: CheckContext) -> Iterator[Finding]:
    for note in ctx.launcher_notes:
        if note.rule != LAUNCHER_FILE_RULE:
            raise ValueError(f"launcher_notes: {note.rule!r} is not allowed; allowed: {LAUNCHER_FILE_RULE!r}")
        yield note
