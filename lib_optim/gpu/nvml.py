"""The NVIDIA driver through NVML (pynvml): driver version and GPUs, without initialising CUDA."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lib_optim.gpu.facts import _MB, DriverReply, GpuInfo, _describe
from lib_optim.log import get_logger

log = get_logger(__name__)


def _text(value: Any) -> str:
    """pynvml returns ``bytes`` in old releases and ``str`` in newer ones."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return str(value)


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
        uuid=_optional(lambda: _text(pynvml.nvmlDeviceGetUUID(handle)), "nvmlDeviceGetUUID", index),
        pci_bus_id=_optional(lambda: _text(pynvml.nvmlDeviceGetPciInfo(handle).busId), "nvmlDeviceGetPciInfo", index),
    )


def _optional(read: Callable[[], str], what: str, index: int) -> str | None:
    """An identifier that only places the card in CUDA's numbering (lib_optim.gpu.visible): None when unreadable."""
    try:
        return read() or None
    except Exception:  # an old driver or pynvml without it: the card is still there
        log.debug("%s(%d) failed", what, index, exc_info=True)
        return None
