"""The NVIDIA driver without a Python binding: ``nvidia-smi`` (it comes with the driver on Linux and Windows) and
the kernel module's version file in ``/proc`` (Linux)."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lib_optim.gpu.facts import DriverReply, GpuInfo, _describe, _vendor_from_name
from lib_optim.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class DriverAccess:
    """Where to ask the NVIDIA driver when this Python has no pynvml (tests point these at fakes).

    ``path``: the PATH to find ``nvidia-smi`` in (None: this process's PATH). ``nvidia-smi`` comes with the
    driver on Linux and Windows. ``proc_version``: the kernel module's version file (Linux).
    """

    path: str | None = None
    proc_version: Path = Path("/proc/driver/nvidia/version")
    timeout_s: float = 20.0


DEFAULT_DRIVER_ACCESS = DriverAccess()

# compute_cap exists since driver 510; older ones refuse the whole query, so it is asked for separately.
_SMI_FIELDS = ("index", "name", "memory.total", "memory.free", "driver_version")
_SMI_NA = ("[N/A]", "[Not Supported]", "N/A", "")


def _smi_int(value: str) -> int | None:
    value = value.strip()
    if value in _SMI_NA:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None


def _smi_capability(value: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*(\d+)\.(\d+)\s*", value)
    return (int(match[1]), int(match[2])) if match else None


def _run_smi(exe: str, fields: tuple[str, ...], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout_s,
        check=False,
    )


def _first_line(*texts: str) -> str:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                return line.strip()
    return ""


def probe_nvidia_smi(notes: list[str], access: DriverAccess | None = None) -> DriverReply | None:
    """GPUs and driver version from ``nvidia-smi``; ``None`` when it is not on the PATH (nothing to ask with)."""
    access = access or DEFAULT_DRIVER_ACCESS
    exe = shutil.which("nvidia-smi", path=access.path)
    if exe is None:
        notes.append("nvidia-smi not found on the PATH")
        return None
    try:
        proc = _run_smi(exe, (*_SMI_FIELDS, "compute_cap"), access.timeout_s)
        with_capability = proc.returncode == 0
        if not with_capability and "compute_cap" in proc.stdout + proc.stderr:
            proc = _run_smi(exe, _SMI_FIELDS, access.timeout_s)  # a driver older than 510
    # A hung nvidia-smi is itself a sign of a driver in trouble; one that cannot start says why.
    except (OSError, subprocess.SubprocessError) as exc:
        log.debug("nvidia-smi failed", exc_info=True)
        timed_out = isinstance(exc, subprocess.TimeoutExpired)
        reason = f"timed out after {access.timeout_s:g} s" if timed_out else _describe(exc)
        notes.append(f"nvidia-smi failed: {reason}")
        return DriverReply(error=f"nvidia-smi {reason}")
    if proc.returncode != 0:
        reason = _first_line(proc.stdout, proc.stderr) or f"exit status {proc.returncode}"
        notes.append(f"nvidia-smi failed: {reason}")
        return DriverReply(error=f"nvidia-smi: {reason}")
    gpus: list[GpuInfo] = []
    driver: str | None = None
    for row in csv.reader(proc.stdout.splitlines(), skipinitialspace=True):
        if len(row) < len(_SMI_FIELDS):
            continue
        index, name, total, free, version = (cell.strip() for cell in row[: len(_SMI_FIELDS)])
        capability = row[len(_SMI_FIELDS)] if with_capability and len(row) > len(_SMI_FIELDS) else ""
        driver = driver or (version if version not in _SMI_NA else None)
        position = _smi_int(index)
        gpus.append(
            GpuInfo(
                index=position if position is not None else len(gpus),
                name=name or f"NVIDIA GPU {len(gpus)}",
                vendor=_vendor_from_name(name, "nvidia"),
                total_mb=_smi_int(total),
                free_mb=_smi_int(free),
                compute_capability=_smi_capability(capability),
                source="nvidia-smi",
            )
        )
    if not gpus:
        notes.append("nvidia-smi listed no GPU")
    return DriverReply(driver, tuple(gpus))


def read_proc_driver_version(access: DriverAccess | None = None) -> DriverReply | None:
    """The loaded kernel module's version (Linux). No ``/proc/driver`` at all: ``None`` (cannot tell)."""
    path = (access or DEFAULT_DRIVER_ACCESS).proc_version
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        if path.parent.parent.is_dir():
            return DriverReply(error=f"the nvidia kernel module is not loaded (no {path})")
        return None
    except OSError:  # unreadable: cannot tell, like no /proc
        log.debug("cannot read %s", path, exc_info=True)
        return None
    # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  ..." (or "... Open Kernel Module for x86_64 ...")
    match = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", text) or re.search(
        r"\b(\d{3}\.\d+(?:\.\d+)?)\b", text
    )
    return DriverReply(driver=match.group(1) if match else _first_line(text) or "unknown version")
