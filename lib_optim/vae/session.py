"""Tiled VAE for one generation: what every host adapter calls from its ``apply_vae_tiling``, and whether the tiled
decode will fit (the out-of-memory retry asks). torch loads on first use: importing this stays cheap."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from lib_optim.adapter import Session
from lib_optim.attention import Attention
from lib_optim.log import get_logger
from lib_optim.patching import patched_attr
from lib_optim.settings import VaeTiling
from lib_optim.vae import planner as vae_planner

log = get_logger(__name__)


def tile_vae(session: Session, first_stage_model: Any) -> None:
    """Tiled VAE for this generation, shared by every adapter: the ``decoder``/``encoder`` of
    ``first_stage_model`` (the ldm/sgm layout all four hosts use, docs/hosts.md §5.6) get
    :func:`lib_optim.vae.tiling.tiling_forward` as an instance ``forward`` — ``on``: always tiled, ``auto``: tiled
    exactly when :func:`lib_optim.vae.planner.needs_tiling` says the whole image will not fit in free memory
    (:func:`lib_optim.attention.free_memory_bytes`) — removed again when the session's restorer closes. Every
    decode/encode is reported to ``session.data["vae_tiling_events"]`` (the infotext and telemetry read it)."""
    from lib_optim.attention import free_memory_bytes
    from lib_optim.vae import tiling as vae_tiling

    mode = session.settings.vae_tiling
    if mode not in (VaeTiling.ON, VaeTiling.AUTO):
        return
    if first_stage_model is None:
        session.data["vae_tiling_unavailable"] = "no VAE loaded"
        log.warning("vae_tiling: no VAE loaded; nothing changed")
        return
    events: list[Any] = session.data.setdefault("vae_tiling_events", [])
    max_tile = vae_max_tile()
    # The VAE's attention block follows the UNet's choice on every host (docs/hosts.md §3): the memory-efficient
    # kernels hold no positions × positions matrix, the others do (lib_optim.vae.planner's "math").
    efficient = session.attention_used in (Attention.SDP.value, Attention.XFORMERS.value)
    patched = []
    for part in ("decoder", "encoder"):
        module = getattr(first_stage_model, part, None)
        if module is None:
            continue
        try:
            forward = vae_tiling.tiling_forward(
                module,
                part,
                module.forward,
                free_bytes=free_memory_bytes,
                always=mode is VaeTiling.ON,
                attention="sdpa" if efficient else "math",
                report=events.append,
                max_tile=max_tile,
            )
        except (TypeError, ValueError) as exc:  # a VAE of another layout (not SD/SDXL): left as it is
            session.data["vae_tiling_unavailable"] = str(exc).removeprefix("[Optim] ")
            log.warning("vae_tiling: %s; the %s runs untiled", session.data["vae_tiling_unavailable"], part)
            continue
        session.restorer.enter(patched_attr(module, "forward", forward))
        patched.append(part)
    if patched:
        session.restorer.notes.append(f"VAE {'/'.join(patched)} tiling {mode.value}")


def tiled_vae_fits(request: Mapping[str, Any], free_bytes: int) -> bool:
    """Whether the decode of the image ``request`` describes (:func:`lib_optim.hosts.base.auto_attention_request`'s
    ``width``/``height``/``dtype_bytes``/``device``), in the smallest tiles, fits in ``free_bytes``."""
    height, width = request["height"] // 8 * 8, request["width"] // 8 * 8
    need = vae_planner.predict_tiled_peak_bytes(
        max(8, height),
        max(8, width),
        tile=32,
        overlap=8,
        dtype_bytes=request["dtype_bytes"],
        device=request["device"],
    )
    return need <= free_bytes


VAE_MAX_TILE_ENV = "OPTIM_VAE_MAX_TILE"
VAE_TILE_RANGE = (32, 256)  # at least twice the overlap (lib_optim.vae.tiling.MODULE_OVERLAP)


def vae_max_tile(environ: Mapping[str, str] | None = None) -> int:
    """The largest VAE tile in latent pixels (8 image pixels each): ``OPTIM_VAE_MAX_TILE`` when set to a multiple of
    8 from 32 to 256, else 256 (the tile is chosen from free memory below that). A bad value is reported and
    ignored: it must not fail a generation."""
    raw = (os.environ if environ is None else environ).get(VAE_MAX_TILE_ENV, "").strip()
    low, high = VAE_TILE_RANGE
    if not raw:
        return high
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value % 8 or not low <= value <= high:
        log.warning(
            "%s: %r is not allowed; allowed: a multiple of 8 from %d to %d (latent pixels); using %d",
            VAE_MAX_TILE_ENV,
            raw,
            low,
            high,
            high,
        )
        return high
    return value
