"""Put the probe, the checker and the profiles together: what ``doctor`` and the WebUI's status show."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Any, Literal

from lib_optim.compile import CompileAdvice, CompileProbe, compile_advice, compile_section_dict
from lib_optim.gpu import GpuInfo, SystemFacts
from lib_optim.host_specs import HostKind, host_spec
from lib_optim.launch.checker import CheckInput, Finding, RuntimeFacts, run_checks
from lib_optim.launch.cmdline import environment_command_line
from lib_optim.launch.gpu_choice import GpuChoice, choose_gpu
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


def runtime_facts(
    system: SystemFacts, *, nvidia_present: bool | None = None, gpu: GpuInfo | None = None
) -> RuntimeFacts:
    """Turn the probe's view of the machine into the facts the checker's rules read; ``gpu``: the card the WebUI
    runs on (default: the largest)."""
    torch = system.torch
    xformers = system.xformers
    best = gpu or max(system.gpus, key=lambda g: g.total_mb or 0, default=None)
    torch_ok = torch is not None and torch.error is None
    return RuntimeFacts(
        torch_version=torch.version if torch else None,
        torch_has_cuda=(torch.cuda is not None or torch.hip is not None) if torch_ok and torch else None,
        cuda_available=torch.cuda_available if torch_ok and torch else None,
        nvidia_driver=system.nvidia_driver,
        nvidia_driver_error=system.nvidia_driver_error,
        nvidia_gpu_expected=True if system.nvidia_driver_hung else nvidia_present,
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
    any NVIDIA card. One that hangs does: it is installed, and stuck on a card.
    """
    return bool(system.gpus or system.nvidia_driver or nvidia_present or system.nvidia_driver_hung)


def recommend_profile(
    system: SystemFacts, nvidia_present: bool | None, choice: GpuChoice | None = None
) -> tuple[str, str]:
    """The profile for this machine and why: for the card the WebUI runs on (``choice``; without one, the largest).
    Never ``cpu`` while a GPU is present, even of unknown size."""
    card = choice.profile_gpu if choice is not None else None
    if card is not None and card.total_mb is not None:
        smallest = " (the smallest the WebUI may run on)" if choice is not None and choice.maybe else ""
        return choose_auto(card.total_mb), f"for the {card.name} ({card.total_mb} MB){smallest}"
    sized = [g for g in system.gpus if g.total_mb is not None]
    if sized:
        best = max(sized, key=lambda g: g.total_mb or 0)
        return choose_auto(best.total_mb), f"for the {best.name} ({best.total_mb} MB)"
    if system.nvidia_driver_hung:
        return (
            UNKNOWN_SIZE_PROFILE,
            "the NVIDIA driver is hung, so the card's memory is unknown: a middle profile that starts on any card; "
            "after a reboot run doctor again for the one sized to your card",
        )
    if gpu_present(system, nvidia_present):
        return (
            UNKNOWN_SIZE_PROFILE,
            "a GPU is present, but this Python cannot read its memory: a middle profile that starts on any card; "
            "run doctor with the WebUI's Python for the one sized to your card",
        )
    if system.directml:
        return UNKNOWN_SIZE_PROFILE, "torch-directml is installed (AMD/Intel GPU through DirectML)"
    return "cpu", "no GPU found"


def webui_python(
    webui_root: Path | None, *, windows: bool | None = None, launcher_vars: Mapping[str, str] | None = None
) -> str:
    """The Python the WebUI runs: its venv's (webui.sh ``venv_dir``, webui.bat ``VENV_DIR``, default ``venv`` in
    the WebUI folder), or with the venv switched off (``-``) the launcher's Python (``python_cmd`` / ``PYTHON``);
    docs/hosts.md §2.6. ``launcher_vars``: what the webui-user file sets, exported or not."""
    windows = sys.platform == "win32" if windows is None else windows
    found = launcher_vars or {}
    root = str(webui_root) if webui_root is not None else "<WebUI folder>"
    venv = (found.get("VENV_DIR") if windows else found.get("venv_dir")) or "venv"
    if venv.strip() == "-":
        return (found.get("PYTHON") or "python") if windows else (found.get("python_cmd") or "python3")
    if windows:
        base = venv if PureWindowsPath(venv).is_absolute() else f"{root}\\{venv}"
        return f"{base}\\Scripts\\python"
    base = venv if venv.startswith("/") else f"{root}/{venv}"
    return f"{base}/bin/python"


def _python_state(python: str, webui_root: Path | None) -> str:
    """Whether the WebUI's venv Python is there: its own words for the hint."""
    if webui_root is None or "/" not in python.replace("\\", "/"):
        return ""
    if Path(python).exists() or Path(f"{python}.exe").exists():
        return " (its venv)"
    return " (its venv, not there yet: the WebUI creates it on its first start)"


def exact_figures_hint(
    system: SystemFacts,
    nvidia_present: bool | None,
    webui_root: Path | None,
    extension: Path,
    launcher_vars: Mapping[str, str] | None = None,
) -> str | None:
    """Which Python to run for exact figures, when this one cannot give them (no torch, a broken one, or CPU
    torch on a GPU)."""
    torch = system.torch
    broken = torch is not None and torch.error is not None
    cpu_torch_on_gpu = (
        torch is not None and not broken and not (torch.cuda or torch.hip) and gpu_present(system, nvidia_present)
    )
    if not (torch is None or broken or cpu_torch_on_gpu):
        return None
    here = sys.executable or "python"
    windows = sys.platform == "win32"
    python = webui_python(webui_root, windows=windows, launcher_vars=launcher_vars)
    cd = f'cd /d "{extension}"' if windows else f'cd "{extension}"'
    run = f'{cd} && "{python}" -m lib_optim doctor'
    if torch is None:
        if Path(here).resolve() == Path(python).resolve():
            return f"This Python ({here}) is the WebUI's own and has no torch: the WebUI installs it when it starts."
        return (
            f"This Python ({here}) has no torch. The WebUI runs {python}{_python_state(python, webui_root)}, where "
            f"its torch, CUDA and xFormers are; for exact figures run doctor with it: {run}"
        )
    what = "has no working torch" if broken else "has a CPU-only torch"
    return (
        f"This Python ({here}) {what}, so torch, CUDA and xFormers are not those the WebUI uses. For exact "
        f"figures run doctor with the WebUI's Python: {run}"
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
    gpu: GpuChoice | None = None  # the GPU the WebUI will run on (None: no GPU found)
    compile: CompileAdvice | None = None  # can regional compile work here, its cache, the torch upgrade path

    def gpu_lines(self) -> list[str]:
        """Doctor's lines about the GPU the WebUI will use; none on a one-GPU machine where nothing chose."""
        if self.gpu is None or not self.gpu.worth_saying(len(self.system.gpus)):
            return []
        return self.gpu.lines()

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
            "gpu": self.gpu.to_dict() if self.gpu is not None else None,
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
    launcher_vars: Mapping[str, str] | None = None,
    probed_env: Mapping[str, str] | None = None,
    compile_probe: CompileProbe | None = None,
) -> DoctorReport:
    """Check this environment for ``host`` and recommend a profile for the GPU it will run on. ``pci`` says
    whether an NVIDIA card is on the bus (tests replace it); ``webui_root``/``extension``/``launcher_vars`` (what
    the webui-user file sets) shape the hint about which Python to run (and ``webui_root`` where the compile cache
    is). ``probed_env``: the environment ``system`` was probed in (default: this process's); ``compile_probe``: what
    the compile section reads (tests)."""
    env = dict(os.environ if env is None else env)
    nvidia_present = pci()
    argv = effective_argv(args, env)
    choice = choose_gpu(host, system, argv, env, os.environ if probed_env is None else probed_env)
    card = choice.profile_gpu if choice is not None else None
    facts = runtime_facts(system, nvidia_present=nvidia_present, gpu=card)
    findings = run_checks(CheckInput(host, argv, env, facts))
    name, reason = recommend_profile(system, nvidia_present, choice)
    hp, directml = _doctor_profile(host, name, directml=system.directml and not system.gpus)
    kind: Literal["sh", "bat"] = "bat" if sys.platform == "win32" else "sh"
    extension = extension or Path(__file__).resolve().parents[2]
    hint = exact_figures_hint(system, nvidia_present, webui_root, extension, launcher_vars)
    line = launch_line(hp, kind)
    advice = compile_advice(host, system, environ=env, argv=argv, webui_root=webui_root, probe=compile_probe)
    return DoctorReport(host, system, findings, name, hp.flags, hp.env, line, reason, hint, directml, choice, advice)


def gpu_lines(reports: Sequence[DoctorReport]) -> list[str]:
    """The GPU lines of doctor's reports for several hosts: once where they agree, else per host."""
    distinct = {tuple(r.gpu_lines()) for r in reports}
    if len(distinct) <= 1:
        return reports[0].gpu_lines() if reports else []
    return [line for r in reports if r.gpu_lines() for line in (f"On {r.host.display_name}:", *r.gpu_lines())]


def doctor_json(
    reports: Sequence[DoctorReport], findings: Mapping[HostKind, Sequence[Finding]], note: str | None
) -> dict[str, Any]:
    """``doctor --json``: one host's report (``note`` None: the host is known), or every host's with the note saying
    why there are several. ``findings``: each host's findings as shown (the launcher file's added)."""
    first = reports[0]
    if note is None:
        return {**first.to_dict(), "findings": [f.to_dict() for f in findings[first.host]]}
    return {
        "host": None,
        "hosts": [r.host.value for r in reports],
        "note": note,
        "system": first.system.to_dict(),
        "findings": [{**f.to_dict(), "host": r.host.value} for r in reports for f in findings[r.host]],
        "recommended_profile": {
            "name": first.profile,
            "reason": first.profile_reason,
            "by_host": {
                r.host.value: {
                    "name": r.profile,
                    "flags": list(r.profile_flags),
                    "env": dict(r.profile_env),
                    "commandline": r.commandline,
                }
                for r in reports
            },
        },
        "hint": first.hint,
        "gpu": {r.host.value: r.gpu.to_dict() if r.gpu else None for r in reports},
        "compile": compile_section_dict([r.compile for r in reports if r.compile is not None]),
    }


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
