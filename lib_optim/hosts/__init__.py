"""Host glue: the only part of lib_optim that imports WebUI code (``modules``, ``backend``, ``ldm``...)."""

from __future__ import annotations

import sys
from pathlib import Path

from lib_optim.adapter import HostAdapter
from lib_optim.hostdetect import HostCheckout, detect_kind
from lib_optim.hostkinds import HostKind


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


def detect_running_host() -> HostCheckout | None:
    root = running_webui_root()
    if root is None:
        return None
    return detect_kind(root)


def create_adapter(kind: HostKind) -> HostAdapter:
    if kind is HostKind.A1111:
        from lib_optim.hosts.a1111 import A1111Adapter

        return A1111Adapter()
    if kind is HostKind.FORGE:
        from lib_optim.hosts.forge import ForgeAdapter

        return ForgeAdapter()
    from lib_optim.hosts.forge import UnsupportedForgeAdapter

    return UnsupportedForgeAdapter(kind)
