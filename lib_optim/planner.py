"""Choosing an attention backend for ``auto``.

Issue 4 replaces the preference order below with memory predictions and measured speed; the interface
stays: the available backends in, one backend out, with the reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from lib_optim.settings import Attention

# Fastest first where memory is not the limit (HOSTS.md §3.1: on a CPU run of A1111 v1.10.1 sdp was the
# fastest; on CUDA sdp and xformers use memory-efficient kernels).
_PREFERENCE = (Attention.SDP, Attention.XFORMERS, Attention.SDP_NO_MEM, Attention.SUB_QUAD, Attention.SPLIT)


@dataclass(frozen=True)
class AutoChoice:
    attention: Attention
    reason: str


def choose_auto_attention(
    available: Sequence[Attention],
    *,
    width: int = 512,
    height: int = 512,
    batch: int = 1,
    free_mb: int | None = None,
) -> AutoChoice:
    """Pick the backend ``auto`` stands for from ``available`` (never HOST or AUTO)."""
    for candidate in _PREFERENCE:
        if candidate in available:
            return AutoChoice(candidate, f"{candidate.value}: the fastest available backend")
    concrete = [a for a in available if a not in (Attention.HOST, Attention.AUTO)]
    if not concrete:
        raise ValueError("[Optim] attention: auto found no available backend; allowed: host")
    return AutoChoice(concrete[0], f"{concrete[0].value}: the only available backend")
