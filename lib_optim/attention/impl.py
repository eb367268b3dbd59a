"""Our own implementations of the attention algorithms the hosts use, for use outside a WebUI.

The benchmark (:mod:`lib_optim.bench.attention`) times these side by side and the planner
(:mod:`lib_optim.attention.planner`)
predicts their memory, so each function here is written to have exactly the memory behaviour the
planner's formulas describe. They re-implement the *algorithms* of A1111 v1.10.1
(``modules/sd_hijack_optimizations.py``, ``modules/sub_quadratic_attention.py``) and Forge
(``backend/attention.py``); no host code is imported or copied.

Layout: every function takes ``q``, ``k``, ``v`` as ``(batch*heads, tokens, dim_head)`` — the layout the
hosts' split and sub-quadratic paths work in — and returns ``(batch*heads, q_tokens, dim_head)`` in the
input dtype. The result of :func:`sdp` and :func:`sdp_variant` may be a non-contiguous view (the CPU
flash kernel writes ``(B, N, H, d)`` and returns it transposed); call ``.contiguous()`` if that matters.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from lib_optim.attention import registry
from lib_optim.attention.memory import SPLIT_MAX_STEPS, split_steps, sub_quad_chunks
from lib_optim.attention.registry import Attention
from lib_optim.log import get_logger

log = get_logger(__name__)

AttnFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

# The SDPA kernels torch.nn.attention.sdpa_kernel can pin, by our name.
SDP_KERNELS = ("math", "flash", "efficient", "cudnn")


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    if q.dim() != 3 or k.dim() != 3 or v.dim() != 3:
        raise ValueError("[Optim] attention: q, k, v must be (batch*heads, tokens, dim_head)")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2] != k.shape[2]:
        raise ValueError(f"[Optim] attention: shapes do not match: q {tuple(q.shape)}, k {tuple(k.shape)}")


def free_memory_bytes(device: torch.device | str) -> int:
    """What the hosts call free memory: CUDA free + torch's reserved-but-unused; on CPU, MemAvailable."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        # Memory torch has reserved but not handed out is free to the next tensor, as A1111 counts it.
        return int(free + torch.cuda.memory_reserved(dev) - torch.cuda.memory_allocated(dev))
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 8 << 30  # no way to ask: assume a modest machine rather than an unlimited one


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(Q·Kᵀ/√d)·V with the whole score matrix: the reference, and A1111's "None" (CompVis)."""
    _check(q, k, v)
    scores = torch.bmm(q, k.transpose(1, 2)).mul_(q.shape[-1] ** -0.5)  # in place: one score matrix, not two
    return torch.bmm(scores.softmax(dim=-1), v)


def sdp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """torch's scaled_dot_product_attention, letting torch pick the kernel.

    Called on ``(1, B·H, N, d)``: torch only takes its fused kernels (the CPU flash kernel included) for
    4-D inputs; a 3-D call runs the math kernel, with the full score matrix.
    """
    _check(q, k, v)
    return F.scaled_dot_product_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)).squeeze(0)


def _sdp_backend(kernel: str) -> object:
    from torch.nn.attention import SDPBackend

    names = {
        "math": "MATH",
        "flash": "FLASH_ATTENTION",
        "efficient": "EFFICIENT_ATTENTION",
        "cudnn": "CUDNN_ATTENTION",
    }
    if kernel not in names:
        raise ValueError(f"[Optim] attention: unknown SDPA kernel {kernel!r}; allowed: {', '.join(SDP_KERNELS)}")
    return getattr(SDPBackend, names[kernel])


def sdp_variant(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kernel: str) -> torch.Tensor:
    """:func:`sdp` with one SDPA kernel forced (``math``, ``flash``, ``efficient`` or ``cudnn``)."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_sdp_backend(kernel)]):  # type: ignore[list-item]
        return sdp(q, k, v)


@cache
def sdp_kernel_works(kernel: str, device: str, dtype: torch.dtype, dim_head: int) -> bool:
    """Whether torch runs ``kernel`` for this device, dtype and head size (tried once on a tiny input)."""
    try:
        t = torch.zeros(2, 8, dim_head, device=device, dtype=dtype)
        sdp_variant(t, t, t, kernel)
    except (RuntimeError, ValueError, ImportError, AttributeError):
        return False
    return True


def cpu_packs(dtype: torch.dtype) -> bool:
    """Whether torch's CPU flash kernel repacks K and V for this dtype on this CPU (the planner's ``cpu_pack``):
    bf16 on a CPU with AMX tiles (AMX-BF16: Sapphire Rapids and later), fp16 with AMX-FP16 — the CPUs
    ``at::native::cpublas::could_pack`` accepts. fp32 never."""
    probe = {
        torch.bfloat16: "_is_amx_tile_supported",
        torch.float16: "_is_amx_fp16_supported",
    }.get(dtype)
    check = getattr(torch.cpu, probe, None) if probe else None
    return bool(check()) if callable(check) else False


def split(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    steps: int | None = None,
    free_bytes: int | None = None,
) -> torch.Tensor:
    """Doggettx split attention: full-width score rows for a slice of the queries at a time.

    The number of slices ``steps`` comes from free memory exactly as the hosts choose it
    (:func:`lib_optim.attention.memory.split_steps`: the full score matrix times 2.5 (fp32) or 3 (fp16) against
    ``free_bytes``, rounded up to a power of two, at most 64); pass ``steps`` to fix it. Slices are
    ``ceil(Nq / steps)`` queries (the last one shorter) — A1111 uses ``Nq // steps`` and Forge falls back
    to one slice when ``steps`` does not divide ``Nq``; ceil keeps the slice count at ``steps``.
    """
    _check(q, k, v)
    bh, nq, d = q.shape
    nk = k.shape[1]
    if steps is None:
        free = free_memory_bytes(q.device) if free_bytes is None else free_bytes
        steps = split_steps(bh, nq, nk, q.element_size(), free)
        if steps > SPLIT_MAX_STEPS:  # the hosts' limit: past it the slices are too thin to be worth running
            raise MemoryError(
                f"[Optim] split attention needs {steps} slices (more than {SPLIT_MAX_STEPS}) in {free} bytes"
            )
    size = math.ceil(nq / max(1, steps))
    # zeros, as the hosts allocate it: the whole output is resident from the start (an empty tensor's
    # pages would only be touched slice by slice, and the peak would depend on where it fell).
    scale = d**-0.5
    out = torch.zeros(bh, nq, v.shape[2], device=q.device, dtype=q.dtype)
    kt = k.transpose(1, 2)
    for start in range(0, nq, size):
        end = min(start + size, nq)
        scores = torch.bmm(q[:, start:end], kt).mul_(scale)
        probs = scores.softmax(dim=-1)  # the slice's scores and probabilities coexist here: the peak
        del scores
        out[:, start:end] = torch.bmm(probs, v)
        del probs
    return out


def sub_quad(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_chunk: int = 1024,
    kv_chunk: int | None = None,
    chunk_threshold: float | None = None,
    *,
    kv_chunk_min: int | None = None,
    free_bytes: int | None = None,
) -> torch.Tensor:
    """Sub-quadratic attention (Rabe & Staats, arXiv:2112.05682): chunked online softmax.

    Queries go ``q_chunk`` at a time; within a query chunk the keys go ``kv_chunk`` at a time, keeping a
    running maximum, a running sum of exponentials and a running weighted sum of values, rescaled when the
    maximum grows — so only a ``(B·H, q_chunk, kv_chunk)`` score block exists at once.

    Chunk sizes follow A1111's ``sub_quad_attention`` (:func:`lib_optim.attention.memory.sub_quad_chunks`):
    ``kv_chunk`` defaults to √Nk; ``chunk_threshold`` is a percentage of free memory (``None``: 70 %,
    ``0``: no threshold) — when the whole Q·Kᵀ fits under it, all keys go in one chunk (the no-chunk fast
    path: plain softmax per query chunk, no running statistics).
    """
    _check(q, k, v)
    bh, nq, d = q.shape
    nk = k.shape[1]
    free = None
    if chunk_threshold != 0:
        free = free_memory_bytes(q.device) if free_bytes is None else free_bytes
    qc, kc = sub_quad_chunks(
        bh,
        nq,
        nk,
        d,
        q.element_size(),
        q_chunk=q_chunk,
        kv_chunk=kv_chunk,
        kv_chunk_min=kv_chunk_min,
        chunk_threshold=chunk_threshold,
        free_bytes=free,
    )
    scale = d**-0.5
    kt = k.transpose(1, 2)
    if kc >= nk:
        if nq <= qc:
            return naive(q, k, v)
        out = torch.zeros(bh, nq, v.shape[2], device=q.device, dtype=q.dtype)
        for start in range(0, nq, qc):
            end = min(start + qc, nq)
            probs = torch.bmm(q[:, start:end], kt).mul_(scale).softmax(dim=-1)
            out[:, start:end] = torch.bmm(probs, v)
            del probs
        return out

    if nq <= qc:
        return _online_chunk(q, kt, v, kc, scale)
    out = torch.zeros(bh, nq, v.shape[2], device=q.device, dtype=q.dtype)
    for start in range(0, nq, qc):
        end = min(start + qc, nq)
        out[:, start:end] = _online_chunk(q[:, start:end], kt, v, kc, scale)
    return out


def _online_chunk(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, kc: int, scale: float) -> torch.Tensor:
    """One query chunk against all keys, ``kc`` keys at a time, with the running softmax statistics."""
    bh, n, _ = q.shape
    nk = kt.shape[2]
    acc = torch.zeros(bh, n, v.shape[2], device=q.device, dtype=q.dtype)
    run_max = torch.full((bh, n, 1), -math.inf, device=q.device, dtype=q.dtype)
    run_sum = torch.zeros(bh, n, 1, device=q.device, dtype=q.dtype)
    for start in range(0, nk, kc):
        end = min(start + kc, nk)
        block = torch.bmm(q, kt[:, :, start:end]).mul_(scale)
        new_max = torch.maximum(run_max, block.amax(dim=-1, keepdim=True))
        block.sub_(new_max).exp_()  # in place: the score block is the only (n × kc) tensor alive
        correction = torch.exp(run_max - new_max)  # rescales what was summed under the old maximum
        run_sum.mul_(correction).add_(block.sum(dim=-1, keepdim=True))
        acc.mul_(correction).baddbmm_(block, v[:, start:end])
        run_max = new_max
        del block
    return acc.div_(run_sum)


def sdp_no_mem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """A1111's ``sdp-no-mem``: SDPA with the memory-efficient kernel disabled (flash and math only)."""
    from torch.nn.attention import sdpa_kernel

    with sdpa_kernel([_sdp_backend("flash"), _sdp_backend("math")]):  # type: ignore[list-item]
        return sdp(q, k, v)


def xformers_unavailable_reason(device: str) -> str:
    """ "" when xformers' kernels can run on ``device``, else why and what to do."""
    if device != "cuda":
        return "xformers has CUDA kernels only"
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - a broken xformers build raises anything on import
        return f"xformers does not import ({type(exc).__name__}); pip install the xformers build that matches torch"
    return ""


def xformers(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """xformers' memory-efficient attention (raises ImportError when xformers is not importable)."""
    import xformers.ops as xops

    _check(q, k, v)
    return xops.memory_efficient_attention(q.contiguous(), k.contiguous(), v.contiguous())


def available_backends(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[Attention, AttnFn]:
    """The registered algorithms that have an implementation here and can run on this device
    (:meth:`lib_optim.attention.registry.AttentionBackend.unavailable_reason`), by name."""
    dev = str(torch.device(device).type)
    out: dict[Attention, AttnFn] = {}
    for entry in registry.algorithms():
        fn = entry.implementation_fn()
        if fn is None:
            continue
        reason = entry.unavailable_reason(dev)
        if reason:
            log.debug("%s does not run on %s: %s", entry.name.value, dev, reason)
            continue
        out[entry.name] = fn
    return out


def sdp_kernels(device: torch.device | str, dtype: torch.dtype = torch.float32) -> dict[str, AttnFn]:
    """Each SDPA kernel (``math``, ``flash``, ``efficient``, ``cudnn``) torch runs on this device and dtype,
    forced one at a time — for comparing them with the backends."""
    dev = str(torch.device(device).type)
    out: dict[str, AttnFn] = {}
    for kernel in SDP_KERNELS:
        if sdp_kernel_works(kernel, dev, dtype, 64):

            def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, _kernel: str = kernel) -> torch.Tensor:
                return sdp_variant(q, k, v, _kernel)

            out[kernel] = run
        else:
            log.debug("SDPA kernel %s does not run on %s/%s", kernel, dev, dtype)
    return out
