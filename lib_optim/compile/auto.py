"""``compile=auto``: compile the UNet's blocks only when the job pays for the compile.

:func:`decide` (pure) weighs, for one job:

- what compiling costs *now*: nothing when these blocks are already compiled in this process for this key; the
  *warm* figure when an earlier process on this machine compiled this key and the on-disk compile cache keeps its
  kernels; the *cold* figure otherwise;
- what it saves: the steady saving per image-step (eager minus compiled seconds per step of one image) × the
  job's image-steps (steps × batch count × batch size, × the jobs left in an X/Y/Z grid);
- whether compile's extra memory fits beside the generation in free memory.

It compiles iff the memory fits and the saving over the job exceeds the cost (with no cost: iff it saves at all).

Every figure is measured on this machine and remembered (:class:`AutoMemory`, a JSON file) per
:class:`AutoKey` — torch version, device name, model, size bucket, dtype, attention backend and mode — by
:class:`AutoRun` after each generation: the compile seconds from the compiler's :class:`CompileStats`, the seconds
per step from the sampler's step callbacks (the median interval, so the compiling step and the gaps between
batches do not count). Until a figure is measured, the estimates below stand in, and the decision says which.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import statistics
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from lib_optim.compile.blocks import torch_version
from lib_optim.compile.persist import current_root, kept_cache
from lib_optim.log import get_logger

log = get_logger(__name__)

# --- estimates, until measured on this machine ----------------------------------------------------------------

# Seconds of a cold compile of an SD UNet's blocks. CPU: this project's 2-core test machine took 71 s (A1111) and
# 175 s (Forge f2) on torch 2.13 (docs/figures.md), and 117–192 s for A1111's torch 2.1.2 (134 graphs): 120 s.
# CUDA: no figure measured here yet; compiling is mostly Python-side tracing plus triton builds, which a desktop
# CPU does faster than the test machine: 40 s.
COLD_COMPILE_S: Mapping[str, float] = {"cpu": 120.0, "cuda": 40.0}
# A compile whose kernels the on-disk cache holds: dynamo still traces every graph, inductor skips code generation
# and the C++/triton build. An estimate (a quarter of the cold figure) until a warm compile is measured.
WARM_COMPILE_FRACTION = 0.25
# max-autotune benchmarks kernel choices while compiling: an estimate of how much longer its compile takes.
MAX_AUTOTUNE_COMPILE_FACTOR = 3.0
# Steady eager/compiled speed ratio. CPU before torch 2.5, in the hosts with their own torch, SD1.5 512², 4 steps,
# their default CPU attention: ×1.38 (A1111 v1.10.1, 2.1.2) and ×1.10 (Forge f2, 2.3.1) once every block is one
# graph (docs/figures.md; 0.96–1.06× before, with graph breaks): the lower one. CPU from torch 2.5: ×1.10 (A1111)
# and ×1.24 (Forge f2) on torch 2.13: the lower one. CUDA: 1.2–1.4× reported for consumer GPUs (the optimization
# notes this lever comes from; not measured here yet): the lower one.
SPEEDUP_CPU_BEFORE_2_5 = 1.10
SPEEDUP_CPU = 1.10
SPEEDUP_CUDA = 1.2
# Eager seconds per step of one SD1.5 512² image, for a key with no step measured yet. CPU: the test machine took
# 38.5–42.3 s (2 cores, fp32, docs/figures.md); a desktop CPU is ~10× faster, and the lower figure is the cautious
# side (it understates what compile saves): 4 s. CUDA: 0.05 s (20 it/s, a fast card at fp16).
EAGER_STEP_S: Mapping[str, float] = {"cpu": 4.0, "cuda": 0.05}
# Per pixel, an SDXL step costs more than an SD1.5 one (2.6 vs 0.86 billion UNet parameters, fewer at full size).
FAMILY_STEP_FACTOR: Mapping[str, float] = {"sd15": 1.0, "sdxl": 1.3}
# What compile adds to a generation's peak memory (inductor's buffers and workspace, the compile's own process
# memory): seeds by mode and family, +0.5–4 GB, until measured.
COMPILE_EXTRA_MB: Mapping[str, Mapping[str, int]] = {
    "on": {"sd15": 512, "sdxl": 1024},
    "max-autotune": {"sd15": 2048, "sdxl": 4096},
}
# A remembered figure is the mean of its last few measurements (older ones weigh less as the machine changes).
MEAN_WINDOW = 5
# Step intervals needed before a generation's seconds per step are remembered.
MIN_INTERVALS = 3
BASE_AREA = 512 * 512
MEMORY_VERSION = 1


def default_auto_memory_path() -> Path:
    """Where the measured figures are remembered: beside the compile cache they describe
    (:func:`lib_optim.compile.persist.current_root`; ``compile-cache clear`` keeps it)."""
    return current_root() / "compile-auto.json"


def estimated_speedup(device_type: str, torch: str) -> float:
    """Eager/compiled speed ratio for ``device_type`` on this torch, when none is measured (see the constants)."""
    if device_type == "cpu":
        return SPEEDUP_CPU if torch_version(torch) >= (2, 5) else SPEEDUP_CPU_BEFORE_2_5
    return SPEEDUP_CUDA


def size_bucket(width: int, height: int) -> str:
    """Images of about the same area share figures: ``512px`` = the side of a square of that area, to 64 px."""
    side = 64 * max(1, round(math.sqrt(max(1, width * height)) / 64))
    return f"{side}px"


# --- the key, the job and a remembered record -------------------------------------------------------------------


@dataclass(frozen=True)
class AutoKey:
    """What the figures depend on."""

    torch: str
    device: str  # "NVIDIA GeForce RTX 4090", "cpu x86_64 (8 threads)"
    model: str  # family and model hash: "sdxl:31e35c80fc"
    size: str  # :func:`size_bucket`
    dtype: str
    attention: str
    mode: str  # the compile mode: "on" for auto

    def text(self) -> str:
        return "|".join(str(getattr(self, f.name)) for f in fields(self))


@dataclass(frozen=True)
class AutoJob:
    """One generation's job as ``auto`` sees it."""

    key: AutoKey
    device_type: str  # "cpu" or "cuda" (any accelerator is planned as cuda)
    family: str
    batch_size: int
    steps: float  # UNet steps per image at the key's size (a hires job's first pass counts by its smaller area)
    images: int  # batch count × batch size × the jobs left in a grid
    free_mb: float | None = None  # free memory on the device now; None = unknown (no memory check)
    working_mb: float = 0.0  # the generation's own largest allocation beyond the weights (attention)
    timed: bool = True  # one pass at one size: its step intervals are this key's seconds per step

    @property
    def image_steps(self) -> float:
        return self.steps * self.images


@dataclass
class AutoRecord:
    """The figures measured for one key (None = not yet), seconds; ``*_n`` counts the measurements."""

    cold_compile_s: float | None = None
    cold_compile_n: int = 0
    warm_compile_s: float | None = None
    warm_compile_n: int = 0
    eager_step_s: float | None = None  # per step of one image
    eager_step_n: int = 0
    compiled_step_s: float | None = None
    compiled_step_n: int = 0

    def with_measurement(self, name: str, value: float) -> AutoRecord:
        """This record with ``value`` folded into the figure ``name`` (a mean over the last :data:`MEAN_WINDOW`)."""
        counter = name.removesuffix("_s") + "_n"
        if not name.endswith("_s") or counter not in self.__dataclass_fields__:
            figures = ", ".join(f.name for f in fields(self) if f.name.endswith("_s"))
            raise ValueError(f"[Optim] compile auto: figure {name!r} is unknown; allowed: {figures}")
        old, count = getattr(self, name), getattr(self, counter)
        weight = min(count, MEAN_WINDOW - 1)
        mean = value if old is None else (old * weight + value) / (weight + 1)
        return replace(self, **{name: mean, counter: count + 1})

    @classmethod
    def from_dict(cls, data: object) -> AutoRecord:
        """A record from the file; anything malformed is left unmeasured."""
        values: dict[str, Any] = {}
        if isinstance(data, Mapping):
            for f in fields(cls):
                value = data.get(f.name)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    continue
                if f.name.endswith("_n"):
                    if isinstance(value, int) and value >= 0:
                        values[f.name] = value
                elif value >= 0:
                    values[f.name] = float(value)
        return cls(**values)


# --- a job from a generation's request ---------------------------------------------------------------------------


def make_job(
    request: Mapping[str, Any],
    *,
    device: Any,
    steps: int,
    images: int,
    model: str,
    attention: str,
    mode: str = "on",
    dtype: str = "",
    first_pass: tuple[int, int, int] | None = None,
) -> AutoJob:
    """The job of one generation. ``request``: the attention planner's request for it
    (:func:`lib_optim.hosts.base.auto_attention_request`: the largest pass's ``width``/``height``, ``batch``,
    ``family``, ``device`` type, ``dtype_bytes``, ``free_mb``, ``budget_mb``); ``device``: the torch device it runs
    on; ``steps``: UNet steps per image at that size; ``images``: every image of the job; ``model``: the model's
    hash; ``attention``: the backend that runs; ``first_pass``: (width, height, steps) of a hires job's first pass,
    whose steps count by their smaller area."""
    import torch

    width, height = int(request["width"]), int(request["height"])
    batch = max(1, int(request.get("batch", 1)))
    family = str(request.get("family", "sd15"))
    device_type = "cpu" if str(request.get("device", "cpu")) == "cpu" else "cuda"
    limits = [float(x) for x in (request.get("free_mb"), request.get("budget_mb")) if x is not None]
    equivalent = float(steps)
    if first_pass is not None:
        first_w, first_h, first_steps = first_pass
        equivalent += first_steps * (first_w * first_h) / max(1, width * height)
    key = AutoKey(
        torch=str(torch.__version__),
        device=device_name(device),
        model=f"{family}:{model or 'unknown'}",
        size=size_bucket(width, height),
        dtype=dtype or f"{int(request.get('dtype_bytes', 4)) * 8}-bit",
        attention=attention or "host",
        mode=mode,
    )
    return AutoJob(
        key=key,
        device_type=device_type,
        family=family,
        batch_size=batch,
        steps=equivalent,
        images=max(1, int(images)),
        free_mb=min(limits) if limits else None,
        # split and sub-quad size their chunks from the memory left to them: what compile leaves
        working_mb=_working_mb(request, attention, min(limits) - compile_extra_mb(mode, family) if limits else None),
        timed=first_pass is None,
    )


def device_name(device: Any) -> str:
    """``NVIDIA GeForce RTX 4090`` / ``cpu x86_64 (8 threads)``: the figures are this device's."""
    import platform

    import torch

    dev = torch.device(device if device is not None else "cpu")
    if dev.type == "cpu":
        return f"cpu {platform.machine()} ({torch.get_num_threads()} threads)"
    try:
        module = getattr(torch, dev.type)
        return str(module.get_device_name(dev))
    except (AttributeError, AssertionError, RuntimeError) as exc:  # a build without this device's support
        log.debug("device name of %s unknown: %s", dev, exc)
        return dev.type


def _working_mb(request: Mapping[str, Any], attention: str, limit_mb: float | None) -> float:
    """The largest attention call's predicted peak for this request (the attention planner's memory model)."""
    from lib_optim.attention import Attention, attention_shapes, parse_name, predict_peak_bytes

    backend = parse_name(attention) if attention else None
    if backend in (None, Attention.HOST, Attention.AUTO):
        backend = Attention.SDP
    device = "cpu" if str(request.get("device", "cpu")) == "cpu" else "cuda"
    free = int(max(0.0, limit_mb) * (1 << 20)) if limit_mb is not None else None
    try:
        shapes = attention_shapes(
            str(request.get("family", "sd15")), int(request["width"]), int(request["height"]), int(request["batch"])
        )
        kwargs: dict[str, Any] = {
            "dtype_bytes": int(request.get("dtype_bytes", 4)),
            "device": device,
            "free_bytes": free,
        }
        try:
            peak = max(predict_peak_bytes(backend, s, **kwargs) for s in shapes)
        except ValueError:  # a backend without a memory model: SDP's
            peak = max(predict_peak_bytes(Attention.SDP, s, **kwargs) for s in shapes)
    except (KeyError, ValueError) as exc:
        log.debug("compile auto: working memory unknown (%s); counted as none", exc)
        return 0.0
    return peak / (1 << 20)


# --- the decision ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AutoDecision:
    """What ``auto`` decided for a generation, with its figures (``text`` for infotext and the status line)."""

    compile: bool
    cost_s: float = 0.0
    cost: str = "cold"  # "compiled" (already, in this process), "warm", "cold"
    cost_measured: bool = False
    saving_step_s: float = 0.0  # per image-step
    saving_measured: bool = False
    image_steps: float = 0.0
    images: int = 1
    memory_fits: bool = True
    memory_note: str = ""
    unavailable: str = ""  # why compile cannot run for this generation ("compile not available here: …")

    @property
    def saving_s(self) -> float:
        return self.saving_step_s * self.image_steps

    def text(self) -> str:
        """``auto→eager (compile ≈ 120 s cold, estimated; saves ≈ 0.36 s/step × 20 steps = 7 s, estimated)``."""
        outcome = "auto→compile" if self.compile else "auto→eager"
        if self.unavailable:
            return f"{outcome} ({self.unavailable})"
        if not self.memory_fits:
            return f"{outcome} ({self.memory_note})"
        if self.cost == "compiled":
            cost = "already compiled"
        else:
            how = "measured" if self.cost_measured else "estimated"
            cost = f"compile ≈ {self.cost_s:.0f} s {self.cost}, {how}"
        steps = f"{self.image_steps:.0f} steps" + (f" ({self.images} images)" if self.images > 1 else "")
        how = "measured" if self.saving_measured else "estimated"
        saving = f"saves ≈ {_seconds(self.saving_step_s)} s/step × {steps} = {self.saving_s:.0f} s, {how}"
        return f"{outcome} ({cost}; {saving})"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["saving_s"] = round(self.saving_s, 3)
        data["text"] = self.text()
        return data


def _seconds(value: float) -> str:
    return f"{value:.2f}" if abs(value) < 10 else f"{value:.0f}"


def compile_cost(
    job: AutoJob, record: AutoRecord, *, compiled_here: bool, disk_cached: bool
) -> tuple[float, str, bool]:
    """(seconds, "compiled"/"warm"/"cold", measured) of compiling for ``job`` now."""
    if compiled_here:
        return 0.0, "compiled", True
    cold = record.cold_compile_s
    cold_measured = cold is not None
    if cold is None:
        cold = COLD_COMPILE_S.get(job.device_type, COLD_COMPILE_S["cuda"])
        if job.key.mode == "max-autotune":
            cold *= MAX_AUTOTUNE_COMPILE_FACTOR
    if disk_cached:
        if record.warm_compile_s is not None:
            return record.warm_compile_s, "warm", True
        return cold * WARM_COMPILE_FRACTION, "warm", False
    return cold, "cold", cold_measured


def step_saving(job: AutoJob, record: AutoRecord) -> tuple[float, bool]:
    """(seconds saved per image-step, measured): eager − compiled when both are measured, else one measured figure
    and the estimated speed-up, else the estimated eager step (scaled by area and family) and speed-up."""
    eager, compiled = record.eager_step_s, record.compiled_step_s
    if eager is not None and compiled is not None:
        return eager - compiled, True
    speedup = estimated_speedup(job.device_type, job.key.torch)
    if eager is not None:
        return eager * (1 - 1 / speedup), False
    if compiled is not None:
        return compiled * (speedup - 1), False
    side = int(job.key.size.removesuffix("px") or 512)
    per_step = EAGER_STEP_S.get(job.device_type, EAGER_STEP_S["cuda"]) * side * side / BASE_AREA
    per_step *= FAMILY_STEP_FACTOR.get(job.family, max(FAMILY_STEP_FACTOR.values()))
    return per_step * (1 - 1 / speedup), False


def compile_extra_mb(mode: str, family: str) -> int:
    """The seed for compile's extra memory in ``mode`` for ``family`` (the mode's largest for another family)."""
    table = COMPILE_EXTRA_MB.get(mode, COMPILE_EXTRA_MB["max-autotune"])
    return table.get(family, max(table.values()))


def memory_check(job: AutoJob) -> tuple[bool, str]:
    """(fits, why): compile's extra memory beside the generation's own working memory, in the free memory."""
    extra = compile_extra_mb(job.key.mode, job.family)
    if job.free_mb is None:
        return True, "free memory unknown"
    need = extra + job.working_mb
    fits = need <= job.free_mb
    verb = "fit" if fits else "do not fit"
    return fits, (
        f"compile's extra ≈ {extra / 1024:.1f} GB + the generation's ≈ {job.working_mb / 1024:.1f} GB "
        f"{verb} in {job.free_mb / 1024:.1f} GB free"
    )


def decide(job: AutoJob, record: AutoRecord, *, compiled_here: bool = False, disk_cached: bool = False) -> AutoDecision:
    """Compile iff compile's extra memory fits and the job's saving exceeds what compiling costs now."""
    cost, kind, cost_measured = compile_cost(job, record, compiled_here=compiled_here, disk_cached=disk_cached)
    saving, saving_measured = step_saving(job, record)
    fits, note = memory_check(job)
    total = saving * job.image_steps
    pays = saving > 0 if kind == "compiled" else total > cost
    return AutoDecision(
        compile=fits and pays,
        cost_s=cost,
        cost=kind,
        cost_measured=cost_measured,
        saving_step_s=saving,
        saving_measured=saving_measured,
        image_steps=job.image_steps,
        images=job.images,
        memory_fits=fits,
        memory_note=note,
    )


# --- the memory of measured figures -----------------------------------------------------------------------------


class AutoMemory:
    """The measured figures per :class:`AutoKey`, in a JSON file (``path``; default
    :func:`default_auto_memory_path`, read at each use). Read at every decision, written after each measured
    generation (atomically); a missing or unreadable file is an empty memory, never an error."""

    def __init__(self, path: Path | str | None = None) -> None:
        self._path = Path(path) if path is not None else None
        self._lock = threading.Lock()
        self._warned = False

    @property
    def path(self) -> Path:
        return self._path if self._path is not None else default_auto_memory_path()

    def get(self, key: AutoKey) -> AutoRecord:
        with self._lock:
            return AutoRecord.from_dict(self._load().get(key.text(), {}).get("figures"))

    def record(self, key: AutoKey, **measured: float) -> AutoRecord:
        """Fold the measured figures (names of :class:`AutoRecord` fields) into ``key``'s record and save it."""
        with self._lock:
            entries = self._load()
            entry = entries.get(key.text(), {})
            updated = AutoRecord.from_dict(entry.get("figures"))
            for name, value in measured.items():
                updated = updated.with_measurement(name, value)
            entries[key.text()] = {"key": asdict(key), "figures": asdict(updated), "updated": time.time()}
            self._save(entries)
            return updated

    def _load(self) -> dict[str, Any]:
        path = self.path
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            self._warn(f"cannot read {path} ({exc}); starting from estimates")
            return {}
        entries = data.get("entries") if isinstance(data, dict) and data.get("version") == MEMORY_VERSION else None
        if not isinstance(entries, dict):
            self._warn(f"{path} is not a compile-auto file of version {MEMORY_VERSION}; starting from estimates")
            return {}
        return {k: v for k, v in entries.items() if isinstance(v, dict)}

    def _save(self, entries: dict[str, Any]) -> None:
        path = self.path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".compile-auto-", dir=path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump({"version": MEMORY_VERSION, "entries": entries}, fh, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as exc:
            self._warn(f"cannot write {path} ({exc}); this measurement is not remembered")
            with contextlib.suppress(OSError, UnboundLocalError):
                os.unlink(tmp)

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            log.warning("[Optim] compile auto: %s", message)
        else:
            log.debug("compile auto: %s", message)


# --- one generation: decide, time the steps, remember -----------------------------------------------------------


@dataclass
class AutoRun:
    """One generation's compile plan: the decision (``auto``: acted on; ``on``/``max-autotune``: only the cost's
    kind matters, to file the measured compile seconds) and its measurement. The runtime calls :meth:`step` from
    the sampler's step callback and :meth:`finish` when the generation ends."""

    decision: AutoDecision
    auto: bool
    job: AutoJob | None = None
    planner: AutoPlanner | None = None
    root: Any = None  # a weak reference to the compiled model
    application: Any = None  # the regional compile application, when compiled
    stamps: list[float] = field(default_factory=list)
    finished: bool = False

    def step(self) -> None:
        if self.planner is not None and not self.finished:
            self.stamps.append(self.planner.clock())

    def step_seconds(self) -> float | None:
        """Seconds per step of one image: the median interval between step callbacks (the compiling step and the
        gaps between batches are outliers), over the batch size; None with fewer than :data:`MIN_INTERVALS`."""
        if self.job is None or len(self.stamps) <= MIN_INTERVALS:
            return None
        intervals = [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]
        median = statistics.median(intervals)
        return median / self.job.batch_size if median > 0 else None

    def finish(self) -> None:
        """Remember what this generation measured (once)."""
        if self.finished:
            return
        self.finished = True
        if self.planner is None or self.job is None:
            return
        measured: dict[str, float] = {}
        step = self.step_seconds() if self.job.timed else None
        stats = getattr(self.application, "stats", None)
        if stats is None:
            if self.auto and step is not None:
                measured["eager_step_s"] = step
        elif not stats.fell_back and stats.calls > 0:
            root = self.root() if self.root is not None else None
            if root is not None:
                self.planner.mark_compiled(root, self.job.key)
            if stats.compiles > 0 and self.decision.cost in ("cold", "warm") and not stats.interrupted:
                measured[f"{self.decision.cost}_compile_s"] = float(stats.compile_seconds)
            if step is not None:
                measured["compiled_step_s"] = step
        if measured:
            self.planner.memory.record(self.job.key, **measured)
            log.debug("compile auto: remembered %s for %s", measured, self.job.key.text())

    def summary(self) -> dict[str, Any]:
        """The decision with its figures, and the key they are filed under in ``compile-auto.json`` (``key``; absent
        where compile could not run)."""
        data = self.decision.to_dict()
        if self.job is not None:
            data["key"] = self.job.key.text()
        return data


class AutoPlanner:
    """The process's ``auto``: the memory of figures, what this process compiled, the clock the steps are timed
    with, and whether the on-disk cache holds a key's kernels (``disk_cached(key, record)``; default: an earlier
    process compiled this key here and inductor's FX graph cache is on)."""

    def __init__(
        self,
        memory: AutoMemory | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        disk_cached: Callable[[AutoKey, AutoRecord], bool] | None = None,
    ) -> None:
        self.memory = memory if memory is not None else AutoMemory()
        self.clock = clock
        self._disk_cached = disk_cached if disk_cached is not None else _inductor_cache_has
        self._compiled: weakref.WeakKeyDictionary[Any, set[str]] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()

    def mark_compiled(self, root: Any, key: AutoKey) -> None:
        with self._lock:
            self._compiled.setdefault(root, set()).add(key.text())

    def compiled_here(self, root: Any, key: AutoKey) -> bool:
        with self._lock:
            return key.text() in self._compiled.get(root, ())

    def begin(self, job: AutoJob, root: Any, *, auto: bool) -> AutoRun:
        """Decide for ``job`` on the model ``root``; the returned run measures the generation."""
        record = self.memory.get(job.key)
        here = self.compiled_here(root, job.key)
        decision = decide(job, record, compiled_here=here, disk_cached=not here and self._disk_cached(job.key, record))
        return AutoRun(decision, auto, job, self, _weak(root))


def unavailable_run(why: str) -> AutoRun:
    """``auto`` where compile cannot run (no compiler, failed before, the job unknown): eager, saying why."""
    return AutoRun(AutoDecision(compile=False, unavailable=why), auto=True)


def _weak(root: Any) -> Any:
    try:
        return weakref.ref(root)
    except TypeError:
        return None


def _inductor_cache_has(key: AutoKey, record: AutoRecord) -> bool:
    """Whether the on-disk compile cache should hold ``key``'s kernels: an earlier process compiled it on this
    machine and inductor's folder is the one kept across restarts (:mod:`lib_optim.compile.persist`: inductor's
    compiled kernels before torch 2.3, and its FX graph cache too from 2.3), not the temp folder."""
    if record.cold_compile_s is None and record.warm_compile_s is None:
        return False
    setup = kept_cache()
    return setup is not None and setup.inductor_owner in ("ours", "yours")


@functools.cache
def get_auto_planner() -> AutoPlanner:
    """The process's planner (what it compiled lives as long as the process)."""
    return AutoPlanner()
