"""``python -m lib_optim bench``: time the attention backends side by side, measure their peak memory.

For each model shape (``sd15-512``, ``sd15-768``, ``sdxl-1024``) and each of its attention calls
(:func:`lib_optim.attention.planner.attention_shapes`; with ``quick`` only the largest self- and cross-attention),
every available backend of :mod:`lib_optim.attention.impl` runs on the same random q, k, v:

- **Time**: one warm-up call per backend, then ``repeats`` rounds; each round runs every backend once, in
  an order rotated by one each round, so machine noise and order effects land on all of them alike. The
  median is reported, and its ratio to the best backend at that shape. When every backend's warm-up took
  over :data:`SLOW_CALL_S`, the warm-up round counts as the first round. Fast calls get more rounds — as
  many as fit in :data:`FAST_ROUND_BUDGET_S` per backend, at most :data:`MAX_ROUNDS` — since a 20 ms call's
  median of two is at the mercy of one hiccup, and more rounds of it cost little.
- **Peak memory** (taken during the warm-up call): on CUDA, ``torch.cuda.max_memory_allocated`` minus
  what was allocated before (exact, allocator bytes). On CPU, the process's peak resident set: the
  kernel's high-water mark ``VmHWM`` is reset through ``/proc/self/clear_refs`` (Linux), and the peak
  minus the resident size before the call is the call's peak. glibc is told to serve every allocation of
  128 KiB or more with its own ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``), so freed tensors go straight back
  to the system and a new one cannot hide in memory that is already resident. Accurate to a page for
  tensors of 128 KiB and up; smaller allocations are not seen, which is why errors on peaks under
  :data:`MIN_MEASURED_BYTES` are shown but not counted in the maximum error. Elsewhere: not measured.
- **Prediction**: :func:`lib_optim.attention.planner.predict_peak_bytes` for the same call, and its error.
- **auto**: :func:`lib_optim.attention.planner.choose_for_shapes` over the host backends measured here, with the
  same memory limit, and the ratio of its pick's time to the best time at that shape; then, as a host
  picks once per generation, its one pick over all the calls of the model shape, judged by the summed time
  of those calls (:data:`STEP_LABEL`).

A backend whose predicted peak exceeds the memory limit (``mem_fraction`` of free RAM / VRAM) is not run;
the table says so. ``split`` and ``sub-quad`` are given that limit as their free memory, so they slice
themselves to fit as they would in a host.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from lib_optim.attention import (
    MIB,
    Attention,
    AttnShape,
    algorithms,
    attention_shapes,
    choose_for_shapes,
    impl,
    predict_peak_bytes,
)
from lib_optim.log import get_logger

log = get_logger(__name__)

# family, width, height; "tiny" is for tests (a 64x64 image: attention over 64 tokens).
SHAPE_SPECS: dict[str, tuple[str, int, int]] = {
    "sd15-512": ("sd15", 512, 512),
    "sd15-768": ("sd15", 768, 768),
    "sdxl-1024": ("sdxl", 1024, 1024),
    "tiny": ("sd15", 64, 64),
}
DEFAULT_SPECS = ("sd15-512", "sd15-768", "sdxl-1024")
# --dtype: the compute dtypes the hosts run attention in (fp16 on CUDA by default; fp32 with --no-half or on
# CPU; bf16 with A1111's --precision/Forge's --unet-in-bf16). On CPU, fp16/bf16 check the planner's 2-byte
# formulas (split's ×3 rule, the flash kernel's reduced-precision block) without a GPU.
DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def host_backends() -> list[Attention]:
    """The algorithms both main hosts can switch to per generation: what `auto` chooses among here (the rest
    are shown for comparison)."""
    return [b.name for b in algorithms() if b.a1111 is not None and b.forge is not None]


STEP_LABEL = "UNet step (its calls summed)"
MIN_MEASURED_BYTES = 4 * MIB
SLOW_CALL_S = 1.0
FAST_ROUND_BUDGET_S = 0.5
MAX_ROUNDS = 25
_MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


@dataclass
class Row:
    spec: str
    shape: str
    kind: str
    bh: int
    nq: int
    nk: int
    dim_head: int
    backend: str
    predicted_bytes: int
    median_s: float | None = None
    ratio: float | None = None
    measured_bytes: int | None = None
    error_pct: float | None = None
    skipped: str | None = None
    rounds: int | None = None  # timed calls behind the median


@dataclass
class AutoRow:
    spec: str
    shape: str
    pick: str
    reason: str
    ratio: float | None


@dataclass
class AttentionBenchReport:
    device: str
    dtype: str
    threads: int
    repeats: int
    memory_method: str
    limit_bytes: int
    rows: list[Row] = field(default_factory=list)
    auto: list[AutoRow] = field(default_factory=list)

    @property
    def max_error_pct(self) -> float | None:
        errs = [
            abs(r.error_pct)
            for r in self.rows
            if r.error_pct is not None and (r.measured_bytes or 0) >= MIN_MEASURED_BYTES
        ]
        return max(errs) if errs else None

    @property
    def max_auto_ratio(self) -> float | None:
        ratios = [a.ratio for a in self.auto if a.ratio is not None]
        return max(ratios) if ratios else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "dtype": self.dtype,
            "threads": self.threads,
            "repeats": self.repeats,
            "memory_method": self.memory_method,
            "limit_bytes": self.limit_bytes,
            "rows": [asdict(r) for r in self.rows],
            "auto": [asdict(a) for a in self.auto],
            "max_error_pct": self.max_error_pct,
            "max_auto_ratio": self.max_auto_ratio,
        }


# ---------------------------------------------------------------------------------------------------------
# Peak memory.


def _status_bytes(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as fh:
        match = re.search(rf"^{key}:\s+(\d+) kB", fh.read(), re.MULTILINE)
    if match is None:
        raise OSError(f"no {key} in /proc/self/status")
    return int(match.group(1)) * 1024


class PeakMeter:
    """Measures the peak memory of one call on a device (see the module doc for the method)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "none"
        self._malloc_trim: Callable[[int], int] | None = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated"
        else:
            try:
                with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                    fh.write("5")
                _status_bytes("VmHWM")
                self.method = "VmHWM (peak RSS, reset via /proc/self/clear_refs; mmap threshold 128 KiB)"
            except OSError:
                log.info("peak memory on this system: not measured (no /proc/self/clear_refs)")
                return
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None)
                libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
                self._malloc_trim = libc.malloc_trim

    def measure(self, fn: Callable[[], object]) -> int | None:
        if self.method == "none":
            fn()
            return None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            result = fn()
            torch.cuda.synchronize(self.device)
            del result
            return int(torch.cuda.max_memory_allocated(self.device) - base)
        # Garbage freed during the call would lower the resident size under the base and hide part of the
        # peak: collect it first. Then give free heap memory back to the system (glibc's malloc_trim): the
        # mmap threshold only applies to new heap growth, and a large free chunk left from before it was set
        # would serve the call from pages that are already resident, unseen.
        gc.collect()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        base = _status_bytes("VmRSS")
        result = fn()
        del result
        return max(0, _status_bytes("VmHWM") - base)


# ---------------------------------------------------------------------------------------------------------
# The run.


def _select_shapes(family: str, width: int, height: int, quick: bool) -> list[AttnShape]:
    shapes = attention_shapes(family, width, height, 1)
    if not quick:
        return shapes
    self_top = max((s for s in shapes if s.kind == "self"), key=lambda s: s.bh * s.nq * s.nk)
    cross_top = max((s for s in shapes if s.kind == "cross"), key=lambda s: s.bh * s.nq * s.nk * s.dim_head)
    return [self_top, cross_top]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True)
class _Target:
    """One thing timed at each call: a registered backend, or SDPA with one kernel forced (``kernel``)."""

    label: str
    backend: Attention
    kernel: str | None
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _targets(
    dev: torch.device, compute: torch.dtype, limit: int, wanted: Sequence[str] | None, quick: bool
) -> list[_Target]:
    backends = impl.available_backends(dev, compute)
    # given the run's memory limit as their free memory, so they size their chunks to it as in a host
    sized: dict[Attention, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
        Attention.SPLIT: lambda q, k, v: impl.split(q, k, v, free_bytes=limit),
        Attention.SUB_QUAD: lambda q, k, v: impl.sub_quad(q, k, v, free_bytes=limit),
    }
    out = [_Target(name.value, name, None, sized.get(name, fn)) for name, fn in backends.items()]
    out += [_Target(f"sdp-{k}", Attention.SDP, k, fn) for k, fn in impl.sdp_kernels(dev, compute).items()]
    if wanted is not None:
        return [t for t in out if t.label in wanted]
    if quick:
        shared = set(host_backends())
        return [t for t in out if t.kernel is None and t.backend in shared]
    return out


def target_labels(device: str = "cpu", dtype: str | None = None) -> list[str]:
    """Every row label :func:`run_bench` can time here (``backends=``): each available backend and each SDPA
    kernel that runs on ``device`` in ``dtype`` (a :data:`DTYPES` name; ``None`` = the device's default)."""
    dev = torch.device(device)
    compute = DTYPES[dtype] if dtype is not None else (torch.float16 if dev.type == "cuda" else torch.float32)
    return [t.label for t in _targets(dev, compute, 0, None, False)]


def run_bench(
    specs: Sequence[str] = DEFAULT_SPECS,
    *,
    device: str = "cpu",
    repeats: int | None = None,
    quick: bool = False,
    backends: Sequence[str] | None = None,
    mem_fraction: float = 0.6,
    seed: int = 0,
    dtype: str | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> AttentionBenchReport:
    """Run the benchmark (see the module doc) and return its results.

    ``dtype``: a :data:`DTYPES` name; ``None`` = fp16 on CUDA, fp32 on CPU (what the hosts run by default).
    ``backends``: row labels to run (``sdp``, ``split``, ``sdp-math``, …); default all, ``quick``: the host
    backends. ``clock``: seconds, for the timings (tests inject one).
    """
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("[Optim] bench: --device cuda: torch has no CUDA device here; allowed: cpu")
    unknown = [s for s in specs if s not in SHAPE_SPECS]
    if unknown:
        raise ValueError(f"[Optim] bench: unknown shape {unknown[0]!r}; allowed: {', '.join(DEFAULT_SPECS)}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"[Optim] bench: --dtype {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    default_dtype = torch.float16 if dev.type == "cuda" else torch.float32
    compute = DTYPES[dtype] if dtype is not None else default_dtype
    elt = torch.tensor([], dtype=compute).element_size()
    repeats = repeats if repeats is not None else (2 if quick else 5)
    threads = torch.get_num_threads()
    meter = PeakMeter(dev)
    limit = int(impl.free_memory_bytes(dev) * mem_fraction)
    targets = _targets(dev, compute, limit, backends, quick)
    result = AttentionBenchReport(dev.type, str(compute).removeprefix("torch."), threads, repeats, meter.method, limit)
    pack = dev.type == "cpu" and impl.cpu_packs(compute)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    measured = {t.backend for t in targets if t.kernel is None}
    candidates = [b for b in host_backends() if b in measured]
    choose = partial(
        choose_for_shapes,
        candidates,
        free_mb=limit / MIB,
        device=dev.type,
        dtype_bytes=elt,
        threads=threads,
        cpu_pack=pack,
    )
    run = _ShapeRun(dev, compute, elt, threads, limit, repeats, meter, gen, pack, clock)
    for spec in specs:
        family, width, height = SHAPE_SPECS[spec]
        shapes = _select_shapes(family, width, height, quick)
        totals: dict[Attention, float | None] = {}
        for shape in shapes:
            rows = run.bench(spec, shape, targets)
            result.rows.extend(rows)
            times = {r.backend: r.median_s for r in rows if r.median_s is not None}
            pick, reason = choose([shape])
            best = min(times.values()) if times else None
            ratio = times[pick.value] / best if best and pick.value in times else None
            result.auto.append(AutoRow(spec, shape.label, pick.value, reason, ratio))
            for name in candidates:
                # a backend that did not run at one call has no total for the step
                so_far = totals.get(name, 0.0)
                totals[name] = so_far + times[name.value] if so_far is not None and name.value in times else None
        # What a host does: one pick for all the calls of a UNet step, judged by their summed time.
        pick, reason = choose(shapes)
        finished = {n: t for n, t in totals.items() if t is not None}
        best = min(finished.values()) if finished else None
        ratio = finished[pick] / best if best and pick in finished else None
        result.auto.append(AutoRow(spec, STEP_LABEL, pick.value, reason, ratio))
    return result


@dataclass
class _ShapeRun:
    """What every shape of one run shares: the device, dtype, memory limit, rounds, meter and clock."""

    dev: torch.device
    dtype: torch.dtype
    elt: int
    threads: int
    limit: int
    repeats: int
    meter: PeakMeter
    gen: torch.Generator
    cpu_pack: bool
    clock: Callable[[], float]

    def bench(self, spec: str, shape: AttnShape, targets: Sequence[_Target]) -> list[Row]:
        def make(n: int) -> torch.Tensor:
            return torch.randn(shape.bh, n, shape.dim_head, generator=self.gen).to(device=self.dev, dtype=self.dtype)

        q, k, v = make(shape.nq), make(shape.nk), make(shape.nk)
        rows: dict[str, Row] = {}
        runnable: list[_Target] = []
        warm: dict[str, float] = {}
        for target in targets:
            predicted = predict_peak_bytes(
                target.backend,
                shape,
                dtype_bytes=self.elt,
                device=self.dev.type,
                free_bytes=self.limit,
                threads=self.threads,
                cpu_pack=self.cpu_pack,
                kernel=target.kernel,
            )
            row = Row(
                spec, shape.label, shape.kind, shape.bh, shape.nq, shape.nk, shape.dim_head, target.label, predicted
            )
            rows[target.label] = row
            if predicted > self.limit:
                row.skipped = f"predicted {predicted / MIB:.0f} MiB > limit {self.limit / MIB:.0f} MiB"
                continue
            fn = target.fn
            try:
                # The same kernel at one batch·head first: code the first call loads or generates (oneDNN/AMX
                # kernels, thread pools) is then resident before the peak is taken, not counted in it.
                del_out = fn(q[:1], k[:1], v[:1])
                del del_out
                start = self.clock()
                row.measured_bytes = self.meter.measure(partial(fn, q, k, v))  # warm-up and peak in one call
                _sync(self.dev)
                warm[target.label] = self.clock() - start
            except (RuntimeError, MemoryError) as exc:
                row.skipped = f"failed: {str(exc).splitlines()[0][:80]}"
                continue
            if row.measured_bytes:
                row.error_pct = 100.0 * (predicted - row.measured_bytes) / row.measured_bytes
            runnable.append(target)
        samples: dict[str, list[float]] = {t.label: [] for t in runnable}
        rounds = timed_rounds(self.repeats, [warm[t.label] for t in runnable])
        if runnable and min(warm[t.label] for t in runnable) >= SLOW_CALL_S:
            # Calls this slow have nothing left to warm up (and the peak measurement costs two /proc writes):
            # the warm-up round is the first timed round, which keeps --quick within minutes at 768².
            for target in runnable:
                samples[target.label].append(warm[target.label])
            rounds -= 1
        for r in range(rounds):
            order = runnable[r % len(runnable) :] + runnable[: r % len(runnable)] if runnable else []
            for target in order:
                _sync(self.dev)
                start = self.clock()
                out = target.fn(q, k, v)
                _sync(self.dev)
                samples[target.label].append(self.clock() - start)
                del out
        medians = {n: statistics.median(s) for n, s in samples.items() if s}
        best = min(medians.values()) if medians else None
        for name, med in medians.items():
            rows[name].median_s = med
            rows[name].rounds = len(samples[name])
            rows[name].ratio = med / best if best else None
        log.debug("bench %s %s: %s", spec, shape.label, medians)
        return list(rows.values())


def timed_rounds(repeats: int, warm_up_seconds: Sequence[float]) -> int:
    """Rounds to time: at least ``repeats``; more for fast calls, as many as fit in :data:`FAST_ROUND_BUDGET_S`
    for the slowest backend's warm-up time, at most :data:`MAX_ROUNDS`."""
    if not warm_up_seconds:
        return repeats
    slowest = max(warm_up_seconds)
    return max(repeats, min(MAX_ROUNDS, int(FAST_ROUND_BUDGET_S / max(slowest, 1e-6))))


# ---------------------------------------------------------------------------------------------------------
# Output.


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.1f}"


def format_table(result: AttentionBenchReport) -> str:
    lines = [
        f"Attention benchmark on {result.device} ({result.dtype}, {result.threads} threads, "
        f"median of {result.repeats}+ rounds, more for fast calls); memory limit {result.limit_bytes / MIB:.0f} MiB",
        f"Peak memory: {result.memory_method}; peak = beyond q/k/v, output included",
        "",
        f"{'shape':<10} {'call':<26} {'backend':<14} {'ms':>9} {'×best':>6} {'pred MiB':>9} {'meas MiB':>9} "
        f"{'err %':>7}  note",
    ]
    for r in result.rows:
        ms = "-" if r.median_s is None else f"{r.median_s * 1000:.1f}"
        ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
        err = "-" if r.error_pct is None else f"{r.error_pct:+.1f}"
        if r.error_pct is not None and (r.measured_bytes or 0) < MIN_MEASURED_BYTES:
            err += "~"
        lines.append(
            f"{r.spec:<10} {r.shape:<26} {r.backend:<14} {ms:>9} {ratio:>6} {_mib(r.predicted_bytes):>9} "
            f"{_mib(r.measured_bytes):>9} {err:>7}  {('skipped: ' + r.skipped) if r.skipped else ''}"
        )
    lines.append("")
    lines.append("auto (host backends, planner's prediction and speed table):")
    for a in result.auto:
        ratio = "-" if a.ratio is None else f"{a.ratio:.3f}"
        lines.append(f"  {a.spec:<10} {a.shape:<28} → {a.pick:<9} time ×best {ratio}")
    max_err = result.max_error_pct
    max_ratio = result.max_auto_ratio
    lines.append("")
    lines.append(
        "Max planner error: "
        + ("n/a" if max_err is None else f"{max_err:.1f} %")
        + f" (target ±15 %; peaks under {MIN_MEASURED_BYTES // MIB} MiB, marked ~, not counted)"
    )
    lines.append(
        "Max auto time ratio to the best: " + ("n/a" if max_ratio is None else f"{max_ratio:.3f}") + " (target ≤ 1.03)"
    )
    return "\n".join(lines)


def to_json(result: AttentionBenchReport) -> str:
    return json.dumps(result.to_dict(), indent=2)


def write_plot(result: AttentionBenchReport, path: str) -> str:
    """Write a bar chart of time ratios per call and backend; returns a message saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot: matplotlib is not installed; no chart written to {path} (pip install matplotlib)"
    calls = list(dict.fromkeys(f"{r.spec}\n{r.shape}" for r in result.rows))
    backends = list(dict.fromkeys(r.backend for r in result.rows))
    width = 0.8 / max(1, len(backends))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(calls)), 4.5))
    for i, backend in enumerate(backends):
        values = []
        for call in calls:
            match = [r for r in result.rows if f"{r.spec}\n{r.shape}" == call and r.backend == backend]
            values.append(match[0].ratio if match and match[0].ratio is not None else 0.0)
        ax.bar([x + i * width for x in range(len(calls))], values, width, label=backend)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(calls))])
    ax.set_xticklabels(calls, fontsize=7)
    ax.set_ylabel("time / best (lower is better; 0 = not run)")
    ax.set_title(f"Attention backends on {result.device} ({result.dtype})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"chart written to {path}"
