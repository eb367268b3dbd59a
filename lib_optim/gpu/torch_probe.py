"""torch's view of the machine: its version and CUDA/HIP build, and the GPUs it sees (CUDA, XPU, MPS).

torch is imported inside the functions; reading device details initialises CUDA, which the caller may forbid.
"""

from __future__ import annotations

from typing import Any

from lib_optim.gpu.facts import _MB, GpuInfo, TorchInfo, Vendor, _describe, _dist_version, _vendor_from_name
from lib_optim.log import get_logger

log = get_logger(__name__)


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
