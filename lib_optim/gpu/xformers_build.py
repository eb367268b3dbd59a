"""The installed xFormers, learned from its files without importing it, and whether its binary build fits the
installed torch and Python."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path
from typing import Any

from lib_optim.gpu.facts import XformersInfo, _describe, _dist_version
from lib_optim.log import get_logger

log = get_logger(__name__)

_RELEASE_RE = re.compile(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?")


def _split_torch_version(version: str) -> tuple[tuple[int, int, int] | None, str | None]:
    """``"2.3.1+cu121"`` → ``((2, 3, 1), "cu121")``; the release is ``None`` if unparsable."""
    public, _, local = version.strip().partition("+")
    match = _RELEASE_RE.match(public)
    release = (int(match[1]), int(match[2]), int(match[3] or 0)) if match else None
    return release, (local.lower() or None)


def _cuda_tag(cuda: str | None) -> str | None:
    """``"12.1"`` → ``"cu121"``, the form torch uses in its local version tag."""
    if not cuda:
        return None
    parts = cuda.split(".")
    return f"cu{parts[0]}{parts[1]}" if len(parts) >= 2 and parts[0].isdigit() else None


def torch_build_matches(
    built_for: str | None,
    installed: str | None,
    *,
    built_cuda: str | None = None,
    installed_cuda: str | None = None,
) -> tuple[bool | None, str | None]:
    """Does an extension built for torch ``built_for`` load into torch ``installed``?

    Binary extensions such as xFormers are tied to the exact torch release (major.minor.patch) and to
    its CUDA flavour (the local tag: ``cu121``, ``cu124``, ``rocm6.0``, ``cpu``). When one side has
    no local tag (a plain PyPI wheel), the CUDA versions are compared instead where both are known.
    Returns ``(matches, reason)``; ``matches`` is ``None`` when either side is unknown.
    """
    if not built_for or not installed:
        missing = "build torch version" if not built_for else "installed torch version"
        return None, f"{missing} unknown"
    built_release, built_local = _split_torch_version(built_for)
    have_release, have_local = _split_torch_version(installed)
    if built_release is None or have_release is None:
        return None, f"cannot compare torch versions {built_for!r} and {installed!r}"
    if built_release != have_release:
        return False, f"built for torch {built_for}, installed torch is {installed}"
    if built_local and have_local:
        if built_local != have_local:
            return (
                False,
                f"built for torch {built_for}, installed torch is {installed} ({built_local} ≠ {have_local})",
            )
        return True, None
    built_tag = built_local or _cuda_tag(built_cuda)
    have_tag = have_local or _cuda_tag(installed_cuda)
    if built_tag and have_tag and built_tag != have_tag:
        return (
            False,
            f"built for torch {built_for} ({built_tag}), installed torch is {installed} ({have_tag})",
        )
    return True, None


def _xformers_dirs() -> list[Path]:
    """Candidate package directories of xFormers, found without importing it."""
    import importlib.util

    dirs: list[Path] = []
    try:
        # For a top-level name find_spec only consults the path finders; nothing gets executed.
        spec = importlib.util.find_spec("xformers")
    except (ImportError, ValueError) as exc:
        log.debug("find_spec('xformers') failed: %s", exc)
        spec = None
    if spec is not None:
        dirs.extend(Path(location) for location in spec.submodule_search_locations or ())
        if not dirs and spec.origin:
            dirs.append(Path(spec.origin).parent)
    if not dirs:
        # Metadata can still name the files when the import system would not find the package
        # (for instance a sys.modules entry blocking it).
        import importlib.metadata

        try:
            files = importlib.metadata.distribution("xformers").files or []
        except importlib.metadata.PackageNotFoundError:
            files = []
        for file in files:
            if file.name == "__init__.py" and file.parent.name == "xformers" and len(file.parts) == 2:
                dirs.append(Path(str(file.locate())).parent)
    return dirs


def _read_build_metadata(path: Path) -> tuple[str | None, str | None, str | None]:
    """``(torch, cuda, python)`` from xFormers' ``cpp_lib.json``.

    xFormers writes ``{"version": {"torch": "2.3.1+cu121", "cuda": 1201, "python": "3.10.11", ...}}``
    with CUDA as ``major * 100 + minor``; flat ``torch_version``-style keys are accepted too.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("cpp_lib.json is not a JSON object")
    nested = data.get("version")
    section = nested if isinstance(nested, dict) else {}

    def pick(key: str) -> Any:
        value = section.get(key)
        return value if value is not None else data.get(f"{key}_version")

    torch_version, cuda, python = pick("torch"), pick("cuda"), pick("python")
    if isinstance(cuda, int) and not isinstance(cuda, bool):
        cuda = f"{cuda // 100}.{cuda % 100}" if cuda >= 100 else str(cuda)
    return (
        str(torch_version) if torch_version else None,
        str(cuda) if cuda else None,
        str(python) if python else None,
    )


def probe_xformers(
    torch_version: str | None, *, torch_cuda: str | None = None, python_version: str | None = None
) -> XformersInfo | None:
    """The installed xFormers and whether its binary build fits ``torch_version``; ``None`` if absent.

    xFormers is never imported: a build for another torch either fails to load its extension (and
    prints a long warning) or crashes the interpreter.
    """
    version = _dist_version("xformers")
    dirs = _xformers_dirs()
    if version is None and not dirs:
        return None
    location = str(dirs[0]) if dirs else None
    metadata_file = next((d / "cpp_lib.json" for d in dirs if (d / "cpp_lib.json").is_file()), None)
    if metadata_file is None:
        missing = "package files not found" if not dirs else "no cpp_lib.json (source install or unbuilt)"
        return XformersInfo(version, location, None, None, None, None, None, missing)
    try:
        built_torch, built_cuda, built_python = _read_build_metadata(metadata_file)
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        log.debug("cannot read %s", metadata_file, exc_info=True)
        unreadable = f"cannot read {metadata_file.name}: {_describe(exc)}"
        return XformersInfo(version, location, None, None, None, None, None, unreadable)

    matches_torch, reason = torch_build_matches(
        built_torch, torch_version, built_cuda=built_cuda, installed_cuda=torch_cuda
    )
    running_python = python_version or platform.python_version()
    matches_python: bool | None = None
    if built_python:
        # Binary wheels are tied to the interpreter's major.minor only.
        matches_python = built_python.split(".")[:2] == running_python.split(".")[:2]
        if not matches_python:
            python_reason = f"built for Python {built_python}, running {running_python}"
            reason = f"{reason}; {python_reason}" if reason else python_reason
    return XformersInfo(
        version=version,
        location=location,
        built_for_torch=built_torch,
        built_for_cuda=built_cuda,
        built_for_python=built_python,
        matches_torch=matches_torch,
        matches_python=matches_python,
        reason=reason,
    )
