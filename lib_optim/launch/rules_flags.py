"""Checker rules about the launch flags: what makes start-up exit, per-flag facts, duplicates, attention flags.

Rules are data where the knowledge is data (:data:`FLAG_NOTES`: one row per flag and host, citing the host
code that makes it so) and small functions where a rule looks at several things at once. Every rule is
registered in :data:`lib_optim.launch.checks.RULES` with a stable id; README.md lists them all.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from lib_optim.attention import A1111_NONE_TITLE, Attention, algorithms, backend
from lib_optim.host_specs import HostKind, checked_hosts, host_spec
from lib_optim.launch.checks import (
    A1111,
    EVERY_HOST,
    FORGE,
    FORGE_HOSTS,
    FORGE_PREVIOUS,
    XFORMERS_WHEN_INSTALLED,
    CheckContext,
    Finding,
    RuleCheck,
    Severity,
    rule,
)
from lib_optim.launch.cmdline import parse_args
from lib_optim.webui_user import joined_flags

# --- start-up exits -------------------------------------------------------------------------------------

# Why a flag is unknown, and what to use instead, per host (keys: the flag as users write it; EVERY: any host).
EVERY = "*"
UNKNOWN_FLAG_HINTS: dict[str, dict[str, str]] = {
    "--use-cuda-dsa": {
        EVERY: "TORCH_USE_CUDA_DSA is a PyTorch *build* option (device-side assertions), not a WebUI flag; no host "
        "defines it. Remove it; for debugging a CUDA error set CUDA_LAUNCH_BLOCKING=1 for one run instead.",
    },
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


@rule("unknown-flag", Severity.ERROR, EVERY_HOST, "A flag the host does not define: start-up exits.")
def _unknown_flags(ctx: CheckContext) -> Iterator[Finding]:
    ignored = bool(ctx.env.get("IGNORE_CMD_ARGS_ERRORS"))
    for flag in ctx.args.unknown:
        hints = UNKNOWN_FLAG_HINTS.get(flag.option, {})
        hint = hints.get(ctx.host) or hints.get(EVERY)
        fix = hint or "Remove it, or install the extension that adds it (an extension's preload can add flags)."
        fix += _other_hosts_with(flag.option, ctx.host)
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


def _other_hosts_with(option: str, host: HostKind) -> str:
    """ " X is a flag of Y: if that is your WebUI, check with --host y.": a file checked for the wrong host."""
    others = [h for h in checked_hosts() if h != host and not parse_args([option], h).unknown]
    if not others:
        return ""
    names = _series([h.display_name for h in others], "and")
    hosts = _series([f"--host {h.value}" for h in others], "or")
    which = "that" if len(others) == 1 else "one of them"
    return f" {option} is a flag of {names}: if {which} is your WebUI, check with {hosts}."


def _series(items: list[str], conjunction: str) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} {conjunction} {items[-1]}"


@rule(
    "bad-flag-value",
    Severity.ERROR,
    EVERY_HOST,
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
        if problem.kind == "stray-argument" and joined_flags(problem.token):
            yield _joined_flags_finding(problem.token)
            continue
        yield Finding(
            "bad-flag-value",
            Severity.ERROR,
            problem.token,
            f"{problem.token!r} {what[problem.kind]} ({problem.detail}); argparse makes the WebUI exit at start-up.",
            "Fix or remove it; quote values that contain spaces.",
        )


def _joined_flags_finding(token: str) -> Finding:
    """``"--xformers --medvram"`` as one word: the quotes are the problem, quoting more would not help."""
    return Finding(
        "bad-flag-value",
        Severity.ERROR,
        token,
        f"{token!r} is several flags in one word: quotes around them kept them together (in webui-user.bat cmd keeps "
        'the quotes of `set COMMANDLINE_ARGS="..."` in the value), and argparse takes a word with a space for a '
        "positional argument, so the WebUI exits at start-up with 'unrecognized arguments'.",
        f"Remove the quotes around the flags, so each is a word of its own: in webui-user.bat "
        f'set COMMANDLINE_ARGS={token} (no quotes); in webui-user.sh export COMMANDLINE_ARGS="{token}".',
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
    host_set: tuple[HostKind, ...] | None  # None (EVERY_HOST): every checked host
    rule: str
    severity: Severity
    effect: str  # what it does on those hosts (with the host code that makes it so)
    fix: str
    unless: Callable[[CheckContext], bool] | None = None  # a near miss: the note does not apply

    @property
    def hosts(self) -> tuple[HostKind, ...]:
        return checked_hosts() if self.host_set is None else self.host_set

    def applies_to(self, host: HostKind) -> bool:
        return host in self.hosts


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
        EVERY_HOST,
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
            if note.rule != rule_id or not note.applies_to(ctx.host) or not ctx.has(note.option):
                continue
            if note.unless is not None and note.unless(ctx):
                continue
            prefix = "" if note.rule != "ignored-by-host" else f"{ctx.host.display_name} ignores {note.option}: "
            yield Finding(rule_id, note.severity, note.option, prefix + note.effect, note.fix)

    return check


def _note_hosts(rule_id: str) -> Callable[[], tuple[HostKind, ...]]:
    def hosts() -> tuple[HostKind, ...]:
        return tuple(h for h in checked_hosts() if any(n.rule == rule_id and n.applies_to(h) for n in FLAG_NOTES))

    return hosts


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


@rule("duplicate-flag", Severity.INFO, EVERY_HOST, "The same flag given more than once (the last value wins).")
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
        binding = getattr(entry, host_spec(host).attention)
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
    sdp_binding = getattr(backend(Attention.SDP), host_spec(ctx.host).attention)
    sdp = sdp_binding.flag if sdp_binding is not None else None
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
