"""Choosing an attention backend for ``auto``: predicted memory, ranked speed.

Host adapters call :func:`choose_auto_attention` with the backends available right now; it returns the
fastest one predicted to fit in free memory (and an optional budget), or the most frugal one when none
fits, with the reason. Each backend's memory model and speed rank come from its registry entry
(:mod:`lib_optim.attention.registry`); the formulas are in :mod:`lib_optim.attention.memory`, and
``python -m lib_optim bench`` measures them against :mod:`lib_optim.attention.impl`.

No torch here: the planner runs in the CLI and the hosts' UI process before anything is on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lib_optim.attention import registry
from lib_optim.attention.memory import MIB, AttnShape, MemoryContext, attention_shapes
from lib_optim.attention.registry import Attention

__all__ = [
    "MIB",
    "AutoChoice",
    "RankedBackend",
    "attention_shapes",
    "choose_auto_attention",
    "choose_for_shapes",
    "predict_model_peak_bytes",
    "predict_peak_bytes",
    "rank_candidates",
]


def predict_peak_bytes(
    backend: Attention | str,
    shape: AttnShape,
    *,
    dtype_bytes: int = 2,
    device: str = "cuda",
    free_bytes: int | None = None,
    threads: int | None = None,
    steps: int | None = None,
    q_chunk: int = 1024,
    kv_chunk: int | None = None,
    chunk_threshold: float | None = None,
    cpu_pack: bool = False,
    kernel: str | None = None,
) -> int:
    """Predicted peak bytes of one attention call of ``backend`` beyond q, k, v (output included): its
    registry entry's memory model (:mod:`lib_optim.attention.memory`). ``kernel`` forces one SDPA kernel."""
    name = registry.parse_name(str(backend))
    entry = registry.backend(name) if name is not None else None
    if entry is None or entry.memory is None:
        allowed = ", ".join(b.name.value for b in registry.algorithms())
        raise ValueError(f"[Optim] planner: no memory model for backend {str(backend)!r}; allowed: {allowed}")
    ctx = MemoryContext(
        dtype_bytes=dtype_bytes,
        device=device,
        free_bytes=free_bytes,
        threads=threads,
        steps=steps,
        q_chunk=q_chunk,
        kv_chunk=kv_chunk,
        chunk_threshold=chunk_threshold,
        cpu_pack=cpu_pack,
        kernel=kernel,
    )
    return entry.memory(shape, ctx)


def predict_model_peak_bytes(backend: Attention | str, shapes: Iterable[AttnShape], **kwargs: object) -> int:
    """The largest :func:`predict_peak_bytes` over ``shapes`` (one attention call runs at a time)."""
    return max((predict_peak_bytes(backend, s, **kwargs) for s in shapes), default=0)  # type: ignore[arg-type]


@dataclass(frozen=True)
class AutoChoice:
    attention: Attention
    reason: str


@dataclass(frozen=True)
class RankedBackend:
    name: Attention
    speed: float
    peak_bytes: int
    fits: bool


def rank_candidates(
    available: Iterable[Attention | str],
    shapes: Sequence[AttnShape],
    *,
    limit_bytes: int | None,
    device: str = "cuda",
    dtype_bytes: int = 2,
    threads: int | None = None,
    speed: Mapping[str, float] | None = None,
    cpu_pack: bool = False,
) -> list[RankedBackend]:
    """Every available backend with its speed rank (its registry entry's, or ``speed`` — e.g. ``bench`` ratios
    by backend name), predicted peak and whether it fits, fastest first.

    ``split`` and ``sub-quad`` size their chunks from the memory they are given (``limit_bytes``), so they
    are predicted with it; an entry's ``runs_within`` rule (split: at most the hosts' 64 slices) must hold too.
    """
    overrides = {str(k): float(v) for k, v in (speed or {}).items()}
    ctx = MemoryContext(
        dtype_bytes=dtype_bytes, device=device, free_bytes=limit_bytes, threads=threads, cpu_pack=cpu_pack
    )
    out: list[RankedBackend] = []
    for name in available:
        entry = registry.backend(Attention(name))
        if entry.memory is None:  # host/auto
            continue
        memory = entry.memory
        peak = max((memory(s, ctx) for s in shapes), default=0)
        fits = limit_bytes is None or peak <= limit_bytes
        if entry.runs_within is not None:
            runs_within = entry.runs_within
            fits = fits and all(runs_within(s, ctx) for s in shapes)
        rank = overrides.get(entry.name.value, entry.speed_on(device))
        out.append(RankedBackend(entry.name, rank, peak, fits))
    out.sort(key=lambda c: c.speed)  # stable: ties keep the caller's order
    return out


def choose_for_shapes(
    available: Sequence[Attention | str],
    shapes: Sequence[AttnShape],
    *,
    free_mb: float | None = None,
    budget_mb: float | None = None,
    device: str = "cuda",
    dtype_bytes: int = 2,
    threads: int | None = None,
    speed: Mapping[str, float] | None = None,
    cpu_pack: bool = False,
) -> tuple[Attention, str]:
    """The backend ``auto`` picks for these shapes, and why (see :func:`choose_auto_attention`)."""
    limits = [x for x in (free_mb, budget_mb) if x is not None]
    limit_bytes = int(min(limits) * MIB) if limits else None
    ranked = rank_candidates(
        available,
        shapes,
        limit_bytes=limit_bytes,
        device=device,
        dtype_bytes=dtype_bytes,
        threads=threads,
        speed=speed,
        cpu_pack=cpu_pack,
    )
    if not ranked:
        raise ValueError("[Optim] attention: auto found no available backend; allowed: host")
    where = f"{limit_bytes / MIB:.0f} MiB" if limit_bytes is not None else "no memory limit known"
    fitting = [c for c in ranked if c.fits]
    if fitting:
        best = fitting[0]
        what = "the only available backend" if len(ranked) == 1 else "the fastest available backend"
        return best.name, f"{best.name.value}: {what} predicted to fit (peak {best.peak_bytes / MIB:.0f} MiB; {where})"
    frugal = min(ranked, key=lambda c: (c.peak_bytes, c.speed))
    return frugal.name, (
        f"{frugal.name.value}: nothing is predicted to fit in {where}; the most frugal backend "
        f"(peak {frugal.peak_bytes / MIB:.0f} MiB)"
    )


def choose_auto_attention(
    available: Sequence[Attention],
    *,
    width: int = 512,
    height: int = 512,
    batch: int = 1,
    free_mb: int | None = None,
    budget_mb: int | None = None,
    family: str = "sd15",
    device: str = "cuda",
    dtype_bytes: int = 2,
    speed: Mapping[str, float] | None = None,
) -> AutoChoice:
    """Pick the backend ``auto`` stands for from ``available`` (never HOST or AUTO).

    The fastest backend (its registry entry's speed rank on ``device``, with ``speed`` — e.g. ``bench`` ratios
    by backend name — overriding them) whose predicted peak over the model's attention calls at this size
    (:func:`attention_shapes`) fits in ``free_mb`` and ``budget_mb`` (the smaller; no limit when neither
    is given); the most frugal one when none fits.
    """
    shapes = attention_shapes(family, width, height, batch)
    name, reason = choose_for_shapes(
        available,
        shapes,
        free_mb=free_mb,
        budget_mb=budget_mb,
        device=device,
        dtype_bytes=dtype_bytes,
        speed=speed,
    )
    return AutoChoice(name, reason)
