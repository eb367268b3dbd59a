"""What the probes found: the facts dataclasses, their text for ``doctor``, and helpers every probe shares."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

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
    """One GPU. ``index``: its number in the source's list (NVML and nvidia-smi: PCI bus order over every GPU, as
    nvidia-smi shows them; torch: ``cuda:index`` in the probing process). ``uuid`` (``GPU-…``) and ``pci_bus_id``
    (``00000000:01:00.0``) when the driver told them: they place the card in CUDA's numbering
    (:mod:`lib_optim.gpu.visible`)."""

    index: int
    name: str
    vendor: Vendor
    total_mb: int | None
    free_mb: int | None
    compute_capability: tuple[int, int] | None
    source: GpuSource
    uuid: str | None = None
    pci_bus_id: str | None = None


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
    # nvidia-smi hung: a driver is installed and stuck, so an NVIDIA GPU is there even where nothing else says so.
    nvidia_driver_hung: bool = False

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
        return "not installed in this Python"
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


@dataclass(frozen=True)
class DriverReply:
    """What one way of asking the NVIDIA driver got: an answer (``driver``, ``gpus``) or an ``error``."""

    driver: str | None = None
    gpus: tuple[GpuInfo, ...] = ()
    error: str | None = None
    hung: bool = False  # the driver did not answer in time (nvidia-smi timed out)
