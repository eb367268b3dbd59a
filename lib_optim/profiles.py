"""Launch profiles: what to start the WebUI with for a card of a given size.

A profile is, per host, launch flags + environment variables + per-generation defaults (inference memory
included). What only works before the WebUI starts (Forge's backend flags, allocator settings) gets in
through one marked block in the user's webui-user.sh/.bat (:func:`apply_profile`); the per-generation
defaults fill the Optim accordion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lib_optim.checker import CheckInput, Finding, RuntimeFacts, Severity, run_checks
from lib_optim.hostkinds import HostKind
from lib_optim.settings import Attention, GenerationSettings, Tri
from lib_optim.webui_user import EditResult, apply_block, parse_launch_config, remove_block, render_block

A1111 = HostKind.A1111
FORGE = HostKind.FORGE
FORGE_PREVIOUS = HostKind.FORGE_PREVIOUS

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
) -> GenerationSettings:
    return GenerationSettings(
        enabled=True,
        attention=attention,
        channels_last=channels_last,
        vae_on_cpu=vae_on_cpu,
        inference_memory_mb=inference_memory_mb,
    )


PROFILES: dict[str, Profile] = {
    p.name: p
    for p in (
        Profile(
            "8gb-low",
            "8 GB — Low",
            8,
            "Fits the most: large images, hires fix and SDXL on 8 GB, at some cost in speed.",
            {
                A1111: HostProfile(
                    ("--medvram", "--opt-sub-quad-attention"),
                    {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC},
                    _gen(Attention.SUB_QUAD, Tri.ON),
                    "--medvram keeps one part of the model on the GPU at a time.",
                ),
                FORGE: HostProfile(
                    ("--attention-quad", "--disable-xformers"),
                    {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC},
                    _gen(Attention.SUB_QUAD, Tri.ON, 2048),
                    "2 GB inference memory makes Forge offload more weights to keep room for big images.",
                ),
                FORGE_PREVIOUS: HostProfile(
                    ("--attention-quad", "--disable-xformers"),
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
                    ("--medvram-sdxl", "--opt-sdp-attention"),
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
                A1111: HostProfile(("--opt-sdp-attention",), {}, _gen(Attention.SDP)),
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
                    ("--medvram-sdxl", "--opt-sdp-attention"),
                    {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC},
                    _gen(Attention.SDP, Tri.ON),
                ),
                FORGE: HostProfile((), {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC}, _gen(Attention.SDP, Tri.ON, 1536)),
                FORGE_PREVIOUS: HostProfile(
                    (), {"PYTORCH_CUDA_ALLOC_CONF": _FRUGAL_ALLOC}, _gen(Attention.SDP, Tri.ON)
                ),
            },
        ),
        Profile(
            "12gb",
            "12 GB",
            12,
            "SD1.5 and SDXL without offloading; room for hires fix.",
            {
                A1111: HostProfile(
                    ("--opt-sdp-attention",),
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
                A1111: HostProfile(("--opt-sdp-attention",), {}, _gen(Attention.SDP, channels_last=Tri.ON)),
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
                    ("--opt-sdp-no-mem-attention",), {}, _gen(Attention.SDP_NO_MEM, channels_last=Tri.ON)
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
                A1111: HostProfile(
                    ("--use-cpu", "all", "--no-half", "--skip-torch-cuda-test"), {}, _gen(Attention.SDP)
                ),
                FORGE: HostProfile(("--always-cpu", "--skip-torch-cuda-test"), {}, _gen(Attention.SDP)),
                FORGE_PREVIOUS: HostProfile(("--always-cpu", "--skip-torch-cuda-test"), {}, _gen(Attention.SDP)),
            },
        ),
    )
}

AUTO = "auto"
_DIRECTML_PROFILES = ("8gb-low", "8gb-medium", "8gb-high", "8gb-xl")


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
        raise ProfileError(f"[Optim] host: {host.value!r} has no profiles; allowed: a1111, forge, forge-previous")
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
    # DirectML: no CUDA allocator settings, no xformers; sub-quadratic attention is the frugal choice there.
    flags = ["--directml", "--attention-quad"]
    if profile.name in ("8gb-low", "8gb-xl"):
        flags.append("--always-low-vram")
    generation = GenerationSettings(
        enabled=True,
        attention=Attention.SUB_QUAD,
        vae_on_cpu=base.generation.vae_on_cpu,
        inference_memory_mb=base.generation.inference_memory_mb if host is FORGE else None,
    )
    return HostProfile(tuple(flags), {}, generation, "DirectML (AMD/Intel on Windows).")


def launch_line(hp: HostProfile, kind: str = "sh") -> str:
    """The exact COMMANDLINE_ARGS line (and variables) a user can paste into webui-user."""
    args = " ".join(hp.flags)
    if kind == "bat":
        lines = [f"set COMMANDLINE_ARGS={args}"] + [f"set {k}={v}" for k, v in hp.env.items()]
    else:
        lines = [f'export COMMANDLINE_ARGS="{args}"'] + [f'export {k}="{v}"' for k, v in hp.env.items()]
    return "\n".join(lines)


@dataclass(frozen=True)
class ApplyOutcome:
    edit: EditResult
    findings: list[Finding]  # the checker's findings for the resulting launch configuration


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
) -> ApplyOutcome:
    """Write ``profile``'s block into the webui-user file at ``path`` (backup first; idempotent).

    Refuses — writing nothing — when the resulting launch configuration would stop the WebUI from
    starting (e.g. the user's own COMMANDLINE_ARGS already has another flag of a Forge exclusive group).
    """
    kind = file_kind(path)
    hp = resolve(profile, host, directml=directml, windows=kind == "bat")
    block = render_block(kind, profile.name, list(hp.flags), dict(hp.env))
    preview = apply_block(path, block, dry_run=True)
    findings = _check_text(preview.new_text, kind, host, facts, path)
    errors = [f for f in findings if f.severity is Severity.ERROR]
    if errors:
        listed = "; ".join(f"{f.subject}: {f.message}" for f in errors)
        raise ProfileError(
            f"[Optim] profile {profile.name!r} was not written to {path}: the result would not start — {listed}"
        )
    edit = preview if dry_run else apply_block(path, block, dry_run=False)
    return ApplyOutcome(edit, findings)


def remove_profile(path: Path, *, dry_run: bool = False) -> EditResult:
    file_kind(path)
    return remove_block(path, dry_run=dry_run)


def _check_text(
    text: str, kind: Literal["sh", "bat"], host: HostKind, facts: RuntimeFacts | None, path: Path
) -> list[Finding]:
    config = parse_launch_config(text, kind, source=str(path))
    return run_checks(CheckInput(host, config.commandline_args, config.process_env(), facts or RuntimeFacts()))
