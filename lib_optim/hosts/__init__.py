"""Host glue: the only part of lib_optim that imports WebUI code (``modules``, ``backend``, ``ldm``...)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lib_optim.adapter import HostAdapter
from lib_optim.host_specs import HostCheckout, HostKind, detect_kind, host_spec, host_specs, resolve_ref
from lib_optim.log import get_logger

log = get_logger(__name__)


def running_webui_root() -> Path | None:
    """The checkout of the WebUI this process runs, or None outside a WebUI.

    ``modules.paths_internal`` is safe to import at any time, even from preload (it only computes paths;
    docs/hosts.md §1.2), and every host has it.
    """
    if "modules.paths_internal" not in sys.modules and "modules" not in sys.modules:
        return None
    try:
        from modules import paths_internal
    except ImportError:
        return None
    return Path(paths_internal.script_path)


def running_kind(modules: Mapping[str, Any] | None = None) -> HostKind | None:
    """Which host this process runs, from the code it has loaded (docs/hosts.md §8.2); None when nothing
    loaded tells yet.

    - Forge f2 imports ``backend.memory_management`` in ``initialize_forge()``, before preload (§1.2).
    - Forge previous and reForge re-parse their back end's flags into ``ldm_patched.modules.args_parser.args``
      there: reForge's namespace has ``reserve_vram``/``cuda_device``, Forge previous's ``gpu_device_id``.
    - Every Forge imports ``modules_forge`` before it parses the WebUI's command line
      (``modules.shared_cmd_options``, where preload runs): that module loaded without ``modules_forge`` is A1111.
    """
    loaded = sys.modules if modules is None else modules
    if loaded.get("backend.memory_management") is not None and "modules_forge" in loaded:
        return HostKind.FORGE
    args = getattr(loaded.get("ldm_patched.modules.args_parser"), "args", None)
    if args is not None:
        if hasattr(args, "reserve_vram") or hasattr(args, "cuda_device"):
            return HostKind.REFORGE
        if hasattr(args, "gpu_device_id"):
            return HostKind.FORGE_PREVIOUS
    if "modules.shared_cmd_options" in loaded and not any(k.split(".")[0] == "modules_forge" for k in loaded):
        return HostKind.A1111
    return None


def detect_running_host() -> HostCheckout | None:
    """The running WebUI: its checkout, and its kind from the loaded code (:func:`running_kind`), or from the
    checkout's files (:func:`lib_optim.host_specs.detect.detect_kind`) when nothing loaded tells yet."""
    root = running_webui_root()
    if root is None:
        return None
    checkout = detect_kind(root)
    kind = running_kind()
    if kind is None:
        return checkout
    if kind is not checkout.kind:
        log.debug("the running code says %s, the checkout's files %s: going by the code", kind, checkout.kind)
    version = getattr(sys.modules.get("modules_forge.forge_version"), "version", None)
    return HostCheckout(root, kind, str(version) if version is not None else checkout.version)


def create_adapter(kind: HostKind | str) -> HostAdapter:
    """The adapter of a registered host, built from its spec (``adapter``: a class or ``"module:Class"``).
    ValueError naming the known hosts for an unknown kind or a spec without an adapter."""
    try:
        spec = host_spec(kind)
    except ValueError as exc:
        raise ValueError(f"[Optim] {exc}") from None
    if spec.adapter is None:
        with_adapter = ", ".join(s.kind.value for s in host_specs() if s.adapter is not None)
        raise ValueError(f"[Optim] host: {spec.kind.value!r} has no adapter; hosts with one: {with_adapter}")
    factory = resolve_ref(spec.adapter)
    adapter: HostAdapter = factory(spec.kind) if spec.adapter_takes_kind else factory()
    return adapter
