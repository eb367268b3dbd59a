"""What one generation cost: time, speed and memory.

:class:`GenerationMeter` wraps one generation (``start`` … ``stop``, or ``with``) and returns a
:class:`Telemetry`. Every source is optional — torch's allocator counters, NVML, the process's resident
memory — and whatever cannot be read becomes ``None`` with a note, because a measurement must never
break the generation it measures.

Sources and what they mean:

* torch allocator counters (CUDA, also XPU): ``weights_mb`` is ``memory_allocated()`` at start — on a
  host that keeps the model loaded between generations that is the resident weights — and
  ``peak_allocated_mb`` / ``peak_reserved_mb`` come from ``max_memory_allocated()`` /
  ``max_memory_reserved()``. Those peaks are process-wide counters since their last reset. Resetting them
  at start (``reset_peak_stats=True``) makes them this generation's, but clobbers the host's own use: A1111
  (and Forge, which keeps modules/memmon.py) resets them when a job starts and reads them when it ends for
  the "A: x GB, R: y GB" line, so after our reset that line would cover only the part after our start. A
  save/restore is impossible (torch can reset a peak but never set one), hence the flag and its default
  off. A1111's reset at job start is close to our start anyway; the Telemetry says which window it is.
* NVML (NVIDIA only): the device's used memory, sampled every ``sample_interval_s`` by a background thread.
  It is what nvidia-smi shows — the whole GPU, other processes and the CUDA context included — so it is
  the number to compare with the card's size, not with torch's.
* Process resident memory (every device: the CPU does the work on "cpu", and with the VAE on the CPU
  part of a GPU generation lives there too): sampled from ``/proc/self/statm`` (or psutil) by the same
  thread. ``getrusage().ru_maxrss`` cannot be the per-generation peak on its own — it is the lifetime
  maximum — but when it rose during the generation, its new value *is* this generation's exact peak,
  so it corrects the sampled one (which can miss a short spike between samples).
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from lib_optim.log import get_logger

log = get_logger(__name__)

_MB = 1024 * 1024
_GB = 1024 * 1024 * 1024
DEFAULT_SAMPLE_INTERVAL_S = 0.05
# How long stop() waits for the sampler; one NVML call takes microseconds, so this only bites on a hung driver.
_JOIN_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Telemetry:
    """One generation's measurements; ``None`` = not available here (``notes`` says why)."""

    device: str
    seconds: float
    steps: int
    it_per_s: float | None
    weights_mb: float | None
    peak_allocated_mb: float | None
    peak_reserved_mb: float | None
    working_mb: float | None
    peak_reset: bool  # True: the torch peaks cover exactly this generation; False: since the last reset by anyone
    nvml_start_used_mb: float | None
    nvml_peak_used_mb: float | None
    process_start_rss_mb: float | None
    process_peak_rss_mb: float | None
    samples: int  # background samples taken (the resolution of the sampled peaks)
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable (``notes`` becomes a list)."""
        data = dataclasses.asdict(self)
        data["notes"] = list(self.notes)
        return data


def format_status(t: Telemetry) -> str:
    """A short status line: ``1.9 it/s · peak 5.2 GB (weights 2.1 + working 3.1)``."""
    parts: list[str] = []
    if t.it_per_s is not None:
        parts.append(f"{_rate(t.it_per_s)} it/s")
    else:
        parts.append(f"{t.seconds:.1f} s")
    if t.peak_allocated_mb is not None:
        memory = f"peak {_gb(t.peak_allocated_mb)} GB"
        if t.weights_mb is not None and t.working_mb is not None:
            memory += f" (weights {_gb(t.weights_mb)} + working {_gb(t.working_mb)})"
        parts.append(memory)
    elif t.nvml_peak_used_mb is not None:
        parts.append(f"peak {_gb(t.nvml_peak_used_mb)} GB (whole GPU, NVML)")
    elif t.process_peak_rss_mb is not None:
        parts.append(f"peak RSS {_gb(t.process_peak_rss_mb)} GB")
    return " · ".join(parts)


def _rate(value: float) -> str:
    # Slow CPU runs go down to a few hundredths of an it/s; one decimal would show them as 0.0.
    return f"{value:.2f}" if value < 0.1 else f"{value:.1f}"


def _gb(megabytes: float) -> str:
    return f"{megabytes * _MB / _GB:.1f}"


def _mb(value: float) -> float:
    return round(value / _MB, 1)


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text or type(exc).__name__


# ------------------------------------------------------------------------------------- process memory


def _statm_rss() -> int:
    with open("/proc/self/statm", "rb") as handle:
        resident_pages = int(handle.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def _rss_reader(notes: list[str]) -> Callable[[], int] | None:
    """A function returning the resident set size in bytes, or None (with a note)."""
    try:
        _statm_rss()
        return _statm_rss
    except (OSError, ValueError, IndexError, AttributeError) as exc:  # no /proc (Windows, macOS)
        log.debug("/proc/self/statm unusable: %s", exc)
    try:
        import psutil  # the WebUIs install it; optional here

        process = psutil.Process()

        def psutil_rss() -> int:
            return int(process.memory_info().rss)

        psutil_rss()
        return psutil_rss
    except Exception as exc:  # ImportError, or psutil refusing this process
        log.debug("psutil RSS unusable: %s", exc, exc_info=True)
        notes.append(f"process memory unavailable: no /proc/self/statm and no psutil ({_describe(exc)})")
        return None


def _max_rss_bytes() -> int | None:
    """The process's lifetime peak RSS (ru_maxrss), or None where ``resource`` does not exist (Windows)."""
    try:
        import resource

        value = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    except (ImportError, OSError, AttributeError) as exc:
        log.debug("getrusage unusable: %s", exc)
        return None
    # Linux reports kilobytes, macOS bytes.
    return value if sys.platform == "darwin" else value * 1024


# ----------------------------------------------------------------------------------------------- NVML


def _import_pynvml() -> Any:
    import warnings

    # The deprecated ``pynvml`` wrapper package warns on import; not our user's concern.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import pynvml
    return pynvml


def _nvml_handle(pynvml: Any, torch: Any, index: int) -> tuple[Any, str | None]:
    """NVML's handle for torch's CUDA device ``index``, and a note when the match is a guess.

    torch's numbering follows CUDA_VISIBLE_DEVICES and CUDA_DEVICE_ORDER (fastest first by default),
    NVML's is PCI order over all GPUs, so the indices differ on multi-GPU machines. The device UUID
    matches them exactly.
    """
    try:
        if torch is not None and torch.cuda.is_initialized():
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            if uuid:
                return pynvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"), None
    except Exception as exc:  # old torch without .uuid, or NVML not knowing the UUID (MIG, ZLUDA)
        log.debug("NVML lookup by UUID failed: %s", exc, exc_info=True)
    visible = [part.strip() for part in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if part.strip()]
    if index < len(visible):
        entry = visible[index]
        if entry.isdigit():
            return pynvml.nvmlDeviceGetHandleByIndex(int(entry)), None
        if entry.startswith("GPU-"):
            return pynvml.nvmlDeviceGetHandleByUUID(entry), None
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    return handle, f"NVML device {index} assumed to be torch's cuda:{index}"


# --------------------------------------------------------------------------------------------- meter


class GenerationMeter:
    """Measures one generation. Reusable: every ``start`` begins a new measurement.

    ``reset_peak_stats``: reset torch's peak counters at start so the peaks are this generation's —
    this clobbers the host's own peak report (see the module docstring), so only on request.
    ``use_nvml``: sample the GPU's used memory through NVML (NVIDIA CUDA devices only).
    """

    def __init__(
        self,
        device: str | None = None,
        *,
        reset_peak_stats: bool = False,
        use_nvml: bool = True,
        sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self._default_device = device
        self._reset_peak_stats = reset_peak_stats
        self._use_nvml = use_nvml
        self._interval = max(0.001, float(sample_interval_s))
        self._clock = clock
        self._lock = threading.Lock()
        self._running = False
        self.result: Telemetry | None = None
        self._init_state("cpu")

    def _init_state(self, device: str) -> None:
        self._device = device
        self._notes: list[str] = []
        self._started = 0.0
        self._steps = 0
        self._first_step: float | None = None
        self._last_step: float | None = None
        self._accelerator: Any = None  # torch.cuda / torch.xpu when its counters are usable
        self._accelerator_index: int | None = None
        self._weights_bytes: int | None = None
        self._peak_reset = False
        self._pynvml: Any = None
        self._nvml_handle: Any = None
        self._nvml_start: int | None = None
        self._nvml_peak: int | None = None
        self._rss: Callable[[], int] | None = None
        self._rss_start: int | None = None
        self._rss_peak: int | None = None
        self._maxrss_start: int | None = None
        self._samples = 0
        self._stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    # --- context manager ----------------------------------------------------------------------------

    def __enter__(self) -> GenerationMeter:
        if not self._running:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- public -------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._running

    def start(self, device: str | None = None) -> GenerationMeter:
        """Begin measuring on ``device`` ("cuda:0", "cuda", "cpu", "mps", …; default: the constructor's, else cpu)."""
        if self._running:
            log.debug("meter started twice; the earlier measurement is discarded")
            self._stop_sampler()
            self._stop_nvml()
        name = str(device or self._default_device or "cpu")
        self._init_state(name)
        self.result = None
        self._running = True
        torch = self._import_torch()
        self._start_torch_counters(torch)
        self._start_rss()
        if self._use_nvml:
            self._start_nvml(torch)
        self._start_sampler()
        self._started = self._clock()
        return self

    def step(self) -> None:
        """Count one sampling step (thread-safe; hosts call step callbacks from the generation thread)."""
        now = self._clock()
        with self._lock:
            if not self._running:
                return
            self._steps += 1
            if self._first_step is None:
                self._first_step = now
            self._last_step = now

    def stop(self) -> Telemetry:
        """End the measurement and return it; a second call returns the same result."""
        if not self._running:
            if self.result is not None:
                return self.result
            self._init_state(str(self._default_device or "cpu"))
            self._notes.append("meter was never started")
            self.result = self._build(0.0)
            return self.result
        ended = self._clock()
        with self._lock:
            self._running = False
        try:
            self._stop_sampler()
            self._sample_once()  # the state at the very end counts too
        finally:
            self._stop_nvml()
        self.result = self._build(ended - self._started)
        return self.result

    def snapshot(self) -> Telemetry:
        """The measurement so far, without stopping (infotext is written per image, mid-generation)."""
        if not self._running:
            return self.stop()
        self._sample_once()
        return self._build(self._clock() - self._started)

    # --- torch counters -----------------------------------------------------------------------------

    def _import_torch(self) -> Any:
        try:
            import torch
        except Exception as exc:  # a missing or broken torch leaves only the process numbers
            self._notes.append(f"torch unavailable: {_describe(exc)}")
            log.debug("import torch failed", exc_info=True)
            return None
        return torch

    def _start_torch_counters(self, torch: Any) -> None:
        kind, _, index_text = self._device.partition(":")
        if torch is None or kind not in ("cuda", "xpu"):
            if kind == "mps":
                self._notes.append("MPS has no peak-memory counters; process RSS only")
            return
        module = getattr(torch, kind, None)
        try:
            if module is None or not module.is_available():
                self._notes.append(f"torch.{kind} not available: no allocator counters")
                return
            initialized = getattr(module, "is_initialized", None)
            if initialized is not None and not initialized():
                # Nothing allocated yet, and asking the counters would initialise the device here.
                self._notes.append(f"{kind} not initialised at start: weights taken as 0")
                self._accelerator = module
                self._accelerator_index = int(index_text) if index_text.isdigit() else None
                self._weights_bytes = 0
                return
            index = int(index_text) if index_text.isdigit() else int(module.current_device())
            self._device = f"{kind}:{index}"
            self._accelerator = module
            self._accelerator_index = index
            self._weights_bytes = int(module.memory_allocated(index))
            if self._reset_peak_stats:
                module.reset_peak_memory_stats(index)
                self._peak_reset = True
        except Exception as exc:  # a broken or half-initialised device runtime raises anything
            self._notes.append(f"torch.{kind} memory counters unavailable: {_describe(exc)}")
            log.debug("torch.%s counters failed", kind, exc_info=True)
            self._accelerator = None

    def _read_torch_peaks(self) -> tuple[int | None, int | None]:
        module = self._accelerator
        if module is None:
            return None, None
        try:
            initialized = getattr(module, "is_initialized", None)
            if initialized is not None and not initialized():
                self._notes.append("device never initialised: no peaks")
                return None, None
            index = self._accelerator_index
            if index is None:
                index = int(module.current_device())
                self._device = f"{self._device.partition(':')[0]}:{index}"
            return int(module.max_memory_allocated(index)), int(module.max_memory_reserved(index))
        except Exception as exc:  # see _start_torch_counters
            self._notes.append(f"peak memory unreadable: {_describe(exc)}")
            log.debug("reading torch peaks failed", exc_info=True)
            return None, None

    # --- NVML ---------------------------------------------------------------------------------------

    def _start_nvml(self, torch: Any) -> None:
        kind, _, index_text = self._device.partition(":")
        if kind != "cuda":
            return
        if torch is not None and getattr(getattr(torch, "version", None), "hip", None):
            self._notes.append("NVML skipped: ROCm device")
            return
        try:
            pynvml = _import_pynvml()
        # ImportError when absent; a broken install can raise anything from its module body.
        except Exception as exc:
            self._notes.append(f"NVML unavailable: pynvml not importable ({_describe(exc)})")
            log.debug("import pynvml failed: %s", exc, exc_info=True)
            return
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # no driver, old driver, ZLUDA: all mean "no NVML"
            self._notes.append(f"NVML unavailable: {_describe(exc)}")
            log.debug("nvmlInit failed", exc_info=True)
            return
        # From here NVML is initialised and must be shut down (nvmlInit is reference-counted).
        self._pynvml = pynvml
        try:
            index = int(index_text) if index_text.isdigit() else 0
            handle, note = _nvml_handle(pynvml, torch, index)
            if note:
                self._notes.append(note)
            used = int(pynvml.nvmlDeviceGetMemoryInfo(handle).used)
        except Exception as exc:  # the device is not NVML's (MIG slice, ZLUDA) or not readable
            self._notes.append(f"NVML memory unreadable: {_describe(exc)}")
            log.debug("NVML device query failed", exc_info=True)
            self._stop_nvml()
            return
        self._nvml_handle = handle
        self._nvml_start = self._nvml_peak = used

    def _stop_nvml(self) -> None:
        pynvml, self._pynvml, self._nvml_handle = self._pynvml, None, None
        if pynvml is None:
            return
        try:
            pynvml.nvmlShutdown()
        except Exception as exc:  # a failed shutdown changes none of the numbers
            log.debug("nvmlShutdown failed: %s", exc, exc_info=True)

    # --- process memory -----------------------------------------------------------------------------

    def _start_rss(self) -> None:
        self._rss = _rss_reader(self._notes)
        self._maxrss_start = _max_rss_bytes()
        if self._rss is not None:
            try:
                self._rss_start = self._rss_peak = self._rss()
            except Exception as exc:  # vanished /proc, psutil AccessDenied
                self._notes.append(f"process memory unreadable: {_describe(exc)}")
                log.debug("RSS read failed", exc_info=True)
                self._rss = None

    # --- sampler ------------------------------------------------------------------------------------

    def _start_sampler(self) -> None:
        if self._nvml_handle is None and self._rss is None:
            return
        # The thread gets its own event: a later start() replaces self._stop_event.
        thread = threading.Thread(target=self._sample_loop, args=(self._stop_event,), name="optim-meter", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # "can't start new thread": keep the start/end values only
            self._notes.append(f"memory sampling thread not started: {_describe(exc)}")
            log.debug("sampler thread failed to start", exc_info=True)
            return
        self._thread = thread

    def _stop_sampler(self) -> None:
        self._stop_event.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return
        thread.join(_JOIN_TIMEOUT_S)
        if thread.is_alive():
            # A hung NVML call: shutting NVML down under it could crash, so leave NVML initialised.
            self._notes.append("memory sampler did not stop in time; NVML left initialised")
            log.debug("sampler thread still alive after %.1f s", _JOIN_TIMEOUT_S)
            self._pynvml = None

    def _sample_loop(self, stop: threading.Event) -> None:
        while not stop.wait(self._interval):
            self._sample_once()

    def _sample_once(self) -> None:
        if self._nvml_handle is not None and self._pynvml is not None:
            try:
                used = int(self._pynvml.nvmlDeviceGetMemoryInfo(self._nvml_handle).used)
                with self._lock:
                    self._nvml_peak = used if self._nvml_peak is None else max(self._nvml_peak, used)
            except Exception as exc:  # the error would repeat every sample: note it once and stop asking
                self._notes.append(f"NVML sampling stopped: {_describe(exc)}")
                log.debug("NVML sample failed", exc_info=True)
                self._nvml_handle = None
        if self._rss is not None:
            try:
                rss = self._rss()
                with self._lock:
                    self._rss_peak = rss if self._rss_peak is None else max(self._rss_peak, rss)
            except Exception as exc:  # see above
                self._notes.append(f"process memory sampling stopped: {_describe(exc)}")
                log.debug("RSS sample failed", exc_info=True)
                self._rss = None
        with self._lock:
            self._samples += 1

    # --- result -------------------------------------------------------------------------------------

    def _build(self, seconds: float) -> Telemetry:
        notes = list(self._notes)  # a copy: snapshot() may build several times
        it_per_s: float | None = None
        if self._steps >= 2 and self._first_step is not None and self._last_step is not None:
            # First to last step callback: the sampling loop only, without model loading, text encoding and
            # the VAE (which would make a 20-step SDXL image look slow). Spans the hires pass's gap too.
            span = self._last_step - self._first_step
            it_per_s = round((self._steps - 1) / span, 3) if span > 0 else None
        elif self._steps == 1:
            notes.append("one step only: no rate")

        peak_allocated, peak_reserved = self._read_torch_peaks()
        weights = self._weights_bytes if self._accelerator is not None else None
        working = peak_allocated - weights if peak_allocated is not None and weights is not None else None
        if peak_allocated is not None and not self._peak_reset:
            notes.append("peaks since the host's last reset (A1111/Forge: job start), not reset by Optim")

        rss_peak = self._rss_peak
        maxrss_end = _max_rss_bytes()
        if maxrss_end is not None and self._maxrss_start is not None and maxrss_end > self._maxrss_start:
            # The lifetime maximum rose during this generation, so its new value is this generation's peak.
            rss_peak = maxrss_end if rss_peak is None else max(rss_peak, maxrss_end)

        return Telemetry(
            device=self._device,
            seconds=round(max(seconds, 0.0), 3),
            steps=self._steps,
            it_per_s=it_per_s,
            weights_mb=_mb(weights) if weights is not None else None,
            peak_allocated_mb=_mb(peak_allocated) if peak_allocated is not None else None,
            peak_reserved_mb=_mb(peak_reserved) if peak_reserved is not None else None,
            working_mb=_mb(max(working, 0)) if working is not None else None,
            peak_reset=self._peak_reset,
            nvml_start_used_mb=_mb(self._nvml_start) if self._nvml_start is not None else None,
            nvml_peak_used_mb=_mb(self._nvml_peak) if self._nvml_peak is not None else None,
            process_start_rss_mb=_mb(self._rss_start) if self._rss_start is not None else None,
            process_peak_rss_mb=_mb(rss_peak) if rss_peak is not None and self._rss_start is not None else None,
            samples=self._samples,
            notes=tuple(notes),
        )


# --- out of memory (the retry and regional compile both ask) ------------------------------------------------

# Lower-cased message fragments of allocation failures. torch.OutOfMemoryError covers CUDA/HIP/XPU when
# torch raises its own type; the messages catch the rest and errors re-raised as plain RuntimeError.
_OOM_MESSAGES = (
    "out of memory",  # "CUDA out of memory", "HIP out of memory", "MPS backend out of memory", "XPU out of memory"
    "not enough gpu video memory",  # DirectML: "There is not enough GPU video memory available!"
    "could not allocate tensor with",  # DirectML: "Could not allocate tensor with 1073741824 bytes. ..."
    # torch's CPU allocator: "DefaultCPUAllocator: can't allocate memory" (older: "not enough memory")
    "defaultcpuallocator:",
    "cublas_status_alloc_failed",  # cuBLAS cannot allocate its workspace: an OOM under another name
)
# Hosts wrap exceptions a few levels deep; the bound only guards against pathological chains.
_MAX_CHAIN = 32


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` — or an exception it was raised from or during — is an out-of-memory error.

    torch's CPU allocator failing counts (a CPU generation's attention is what a frugal backend shrinks);
    Python's own ``MemoryError`` does not: it comes from PIL/numpy and the like, which no setting here
    changes.
    """
    oom_type = _torch_oom_type()
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and len(seen) < _MAX_CHAIN:
        seen.add(id(current))
        if oom_type is not None and isinstance(current, oom_type):
            return True
        if isinstance(current, RuntimeError):
            message = str(current).lower()
            if any(fragment in message for fragment in _OOM_MESSAGES):
                return True
        current = current.__cause__ or current.__context__
    return False


def _torch_oom_type() -> type[BaseException] | None:
    try:
        import torch
    except Exception as exc:  # without a usable torch only the messages can tell
        log.debug("import torch failed: %s", exc, exc_info=True)
        return None
    # torch.OutOfMemoryError since 2.5; torch.cuda.OutOfMemoryError (the same class now) before that.
    found = getattr(torch, "OutOfMemoryError", None) or getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)
    return found if isinstance(found, type) and issubclass(found, BaseException) else None


__all__ = ["DEFAULT_SAMPLE_INTERVAL_S", "GenerationMeter", "Telemetry", "format_status", "is_out_of_memory"]
