"""Put the probe, the checker and the profiles together: what ``doctor`` and the WebUI's status show."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lib_optim.compile import CompileAdvice, CompileProbe, compile_advice, compile_section_dict
from lib_optim.gpu import SystemFacts
from lib_optim.host_specs import HostKind, host_spec
from lib_optim.launch.checker import CheckInput, Finding, RuntimeFacts, run_checks
from lib_optim.launch.cmdline import environment_command_line
from lib_optim.launch.profiles import HostProfile, ProfileError, choose_auto, get_profile, launch_line, resolve
from lib_optim.settings import GenerationSettings

# Where the GPU's size is unknown (this Python cannot ask the driver), a middle profile: it starts on any card
# the WebUI supports and costs little speed; the exact one needs the WebUI's own Python (see exact_figures_hint).
UNKNOWN_SIZE_PROFILE = "8gb-medium"

_NVIDIA_PCI_VENDOR = "0x10de"


def nvidia_on_pci_bus(sysfs: Path = Path("/sys/bus/pci/devices")) -> bool | None:
    """True if Linux lists an NVIDIA display controller; None where we cannot tell (not Linux)."""
    if not sysfs.is_dir():
        return None
    for device in sysfs.iterdir():
        try:
            vendor = (device / "vendor").read_text().strip()
            klass = (device / "class").read_text().strip()
        except OSError:
            continue
        if vendor == _NVIDIA_PCI_VENDOR and klass.startswith("0x03"):
            return True
    return False


def runtime_facts(system: SystemFacts, *, nvidia_present: bool | None = None) -> RuntimeFacts:
    """Turn the probe's view of the machine into the facts the checker's rules read."""
    torch = system.torch
    xformers = system.xformers
    best = max(system.gpus, key=lambda g: g.total_mb or 0, default=None)
    torch_ok = torch is not None and torch.error is None
    return RuntimeFacts(
        torch_version=torch.version if torch else None,
        torch_has_cuda=(torch.cuda is not None or torch.hip is not None) if torch_ok and torch else None,
        cuda_available=torch.cuda_available if torch_ok and torch else None,
        nvidia_driver=system.nvidia_driver,
        nvidia_driver_error=system.nvidia_driver_error,
        nvidia_gpu_expected=nvidia_present,
        gpu_total_mb=best.total_mb if best else None,
        compute_capability=best.compute_capability if best else None,
        xformers_version=xformers.version if xformers else None,
        xformers_known=True,
        xformers_built_for_torch=xformers.built_for_torch if xformers else None,
        xformers_matches_torch=xformers.matches_torch if xformers else None,
        directml_installed=system.directml,
        mps_available=torch.mps_available if torch_ok and torch else None,
    )


def effective_argv(args: Sequence[str], env: Mapping[str, str]) -> list[str]:
    """What the host's parser sees: the launch arguments, then COMMANDLINE_ARGS (docs/hosts.md §2.2)."""
    return [*args, *environment_command_line(env)]


def gpu_present(system: SystemFacts, nvidia_present: bool | None) -> bool:
    """A GPU is here: listed by a probe, an NVIDIA driver answered, or one is on the PCI bus.

    A driver that does not answer proves nothing on its own: pynvml fails the same way on a machine without
    any NVIDIA card.
    """
    return bool(system.gpus or system.nvidia_driver or nvidia_present)


def recommend_profile(system: SystemFacts, nvidia_present: bool | None) -> tuple[str, str]:
    """The profile for this machine and why. Never ``cpu`` while a GPU is present, even of unknown size."""
    sized = [g for g in system.gpus if g.total_mb is not None]
    if sized:
        best = max(sized, key=lambda g: g.total_mb or 0)
        return choose_auto(best.total_mb), f"for the {best.name} ({best.total_mb} MB)"
    if gpu_present(system, nvidia_present):
        return (
            UNKNOWN_SIZE_PROFILE,
            "a GPU is present, but this Python cannot read its memory: a middle profile that starts on any card; "
            "run doctor with the WebUI's Python for the one sized to your card",
        )
    if system.directml:
        return UNKNOWN_SIZE_PROFILE, "torch-directml is installed (AMD/Intel GPU through DirectML)"
    return "cpu", "no GPU found"


def webui_python(webui_root: Path | None, *, windows: bool | None = None) -> str:
    """The Python the WebUI runs (its venv, webui.sh / webui.bat default ``venv_dir``/``VENV_DIR``)."""
    windows = sys.platform == "win32" if windows is None else windows
    root = str(webui_root) if webui_root is not None else "<WebUI folder>"
    return f"{root}\\venv\\Scripts\\python" if windows else f"{root}/venv/bin/python"


def exact_figures_hint(
    system: SystemFacts, nvidia_present: bool | None, webui_root: Path | None, extension: Path
) -> str | None:
    """Which Python to run for exact figures, when this one cannot give them (no torch, or CPU torch on a GPU)."""
    torch = system.torch
    no_torch = torch is None or torch.error is not None
    cpu_torch_on_gpu = (
        torch is not None and not no_torch and not (torch.cuda or torch.hip) and gpu_present(system, nvidia_present)
    )
    if not (no_torch or cpu_torch_on_gpu):
        return None
    what = "has no working torch" if no_torch else "has a CPU-only torch"
    here = sys.executable or "python"
    windows = sys.platform == "win32"
    cd = f'cd /d "{extension}"' if windows else f'cd "{extension}"'
    return (
        f"This Python ({here}) {what}, so torch, CUDA and xFormers are not those the WebUI uses. For exact "
        f'figures run doctor with the WebUI\'s Python: {cd} && "{webui_python(webui_root, windows=windows)}" '
        "-m lib_optim doctor"
    )


@dataclass(frozen=True)
class DoctorReport:
    host: HostKind
    system: SystemFacts
    findings: list[Finding]
    profile: str
    profile_flags: tuple[str, ...]
    profile_env: Mapping[str, str]
    commandline: str  # what to paste into webui-user; empty when the profile sets nothing before start-up
    profile_reason: str = ""
    hint: str | None = None  # which Python to run for exact figures, when this one cannot give them
    directml: bool = False  # the recommended flags are the profile's DirectML variant (profile apply --directml)
    compile: CompileAdvice | None = None  # can regional compile work here, its cache, the torch upgrade path

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host.value,
            "system": self.system.to_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "recommended_profile": {
                "name": self.profile,
                "reason": self.profile_reason,
                "flags": list(self.profile_flags),
                "env": dict(self.profile_env),
                "commandline": self.commandline,
            },
            "hint": self.hint,
            "compile": compile_section_dict([self.compile]) if self.compile is not None else None,
        }


def doctor(
    host: HostKind,
    system: SystemFacts,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    pci: Callable[[], bool | None] = nvidia_on_pci_bus,
    webui_root: Path | None = None,
    extension: Path | None = None,
    compile_probe: CompileProbe | None = None,
) -> DoctorReport:
    """Check this environment for ``host`` and recommend a profile. ``pci`` says whether an NVIDIA card is on
    the bus (tests replace it); ``webui_root``/``extension`` shape the hint about which Python to run (and
    ``webui_root`` where the compile cache is); ``compile_probe``: what the compile section reads (tests)."""
    env = dict(os.environ if env is None else env)
    nvidia_present = pci()
    facts = runtime_facts(system, nvidia_present=nvidia_present)
    findings = run_checks(CheckInput(host, effective_argv(args, env), env, facts))
    name, reason = recommend_profile(system, nvidia_present)
    hp, directml = _doctor_profile(host, name, directml=system.directml and not system.gpus)
    kind: Literal["sh", "bat"] = "bat" if sys.platform == "win32" else "sh"
    extension = extension or Path(__file__).resolve().parents[2]
    hint = exact_figures_hint(system, nvidia_present, webui_root, extension)
    line = launch_line(hp, kind)
    argv = effective_argv(args, env)
    advice = compile_advice(host, system, environ=env, argv=argv, webui_root=webui_root, probe=compile_probe)
    return DoctorReport(host, system, findings, name, hp.flags, hp.env, line, reason, hint, directml, advice)


def _doctor_profile(host: HostKind, name: str, *, directml: bool) -> tuple[HostProfile, bool]:
    """The recommended profile on ``host`` (on the host its spec borrows profiles from, if another) and whether it
    is the DirectML variant; nothing to set where it has none."""
    source = host_spec(host).profiles_from
    profile = get_profile(name)
    if source is None:
        return HostProfile((), {}, GenerationSettings(), f"{host.display_name} has no launch profiles"), False
    try:
        return resolve(profile, HostKind(source), directml=directml), directml
    except ProfileError:  # no DirectML on this host (A1111): the plain variant is the honest answer
        return resolve(profile, HostKind(source)), False
