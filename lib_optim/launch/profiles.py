"""Launch profiles: what to start the WebUI with for a card of a given size.

A profile is, per host, launch flags + environment variables + per-generation defaults (inference memory
included). What only works before the WebUI starts (Forge's backend flags, allocator settings) gets in
through one marked block in the user's webui-user.sh/.bat (:func:`apply_profile`); the per-generation
defaults fill the Optim accordion.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lib_optim.attention import backend as attention_backend
from lib_optim.host_specs import HostKind, profiled_hosts
from lib_optim.launch.checker import CheckInput, Finding, RuntimeFacts, Severity, run_checks
from lib_optim.settings import Attention, GenerationSettings, Tri, from_dict
from lib_optim.webui_user import (
    EXTENSION_NAME,
    EditResult,
    apply_block,
    block_body,
    edit_lock,
    parse_launch_config,
    read_block,
    remove_block,
    render_block,
)

A1111 = HostKind.A1111
FORGE = HostKind.FORGE
FORGE_PREVIOUS = HostKind.FORGE_PREVIOUS
REFORGE = HostKind.REFORGE


def _flag(attention: Attention, host: HostKind) -> str:
    """The launch flag that selects ``attention`` on ``host``: the registry entry's, never written by hand."""
    flag = attention_backend(attention).flag(host)
    if flag is None:
        raise ValueError(f"[Optim] profiles: {attention.value!r} has no launch flag on {host.display_name}")
    return flag


# _MEDVRAM_NOTE: A1111's --medvram (--medvram-sdxl for SDXL) sets sd_model.lowvram and moves each part, the VAE
# included, to the GPU only while it runs (A1111 v1.10.1 modules/lowvram.py:20-21, :38, :61-74); our VAE-on-CPU
# then steps aside with a warning (lib_optim/hosts/a1111.py, apply_vae_on_cpu). So no A1111 profile with one of
# them sets it.

# Fewer, larger cudaMalloc blocks and earlier reclaiming: the usual cure for fragmentation OOMs on small
# cards. Only keys of the native allocator; never `backend:` (it must be decided before torch loads).
_FRUGAL_ALLOC = "garbage_collection_threshold:0.6,max_split_size_mb:128"
_BALANCED_ALLOC = "garbage_collection_threshold:0.8,max_split_size_mb:512"


class ProfileError(ValueError):
    pass


@dataclass(frozen=True)
class HostProfile:
    flags: tuple[str, ...]
    env: Mapping[str, str]
    generation: GenerationSettings
    note: str = ""


@dataclass(frozen=True)
class Profile:
    name: str
    title: str
    vram_gb: int | None  # the card size it is for; None for the CPU profile
    description: str
    hosts: Mapping[HostKind, HostProfile] = field(default_factory=dict)


def _gen(
    attention: Attention = Attention.HOST,
    vae_on_cpu: Tri = Tri.INHERIT,
    inference_memory_mb: int | None = None,
    channels_last: Tri = Tri.INHERIT,
    **others: Any,
) -> GenerationSettings:
    """A profile's per-generation defaults: these values (``others``: any other field of FIELDS by name, checked
    like the API's), every field not named at its default."""
    values = {"attention": attention, "vae_on_cpu": vae_on_cpu, "inference_memory_mb": inference_memory_mb}
    return from_dict({**values, "channels_last": channels_last, **others})


_PROFILES: tuple[Profile, ...] = (
    Profile(
        "8gb-low",
        "8 GB — Low",
        8,
        "Fits the most: large images, hires fix and SDXL on 8 GB, at some cost in speed.",
        {
            A1111: HostProfile(
                ("--medvram", _flag(Attention.SUB_QUAD, A1111)),
                {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC},
                _gen(Attention.SUB_QUAD),  # no VAE on CPU: A1111 ignores it under --medvram (_MEDVRAM_NOTE)
                "--medvram keeps one part of the model on the GPU at a time, the VAE included.",
            ),
            FORGE: HostProfile(
                (_flag(Attention.SUB_QUAD, FORGE), "--disable-xformers"),
                {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC},
                _gen(Attention.SUB_QUAD, Tri.ON, 2048),
                "2 GB inference memory makes Forge offload more weights to keep room for big images.",
            ),
            FORGE_PREVIOUS: HostProfile(
                (_flag(Attention.SUB_QUAD, FORGE_PREVIOUS), "--disable-xformers"),
                {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC},
                _gen(Attention.SUB_QUAD, Tri.ON),
            ),
        },
    ),
    Profile(
        "8gb-medium",
        "8 GB — Medium",
        8,
        "Balanced for 8 GB: SD1.5 at full speed, SDXL offloaded part by part.",
        {
            A1111: HostProfile(
                ("--medvram-sdxl", _flag(Attention.SDP, A1111)),
                {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC},
                _gen(Attention.SDP),
            ),
            FORGE: HostProfile(
                (),
                {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC},
                _gen(Attention.SDP, inference_memory_mb=1536),
            ),
            FORGE_PREVIOUS: HostProfile((), {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC}, _gen(Attention.SDP)),
        },
    ),
    Profile(
        "8gb-high",
        "8 GB — High",
        8,
        "Fastest on 8 GB for SD1.5-size images; may run out of memory with SDXL or big hires fix.",
        {
            A1111: HostProfile((_flag(Attention.SDP, A1111),), {}, _gen(Attention.SDP)),
            FORGE: HostProfile((), {}, _gen(Attention.SDP, inference_memory_mb=1024)),
            FORGE_PREVIOUS: HostProfile((), {}, _gen(Attention.SDP)),
        },
    ),
    Profile(
        "8gb-xl",
        "8 GB — XL",
        8,
        "SDXL on 8 GB: offload SDXL part by part and decode on the CPU so 1024² fits.",
        {
            A1111: HostProfile(
                ("--medvram-sdxl", _flag(Attention.SDP, A1111)),
                {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC},
                _gen(Attention.SDP),  # no VAE on CPU: ignored for SDXL under --medvram-sdxl (_MEDVRAM_NOTE)
                "--medvram-sdxl keeps one part of an SDXL model on the GPU at a time, the VAE included.",
            ),
            FORGE: HostProfile((), {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC}, _gen(Attention.SDP, Tri.ON, 1536)),
            FORGE_PREVIOUS: HostProfile((), {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC}, _gen(Attention.SDP, Tri.ON)),
        },
    ),
    Profile(
        "12gb",
        "12 GB",
        12,
        "SD1.5 and SDXL without offloading; room for hires fix.",
        {
            A1111: HostProfile(
                (_flag(Attention.SDP, A1111),),
                {"PYTORCH_CUDA_ALLOC_CONF": _BALANCED_ALLOC},
                _gen(Attention.SDP),
            ),
            FORGE: HostProfile((), {}, _gen(Attention.SDP, inference_memory_mb=1024)),
            FORGE_PREVIOUS: HostProfile((), {}, _gen(Attention.SDP)),
        },
    ),
    Profile(
        "16gb",
        "16 GB",
        16,
        "Everything on the GPU; channels-last for tensor-core speed.",
        {
            A1111: HostProfile((_flag(Attention.SDP, A1111),), {}, _gen(Attention.SDP, channels_last=Tri.ON)),
            FORGE: HostProfile((), {}, _gen(Attention.SDP, inference_memory_mb=1024, channels_last=Tri.ON)),
            FORGE_PREVIOUS: HostProfile((), {}, _gen(Attention.SDP, channels_last=Tri.ON)),
        },
    ),
    Profile(
        "24gb",
        "24 GB",
        24,
        "Everything on the GPU, fastest attention; keeps models loaded.",
        {
            A1111: HostProfile(
                (_flag(Attention.SDP_NO_MEM, A1111),), {}, _gen(Attention.SDP_NO_MEM, channels_last=Tri.ON)
            ),
            FORGE: HostProfile((), {}, _gen(Attention.SDP, inference_memory_mb=1024, channels_last=Tri.ON)),
            FORGE_PREVIOUS: HostProfile((), {}, _gen(Attention.SDP, channels_last=Tri.ON)),
        },
    ),
    Profile(
        "cpu",
        "CPU only",
        None,
        "No usable GPU: run everything on the CPU in float32 (slow, but it works).",
        {
            A1111: HostProfile(("--use-cpu", "all", "--no-half", "--skip-torch-cuda-test"), {}, _gen(Attention.SDP)),
            FORGE: HostProfile(("--always-cpu", "--skip-torch-cuda-test"), {}, _gen(Attention.SDP)),
            FORGE_PREVIOUS: HostProfile(("--always-cpu", "--skip-torch-cuda-test"), {}, _gen(Attention.SDP)),
        },
    ),
)


def _on_reforge(hp: HostProfile) -> HostProfile:
    """reForge's variant of a Forge previous profile: the same back end (ldm_patched) and the same flags —
    ``--always-cpu``, ``--disable-xformers``, ``--attention-*`` and ``--skip-torch-cuda-test`` are all in its
    parsers (ldm_patched/modules/args_parser.py, modules/cmd_args.py at 3b56b268; flagtables.py's reForge table)
    — with each attention flag taken from the registry for reForge, never copied by hand."""
    by_flag = {
        attention_backend(a).flag(FORGE_PREVIOUS): attention_backend(a).flag(REFORGE)
        for a in Attention
        if attention_backend(a).flag(FORGE_PREVIOUS) is not None
    }
    flags = tuple(by_flag.get(f) or f for f in hp.flags)
    return HostProfile(flags, hp.env, hp.generation, hp.note)


PROFILES: dict[str, Profile] = {
    p.name: Profile(
        p.name, p.title, p.vram_gb, p.description, {**p.hosts, REFORGE: _on_reforge(p.hosts[FORGE_PREVIOUS])}
    )
    for p in _PROFILES
}

AUTO = "auto"
_DIRECTML_PROFILES = ("8gb-low", "8gb-medium", "8gb-high", "8gb-xl")  # the keys of _DIRECTML below


def choose_auto(gpu_total_mb: int | None) -> str:
    """The profile for a card of ``gpu_total_mb`` (None = no GPU found)."""
    if gpu_total_mb is None:
        return "cpu"
    gb = gpu_total_mb / 1024
    if gb < 7:
        return "8gb-low"
    if gb < 10:
        return "8gb-medium"
    if gb < 14:
        return "12gb"
    if gb < 20:
        return "16gb"
    return "24gb"


def profile_names() -> list[str]:
    return [*PROFILES, AUTO]


def get_profile(name: str, gpu_total_mb: int | None = None) -> Profile:
    key = name.strip().lower()
    if key == AUTO:
        key = choose_auto(gpu_total_mb)
    if key not in PROFILES:
        raise ProfileError(f"[Optim] profile: {name!r} is not a profile; allowed: {', '.join(profile_names())}")
    return PROFILES[key]


def resolve(profile: Profile, host: HostKind, *, directml: bool = False, windows: bool = False) -> HostProfile:
    """The flags, environment and per-generation defaults of ``profile`` on ``host``.

    ``directml``: an AMD/Intel card through DirectML (Windows). ``windows``: the allocator's
    expandable segments are not supported there, so nothing platform-specific is added.
    """
    if host not in profile.hosts:
        allowed = ", ".join(h.value for h in profiled_hosts())
        raise ProfileError(f"[Optim] host: {host.value!r} has no profiles; allowed: {allowed}")
    base = profile.hosts[host]
    if not directml:
        return base
    if profile.name not in _DIRECTML_PROFILES:
        raise ProfileError(
            f"[Optim] profile: {profile.name!r} has no DirectML variant; allowed with --directml: "
            + ", ".join(_DIRECTML_PROFILES)
        )
    if host is A1111:
        raise ProfileError(
            "[Optim] --directml: stock A1111 v1.10 has no DirectML support; use Forge (host forge) or the "
            "DirectML fork of A1111"
        )
    flags, attention, budget = _DIRECTML[profile.name]
    generation = GenerationSettings(enabled=True, attention=attention, inference_memory_mb=budget)
    return HostProfile(flags, {}, generation, _DIRECTML_NOTE)


# DirectML (AMD/Intel on Windows): the setup known to work on an RX 6600 XT 8 GB (Forge
# "f2.0.1v1.10.1-previous-669" — that is Forge f2 at dfdcbab6, docs/hosts.md §8.3 — torch 2.4.1 with
# torch-directml): weights offloaded (--always-low-vram, plus --always-offload-from-vram for Low), the VAE on the
# CPU, split attention for Low/Medium and sub-quadratic for High/XL — the two attention implementations that run
# well there (docs/hosts.md §4.8) — and a computation budget (Forge's inference memory) of about 1.8 / 2 GB, which
# the per-generation defaults carry. No CUDA allocator settings, no xformers. --skip-torch-cuda-test: the CUDA
# test of the launcher fails on a torch without CUDA (docs/hosts.md §2.5). That setup also passed
# --precision full --no-half; Forge parses them and reads neither (the checker says so) — it never uses fp16 with
# DirectML anyway (§4.8) — so they are left out.
_DIRECTML_BASE = ("--directml", "0", "--always-low-vram")
_DIRECTML_TAIL = ("--vae-in-cpu", "--skip-torch-cuda-test")
_DIRECTML: dict[str, tuple[tuple[str, ...], Attention, int]] = {
    "8gb-low": (
        (*_DIRECTML_BASE, "--always-offload-from-vram", _flag(Attention.SPLIT, FORGE), *_DIRECTML_TAIL),
        Attention.SPLIT,
        1792,
    ),
    "8gb-medium": ((*_DIRECTML_BASE, _flag(Attention.SPLIT, FORGE), *_DIRECTML_TAIL), Attention.SPLIT, 2048),
    "8gb-high": ((*_DIRECTML_BASE, _flag(Attention.SUB_QUAD, FORGE), *_DIRECTML_TAIL), Attention.SUB_QUAD, 2048),
    "8gb-xl": ((*_DIRECTML_BASE, _flag(Attention.SUB_QUAD, FORGE), *_DIRECTML_TAIL), Attention.SUB_QUAD, 2048),
}
_DIRECTML_NOTE = (
    "DirectML (AMD/Intel on Windows): weights offloaded, VAE on the CPU, split or sub-quadratic attention, "
    "a computation budget as inference memory. Untested here on a real DirectML card."
)


def launch_line(hp: HostProfile, kind: Literal["sh", "bat"] = "sh") -> str:
    """The lines a user can paste into webui-user: exactly what ``profile apply`` writes between its markers.

    The flags are appended to the file's own COMMANDLINE_ARGS (``"$COMMANDLINE_ARGS ..."``), so pasting
    them keeps the user's arguments. Empty when the profile sets nothing before start-up on this host.
    """
    return "\n".join(block_body(kind, list(hp.flags), dict(hp.env)))


def nothing_to_write(profile: Profile, host: HostKind, hp: HostProfile) -> str:
    """What to say when ``hp`` has no launch flags and no variables (e.g. Forge: all per generation)."""
    defaults = ", ".join(f"{k}={v}" for k, v in hp.generation.non_default().items())
    return (
        f"Profile {profile.name} sets no launch flags or environment variables on {host.display_name}: "
        "nothing to put in webui-user. Its per-generation defaults"
        + (f" ({defaults})" if defaults else "")
        + " apply through the Optim accordion, or at start-up with --optim-profile "
        + profile.name
        + "."
    )


def profile_text(profile: Profile, host: HostKind, hp: HostProfile, kind: Literal["sh", "bat"]) -> str:
    """``profile show``: what ``profile`` sets on ``host``, the lines to paste first."""
    lines = [f"{profile.title} ({profile.name}) on {host.display_name}: {profile.description}"]
    lines.append(launch_line(hp, kind) or nothing_to_write(profile, host, hp))
    defaults = hp.generation.non_default()
    lines.append("Per-generation defaults: " + (json.dumps(defaults) if defaults else "none"))
    return "\n".join([*lines, hp.note] if hp.note else lines)


def profile_dict(name: str, host: HostKind, hp: HostProfile) -> dict[str, Any]:
    """``profile show --json``: the same as a dict."""
    flags, env, generation = list(hp.flags), dict(hp.env), hp.generation.to_dict()
    return {"name": name, "host": host.value, "flags": flags, "env": env, "generation": generation, "note": hp.note}


@dataclass(frozen=True)
class ApplyOutcome:
    edit: EditResult
    findings: list[Finding]  # the checker's findings for the resulting launch configuration
    # Things the user should know: hand edits the new block replaces, nothing to write for this host, ...
    notes: tuple[str, ...] = ()


def file_kind(path: Path) -> Literal["sh", "bat"]:
    """The launcher kind of a webui-user file, from its suffix; ProfileError names the allowed ones."""
    if path.suffix.lower() in (".bat", ".cmd"):
        return "bat"
    if path.suffix.lower() == ".sh":
        return "sh"
    raise ProfileError(f"[Optim] --file: {str(path)!r} is not a webui-user file; allowed: *.sh, *.bat, *.cmd")


def apply_profile(
    path: Path,
    profile: Profile,
    host: HostKind,
    *,
    directml: bool = False,
    dry_run: bool = False,
    facts: RuntimeFacts | None = None,
    create: bool = False,
    force: bool = False,
) -> ApplyOutcome:
    """Write ``profile``'s block into the webui-user file at ``path`` (backup first; idempotent).

    Refuses — writing nothing — when the resulting launch configuration would stop the WebUI from
    starting (e.g. the user's own COMMANDLINE_ARGS already has another flag of a Forge exclusive group).
    A profile that sets nothing before start-up on ``host`` writes no block (and removes an old one).
    ``create``: make the file if it is missing (else WebuiUserError); ``force``: write a read-only file.
    The whole read-check-write holds the file's edit lock, so two applies never interleave.
    """
    kind = file_kind(path)
    hp = resolve(profile, host, directml=directml, windows=kind == "bat")
    if not path.exists() and not create:
        raise ProfileError(
            f"[Optim] --file: {str(path)!r} does not exist; nothing written (pass --create to make a new file)"
        )
    with contextlib.nullcontext() if dry_run else edit_lock(path):
        notes = _hand_edits(path, kind)
        if not hp.flags and not hp.env:
            edit = remove_block(path, dry_run=dry_run, force=force)
            notes.append(nothing_to_write(profile, host, hp))
            if edit.changed:
                notes.append("The old block is removed: none of it applies to this profile.")
            return ApplyOutcome(edit, _check_text(edit.new_text, kind, host, facts, path), tuple(notes))
        block = render_block(kind, profile.name, list(hp.flags), dict(hp.env))
        preview = apply_block(path, block, dry_run=True, create=create)
        findings = _check_text(preview.new_text, kind, host, facts, path)
        errors = [f for f in findings if f.severity is Severity.ERROR]
        if errors:
            listed = "; ".join(f"{f.subject}: {f.message}" for f in errors)
            raise ProfileError(
                f"[Optim] profile {profile.name!r} was not written to {path}: the result would not start — {listed}"
            )
        edit = preview if dry_run else apply_block(path, block, dry_run=False, create=create, force=force)
        return ApplyOutcome(edit, findings, tuple(notes))


def remove_profile(path: Path, *, dry_run: bool = False, force: bool = False) -> EditResult:
    file_kind(path)
    return remove_block(path, dry_run=dry_run, force=force)


def _renderings(kind: Literal["sh", "bat"], name: str) -> list[list[str]]:
    """Every body this version could have written for the profile ``name`` (all hosts, with DirectML or not)."""
    profile = PROFILES.get(name)
    if profile is None:
        return []
    bodies: list[list[str]] = []
    for host in profile.hosts:
        for directml in (False, True):
            try:
                hp = resolve(profile, host, directml=directml, windows=kind == "bat")
            except ProfileError:
                continue  # no DirectML variant of this profile, or none on this host
            bodies.append(block_body(kind, list(hp.flags), dict(hp.env)))
    return bodies


def _hand_edits(path: Path, kind: Literal["sh", "bat"]) -> list[str]:
    """A warning naming the lines of our block that no profile writes (edited by hand), if any."""
    found = read_block(path) if path.exists() else None
    if found is None:
        return []
    info, body = found
    bodies = _renderings(kind, info.profile_name)
    if body in bodies:
        return []
    ours = {line for b in bodies for line in b}
    foreign = [line for line in body if line not in ours]
    where = f"{path}:{info.start_line}-{info.end_line}"
    if not foreign:
        return [
            f"Warning: the {EXTENSION_NAME} block ({where}) was changed by hand (lines removed or reordered); "
            "it is replaced as a whole (the backup keeps it)."
        ]
    listed = "; ".join(repr(line) for line in foreign)
    return [
        f"Warning: the {EXTENSION_NAME} block ({where}) has lines no profile writes, edited by hand: {listed}. "
        "They are replaced (the backup keeps them); put your own lines outside the block."
    ]


def _check_text(
    text: str, kind: Literal["sh", "bat"], host: HostKind, facts: RuntimeFacts | None, path: Path
) -> list[Finding]:
    config = parse_launch_config(text, kind, source=str(path))
    return run_checks(CheckInput(host, config.commandline_args, config.process_env(), facts or RuntimeFacts()))
