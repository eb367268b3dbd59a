"""Out-of-memory fallback: recognise an OOM and plan the one retry with more frugal settings.

The policy is "retry that generation once with the next more frugal setting", so :func:`next_frugal`
puts everything that still applies into a single step — a retry that changes only the attention and then
fails again would be a wasted generation. The caller retries once and never loops.

The ladder, all applied together where they apply:

0. compile off, first: compile (``on``, ``max-autotune``, or ``auto``, which may decide to compile) adds its own
   buffers and workspace (+0.5–4 GB by mode, :data:`lib_optim.compile.auto.COMPILE_EXTRA_MB`), and an eager
   retry needs none of it;
1. attention → the most frugal backend that is available and more frugal than the one in use (the
   registry's ``frugal_rank``: sub-quad, the smallest attention footprint, then split);
2. the VAE tiled (``vae_tiling=on``) where the host supports it, tiling is not already on and the tiled decode
   is predicted to fit; else the VAE on the CPU (the decode of a large image is the usual last-moment OOM,
   and tiling keeps it on the GPU: faster than the CPU);
3. Forge only: more *inference memory*. Our ``inference_memory_mb`` is Forge's memory **reserved for
   computation** (``memory_management.current_inference_memory``); Forge keeps that much free by
   offloading weights, so raising it means fewer weights on the GPU — what the issue calls "lower
   inference memory" (Forge's "GPU Weights" slider goes down as this goes up). The frugal direction of
   our field is therefore up.

"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from lib_optim.attention import Attention, frugal_order
from lib_optim.log import get_logger
from lib_optim.settings import INFERENCE_MEMORY_MAX_MB, Compile, GenerationSettings, Tri, VaeTiling
from lib_optim.telemetry import is_out_of_memory

log = get_logger(__name__)

# Forge's own default for memory_management.current_inference_memory (1024 MB), used when neither the
# settings nor the caller say what was in effect.
FORGE_DEFAULT_INFERENCE_MEMORY_MB = 1024
# The retry reserves at least this much: below it a 1024×1024 SDXL decode does not fit on its own.
MIN_RETRY_INFERENCE_MEMORY_MB = 2048


@dataclass(frozen=True)
class FallbackStep:
    """The settings for the one retry, why, and what changed (``name=value``, infotext style)."""

    settings: GenerationSettings
    reason: str
    changes: tuple[str, ...] = ()


def next_frugal(
    settings: GenerationSettings,
    *,
    available: Sequence[Attention],
    supports_inference_memory: bool,
    current_attention: Attention | None,
    current_inference_memory_mb: int | None = None,
    total_memory_mb: int | None = None,
    supports_vae_tiling: bool = False,
    tiled_vae_fits: bool | None = None,
) -> FallbackStep | None:
    """The next more frugal settings after an OOM with ``settings``, or None when nothing is left.

    ``available``: attention backends usable right now. ``current_attention``: the backend the failed
    generation actually ran with (what ``host``/``auto`` resolved to); None = unknown.
    ``current_inference_memory_mb``: Forge's inference memory in effect (the adapter's effective state);
    None = the settings' value, else Forge's default. ``total_memory_mb``: the GPU's size, which caps the
    raise (reserving more than the card has changes nothing further). ``supports_vae_tiling``: the host can
    apply ``vae_tiling``; ``tiled_vae_fits``: the tiled decode is predicted to fit (None = unknown: tried).
    The result is always enabled and always differs from ``settings``.
    """
    # Disabled settings were not in effect: the failed generation ran with the host's own settings.
    base = settings if settings.enabled else GenerationSettings(enabled=True)
    changes: dict[str, Any] = {}
    said: list[str] = []

    if base.compile is not Compile.OFF:
        changes["compile"] = Compile.OFF
        said.append("compile off")

    attention = _frugal_attention(base, available, current_attention)
    if attention is not None:
        changes["attention"] = attention
        said.append(f"{attention.value} attention")

    tiling_tried = base.vae_tiling in (VaeTiling.ON, VaeTiling.AUTO)
    if supports_vae_tiling and not tiling_tried and tiled_vae_fits is not False:
        changes["vae_tiling"] = VaeTiling.ON
        said.append("the VAE tiled")
    elif base.vae_on_cpu is not Tri.ON:
        changes["vae_on_cpu"] = Tri.ON
        said.append("the VAE on the CPU")

    if supports_inference_memory:
        memory = _more_inference_memory(base, current_inference_memory_mb, total_memory_mb)
        if memory is not None:
            changes["inference_memory_mb"] = memory
            said.append(f"{memory} MB inference memory (fewer weights on the GPU)")

    if not changes:
        log.debug("no more frugal settings than %s", base)
        return None
    new = replace(base, **changes)
    listed = tuple(f"{name}={_value_text(value)}" for name, value in changes.items())
    return FallbackStep(new, "out of memory: retrying once with " + _join(said), listed)


def _frugal_attention(
    base: GenerationSettings, available: Sequence[Attention], current: Attention | None
) -> Attention | None:
    # host/auto say nothing about what ran; the caller's ``current`` does.
    in_use = current if current is not None else base.attention
    order = frugal_order()
    in_use_rank = order.index(in_use) if in_use in order else len(order)
    target = next((a for a in order[:in_use_rank] if a in available), None)
    # The settings may already ask for it (the adapter could not apply it): asking again changes nothing.
    return None if target is None or target is base.attention else target


def _more_inference_memory(base: GenerationSettings, current: int | None, total: int | None) -> int | None:
    in_effect = current or base.inference_memory_mb or FORGE_DEFAULT_INFERENCE_MEMORY_MB
    cap = min(INFERENCE_MEMORY_MAX_MB, total) if total else INFERENCE_MEMORY_MAX_MB
    wanted = min(max(in_effect * 2, MIN_RETRY_INFERENCE_MEMORY_MB), cap)
    if wanted <= in_effect or wanted == base.inference_memory_mb:
        return None
    return wanted


def _value_text(value: object) -> str:
    return str(value.value) if isinstance(value, (Attention, Compile, Tri, VaeTiling)) else str(value)


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def infotext_note(step: FallbackStep) -> str:
    """``retried after out of memory: attention=sub-quad, vae_on_cpu=on`` for the generation's infotext."""
    return "retried after out of memory: " + ", ".join(step.changes)


__all__ = [
    "FORGE_DEFAULT_INFERENCE_MEMORY_MB",
    "FallbackStep",
    "infotext_note",
    "is_out_of_memory",
    "next_frugal",
]
