"""Put the probe, the checker and the profiles together: what ``doctor`` and the WebUI's status show."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_optim.checker import CheckInput, Finding, RuntimeFacts, run_checks
from lib_optim.cmdline import environment_command_line
from lib_optim.hostkinds import HostKind
from lib_optim.probe import SystemFacts
from lib_optim.profiles import choose_auto, get_profile, launch_line, resolve

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


@dataclass(frozen=True)
class DoctorReport:
    host: HostKind
    system: SystemFacts
    findings: list[Finding]
    profile: str
    profile_flags: tuple[str, ...]
    profile_env: Mapping[str, str]
    commandline: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host.value,
            "system": self.system.to_dict(),
            "findings": [f.to_dict() for f in self.findings],
            "recommended_profile": {
                "name": self.profile,
                "flags": list(self.profile_flags),
                "env": dict(self.profile_env),
                "commandline": self.commandline,
            },
        }


def doctor(
    host: HostKind,
    system: SystemFacts,
    *,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> DoctorReport:
    env = dict(os.environ if env is None else env)
    facts = runtime_facts(system, nvidia_present=nvidia_on_pci_bus())
    findings = run_checks(CheckInput(host, effective_argv(args, env), env, facts))
    name = choose_auto(system.best_gpu_memory_mb())
    checked_host = host if host is not HostKind.REFORGE else HostKind.FORGE_PREVIOUS
    hp = resolve(get_profile(name), checked_host, directml=system.directml and not system.gpus)
    kind = "bat" if sys.platform == "win32" else "sh"
    return DoctorReport(host, system, findings, name, hp.flags, hp.env, launch_line(hp, kind))
