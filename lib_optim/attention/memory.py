"""Attention calls of a UNet step and the peak memory of each algorithm: the formulas behind ``auto``.

Plain Python (no torch): the planner runs in the command line and the hosts' UI process before anything is
on the GPU. Each backend of the registry (:mod:`lib_optim.attention.registry`) names one of the ``*_peak`` functions
here as its memory model; :mod:`lib_optim.attention.impl` runs the same algorithms with exactly this memory
behaviour, and ``python -m lib_optim bench`` measures one against the other.

Notation (all in bytes; ``e`` is the element size of the compute dtype, 2 for fp16/bf16, 4 for fp32;
``BH`` = batch·heads):

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
from dataclasses import dataclass

MIB = 1 << 20

# Model families: (latent downsampling levels with attention, their channels, heads-or-dim_head rule,
# context length and dim). SD1.5 has 8 heads everywhere (dim_head = ch/8) and attention at /1, /2, /4
# plus the mid block at /8; SDXL uses dim_head 64 (heads = ch/64) at /2 and /4 (mid block at /4).
_FAMILIES: dict[str, dict[str, object]] = {
    "sd15": {"levels": ((1, 320), (2, 640), (4, 1280), (8, 1280)), "heads": 8, "dim_head": None, "ctx": 768},
    "sdxl": {"levels": ((2, 640), (4, 1280)), "heads": None, "dim_head": 64, "ctx": 2048},
}
FAMILIES = tuple(_FAMILIES)
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


@dataclass(frozen=True)
class MemoryContext:
    """Everything besides the shape that a backend's peak depends on.

    ``free_bytes``: the memory split and sub-quad size their chunks to (the hosts ask the device);
    ``steps``/``q_chunk``/``kv_chunk``/``chunk_threshold``: fix the chunking instead; ``threads``: the CPU
    flash kernel's per-thread blocks; ``cpu_pack``: the CPU repacks K and V for AMX (see :func:`sdp_peak`);
    ``kernel``: force one SDPA kernel (``math``, ``flash``, ``efficient``, ``cudnn``), as the bench does.
    """

    dtype_bytes: int = 2
    device: str = "cuda"
    free_bytes: int | None = None
    threads: int | None = None
    steps: int | None = None
    q_chunk: int = 1024
    kv_chunk: int | None = None
    chunk_threshold: float | None = None
    cpu_pack: bool = False
    kernel: str | None = None


# ---------------------------------------------------------------------------------------------------------
# Chunk parameters, shared with lib_optim.attention.impl so that prediction and execution agree.


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


SPLIT_MAX_STEPS = 64  # the hosts refuse to slice finer (A1111 and Forge raise past it)


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
# Peak memory per algorithm. Each takes the call's shape and the context, and returns bytes.

# The CPU flash kernel's query/key block sizes (aten/src/ATen/native/cpu/FlashAttentionKernel.cpp).
_CPU_FLASH_KV_SPLIT = 512


def _cpu_flash_q_split(nq: int) -> int:
    if nq >= 768:
        return 256
    return 64 if nq >= 192 else 32


def _cpu_flash_packs(bh: int, nq: int, nk: int, q_split: int, threads: int) -> bool:
    """Whether the CPU flash kernel repacks K and V for its AMX matmuls (reduced precision, on a CPU that can:
    see ``cpu_pack`` in :func:`sdp_peak`): only for at least 64 queries and keys, and when each thread's
    matmuls are at least 4× the packing work (``FlashAttentionKernel.cpp``'s ``need_pack``)."""
    if nk < 64 or nq < 64:
        return False
    q_slices = -(-nq // q_split)
    per_thread = -(-(bh * q_slices) // max(1, threads))  # query blocks each thread runs
    return per_thread * q_split >= 4 * bh


def _sizes(shape: AttnShape, e: int) -> tuple[int, int]:
    """(output ``O``, full score matrix ``S(Nq)``) in bytes."""
    return shape.bh * shape.nq * shape.dim_head * e, shape.bh * shape.nq * shape.nk * e


def _sliced(shape: AttnShape, e: int, n: int) -> int:
    """Queries ``n`` at a time into a preallocated output: ``O + S(n) + max(S(n), R(n))``."""
    out, _ = _sizes(shape, e)
    return out + shape.bh * n * shape.nk * e + max(shape.bh * n * shape.nk * e, shape.bh * n * shape.dim_head * e)


def naive_peak(shape: AttnShape, ctx: MemoryContext) -> int:
    """The whole score matrix ``S`` (scaled in place), the softmax ``S``, and the output ``probs·V`` while both
    are still referenced: ``2·S(Nq) + O`` (A1111 "None"/V1, Forge previous' basic attention)."""
    out, full = _sizes(shape, ctx.dtype_bytes)
    return 2 * full + out


def split_peak(shape: AttnShape, ctx: MemoryContext) -> int:
    """Doggettx split attention: the output is allocated first, then per slice of ``n = ceil(Nq/steps)``
    queries the slice's scores and softmax coexist, then ``probs·V`` of the slice:
    ``O + S(n) + max(S(n), R(n))``; ``steps`` from :func:`split_steps` and ``free_bytes``."""
    steps = ctx.steps
    if steps is None:
        free = ctx.free_bytes if ctx.free_bytes is not None else 1 << 62
        steps = split_steps(shape.bh, shape.nq, shape.nk, ctx.dtype_bytes, free)
    return _sliced(shape, ctx.dtype_bytes, math.ceil(shape.nq / max(1, steps)))


def split_fits(shape: AttnShape, ctx: MemoryContext) -> bool:
    """Split attention runs at all: within the hosts' :data:`SPLIT_MAX_STEPS` slices."""
    if ctx.free_bytes is None or shape.kind != "self":
        return True
    return split_steps(shape.bh, shape.nq, shape.nk, ctx.dtype_bytes, ctx.free_bytes) <= SPLIT_MAX_STEPS


def sub_quad_peak(shape: AttnShape, ctx: MemoryContext) -> int:
    """Sub-quadratic attention. All keys in one chunk (``kv_chunk ≥ Nk``, the usual case): like split with
    ``n = q_chunk`` (``O + S(n) + max(S(n), R(n))``), or the naive formula when one query chunk covers Nq.
    Chunked keys (online softmax): per query chunk of ``n`` a score block ``BH·n·kc·e``, the running sum
    ``R(n)`` of weighted values and five ``BH·n`` vectors (running max/sum, block max, new max,
    correction); plus ``O`` when there is more than one query chunk: ``[O] + BH·n·kc·e + R(n) + 5·BH·n·e``."""
    e = ctx.dtype_bytes
    bh, nq, nk, d = shape.bh, shape.nq, shape.nk, shape.dim_head
    qc, kc = sub_quad_chunks(
        bh,
        nq,
        nk,
        d,
        e,
        q_chunk=ctx.q_chunk,
        kv_chunk=ctx.kv_chunk,
        chunk_threshold=ctx.chunk_threshold,
        free_bytes=ctx.free_bytes,
    )
    if kc >= nk:
        return naive_peak(shape, ctx) if nq <= qc else _sliced(shape, e, qc)
    out, _ = _sizes(shape, e)
    return (out if nq > qc else 0) + bh * qc * kc * e + bh * qc * d * e + 5 * bh * qc * e


def lse_peak(shape: AttnShape, ctx: MemoryContext) -> int:
    """Fused O(N) kernels that keep their tiles on chip (CUDA flash / memory-efficient / cuDNN SDPA,
    xformers): ``O`` + the fp32 log-sum-exp ``BH·Nq·4`` (xformers pads Nq to 32). Their small workspaces are
    not modelled (not measured: no GPU in CI)."""
    out, _ = _sizes(shape, ctx.dtype_bytes)
    return out + shape.bh * (-(-shape.nq // 32) * 32) * 4


def sdp_kernel(device: str, dtype_bytes: int, *, flash_and_math_only: bool = False) -> str:
    """Which SDPA kernel torch runs (what the memory depends on). CPU: 4-D float inputs go to the CPU flash
    kernel. CUDA: flash for fp16/bf16, the memory-efficient kernel for fp32 (both O(N)); with only flash and
    math allowed (A1111's ``sdp-no-mem``) fp32 falls back to math, where flash does not run."""
    if device == "cpu":
        return "flash"
    if flash_and_math_only:
        return "flash" if dtype_bytes == 2 else "math"
    return "flash" if dtype_bytes == 2 else "efficient"


def _sdp_kernel_peak(kernel: str, shape: AttnShape, ctx: MemoryContext) -> int:
    """- ``math`` (also SDPA on 3-D input): scores ``S``, ``_safe_softmax``'s output ``S`` and its all-``-inf``
      row mask (1 byte per score) while the output is being written; then ``probs·V`` and a copy into the
      output layout: ``max(2·S + S/e + O, S + 2·O)``. Measured on CPU (torch 2.13) to within 1 %.
    - ``flash`` on CPU: ``O`` + the log-sum-exp ``BH·Nq·4`` + per-thread blocks of ``q_split × kv_split``
      scores plus row max, row sum and a ``q_split × d`` accumulator, in fp32 (plus a reduced-precision copy
      of the score block for fp16/bf16): ``q_split`` = 256/64/32 for Nq ≥ 768/192/less, ``kv_split`` = 512,
      clamped to the token counts. With ``cpu_pack`` (a CPU whose AMX unit takes this 2-byte dtype: AMX-BF16
      for bf16, AMX-FP16 for fp16) and enough work to pay for it (:func:`_cpu_flash_packs`), the kernel
      first repacks K and V: ``+ BH·Nk·d'·e`` (K, ``d'`` = d rounded up to even) ``+ BH·Nk'·d·e`` (V, each
      key block rounded up to even) ``+ threads·kv_split·d·e`` (a transpose buffer). Measured on CPU (torch
      2.13, fp32/fp16/bf16, AMX-BF16) to within 0.3 MiB.
    - the CUDA kernels: :func:`lse_peak` without the padding."""
    e = ctx.dtype_bytes
    bh, nq, nk, d = shape.bh, shape.nq, shape.nk, shape.dim_head
    out, full = _sizes(shape, e)
    lse = bh * nq * 4
    if kernel == "math":
        return max(2 * full + full // e + out, full + 2 * out)
    if ctx.device == "cpu" and kernel == "flash":
        qs, ks = min(_cpu_flash_q_split(nq), nq), min(_CPU_FLASH_KV_SPLIT, nk)
        n_threads = ctx.threads or os.cpu_count() or 1
        per_thread = (qs * ks + 2 * qs + qs * d) * 4 + (qs * ks * e if e < 4 else 0)
        packed = 0
        if ctx.cpu_pack and e == 2 and _cpu_flash_packs(bh, nq, nk, qs, n_threads):
            tail = (nk - 1) % ks + 1
            v_rows = (nk - 1) // ks * (ks + ks % 2) + tail + tail % 2
            packed = bh * nk * (d + d % 2) * e + bh * v_rows * d * e + n_threads * ks * d * e
        return out + lse + n_threads * per_thread + packed
    return out + lse


def sdp_peak(shape: AttnShape, ctx: MemoryContext) -> int:
    """torch's ``scaled_dot_product_attention`` with the kernel torch picks (or ``ctx.kernel``)."""
    return _sdp_kernel_peak(ctx.kernel or sdp_kernel(ctx.device, ctx.dtype_bytes), shape, ctx)


def sdp_no_mem_peak(shape: AttnShape, ctx: MemoryContext) -> int:
    """A1111's ``sdp-no-mem``: SDPA with the memory-efficient kernel disabled (flash and math only)."""
    kernel = ctx.kernel or sdp_kernel(ctx.device, ctx.dtype_bytes, flash_and_math_only=True)
    return _sdp_kernel_peak(kernel, shape, ctx)
