"""Doctor's compile section: whether regional compile can work here, how to get it, where its cache is, and — on a
host that pins a torch older than 2.5 — the ``TORCH_COMMAND`` upgrade line with its risks.

Decided from the probe's facts without importing torch (doctor also runs from a Python that is not the WebUI's),
with the same rules as :func:`lib_optim.compile.availability.compile_availability`, which the generation itself
uses. What each host's launcher installs (``TORCH_COMMAND`` and ``XFORMERS_PACKAGE`` defaults): A1111 v1.10.1
``modules/launch_utils.py:319-320,344``; Forge f2 ``:364-365,389``; Forge previous ``:363-364,388``; reForge pins
torch 2.9.0 (``:371-372``) and needs no upgrade. xformers 0.0.28.post3 is the build for torch 2.5.1 (xformers
issue 1121). triton-windows goes with one torch minor version each (its README's table): 3.1 with torch 2.4 and
2.5, 3.2 with 2.6, 3.3 with 2.7, 3.4 with 2.8, 3.5 with 2.9, 3.6 with 2.10; none before torch 2.4; 3.3+ dropped
Turing (RTX 20xx, GTX 16xx).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import sysconfig
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lib_optim.compile.availability import _cxx_compiler
from lib_optim.compile.blocks import MIN_TORCH, torch_version
from lib_optim.compile.persist import (
    INDUCTOR_VAR,
    cache_root,
    data_dir_from_argv,
    folder_name,
    fx_graph_cache_state,
)

if TYPE_CHECKING:
    from lib_optim.gpu import SystemFacts
    from lib_optim.host_specs import HostKind

SHARED_GRAPHS_TORCH = (2, 5)  # dynamo inlines nn.Modules: same-shaped blocks share one graph (regional.py)
UPGRADE_TORCH = ("2.5.1", "0.20.1", "xformers==0.0.28.post3")  # torch, torchvision, the xformers built for it
TRITON_WINDOWS = {(2, 4): 1, (2, 5): 1, (2, 6): 2, (2, 7): 3, (2, 8): 4, (2, 9): 5, (2, 10): 6}  # torch → 3.x


@dataclass(frozen=True)
class LauncherPin:
    """What a host's launcher installs when TORCH_COMMAND / XFORMERS_PACKAGE are not set."""

    torch: str
    xformers: str
    index_url: str
    tested_as: str  # how doctor names the host version that was tested with it


LAUNCHER_PINS = {
    "a1111": LauncherPin("2.1.2", "xformers==0.0.23.post1", "https://download.pytorch.org/whl/cu121", "A1111 v1.10.1"),
    "forge": LauncherPin("2.3.1", "xformers==0.0.27", "https://download.pytorch.org/whl/cu121", "Forge f2"),
    "forge-previous": LauncherPin(
        "2.1.2", "xformers==0.0.23.post1", "https://download.pytorch.org/whl/cu121", "Forge previous"
    ),
}


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _dist_version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _python_headers() -> bool:
    include = sysconfig.get_paths().get("include")
    return include is None or (Path(include) / "Python.h").is_file()


@dataclass(frozen=True)
class CompileProbe:
    """What the compile section reads besides the probe's facts (each part replaceable in tests)."""

    platform: str = field(default_factory=lambda: sys.platform)
    which: Callable[[str], str | None] = shutil.which
    has_module: Callable[[str], bool] = _has_module
    dist_version: Callable[[str], str | None] = _dist_version
    python_headers: Callable[[], bool] = _python_headers


@dataclass(frozen=True)
class CompileAdvice:
    device: str  # cuda, rocm, cpu, mps, directml, or none (no torch here)
    available: bool | None  # None: cannot tell (no torch in this Python)
    reason: str
    fix: str
    torch: str | None
    cache: dict[str, Any]
    older_torch: str = ""  # why a torch before 2.5 compiles slower ("" from 2.5)
    upgrade: dict[str, Any] | None = None  # the TORCH_COMMAND path for this host
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "available": self.available,
            "reason": self.reason,
            "fix": self.fix,
            "torch": self.torch,
            "cache": dict(self.cache),
            "older_torch": self.older_torch,
            "upgrade": self.upgrade,
            "notes": list(self.notes),
        }


def compile_device(system: SystemFacts) -> str:
    """Which device the generation would compile for, from the probe's facts."""
    torch = system.torch
    if torch is None or torch.error is not None or torch.version is None:
        return "none"
    if torch.cuda_available:
        return "rocm" if torch.hip else "cuda"
    if torch.mps_available:
        return "mps"
    if system.directml:
        return "directml"
    return "cpu"


def _windows_triton_fix(version: tuple[int, int]) -> str:
    minor = TRITON_WINDOWS.get(version)
    if minor is None:
        return "pip install -U triton-windows (the release for your torch: see the table in its README)"
    torch = f"{version[0]}.{version[1]}"
    return f'pip install -U "triton-windows<3.{minor + 1}" (triton-windows 3.{minor} goes with torch {torch})'


def _gpu_check(device: str, version: tuple[int, int], system: SystemFacts, probe: CompileProbe) -> tuple[str, str]:
    windows = probe.platform == "win32"
    if windows and version < (2, 4):
        return "no triton for Windows before torch 2.4 (triton-windows starts there)", "upgrade torch to 2.5 or newer"
    if not probe.has_module("triton"):
        if windows:
            return "triton is not installed", f"in the WebUI's venv: {_windows_triton_fix(version)}"
        if device == "rocm":
            return "triton is not installed", "install pytorch-triton-rocm (it comes with torch's ROCm wheels)"
        return "triton is not installed", "pip install triton (torch's Linux wheels bring it: reinstall torch)"
    capability = max((g.compute_capability for g in system.gpus if g.compute_capability), default=None)
    if device == "cuda" and capability is not None and capability < (7, 0):
        return f"this GPU (compute capability {capability[0]}.{capability[1]}) is too old for triton (7.0+)", ""
    return "", ""


def _cpu_check(version: tuple[int, int], environ: Mapping[str, str], probe: CompileProbe) -> tuple[str, str]:
    windows = probe.platform == "win32"
    if windows and version < (2, 5):
        return "inductor's CPU backend on Windows needs torch 2.5 or newer", "upgrade torch to 2.5 or newer"
    if not _cxx_compiler(environ, probe.platform, probe.which):
        if windows:
            return "no C++ compiler (cl.exe)", "install the MSVC Build Tools and start from a Developer prompt"
        return "no C++ compiler", "install g++ or clang++ (e.g. apt install g++), or set CXX to one"
    if probe.platform.startswith("linux") and not probe.python_headers():
        return "the Python headers (Python.h) are missing", "install python3-dev (your distribution's name for it)"
    return "", ""


def _availability(
    device: str, system: SystemFacts, environ: Mapping[str, str], probe: CompileProbe
) -> tuple[bool | None, str, str]:
    if device == "none":
        return None, "this Python has no working torch", "run doctor with the WebUI's Python to know"
    if device in ("mps", "directml"):
        name = "MPS" if device == "mps" else "DirectML"
        return False, f"not supported on {name}: inductor has no code generator for it", "none (runs uncompiled)"
    version = torch_version(system.torch.version if system.torch else None)
    if version < MIN_TORCH:
        return False, "torch.compile needs torch 2.1 or newer", "upgrade torch to 2.5 or newer"
    if system.python.startswith("3.12") and version < (2, 4):
        return False, "torch.compile supports Python 3.12 from torch 2.4", "upgrade torch to 2.5 or newer"
    reason, fix = (
        _gpu_check(device, version, system, probe)
        if device in ("cuda", "rocm")
        else _cpu_check(version, environ, probe)
    )
    return not reason, reason, fix


def _cache(environ: Mapping[str, str], data_dir: Path | None, torch: str | None) -> dict[str, Any]:
    root = cache_root(environ, data_dir)
    user_dir = environ.get(INDUCTOR_VAR, "").strip()
    folder = str(root.path / folder_name(torch)) if torch else None
    yours = bool(user_dir) and user_dir != folder
    return {
        "root": str(root.path),
        "source": root.source,
        "why": root.why,
        "folder": user_dir if yours else folder,
        "yours": yours,
        "fx_graph_cache": fx_graph_cache_state(torch, environ)[1],
    }


def _upgrade(host: HostKind, windows: bool) -> dict[str, Any] | None:
    from lib_optim.host_specs import host_spec

    pin = LAUNCHER_PINS.get(host.value)
    if pin is None:
        return None
    torch, vision, xformers = UPGRADE_TORCH
    command = f"pip install torch=={torch} torchvision=={vision} --extra-index-url {pin.index_url}"
    line = f"set TORCH_COMMAND={command}" if windows else f'export TORCH_COMMAND="{command}"'
    risks = [
        f"{pin.tested_as} was tested with torch {pin.torch}, the one its launcher installs",
        f"the {pin.xformers} it installs is built for torch {pin.torch} and stops loading: also set "
        f"XFORMERS_PACKAGE={xformers} and start once with --reinstall-xformers, or leave --xformers out",
        "other extensions' compiled wheels built for the old torch may need the same",
        "going back: remove TORCH_COMMAND and start once with --reinstall-torch",
    ]
    triton_line = _windows_triton_fix(torch_version(torch)) if windows else ""
    return {
        "host": host.value,
        "host_name": host_spec(host).display_name,
        "installs": pin.torch,
        "torch": torch,
        "file": f"webui-user.{'bat' if windows else 'sh'}",
        "line": line,
        "then": "start once with --reinstall-torch in COMMANDLINE_ARGS, then remove it",
        "windows_triton": triton_line,
        "risks": risks,
    }


def compile_advice(
    host: HostKind,
    system: SystemFacts,
    *,
    environ: Mapping[str, str],
    argv: Sequence[str] = (),
    webui_root: Path | None = None,
    probe: CompileProbe | None = None,
) -> CompileAdvice:
    """Doctor's compile section for ``host`` on this machine (``argv``: the WebUI's launch line, for
    ``--data-dir``)."""
    probe = probe or CompileProbe()
    device = compile_device(system)
    here = system.torch.version if device != "none" and system.torch else None
    pin = LAUNCHER_PINS.get(host.value)
    deciding = here or (pin.torch if pin else None)  # no torch here: the one the host's launcher installs
    version = torch_version(deciding) if deciding else (0, 0)
    available, reason, fix = _availability(device, system, environ, probe)
    older = ""
    if deciding and version < SHARED_GRAPHS_TORCH:
        whose = f"torch {deciding}" + ("" if here else f" (what {host.display_name} installs)")
        restart = (
            "after a restart compiled graphs are reused (the FX graph cache the extension turns on)"
            if version >= (2, 3)
            else "after a restart only the generated kernels are reused"
        )
        older = (
            f"{whose} is older than 2.5: every UNet block is compiled on its own (same-shaped blocks share no "
            f"graph), so the first generation compiles several times longer; {restart}"
        )
    upgrade = _upgrade(host, probe.platform == "win32") if older else None
    notes: list[str] = []
    triton_windows = probe.dist_version("triton-windows")
    expected = TRITON_WINDOWS.get(version)
    if triton_windows and expected is not None and torch_version(triton_windows) != (3, expected):
        notes.append(
            f"triton-windows {triton_windows} is not the one for torch {deciding}: {_windows_triton_fix(version)}"
        )
    data_dir = data_dir_from_argv(argv, webui_root)  # --data-dir, else the checkout, else None (no WebUI)
    cache = _cache(environ, data_dir, here)
    return CompileAdvice(device, available, reason, fix, here, cache, older, upgrade, tuple(notes))


def compile_section_dict(advices: Sequence[CompileAdvice]) -> dict[str, Any]:
    """Doctor's JSON ``compile``: the first host's view, with every host's upgrade path."""
    first = advices[0].to_dict()
    first["upgrade"] = [a.upgrade for a in advices if a.upgrade is not None]
    return first


def compile_section_text(advices: Sequence[CompileAdvice]) -> str:
    """Doctor's compile section, in words."""
    first = advices[0]
    on = f"{first.device}, torch {first.torch}" if first.torch else first.device
    lines = ["Compile (Compile UNet blocks, regional torch.compile):"]
    if first.available:
        lines.append(f"  here ({on}): works")
    elif first.available is None:
        lines.append(f"  here: cannot tell: {first.reason}; {first.fix}")
    else:
        lines.append(f"  here ({on}): cannot work: {first.reason}; fix: {first.fix}")
    cache = first.cache
    if cache["yours"]:
        lines.append(f"  cache: your {INDUCTOR_VAR}={cache['folder']} (the extension leaves it as it is)")
    else:
        shown = cache["folder"] or cache["root"]
        lines.append(f"  cache: {shown} ({cache['why']}); python -m lib_optim compile-cache show")
    lines.extend(f"  note: {n}" for n in first.notes)
    if first.older_torch:
        lines.append(f"  {first.older_torch}")
    for advice in advices:
        up = advice.upgrade
        if up is None:
            continue
        lines.append(f"  For torch {up['torch']} on {up['host_name']} (it installs {up['installs']}), in {up['file']}:")
        lines.append(f"    {up['line']}")
        lines.append(f"    and {up['then']}.")
        if up["windows_triton"]:
            lines.append(f"    Then in the WebUI's venv: {up['windows_triton']}.")
        lines.append("    Risks: " + "; ".join(up["risks"]) + ".")
    return "\n".join(lines)
