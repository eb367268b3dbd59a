"""Facts about this machine: Python, torch, xFormers, GPUs.

Every probe here must survive a missing or broken component: the whole point is to explain a broken
install, so a failure becomes a readable note in the result instead of an exception. Heavy modules
(torch, pynvml) are imported inside the functions so that ``import lib_optim.gpu.probe`` stays cheap.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import platform
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lib_optim.log import get_logger

log = get_logger(__name__)

Vendor = Literal["nvidia", "amd", "intel", "apple", "unknown"]
GpuSource = Literal["nvml", "nvidia-smi", "torch"]

_MB = 1024 * 1024


@dataclass(frozen=True)
class TorchInfo:
    """What the installed torch says about itself.

    ``error`` is set when torch is installed but ``import torch`` (or a query) failed; the other fields
    then hold whatever could still be learned (``version`` from package metadata).
    """

    version: str | None
    cuda: str | None
    hip: str | None
    cuda_available: bool
    mps_available: bool
    device_count: int
    error: str | None = None


@dataclass(frozen=True)
class XformersInfo:
    """The installed xFormers, learned from its files without importing it.

    ``matches_torch`` / ``matches_python`` are ``None`` when either side is unknown; ``reason`` says
    why they are not ``True`` (or why the build metadata could not be read).
    """

    version: str | None
    location: str | None
    built_for_torch: str | None
    built_for_cuda: str | None
    built_for_python: str | None
    matches_torch: bool | None
    matches_python: bool | None
    reason: str | None = None


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    vendor: Vendor
    total_mb: int | None
    free_mb: int | None
    compute_capability: tuple[int, int] | None
    source: GpuSource


@dataclass(frozen=True)
class SystemFacts:
    python: str
    platform: str
    torch: TorchInfo | None
    xformers: XformersInfo | None
    directml: bool
    gradio: str | None
    nvidia_driver: str | None
    gpus: tuple[GpuInfo, ...]
    gpu_source: Literal["nvml", "nvidia-smi", "torch", "none"]
    notes: tuple[str, ...]
    # The driver was asked (NVML, nvidia-smi, the kernel module) and did not answer: why. None when it answered
    # or when nothing here could ask it (no pynvml, no nvidia-smi, not Linux).
    nvidia_driver_error: str | None = None
    nvidia_driver_source: Literal["nvml", "nvidia-smi", "proc"] | None = None

    def best_gpu_memory_mb(self) -> int | None:
        """Total MB of the GPU with the most memory, or ``None`` when no GPU reports its size."""
        sizes = [gpu.total_mb for gpu in self.gpus if gpu.total_mb is not None]
        return max(sizes) if sizes else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (tuples become lists)."""
        return dataclasses.asdict(self)

    def format_text(self) -> str:
        """A compact multi-line summary for ``python -m lib_optim doctor``."""
        lines = [f"Python   {self.python} on {self.platform}"]
        lines.append(f"torch    {_format_torch(self.torch)}")
        lines.append(f"xFormers {_format_xformers(self.xformers)}")
        if self.directml:
            lines.append("DirectML torch-directml installed")
        lines.append(f"gradio   {self.gradio or 'not installed'}")
        if self.nvidia_driver:
            via = f" (via {self.nvidia_driver_source})" if self.nvidia_driver_source else ""
            lines.append(f"Driver   NVIDIA {self.nvidia_driver}{via}")
        elif self.nvidia_driver_error:
            lines.append(f"Driver   no NVIDIA driver answered ({self.nvidia_driver_error})")
        if self.gpus:
            for gpu in self.gpus:
                lines.append(f"GPU {gpu.index}    {_format_gpu(gpu)}")
        else:
            lines.append("GPU      none found")
        lines.extend(f"note     {note}" for note in self.notes)
        return "\n".join(lines)


def _format_torch(info: TorchInfo | None) -> str:
    if info is None:
        return "not available"
    parts = [info.version or "unknown version"]
    if info.cuda:
        parts.append(f"CUDA {info.cuda}")
    if info.hip:
        parts.append(f"HIP {info.hip}")
    if info.error:
        parts.append(f"import failed: {info.error}")
        return ", ".join(parts)
    if info.cuda_available:
        parts.append(f"{info.device_count} device(s) usable")
    elif info.mps_available:
        parts.append("MPS usable")
    else:
        parts.append("no GPU usable")
    return ", ".join(parts)


def _format_xformers(info: XformersInfo | None) -> str:
    if info is None:
        return "not installed"
    text = info.version or "unknown version"
    if info.built_for_torch:
        text += f" (built for torch {info.built_for_torch})"
    if info.matches_torch is True and info.matches_python is not False:
        text += ", matches"
    elif info.reason:
        text += f" — {info.reason}"
    return text


def _format_gpu(gpu: GpuInfo) -> str:
    parts = [f"{gpu.name} [{gpu.vendor}]"]
    if gpu.total_mb is not None:
        memory = f"{gpu.total_mb} MB"
        if gpu.free_mb is not None:
            memory += f" ({gpu.free_mb} MB free)"
        parts.append(memory)
    if gpu.compute_capability:
        parts.append(f"sm {gpu.compute_capability[0]}.{gpu.compute_capability[1]}")
    parts.append(f"via {gpu.source}")
    return ", ".join(parts)


def _describe(exc: BaseException) -> str:
    """A one-line reason: the message, or the exception type when the message is empty."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__


def _dist_version(name: str) -> str | None:
    """Installed version from package metadata; never imports the package itself."""
    import importlib.metadata

    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------------- torch


def probe_torch(notes: list[str]) -> TorchInfo | None:
    """``None`` when torch is not installed; otherwise what it reports (``error`` set if it is broken)."""
    try:
        import torch
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            notes.append("torch not installed")
            log.debug("torch not installed: %s", exc)
            return None
        log.debug("import torch failed", exc_info=True)
        return _broken_torch(notes, exc)
    # A broken torch install fails in many ways (OSError from a DLL, RuntimeError, AttributeError
    # from a half-upgraded package); all of them must end up as a note, not a crash.
    except Exception as exc:
        log.debug("import torch failed", exc_info=True)
        return _broken_torch(notes, exc)

    version = str(getattr(torch, "__version__", "")) or _dist_version("torch")
    torch_version = getattr(torch, "version", None)
    cuda = getattr(torch_version, "cuda", None)
    hip = getattr(torch_version, "hip", None)
    error: str | None = None
    cuda_available = False
    device_count = 0
    mps_available = False
    try:
        # Neither call initialises torch's CUDA state (is_available/device_count use the driver's
        # device count only), so they are safe before the host sets CUDA up.
        cuda_available = bool(torch.cuda.is_available())
        device_count = int(torch.cuda.device_count()) if cuda_available else 0
    except Exception as exc:  # a broken CUDA runtime raises arbitrary errors here
        error = f"torch.cuda query failed: {_describe(exc)}"
        notes.append(error)
        log.debug("torch.cuda query failed", exc_info=True)
    try:
        mps = getattr(getattr(torch, "backends", None), "mps", None)
        mps_available = bool(mps is not None and mps.is_available())
    except Exception as exc:  # same as above, for the MPS backend
        notes.append(f"torch MPS query failed: {_describe(exc)}")
        log.debug("torch MPS query failed", exc_info=True)
    return TorchInfo(
        version=version,
        cuda=str(cuda) if cuda else None,
        hip=str(hip) if hip else None,
        cuda_available=cuda_available,
        mps_available=mps_available,
        device_count=device_count,
        error=error,
    )


def _broken_torch(notes: list[str], exc: BaseException) -> TorchInfo:
    reason = _describe(exc)
    notes.append(f"torch import failed: {reason}")
    return TorchInfo(
        version=_dist_version("torch"),
        cuda=None,
        hip=None,
        cuda_available=False,
        mps_available=False,
        device_count=0,
        error=reason,
    )


def _vendor_from_name(name: str, default: Vendor) -> Vendor:
    """ZLUDA and ROCm present AMD cards through the CUDA API, so the name is the better witness."""
    lowered = name.lower()
    if "amd" in lowered or "radeon" in lowered or "instinct" in lowered:
        return "amd"
    if "intel" in lowered or " arc" in f" {lowered}":
        return "intel"
    if "nvidia" in lowered or "geforce" in lowered or "quadro" in lowered or "tesla" in lowered:
        return "nvidia"
    return default


def _torch_gpus(info: TorchInfo | None, notes: list[str], *, allow_cuda_init: bool) -> list[GpuInfo]:
    """GPUs as torch sees them. Only called after ``probe_torch`` succeeded, so torch imports."""
    if info is None or info.error is not None:
        return []
    import torch

    gpus: list[GpuInfo] = []
    if info.cuda_available and info.device_count > 0:
        # get_device_properties and mem_get_info both initialise CUDA in this process. On A1111 the
        # preload runs before the host configures CUDA, so the caller may forbid that — unless the
        # host has already initialised it, in which case asking costs nothing.
        is_initialized = getattr(torch.cuda, "is_initialized", None)
        if allow_cuda_init or (is_initialized is not None and is_initialized()):
            gpus.extend(_torch_cuda_gpus(torch, info, notes))
        else:
            notes.append("torch GPU details skipped: CUDA not initialised yet (allow_cuda_init=False)")
    xpu = getattr(torch, "xpu", None)
    try:
        xpu_available = bool(xpu is not None and xpu.is_available())
    except Exception as exc:  # an XPU backend without its runtime raises arbitrary errors
        notes.append(f"torch XPU query failed: {_describe(exc)}")
        log.debug("torch XPU query failed", exc_info=True)
        xpu_available = False
    if xpu_available and not gpus:
        if allow_cuda_init:
            gpus.extend(_torch_xpu_gpus(xpu, notes))
        else:
            notes.append("torch XPU details skipped: device not initialised yet (allow_cuda_init=False)")
    if info.mps_available and not gpus:
        gpus.append(_torch_mps_gpu(torch, notes))
    return gpus


def _torch_cuda_gpus(torch: Any, info: TorchInfo, notes: list[str]) -> list[GpuInfo]:
    default_vendor: Vendor = "amd" if info.hip else "nvidia"
    gpus: list[GpuInfo] = []
    for index in range(info.device_count):
        try:
            props = torch.cuda.get_device_properties(index)
        except Exception as exc:  # a device the runtime cannot open must not end the probe
            notes.append(f"torch could not read GPU {index}: {_describe(exc)}")
            log.debug("torch.cuda.get_device_properties(%d) failed", index, exc_info=True)
            continue
        name = str(getattr(props, "name", "") or f"GPU {index}")
        total_bytes = getattr(props, "total_memory", None)
        free_mb: int | None = None
        try:
            free_bytes, total_bytes = torch.cuda.mem_get_info(index)
            free_mb = int(free_bytes) // _MB
        except Exception as exc:  # free memory is optional; total comes from the properties
            notes.append(f"torch could not read free memory of GPU {index}: {_describe(exc)}")
            log.debug("torch.cuda.mem_get_info(%d) failed", index, exc_info=True)
        major, minor = getattr(props, "major", None), getattr(props, "minor", None)
        # ROCm reports gfx versions through major/minor (e.g. 9.0 for gfx90a); they are not CUDA compute
        # capabilities, so only keep them for CUDA builds.
        capability = (int(major), int(minor)) if major is not None and minor is not None else None
        gpus.append(
            GpuInfo(
                index=index,
                name=name,
                vendor=_vendor_from_name(name, default_vendor),
                total_mb=int(total_bytes) // _MB if total_bytes is not None else None,
                free_mb=free_mb,
                compute_capability=None if info.hip else capability,
                source="torch",
            )
        )
    return gpus


def _torch_xpu_gpus(xpu: Any, notes: list[str]) -> list[GpuInfo]:
    gpus: list[GpuInfo] = []
    try:
        count = int(xpu.device_count())
    except Exception as exc:  # see _torch_gpus
        notes.append(f"torch XPU device count failed: {_describe(exc)}")
        log.debug("torch.xpu.device_count failed", exc_info=True)
        return gpus
    for index in range(count):
        try:
            props = xpu.get_device_properties(index)
        except Exception as exc:  # see _torch_cuda_gpus
            notes.append(f"torch could not read XPU {index}: {_describe(exc)}")
            log.debug("torch.xpu.get_device_properties(%d) failed", index, exc_info=True)
            continue
        name = str(getattr(props, "name", "") or f"XPU {index}")
        total_bytes = getattr(props, "total_memory", None)
        gpus.append(
            GpuInfo(
                index=index,
                name=name,
                vendor=_vendor_from_name(name, "intel"),
                total_mb=int(total_bytes) // _MB if total_bytes is not None else None,
                free_mb=None,
                compute_capability=None,
                source="torch",
            )
        )
    return gpus


def _torch_mps_gpu(torch: Any, notes: list[str]) -> GpuInfo:
    total_mb: int | None = None
    # Apple GPUs share system memory; Metal's recommended working-set size is the usable budget.
    # torch.mps.recommended_max_memory only exists in newer torch, hence getattr.
    recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
    if recommended is not None:
        try:
            total_mb = int(recommended()) // _MB
        except Exception as exc:  # the size is optional; the device is still there
            notes.append(f"torch could not read MPS memory: {_describe(exc)}")
            log.debug("torch.mps.recommended_max_memory failed", exc_info=True)
    return GpuInfo(
        index=0,
        name="Apple MPS",
        vendor="apple",
        total_mb=total_mb,
        free_mb=None,
        compute_capability=None,
        source="torch",
    )


# ----------------------------------------------------------------------------------------------- NVML


def _text(value: Any) -> str:
    """pynvml returns ``bytes`` in old releases and ``str`` in newer ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


@dataclass(frozen=True)
class DriverReply:
    """What one way of asking the NVIDIA driver got: an answer (``driver``, ``gpus``) or an ``error``."""

    driver: str | None = None
    gpus: tuple[GpuInfo, ...] = ()
    error: str | None = None


def probe_nvml(notes: list[str]) -> tuple[str | None, list[GpuInfo]] | None:
    """``(driver version, GPUs)`` from NVML, or ``None`` (with a note) when NVML cannot be used.

    NVML reads the driver directly, so it neither initialises CUDA nor depends on which torch build
    is installed — which is why it is asked first.
    """
    reply = _ask_nvml(notes)
    if reply is None or reply.error is not None:
        return None
    return reply.driver, list(reply.gpus)


def _ask_nvml(notes: list[str]) -> DriverReply | None:
    """NVML through pynvml: ``None`` when pynvml is not importable (nothing to ask with)."""
    import warnings

    try:
        # The deprecated ``pynvml`` wrapper package warns on import; that is not our user's concern.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import pynvml
    except ImportError as exc:
        notes.append(f"NVML unavailable: pynvml not importable ({_describe(exc)})")
        log.debug("import pynvml failed: %s", exc)
        return None

    try:
        pynvml.nvmlInit()
    # No driver raises NVMLError_LibraryNotFound, an old driver AttributeError/OSError; all mean "no NVML".
    except Exception as exc:
        notes.append(f"NVML unavailable: {_describe(exc)}")
        log.debug("nvmlInit failed", exc_info=True)
        return DriverReply(error=f"NVML: {_describe(exc)}")

    try:
        driver: str | None = None
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
        except Exception as exc:  # the driver version is optional
            notes.append(f"NVML could not read the driver version: {_describe(exc)}")
            log.debug("nvmlSystemGetDriverVersion failed", exc_info=True)
        gpus = [_nvml_gpu(pynvml, index, notes) for index in range(int(pynvml.nvmlDeviceGetCount()))]
        return DriverReply(driver, tuple(gpus))
    # Count and handle lookups are required; if they fail the NVML view is unusable, so fall back. The driver
    # did answer nvmlInit, so this is not "no driver".
    except Exception as exc:
        notes.append(f"NVML query failed: {_describe(exc)}")
        log.debug("NVML query failed", exc_info=True)
        return DriverReply(driver=driver)
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:  # a failed shutdown changes none of the facts gathered
            log.debug("nvmlShutdown failed", exc_info=True)


def _nvml_gpu(pynvml: Any, index: int, notes: list[str]) -> GpuInfo:
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    name = f"NVIDIA GPU {index}"
    try:
        name = _text(pynvml.nvmlDeviceGetName(handle))
    except Exception as exc:  # the name is cosmetic
        notes.append(f"NVML could not read the name of GPU {index}: {_describe(exc)}")
        log.debug("nvmlDeviceGetName(%d) failed", index, exc_info=True)
    total_mb: int | None = None
    free_mb: int | None = None
    try:
        memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
        total_mb = int(memory.total) // _MB
        free_mb = int(memory.free) // _MB
    except Exception as exc:  # keep the device; its size is just unknown
        notes.append(f"NVML could not read the memory of GPU {index}: {_describe(exc)}")
        log.debug("nvmlDeviceGetMemoryInfo(%d) failed", index, exc_info=True)
    capability: tuple[int, int] | None = None
    try:
        major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
        capability = (int(major), int(minor))
    except Exception as exc:  # old drivers answer NotSupported here
        notes.append(f"NVML could not read the compute capability of GPU {index}: {_describe(exc)}")
        log.debug("nvmlDeviceGetCudaComputeCapability(%d) failed", index, exc_info=True)
    return GpuInfo(
        index=index,
        name=name,
        vendor="nvidia",
        total_mb=total_mb,
        free_mb=free_mb,
        compute_capability=capability,
        source="nvml",
    )


# ------------------------------------------------------------- the driver without a Python binding


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


# ------------------------------------------------------------------------------------------- xFormers

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


# ------------------------------------------------------------------------------------------- together


def probe_system(
    *,
    use_nvml: bool = True,
    use_torch: bool = True,
    allow_cuda_init: bool = True,
    driver_access: DriverAccess | None = None,
) -> SystemFacts:
    """Gather everything; never raises for a missing or broken component.

    GPUs come from NVML first (no CUDA initialisation, exact driver view), then ``nvidia-smi`` (the same
    driver, for a Python without pynvml), then torch, then none. The driver version also comes from the
    kernel module (``/proc``) when nothing else can ask. ``allow_cuda_init=False`` keeps torch from
    initialising CUDA (A1111's preload runs before the host does); torch then reports only availability
    and device count. ``driver_access``: where nvidia-smi and /proc are (default :data:`DEFAULT_DRIVER_ACCESS`).
    """
    access = driver_access or DEFAULT_DRIVER_ACCESS
    notes: list[str] = []
    torch_info: TorchInfo | None = None
    if use_torch:
        torch_info = probe_torch(notes)
    else:
        notes.append("torch not probed (use_torch=False)")

    gpus: list[GpuInfo] = []
    gpu_source: Literal["nvml", "nvidia-smi", "torch", "none"] = "none"
    replies: list[tuple[Literal["nvml", "nvidia-smi", "proc"], DriverReply]] = []
    if use_nvml:
        nvml = _ask_nvml(notes)
        if nvml is not None:
            replies.append(("nvml", nvml))
            if nvml.gpus:
                gpus, gpu_source = list(nvml.gpus), "nvml"
            elif nvml.error is None:
                notes.append("NVML found no GPU")
        if not gpus:
            smi = probe_nvidia_smi(notes, access)
            if smi is not None:
                replies.append(("nvidia-smi", smi))
                if smi.gpus:
                    gpus, gpu_source = list(smi.gpus), "nvidia-smi"
        if not any(reply.driver for _, reply in replies) and not any(reply.error for _, reply in replies):
            # Nothing could ask the driver itself: the kernel module at least says whether it is loaded.
            proc = read_proc_driver_version(access)
            if proc is not None:
                replies.append(("proc", proc))
    answered = next(((source, reply) for source, reply in replies if reply.driver), None)
    nvidia_driver = answered[1].driver if answered else None
    driver_source = answered[0] if answered else None
    driver_error = None if answered else next((reply.error for _, reply in replies if reply.error), None)
    if not gpus and use_torch:
        gpus = _torch_gpus(torch_info, notes, allow_cuda_init=allow_cuda_init)
        if gpus:
            gpu_source = "torch"

    if torch_info is not None and torch_info.error is None:
        installed_torch = torch_info.version
    else:
        # Without a usable torch import, the metadata still tells which torch xFormers must match.
        installed_torch = _dist_version("torch")
    xformers = probe_xformers(installed_torch, torch_cuda=torch_info.cuda if torch_info is not None else None)
    if xformers is not None and xformers.matches_torch is False:
        notes.append(f"xFormers does not match torch: {xformers.reason}")

    return SystemFacts(
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch_info,
        xformers=xformers,
        directml=_dist_version("torch-directml") is not None,
        gradio=_dist_version("gradio"),
        nvidia_driver=nvidia_driver,
        gpus=tuple(gpus),
        gpu_source=gpu_source,
        notes=tuple(notes),
        nvidia_driver_error=driver_error,
        nvidia_driver_source=driver_source,
    )


__all__ = [
    "DEFAULT_DRIVER_ACCESS",
    "DriverAccess",
    "DriverReply",
    "GpuInfo",
    "SystemFacts",
    "TorchInfo",
    "XformersInfo",
    "probe_nvidia_smi",
    "probe_nvml",
    "probe_system",
    "probe_torch",
    "probe_xformers",
    "read_proc_driver_version",
    "torch_build_matches",
]
