"""Find a WebUI checkout on disk and tell which host it is, without importing any of its code.

Each registered host names its markers (:class:`lib_optim.host_specs.kinds.HostSpec`); the hosts are tried
most specific first (more markers per set), in registration order among equals. The four built-in ones
(docs/hosts.md §8.1): Forge f2 has ``modules_forge/`` and ``backend/memory_management.py``; Forge previous
and reForge have ``modules_forge/`` and ``ldm_patched/`` but no ``backend/``; reForge's
``modules_forge/forge_version.py`` says ``1.0.0...`` (or its ``ldm_patched/modules/args_parser.py`` has
``--reserve-vram``); A1111 has none of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from lib_optim.host_specs.kinds import HostKind, HostSpec, Marker, host_specs, known_names, parse_host

_VERSION_RE = re.compile(r"""version\s*=\s*['"]([^'"]+)['"]""")
_FORGE_VERSION = "modules_forge/forge_version.py"


@dataclass(frozen=True)
class HostCheckout:
    root: Path
    kind: HostKind
    version: str  # forge_version for Forge family, "" when unknown


def is_webui_root(path: Path) -> bool:
    return (path / "launch.py").is_file() and (path / "modules").is_dir()


def detect_kind(root: Path) -> HostCheckout:
    """Which host the checkout at ``root`` is. Raises ValueError if ``root`` is not a WebUI checkout or no
    registered host's markers match it."""
    if not is_webui_root(root):
        raise ValueError(f"{root}: not a WebUI checkout (expected launch.py and modules/ there)")
    version = _file_version(root / _FORGE_VERSION)
    for spec in detection_order():
        if any(all(_present(root, m) for m in markers) for markers in spec.markers):
            return HostCheckout(root, spec.kind, version)
    raise ValueError(f"{root}: no registered WebUI's markers match this checkout; known: {known_names()}")


def detection_order() -> list[HostSpec]:
    """The registered hosts, most specific first (stable: registration order among equals)."""
    return sorted((s for s in host_specs() if s.markers), key=lambda s: -s.specificity())


def _present(root: Path, marker: Marker) -> bool:
    path = root / marker.path
    if marker.is_dir:
        return path.is_dir()
    if not path.is_file():
        return False
    if marker.version_prefix:
        return _file_version(path).startswith(marker.version_prefix)
    if marker.contains:
        try:
            return marker.contains in path.read_text(encoding="utf-8")
        except OSError:
            return False
    return True


def _file_version(path: Path) -> str:
    """The first ``version = '...'`` in ``path``, "" when there is none."""
    try:
        match = _VERSION_RE.search(path.read_text(encoding="utf-8"))
    except OSError:
        return ""
    return match.group(1) if match else ""


def find_webui_root(*starts: Path) -> Path | None:
    """The nearest WebUI checkout at or above any of ``starts`` (an extension lives in <root>/extensions/x)."""
    for start in starts:
        for candidate in (start, *start.resolve().parents):
            if is_webui_root(candidate):
                return candidate
    return None


def webui_user_file(root: Path | None, *, windows: bool) -> Path | None:
    """The webui-user file the launcher of the checkout at ``root`` runs on this system (webui.sh sources
    webui-user.sh, webui.bat calls webui-user.bat), if it is there."""
    path = root / ("webui-user.bat" if windows else "webui-user.sh") if root is not None else None
    return path if path is not None and path.is_file() else None


def extension_dir() -> Path:
    """This extension's folder (the parent of lib_optim/)."""
    return Path(__file__).resolve().parents[2]


FALLBACK_HOSTS = (HostKind.A1111, HostKind.FORGE)  # what check and doctor show when no checkout is found


@dataclass(frozen=True)
class HostChoice:
    """The host to check for: given, detected, or (``kind`` None) none found where ``searched`` says."""

    kind: HostKind | None
    root: Path | None = None
    searched: tuple[Path, ...] = ()

    @property
    def hosts(self) -> tuple[HostKind, ...]:
        return (self.kind,) if self.kind is not None else FALLBACK_HOSTS


def _unique_dirs(*paths: Path | None) -> tuple[Path, ...]:
    seen: dict[Path, None] = {}
    for p in paths:
        if p is not None:
            seen.setdefault(p.resolve(), None)
    return tuple(seen)


def choose_host(value: str, *near: Path | None) -> HostChoice:
    """A host name (ValueError naming the known ones), or ``auto``: the checkout at or above ``near`` or the
    current folder."""
    if value.strip().lower() != "auto":
        return HostChoice(parse_host(value))
    searched = _unique_dirs(near[0] if near else None, Path.cwd(), *near[1:])
    root = find_webui_root(*searched)
    if root is None:
        return HostChoice(None, None, searched)
    return HostChoice(detect_kind(root).kind, root, searched)
