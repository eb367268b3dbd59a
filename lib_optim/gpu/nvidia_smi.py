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


# A working nvidia-smi answers in well under a second (a few on a cold multi-GPU machine); one that takes longer is
# stuck in the driver. Tests pass a tiny timeout.
SMI_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class DriverAccess:
    """Where to ask the NVIDIA driver when this Python has no pynvml (tests point these at fakes).

    ``path``: the PATH to find ``nvidia-smi`` in (None: this process's PATH). ``nvidia-smi`` comes with the
    driver on Linux and Windows. ``proc_version``: the kernel module's version file (Linux). ``timeout_s``: how
    long nvidia-smi may take before the driver counts as hung.
    """

    path: str | None = None
    proc_version: Path = Path("/proc/driver/nvidia/version")
    timeout_s: float = SMI_TIMEOUT_S


DEFAULT_DRIVER_ACCESS = DriverAccess()

# What we ask, in this order. A field an older nvidia-smi does not know makes it refuse the whole query
# ('Field "compute_cap" is not a valid field to query.', exit status 2; compute_cap exists since driver 510), so
# the query is asked again without each field it names.
_SMI_FIELDS = ("index", "name", "memory.total", "memory.free", "driver_version", "pci.bus_id", "uuid", "compute_cap")
_SMI_NA = ("[N/A]", "[Not Supported]", "N/A", "")
_REJECTED_FIELD = re.compile(r'Field "([^"]+)" is not a valid field to query')
# After SIGKILL, how long to wait for nvidia-smi to go: a process blocked inside a hung driver cannot die.
_KILL_WAIT_S = 1.0


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


def _smi_text(value: str) -> str | None:
    value = value.strip()
    return None if value in _SMI_NA else value


def _run_smi(exe: str, fields: tuple[str, ...], timeout_s: float) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)``; raises ``subprocess.TimeoutExpired`` after ``timeout_s``.

    Not ``subprocess.run``: after its timeout it kills the child and then waits for it without limit, and a
    nvidia-smi stuck in a hung driver does not die until the driver lets go.
    """
    proc = subprocess.Popen(
        [exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        encoding="utf-8",
        errors="replace",
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(timeout=_KILL_WAIT_S)
        except subprocess.TimeoutExpired:
            log.debug("nvidia-smi (pid %d) outlives SIGKILL: blocked in the driver; left behind", proc.pid)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        raise
    return proc.returncode, out, err


def _first_line(*texts: str) -> str:
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                return line.strip()
    return ""


def _query(exe: str, timeout_s: float) -> tuple[tuple[str, ...], int, str, str]:
    """Ask for :data:`_SMI_FIELDS`, dropping each field nvidia-smi refuses; returns the fields of the last ask."""
    fields = list(_SMI_FIELDS)
    while True:
        code, out, err = _run_smi(exe, tuple(fields), timeout_s)
        rejected = _REJECTED_FIELD.search(out + err) if code != 0 else None
        if rejected is None or rejected[1] not in fields or len(fields) == 1:
            return tuple(fields), code, out, err
        log.debug("nvidia-smi does not know the field %r (an older driver): asking without it", rejected[1])
        fields.remove(rejected[1])


def hung_driver(timeout_s: float) -> str:
    """The diagnosis for a nvidia-smi that did not answer in time."""
    return (
        f"nvidia-smi did not answer within {timeout_s:g} s: the NVIDIA driver looks hung — reboot, or reinstall "
        "the driver"
    )


def probe_nvidia_smi(notes: list[str], access: DriverAccess | None = None) -> DriverReply | None:
    """GPUs and driver version from ``nvidia-smi``; ``None`` when it is not on the PATH (nothing to ask with)."""
    access = access or DEFAULT_DRIVER_ACCESS
    exe = shutil.which("nvidia-smi", path=access.path)
    if exe is None:
        notes.append("nvidia-smi not found on the PATH")
        return None
    try:
        fields, code, out, err = _query(exe, access.timeout_s)
    except subprocess.TimeoutExpired:  # a hung nvidia-smi is itself the sign of a driver in trouble
        log.debug("nvidia-smi timed out", exc_info=True)
        notes.append(hung_driver(access.timeout_s))
        return DriverReply(error=hung_driver(access.timeout_s), hung=True)
    except (OSError, subprocess.SubprocessError) as exc:  # one that cannot start says why
        log.debug("nvidia-smi failed", exc_info=True)
        notes.append(f"nvidia-smi failed: {_describe(exc)}")
        return DriverReply(error=f"nvidia-smi {_describe(exc)}")
    if code != 0:
        reason = _first_line(out, err) or f"exit status {code}"
        notes.append(f"nvidia-smi failed: {reason}")
        return DriverReply(error=f"nvidia-smi: {reason}")
    gpus: list[GpuInfo] = []
    driver: str | None = None
    for row in csv.reader(out.splitlines(), skipinitialspace=True):
        if len(row) < len(fields):
            continue
        cell = {field: value.strip() for field, value in zip(fields, row, strict=False)}
        driver = driver or _smi_text(cell.get("driver_version", ""))
        position = _smi_int(cell.get("index", ""))
        name = cell.get("name", "")
        gpus.append(
            GpuInfo(
                index=position if position is not None else len(gpus),
                name=name or f"NVIDIA GPU {len(gpus)}",
                vendor=_vendor_from_name(name, "nvidia"),
                total_mb=_smi_int(cell.get("memory.total", "")),
                free_mb=_smi_int(cell.get("memory.free", "")),
                compute_capability=_smi_capability(cell.get("compute_cap", "")),
                source="nvidia-smi",
                uuid=_smi_text(cell.get("uuid", "")),
                pci_bus_id=_smi_text(cell.get("pci.bus_id", "")),
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
