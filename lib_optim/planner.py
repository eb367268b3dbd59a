"""Choosing an attention backend for ``auto``: predicted memory, ranked speed.

Host adapters call :func:`choose_auto_attention` with the backends available right now; it returns the
fastest one predicted to fit in free memory (and an optional budget), or the most frugal one when none
fits, with the reason. The predictions are formulas over the attention shapes of the UNet
(:func:`attention_shapes`), one per backend (:func:`predict_peak_bytes`); ``python -m lib_optim bench``
measures them against the implementations in :mod:`lib_optim.attention_impl`.

No torch here: the planner runs in the CLI and the hosts' UI process before anything is on the GPU.

Notation in the formulas (all in bytes; ``e`` is the element size of the compute dtype, 2 for fp16/bf16,
4 for fp32; ``BH`` = batch·heads):

- ``S(n)  = BH·n·Nk·e`` — a score matrix for ``n`` queries against all ``Nk`` keys;
- ``O     = BH·Nq·d·e`` — the attention output;
- ``R(n)  = BH·n·d·e``  — the output of ``n`` queries.

A *peak* is the most memory the call holds at once beyond its inputs q, k, v, the output included: the
output is alive during some phases and not others (SDPA's math kernel frees its score matrix before it
copies the output), so "peak minus output" is not always the working memory; the peak is what has to fit
in free memory and what ``bench`` measures.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from lib_optim.settings import Attention

MIB = 1 << 20

# Model families: (latent downsampling levels with attention, their channels, heads-or-dim_head rule,
# context length and dim). SD1.5 has 8 heads everywhere (dim_head = ch/8) and attention at /1, /2, /4
# plus the mid block at /8; SDXL uses dim_head 64 (heads = ch/64) at /2 and /4 (mid block at /4).
_FAMILIES: dict[str, dict[str, object]] = {
    "sd15": {"levels": ((1, 320), (2, 640), (4, 1280), (8, 1280)), "heads": 8, "dim_head": None, "ctx": 768},
    "sdxl": {"levels": ((2, 640), (4, 1280)), "heads": None, "dim_head": 64, "ctx": 2048},
}
CONTEXT_TOKENS = 77


@dataclass(frozen=True)
class AttnShape:
    """One attention call: ``bh`` = batch·heads, ``nq`` query tokens, ``nk`` key tokens."""

    kind: str  # "self" or "cross"
    bh: int
    nq: int
    nk: int
    dim_head: int
    level: int = 1  # the latent downsampling factor it runs at

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.level} {self.bh}x{self.nq}x{self.nk}x{self.dim_head}"


def attention_shapes(family: str, width: int, height: int, batch: int = 1, *, cfg: bool = True) -> list[AttnShape]:
    """The distinct attention calls of one UNet step, largest first.

    The latent is ``(height/8, width/8)``; each level ``/l`` halves it ``log2(l)`` times the way a
    stride-2 convolution with padding 1 does (``ceil(n/2)``). ``cfg`` doubles the batch for
    cond/uncond, as the hosts batch them. Self-attention: ``Nq = Nk`` = tokens at that level;
    cross-attention: ``Nk`` = 77 context tokens (the k/v projections map the 768/2048-dim context to
    the level's inner dim, so dim_head is the same as self-attention's).
    """
    spec = _FAMILIES.get(family)
    if spec is None:
        raise ValueError(f"[Optim] planner: unknown model family {family!r}; allowed: {', '.join(_FAMILIES)}")
    b = batch * (2 if cfg else 1)
    lat_h, lat_w = max(1, math.ceil(height / 8)), max(1, math.ceil(width / 8))
    seen: set[tuple[str, int, int, int, int]] = set()
    shapes: list[AttnShape] = []
    for level, channels in spec["levels"]:  # type: ignore[attr-defined]
        h, w = lat_h, lat_w
        for _ in range(int(math.log2(level))):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        if spec["heads"] is not None:
            heads = int(spec["heads"])  # type: ignore[call-overload]
            dim_head = channels // heads
        else:
            dim_head = int(spec["dim_head"])  # type: ignore[call-overload]
            heads = channels // dim_head
        for kind, nk in (("self", h * w), ("cross", CONTEXT_TOKENS)):
            key = (kind, b * heads, h * w, nk, dim_head)
            if key not in seen:
                seen.add(key)
                shapes.append(AttnShape(kind, b * heads, h * w, nk, dim_head, level))
    return shapes


# ---------------------------------------------------------------------------------------------------------
# Chunk parameters, shared with lib_optim.attention_impl so that prediction and execution agree.


def split_steps(bh: int, nq: int, nk: int, elt: int, free_bytes: int) -> int:
    """How many query slices Doggettx split attention uses (A1111 and Forge choose it this way).

    ``required = BH·Nq·Nk·e × m`` with ``m`` = 3 for 2-byte dtypes and 2.5 for fp32 (A1111; Forge uses 3
    for both); ``steps = 1`` if it fits in ``free_bytes``, else ``2^ceil(log2(required/free))``. The
    hosts refuse above 64 steps; the caller decides (the value is returned uncapped).
    """
    required = bh * nq * nk * elt * (3.0 if elt == 2 else 2.5)
    if free_bytes <= 0:
        return 1 << 30
    if required <= free_bytes:
        return 1
    return 2 ** math.ceil(math.log2(required / free_bytes))


def sub_quad_chunks(
    bh: int,
    nq: int,
    nk: int,
    dim_head: int,
    elt: int,
    *,
    q_chunk: int = 1024,
    kv_chunk: int | None = None,
    kv_chunk_min: int | None = None,
    chunk_threshold: float | None = None,
    free_bytes: int | None = None,
) -> tuple[int, int]:
    """The (query chunk, key chunk) sub-quadratic attention runs with — A1111's ``sub_quad_attention`` rules.

    ``chunk_threshold`` is a percentage of ``free_bytes`` (``None``: 70 %; ``0``: no threshold). With a
    threshold, the minimum key chunk is ``threshold / (BH·e·2d)`` (A1111's ``kv_chunk_size_min``), and
    when the whole Q·Kᵀ (``BH·Nq·Nk·e``) fits under the threshold all keys go in one chunk. Otherwise
    the key chunk is ``kv_chunk`` or ``√Nk``. Both are clamped to the token counts.
    """
    threshold: int | None = None
    if chunk_threshold != 0 and free_bytes is not None:
        pct = 70.0 if chunk_threshold is None else float(chunk_threshold)
        threshold = int(free_bytes * pct / 100)
    if kv_chunk_min is None and threshold is not None:
        kv_chunk_min = threshold // max(1, bh * elt * 2 * dim_head)
    if threshold is not None and bh * nq * nk * elt <= threshold:
        kc = nk
    else:
        kc = min(kv_chunk or math.isqrt(nk), nk)
        if kv_chunk_min:
            kc = max(kc, kv_chunk_min)
    return max(1, min(q_chunk, nq)), max(1, min(kc, nk))


# ---------------------------------------------------------------------------------------------------------
# Peak memory per backend.

# The CPU flash kernel's query/key block sizes (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp).
_CPU_FLASH_KV_SPLIT = 512


def _cpu_flash_q_split(nq: int) -> int:
    if nq >= 768:
        return 256
    return 64 if nq >= 192 else 32


def _cpu_flash_packs(bh: int, nq: int, nk: int, q_split: int, threads: int) -> bool:
    """Whether the CPU flash kernel repacks K and V for its AMX matmuls (reduced precision, on a CPU that can:
    see ``cpu_pack`` in :func:`predict_peak_bytes`): only for at least 64 queries and keys, and when each
    thread's matmuls are at least 4× the packing work (``FlashAttentionKernel.cpp``'s ``need_pack``)."""
    if nk < 64 or nq < 64:
        return False
    q_slices = -(-nq // q_split)
    per_thread = -(-(bh * q_slices) // max(1, threads))  # query blocks each thread runs
    return per_thread * q_split >= 4 * bh


def _name(backend: Attention | str) -> str:
    return str(getattr(backend, "value", backend))


def sdp_kernel_for(backend: str, device: str, elt: int) -> str:
    """Which SDPA kernel torch runs for ``sdp``/``sdp-no-mem`` (what the memory depends on).

    CPU: 4-D float inputs go to the CPU flash kernel. CUDA: ``sdp`` takes flash for fp16/bf16 and the
    memory-efficient kernel for fp32 (both O(N)); ``sdp-no-mem`` (A1111: flash and math only) falls back
    to math for fp32, where flash does not run.
    """
    if backend.startswith("sdp-") and backend != "sdp-no-mem":
        return backend.removeprefix("sdp-")
    if device == "cpu":
        return "flash"
    if backend == "sdp-no-mem":
        return "flash" if elt == 2 else "math"
    return "flash" if elt == 2 else "efficient"


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
) -> int:
    """Predicted peak bytes one attention call holds beyond q, k, v (output included; see the module doc).

    - ``none`` (naive; A1111 "None"/v1): the score matrix ``S`` (scaled in place), the softmax ``S``, and
      the output ``probs·V`` while both are still referenced: ``2·S(Nq) + O``.
    - ``sdp-math`` (torch's math kernel, also ``sdp`` on 3-D input): scores ``S``, ``_safe_softmax``'s
      output ``S`` and its all-``-inf`` row mask (1 byte per score) while the output is being written;
      then ``probs·V`` and a copy into the output layout: ``max(2·S + S/e + O, S + 2·O)``. Measured on
      CPU (torch 2.13) to within 1 %.
    - ``sdp`` on CPU = the CPU flash kernel: ``O`` + the log-sum-exp ``BH·Nq·4`` + per-thread blocks of
      ``q_split × kv_split`` scores plus row max, row sum and a ``q_split × d`` accumulator, in fp32
      (plus a reduced-precision copy of the score block for fp16/bf16): ``q_split`` = 256/64/32 for
      Nq ≥ 768/192/less, ``kv_split`` = 512, clamped to the token counts. With ``cpu_pack`` (a CPU whose
      AMX unit takes this 2-byte dtype: AMX-BF16 for bf16, AMX-FP16 for fp16) and enough work to pay for it
      (:func:`_cpu_flash_packs`), the kernel first repacks K and V: ``+ BH·Nk·d'·e`` (K, ``d'`` = d rounded
      up to even) ``+ BH·Nk'·d·e`` (V, each key block rounded up to even) ``+ threads·kv_split·d·e`` (a
      transpose buffer). Measured on CPU (torch 2.13, fp32/fp16/bf16, AMX-BF16) to within 0.3 MiB.
    - ``sdp`` on CUDA (flash / memory-efficient / cuDNN kernels), ``xformers``: O(N) — ``O`` + the
      fp32 log-sum-exp ``BH·Nq·4`` (xformers pads Nq to 32). The kernels keep their tiles in on-chip
      memory; their small workspaces are not modelled (not measured here: no GPU in CI).
    - ``split`` (Doggettx): the output is allocated first, then per slice of ``n = ceil(Nq/steps)``
      queries the slice's scores and softmax coexist, then ``probs·V`` of the slice:
      ``O + S(n) + max(S(n), R(n))``; ``steps`` from :func:`split_steps` and ``free_bytes``.
    - ``sub-quad``, all keys in one chunk (``kv_chunk ≥ Nk``, the usual case): like ``split`` with
      ``n = q_chunk`` (``O + S(n) + max(S(n), R(n))``), or ``none``'s formula when one query chunk
      covers Nq. Chunked keys (online softmax): per query chunk of ``n`` a score block ``BH·n·kc·e``, the
      running sum ``R(n)`` of weighted values and five ``BH·n`` vectors (running max/sum, block max,
      new max, correction); plus ``O`` when there is more than one query chunk:
      ``[O] + BH·n·kc·e + R(n) + 5·BH·n·e``.
    """
    name = _name(backend)
    e = dtype_bytes
    bh, nq, nk, d = shape.bh, shape.nq, shape.nk, shape.dim_head
    out = bh * nq * d * e
    full = bh * nq * nk * e

    def naive() -> int:
        return 2 * full + out

    def sliced(n: int) -> int:
        return out + bh * n * nk * e + max(bh * n * nk * e, bh * n * d * e)

    if name in (Attention.NONE.value, Attention.V1.value):
        return naive()
    if name == Attention.INVOKEAI.value:  # InvokeAI slices queries by memory, like split
        name = Attention.SPLIT.value
    if name == Attention.SPLIT.value:
        if steps is None:
            steps = split_steps(bh, nq, nk, e, free_bytes if free_bytes is not None else 1 << 62)
        return sliced(math.ceil(nq / max(1, steps)))
    if name == Attention.SUB_QUAD.value:
        qc, kc = sub_quad_chunks(
            bh, nq, nk, d, e, q_chunk=q_chunk, kv_chunk=kv_chunk, chunk_threshold=chunk_threshold, free_bytes=free_bytes
        )
        if kc >= nk:
            return naive() if nq <= qc else sliced(qc)
        return (out if nq > qc else 0) + bh * qc * kc * e + bh * qc * d * e + 5 * bh * qc * e
    if name == Attention.XFORMERS.value:
        return out + bh * (-(-nq // 32) * 32) * 4
    if name == Attention.SDP.value or name.startswith("sdp-"):
        kernel = sdp_kernel_for(name, device, e)
        lse = bh * nq * 4
        if kernel == "math":
            return max(2 * full + full // e + out, full + 2 * out)
        if device == "cpu" and kernel == "flash":
            qs, ks = min(_cpu_flash_q_split(nq), nq), min(_CPU_FLASH_KV_SPLIT, nk)
            n_threads = threads or os.cpu_count() or 1
            per_thread = (qs * ks + 2 * qs + qs * d) * 4 + (qs * ks * e if e < 4 else 0)
            packed = 0
            if cpu_pack and e == 2 and _cpu_flash_packs(bh, nq, nk, qs, n_threads):
                tail = (nk - 1) % ks + 1
                v_rows = (nk - 1) // ks * (ks + ks % 2) + tail + tail % 2
                packed = bh * nk * (d + d % 2) * e + bh * v_rows * d * e + n_threads * ks * d * e
            return out + lse + n_threads * per_thread + packed
        return out + lse
    raise ValueError(f"[Optim] planner: no memory model for backend {name!r}")


def predict_model_peak_bytes(backend: Attention | str, shapes: Iterable[AttnShape], **kwargs: object) -> int:
    """The largest :func:`predict_peak_bytes` over ``shapes`` (one attention call runs at a time)."""
    return max((predict_peak_bytes(backend, s, **kwargs) for s in shapes), default=0)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------
# Speed ranking and the choice.

# Relative time per attention call, lower is faster, where memory is not the limit. CPU: ratios to the best
# measured by `python -m lib_optim bench --quick` on a 2-core x86 machine (torch 2.13, fp32; SD1.5 512²,
# 768², SDXL 1024², self-attention, which dominates a step): naive ("none") 3.1-4.0, the math kernel 6.2-6.7,
# sub-quad 3.1-4.2, split as naive when one slice fits (3.2-4.1) and far slower when it slices (14× at
# 768² with 13 GiB free) — so sub-quad ranks ahead of split here; cross-attention is 1.5-2.9 for all.
# CUDA: HOSTS.md §3.1 and the hosts' own priorities (A1111 ranks xformers, then sdp, sdp-no-mem,
# sub-quad and split); the flash/efficient kernels are within a few per cent of each other (not measured
# here: no GPU was lent to this project's sessions yet).
SPEED_TABLE: dict[str, dict[str, float]] = {
    "cpu": {
        "sdp": 1.0,
        "sdp-flash": 1.0,
        "sdp-no-mem": 1.0,
        "xformers": 1.0,
        "none": 3.5,
        "sub-quad": 3.6,
        "split": 3.8,
        # not implemented in lib_optim.attention_impl, so not measured: ranked behind the measured ones
        "v1": 4.0,
        "invokeai": 4.0,
        "sdp-math": 6.4,
    },
    "cuda": {
        "sdp": 1.0,
        "sdp-flash": 1.0,
        "sdp-cudnn": 1.0,
        "xformers": 1.02,
        "sdp-no-mem": 1.05,
        "sdp-efficient": 1.1,
        "sub-quad": 1.8,
        "split": 1.9,
        "invokeai": 2.2,
        "sdp-math": 2.5,
        "none": 2.5,
        "v1": 2.5,
    },
}


@dataclass(frozen=True)
class AutoChoice:
    attention: Attention
    reason: str


@dataclass(frozen=True)
class Candidate:
    name: str
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
) -> list[Candidate]:
    """Every available backend with its speed rank, predicted peak and whether it fits, fastest first.

    ``split`` and ``sub-quad`` size their chunks from the memory they are given (``limit_bytes``), so they
    are predicted with it; split fits only within the hosts' 64 steps.
    """
    table = dict(SPEED_TABLE.get(device, SPEED_TABLE["cuda"]))
    table.update({_name(k): float(v) for k, v in (speed or {}).items()})
    out: list[Candidate] = []
    for backend in available:
        name = _name(backend)
        if name in (Attention.HOST.value, Attention.AUTO.value):
            continue
        peak = predict_model_peak_bytes(
            name,
            shapes,
            dtype_bytes=dtype_bytes,
            device=device,
            free_bytes=limit_bytes,
            threads=threads,
            cpu_pack=cpu_pack,
        )
        fits = limit_bytes is None or peak <= limit_bytes
        if name == Attention.SPLIT.value and limit_bytes is not None:
            fits = fits and all(
                split_steps(s.bh, s.nq, s.nk, dtype_bytes, limit_bytes) <= 64 for s in shapes if s.kind == "self"
            )
        out.append(Candidate(name, table.get(name, 10.0), peak, fits))
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
) -> tuple[str, str]:
    """The backend name ``auto`` picks for these shapes, and why (see :func:`choose_auto_attention`)."""
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
        return best.name, f"{best.name}: {what} predicted to fit (peak {best.peak_bytes / MIB:.0f} MiB; {where})"
    frugal = min(ranked, key=lambda c: (c.peak_bytes, c.speed))
    return frugal.name, (
        f"{frugal.name}: nothing is predicted to fit in {where}; the most frugal backend "
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

    The fastest backend (``SPEED_TABLE[device]``, with ``speed`` — e.g. ``bench`` ratios by backend name —
    overriding entries) whose predicted peak over the model's attention calls at this size
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
    return AutoChoice(Attention(name), reason)
