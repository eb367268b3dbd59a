"""Find a WebUI checkout on disk and tell which host it is, without importing any of its code.

Signals (docs/hosts.md §8.1): Forge f2 has ``modules_forge/`` and ``backend/memory_management.py``; Forge previous
and reForge have ``modules_forge/`` and ``ldm_patched/`` but no ``backend/``; reForge's
``modules_forge/forge_version.py`` says ``1.0.0...``; A1111 has none of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lib_optim.host_specs.kinds import HostKind

_VERSION_RE = re.compile(r"""version\s*=\s*['"]([^'"]+)['"]""")


@dataclass(frozen=True)
class HostCheckout:
    root: Path
    kind: HostKind
    version: str  # forge_version for Forge family, "" when unknown


def is_webui_root(path: Path) -> bool:
    return (path / "launch.py").is_file() and (path / "modules").is_dir()


def detect_kind(root: Path) -> HostCheckout:
    """Which host the checkout at ``root`` is. Raises ValueError if ``root`` is not a WebUI checkout."""
    if not is_webui_root(root):
        raise ValueError(f"{root}: not a WebUI checkout (expected launch.py and modules/ there)")
    version = _forge_version(root)
    if (root / "modules_forge").is_dir():
        if (root / "backend" / "memory_management.py").is_file():
            return HostCheckout(root, HostKind.FORGE, version)
        if version.startswith("1.") or (
            (root / "ldm_patched" / "modules" / "args_parser.py").is_file() and _is_reforge(root)
        ):
            return HostCheckout(root, HostKind.REFORGE, version)
        return HostCheckout(root, HostKind.FORGE_PREVIOUS, version)
    return HostCheckout(root, HostKind.A1111, version)


def _forge_version(root: Path) -> str:
    path = root / "modules_forge" / "forge_version.py"
    try:
        match = _VERSION_RE.search(path.read_text(encoding="utf-8"))
    except OSError:
        return ""
    return match.group(1) if match else ""


def _is_reforge(root: Path) -> bool:
    # reForge's backend parser has --cuda-device and --reserve-vram (docs/hosts.md §8.1).
    try:
        text = (root / "ldm_patched" / "modules" / "args_parser.py").read_text(encoding="utf-8")
    except OSError:
        return False
    return "--reserve-vram" in text


def find_webui_root(*starts: Path) -> Path | None:
    """The nearest WebUI checkout at or above any of ``starts`` (an extension lives in <root>/extensions/x)."""
    for start in starts:
        for candidate in (start, *start.resolve().parents):
            if is_webui_root(candidate):
                return candidate
    return None


def extension_dir() -> Path:
    """This extension's folder (the parent of lib_optim/)."""
    return Path(__file__).resolve().parents[2]
