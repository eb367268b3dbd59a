"""What preload.py does, inside the WebUI process, before models load.

Runs inside ``import modules.shared`` (docs/hosts.md §1.2): ``shared.cmd_opts``/``opts`` do not exist yet, so only
the parser, ``sys.argv``, ``os.environ``, ``modules.paths_internal`` and — on Forge, where they are already
imported — ``backend.args``/``backend.memory_management`` (Forge f2) or ``ldm_patched.modules.args_parser``/
``model_management`` (Forge previous, reForge) are touched. Nothing here initialises CUDA: on A1111
preload runs before the host's first CUDA call, and allocator settings must still be able to take effect.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lib_optim.attention import Attention, algorithms
from lib_optim.compile import setup_compile_cache
from lib_optim.host_specs import HostKind, checked_hosts, host_spec
from lib_optim.hosts import detect_running_host
from lib_optim.launch import (
    CheckInput,
    Finding,
    FlagSpec,
    HostProfile,
    ProfileError,
    RuntimeFacts,
    TakesValue,
    get_profile,
    profile_names,
    resolve,
    run_checks,
)
from lib_optim.log import get_logger, setup_console_logging
from lib_optim.runtime import get_runtime
from lib_optim.settings import Tri

log = get_logger(__name__)

OUR_FLAGS: tuple[tuple[str, dict[str, Any]], ...] = (
    (
        "--optim-profile",
        {
            "type": str,
            "default": None,
            "metavar": "NAME",
            "help": "sd-webui-optim: apply this launch profile at start-up (" + ", ".join(profile_names()) + ")",
        },
    ),
    ("--optim-no-check", {"action": "store_true", "help": "sd-webui-optim: do not check flags at start-up"}),
    (
        "--optim-log-level",
        {"type": str, "default": None, "metavar": "LEVEL", "help": "sd-webui-optim: DEBUG, INFO, WARNING or ERROR"},
    ),
)

_OPTION_RE = re.compile(r"""add_argument\(\s*['"](--?[A-Za-z0-9][\w-]*)['"]""")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add ``--optim-*`` (skipping any already there: argparse raises on a duplicate, docs/hosts.md §1.3)."""
    known = getattr(parser, "_option_string_actions", {})
    for option, kwargs in OUR_FLAGS:
        if option not in known:
            parser.add_argument(option, **kwargs)


def our_options(argv: Sequence[str]) -> argparse.Namespace:
    """Read our own flags now; the host's strict parse comes after every preload."""
    mini = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for option, kwargs in OUR_FLAGS:
        mini.add_argument(option, **kwargs)
    namespace, _ = mini.parse_known_args(list(argv))
    return namespace


def parser_flags(parser: argparse.ArgumentParser) -> list[FlagSpec]:
    """Every option the real parser knows now (host flags and earlier extensions' preload flags)."""
    specs = []
    for action in getattr(parser, "_actions", []):
        strings = [s for s in action.option_strings if s.startswith("-")]
        if not strings:
            continue
        nargs = action.nargs
        takes: TakesValue = "none" if nargs == 0 else "one" if nargs is None else "optional" if nargs == "?" else "many"
        choices = tuple(str(c) for c in action.choices) if action.choices else None
        specs.append(
            FlagSpec(strings[0], tuple(strings[1:]), action.dest, takes, "str", choices, None, None, "parser", "", "")
        )
    return specs


def other_extension_flags(extension_dirs: Sequence[Path], own_dir: Path) -> list[FlagSpec]:
    """Flags other extensions' preload.py files will add after ours (preloads run in folder order)."""
    specs = []
    for base in extension_dirs:
        if not base.is_dir():
            continue
        for preload in sorted(base.glob("*/preload.py")):
            if preload.parent.resolve() == own_dir.resolve():
                continue
            try:
                text = preload.read_text(encoding="utf-8", errors="replace")
            except OSError as exc:
                log.debug("cannot read %s: %s", preload, exc)
                continue
            for option in _OPTION_RE.findall(text):
                # unknown arity: treat as optional-value so a following value is not reported as stray
                specs.append(
                    FlagSpec(
                        option,
                        (),
                        option.lstrip("-").replace("-", "_"),
                        "optional",
                        "str",
                        None,
                        None,
                        None,
                        f"preload:{preload.parent.name}",
                        "",
                        "",
                    )
                )
    return specs


def saved_option(key: str, default: Any) -> Any:
    """A Settings → Optim value as saved in the WebUI's config file (options are not loaded at preload).

    The file is ``--ui-settings-file`` or ``<data dir>/config.json`` (modules/cmd_args.py, paths_internal.py).
    """
    import json

    mini = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    mini.add_argument("--ui-settings-file", default=None)
    mini.add_argument("--data-dir", default=None)
    known, _ = mini.parse_known_args(sys.argv[1:])
    path = known.ui_settings_file
    if path is None:
        try:
            from modules import paths_internal

            data_dir = known.data_dir or paths_internal.data_path
        except ImportError:
            return default
        path = os.path.join(data_dir, "config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle).get(key, default)
    except (OSError, ValueError) as exc:
        log.debug("settings file %s not read: %s", path, exc)
        return default


def format_block(findings: Sequence[Finding], host: HostKind) -> str:
    lines = [f"checked launch flags and environment for {host.display_name}: {len(findings)} finding(s)"]
    for f in findings:
        lines.append(f"  [{f.severity.value}] {f.subject} ({f.rule}): {f.message}")
        lines.append(f"      fix: {f.fix}")
    lines.append("  (details: Optim accordion, GET /optim/v1/status, or python -m lib_optim check)")
    return "\n".join(lines)


def _facts() -> RuntimeFacts:
    from lib_optim.gpu import probe_system
    from lib_optim.launch import nvidia_on_pci_bus, runtime_facts

    # No torch queries: on A1111 they could initialise CUDA before the allocator settings are final.
    system = probe_system(use_torch=False, allow_cuda_init=False)
    facts = runtime_facts(system, nvidia_present=nvidia_on_pci_bus())
    return facts


def preload(parser: argparse.ArgumentParser) -> None:
    add_flags(parser)
    ours = our_options(sys.argv[1:])
    setup_console_logging(ours.optim_log_level or "INFO")
    checkout = detect_running_host()
    rt = get_runtime()
    if checkout is None:
        log.warning("preload: no WebUI found around this process; nothing to do")
        return
    rt.host = checkout.kind
    _setup_compile_cache()

    if not ours.optim_no_check and checkout.kind in checked_hosts() and saved_option("optim_check_at_startup", True):
        from modules import paths_internal

        own_dir = Path(__file__).resolve().parents[2]
        extra = parser_flags(parser) + other_extension_flags(
            [Path(paths_internal.extensions_dir), Path(paths_internal.extensions_builtin_dir)], own_dir
        )
        findings = run_checks(CheckInput(checkout.kind, sys.argv[1:], dict(os.environ), _facts(), extra))
        rt.startup_findings = findings
        if findings:
            log.warning("%s", format_block(findings, checkout.kind))
        else:
            log.info("launch flags and environment: no problems found for %s", checkout.kind.display_name)

    if ours.optim_profile:
        try:
            apply_startup_profile(parser, ours.optim_profile, checkout.kind)
        except ProfileError as exc:
            log.error("%s", exc)


def _setup_compile_cache() -> None:
    """torch.compile's caches in the WebUI's data folder (``paths_internal.data_path``, ``--data-dir``: docs/hosts.md
    §1.13), set before any model loads: torch 2.1-2.4 fix inductor's folder at the first compile."""
    from modules import paths_internal

    setup_compile_cache(paths_internal.data_path)


def apply_startup_profile(parser: argparse.ArgumentParser, name: str, host: HostKind) -> None:
    if name.strip().lower() == "auto":
        # the doctor's choice, for the GPU this WebUI runs on: never `cpu` while a GPU is present, even one whose
        # size cannot be read here
        from lib_optim.gpu import probe_system
        from lib_optim.launch import choose_gpu, nvidia_on_pci_bus, recommend_profile

        system = probe_system(use_torch=False)
        choice = choose_gpu(host, system, sys.argv[1:], os.environ, os.environ)
        name, why = recommend_profile(system, nvidia_on_pci_bus(), choice)
        log.info("--optim-profile auto: %s (%s)", name, why)
    profile = get_profile(name)
    hp = resolve(profile, host)
    rt = get_runtime()
    rt.startup_profile = profile.name
    rt.defaults = hp.generation
    later: list[str] = []
    applied: list[str] = []
    binding = host_spec(host).attention  # which host code the profile's settings go to
    if binding == "a1111":
        applied, later = _apply_a1111(parser, hp)
    elif binding == "forge":
        applied, later = _apply_forge(hp)
    else:
        applied, later = _apply_ldm_patched(hp, host)
    if applied:
        log.info("profile %s applied at start-up: %s", profile.name, ", ".join(applied))
    if later:
        log.warning(
            "profile %s: %s only take effect when the WebUI starts with them; write them with: "
            "python -m lib_optim profile apply %s --file <WebUI folder>/webui-user.%s",
            profile.name,
            " ".join(later),
            profile.name,
            "bat" if sys.platform == "win32" else "sh",
        )
    rt.startup_notes.append(
        f"profile {profile.name}: applied {', '.join(applied) or 'nothing'}; "
        f"restart needed for {' '.join(later) or 'nothing'}"
    )


def _apply_a1111(parser: argparse.ArgumentParser, hp: HostProfile) -> tuple[list[str], list[str]]:
    """A1111 reads these flags after preload (docs/hosts.md §1.3), so parser defaults are enough."""
    applied: list[str] = []
    later: list[str] = []
    actions = getattr(parser, "_option_string_actions", {})
    flags = list(hp.flags)
    i = 0
    while i < len(flags):
        flag = flags[i]
        action = actions.get(flag)
        if action is not None and action.nargs == 0:
            parser.set_defaults(**{action.dest: True})
            applied.append(flag)
        elif action is not None and i + 1 < len(flags):
            parser.set_defaults(**{action.dest: flags[i + 1].split() if action.nargs in ("+", "*") else flags[i + 1]})
            applied.append(f"{flag} {flags[i + 1]}")
            i += 1
        else:
            later.append(flag)
        i += 1
    for key, value in hp.env.items():
        if "backend" in value:
            later.append(f"{key}={value}")  # the allocator backend must be chosen before torch loads
        elif key in os.environ:
            log.info("%s is already set (%s); the profile's value is not applied", key, os.environ[key])
        else:
            os.environ[key] = value  # read when the CUDA allocator initialises, after preload
            applied.append(f"{key}={value}")
    return applied, later


def _apply_forge(hp: HostProfile) -> tuple[list[str], list[str]]:
    """Forge decided its backend before preload; set the live state that is read later (docs/hosts.md §1.3, §4.3)."""
    from backend import memory_management
    from backend.args import args as backend_args

    applied: list[str] = []
    later = [f for f in hp.flags]
    later += [f"{k}={v}" for k, v in hp.env.items()]  # CUDA is initialised already on Forge
    memory = hp.generation.inference_memory_mb
    if memory:
        memory_management.current_inference_memory = memory * 1024 * 1024
        applied.append(f"inference memory {memory} MB")
    if hp.generation.vae_on_cpu is Tri.ON:
        import torch

        backend_args.vae_in_cpu = True  # vae_device() reads it when the VAE is built (docs/hosts.md §5.3)
        memory_management.VAE_DTYPES = [torch.float32]
        applied.append("VAE on CPU (float32)")
    attention = hp.generation.attention
    flags = {b.name: b.forge.flag for b in algorithms() if b.forge is not None and b.forge.flag}
    if attention in flags and "backend.attention" not in sys.modules:
        # backend.attention picks its function when first imported, after preload (docs/hosts.md §3.3): the
        # flags of its exclusive group decide, with xformers off.
        for name, flag in flags.items():
            setattr(backend_args, flag.removeprefix("--").replace("-", "_"), name is attention)
        memory_management.ENABLE_PYTORCH_ATTENTION = attention is Attention.SDP
        memory_management.XFORMERS_IS_AVAILABLE = False
        applied.append(f"attention {attention.value}")
    return applied, later


def _apply_ldm_patched(hp: HostProfile, host: HostKind) -> tuple[list[str], list[str]]:
    """Forge previous and reForge parsed their back end's flags and imported ``model_management`` before preload
    (docs/hosts.md §1.2); what is read later can still change (§1.3):

    - ``minimum_inference_memory()``, looked up at every model load (§4.6, §4.7);
    - ``args.vae_in_cpu``, read by ``vae_device()`` when a VAE is built; Forge previous fixed the VAE dtype at
      import (``VAE_DTYPE``, float32 with ``--vae-in-cpu`` unless a ``--vae-in-*`` dtype flag is given), reForge
      picks it when the VAE is built (float32 on the CPU) (§4.6, §4.7);
    - the attention: ``ldm_patched.ldm.modules.attention`` chooses at its import, after preload (§3.5, §3.6), from
      ``args.attention_*``, ``ENABLE_PYTORCH_ATTENTION`` and ``XFORMERS_IS_AVAILABLE`` (and reForge's sage/flash
      flags); the VAE's ``AttnBlock`` follows ``ENABLE_PYTORCH_ATTENTION`` when it is built.

    The profile's flags and environment variables only take effect from the launch line (CUDA is up already).
    """
    import torch
    from ldm_patched.modules import args_parser
    from ldm_patched.modules import model_management as mm

    from lib_optim.hosts.ldm_patched import ATTENTION, fixed_reserve

    args = args_parser.args
    applied: list[str] = []
    later = [*hp.flags, *(f"{k}={v}" for k, v in hp.env.items())]
    memory = hp.generation.inference_memory_mb
    if memory:
        mm.minimum_inference_memory = fixed_reserve(memory * 1024 * 1024)
        applied.append(f"inference memory {memory} MB")
    if hp.generation.vae_on_cpu is Tri.ON:
        args.vae_in_cpu = True
        explicit = any(getattr(args, f"vae_in_{d}", False) for d in ("fp16", "bf16", "fp32"))
        if host is HostKind.FORGE_PREVIOUS and not explicit:
            mm.VAE_DTYPE = torch.float32
        applied.append("VAE on CPU (float32)")
    attention = hp.generation.attention
    flags = {b.name: b.ldm_patched.flag for b in algorithms() if b.ldm_patched is not None and b.ldm_patched.flag}
    if attention in flags and ATTENTION not in sys.modules:
        for name, flag in flags.items():
            setattr(args, flag.removeprefix("--").replace("-", "_"), name is attention)
        for first in ("use_sage_attention", "use_sage_attention3", "use_flash_attention"):  # reForge: they win
            if getattr(args, first, False):
                setattr(args, first, False)
        mm.ENABLE_PYTORCH_ATTENTION = attention is Attention.SDP
        mm.XFORMERS_IS_AVAILABLE = False
        applied.append(f"attention {attention.value}")
    return applied, later
