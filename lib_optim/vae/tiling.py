"""Tiled VAE decode and encode: the image is processed in overlapping tiles, so the VAE's largest activations
are a tile's, not the whole image's.

Two levels:

- **module** (:func:`tiled_decoder`/:func:`tiled_decode_vae`, :func:`tiled_encoder`/:func:`tiled_encode_vae`):
  walks an SD VAE decoder/encoder itself, layer by layer, calling its modules (the ldm/sgm layout, which Forge
  and :mod:`lib_optim.vae.model` share: ``conv_in``, ``mid.block_1/attn_1/block_2``, ``up[i].block[j]``,
  ``up[i].upsample.conv``, ``norm_out``, ``conv_out``; the encoder's ``down[i]`` and ``downsample.conv``).
  The mid block, with its attention over all positions, runs on the whole latent (1/64 of the pixels); only the
  full-resolution part is tiled, and its GroupNorms use the statistics of the whole image (``norm="exact"``):
  every tile runs to the next GroupNorm, reports the moments of the region it owns, and all continue with the
  pooled statistics. With a margin of 8 latent pixels the result is the untiled one to rounding (measured:
  110-120 dB PSNR; the receptive field is wider, but its edge contributes almost nothing). The tiles are
  joined by cutting in the middle of their overlap. While one tile runs, the others wait holding their current
  activations — parked in CPU memory when decoding on a GPU (``park="auto"``), so the GPU holds about one
  tile. This executor is also leaner than the hosts' blocks (in-place SiLU, normalization and residual add,
  the 2× upsampling in bands): untiled, it needs about half of A1111's peak.
- **callable** (:func:`tiled_decode`, :func:`tiled_encode`): any function from latent to image (or back) on
  overlapping tiles whose outputs are blended with linear ramps. Works with any VAE, but each tile normalizes
  with its own statistics and its mid-block attention sees only the tile: tiles drift apart (measured on the
  random-weight SD VAE at 1024²: 39 dB on a noise latent, 18 dB on a smooth one). A fallback.

``norm="tile"`` gives the module level the callable level's per-tile statistics (faster: no waiting, no
parking; 42 dB / 19 dB in the same measurement) — for comparison.

Both levels assemble into one preallocated output; the tiles' outputs are dropped as soon as they are added.
Sizes: ``tile`` and ``overlap`` are in latent pixels (8 image pixels each). Tiles are all ``tile`` wide (the last
is moved back, not shrunk), spaced evenly with at least ``overlap`` in common; an image no larger than one tile
is processed in one piece (at the callable level: the plain call).

This module holds both levels' entry points and the choice of tile; the tile grid and the argument checks are in
:mod:`lib_optim.vae.tiles`, the module level's walk over the layers in :mod:`lib_optim.vae.walk`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lib_optim.log import get_logger
from lib_optim.vae import planner as vae_planner
from lib_optim.vae.tiles import (
    CALLABLE_OVERLAP,
    DEFAULT_NORM,
    MODULE_OVERLAP,
    NORM_MODES,
    SCALE,
    AxisTile,
    Tile,
    _Canvas,
    _check_sizes,
    _checked_overlap,
    _pixel_span,
    check_layout,
    tile_axis,
    tile_grid,
)
from lib_optim.vae.walk import (
    UPSAMPLE_BANDS,
    _assemble,
    _core_window,
    _decoder_up,
    _encoder_down,
    _mid,
    _park_device,
    _Program,
    _silu_,
    _TileState,
)

log = get_logger(__name__)


# ---------------------------------------------------------------------------------------------------------
# Callable level.


def tiled_decode(
    decode: Callable[[torch.Tensor], torch.Tensor],
    z: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int = CALLABLE_OVERLAP,
    blend: float = 1.0,
) -> torch.Tensor:
    """``decode`` maps a latent ``(B, C, h, w)`` to an image ``(B, 3, 8h, 8w)``; run it on overlapping tiles
    of ``z`` and blend them (linear ramps across the overlap). Output dtype and device are the decode's."""
    _check_sizes(tile, overlap, blend)
    if z.dim() != 4:
        raise ValueError(
            f"[Optim] VAE tiling z: shape {tuple(z.shape)} is not allowed; allowed: (batch, channels, h, w)"
        )
    h, w = z.shape[2:]
    grid = tile_grid(h, w, tile, overlap, blend)
    if len(grid) == 1:
        return decode(z)
    canvas = _Canvas(h, w, SCALE)
    for t in grid:
        canvas.add(t, decode(z[:, :, t.y.start : t.y.end, t.x.start : t.x.end]))
    return canvas.result()


def tiled_encode(
    encode: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int = CALLABLE_OVERLAP,
    blend: float = 1.0,
) -> torch.Tensor:
    """``encode`` maps an image ``(B, 3, H, W)`` to a latent ``(B, C, H//8, W//8)`` (C = 8 moments for SD's
    encoder + ``quant_conv``, or 4); run it on overlapping tiles (``tile``/``overlap`` in latent pixels) and
    blend them. Pixels past the last multiple of 8 go with the last tile, as the untiled encoder sees them."""
    _check_sizes(tile, overlap, blend)
    if x.dim() != 4 or x.shape[2] < SCALE or x.shape[3] < SCALE:
        raise ValueError(f"[Optim] VAE tiling x: shape {tuple(x.shape)} is not allowed; allowed: (batch, 3, H≥8, W≥8)")
    height, width = x.shape[2:]
    grid = tile_grid(height // SCALE, width // SCALE, tile, overlap, blend)
    if len(grid) == 1:
        return encode(x)
    canvas = _Canvas(height // SCALE, width // SCALE, 1)
    for t in grid:
        (y0, y1), (x0, x1) = _pixel_span(t.y, height), _pixel_span(t.x, width)
        canvas.add(t, encode(x[:, :, y0:y1, x0:x1]))
    return canvas.result()


@torch.no_grad()  # inference only: the in-place steps would break autograd, and graphs cost memory
def tiled_decoder(
    decoder: Any,
    h: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int | None = None,
    norm: str = DEFAULT_NORM,
    park: str | torch.device | None = "auto",
    blend: float = 0.0,
) -> torch.Tensor:
    """Run an SD VAE ``decoder`` (ldm/sgm/Forge ``Decoder``, or :mod:`lib_optim.vae.model`'s) on ``h`` — its input,
    the latent after ``post_quant_conv``, ``(B, 4, h, w)`` — in tiles after the mid block; returns the image
    ``(B, 3, 8h, 8w)``, what ``decoder(h)`` returns.

    ``overlap`` (latent pixels): default :data:`MODULE_OVERLAP` (at most half the tile); the tiles are cut in the
    middle of each overlap (``blend=0``), and with ``norm="exact"`` the result is the untiled one to rounding.
    ``park``: where tiles waiting for statistics keep their activations; "auto" = CPU memory when decoding on a
    GPU (so GPU memory holds about one tile), none on CPU."""
    overlap = _checked_overlap(tile, overlap, norm, blend)
    check_layout(decoder, "decoder")
    rows, cols = h.shape[2:]
    grid = tile_grid(rows, cols, tile, overlap, blend)
    mid = _mid(decoder.mid, decoder.conv_in(h))
    del h
    exact = norm == "exact"
    parked = _park_device(park, mid.device) if len(grid) > 1 else None  # one piece waits for nobody

    def program(t: Tile) -> _Program:
        crop = mid[:, :, t.y.start : t.y.end, t.x.start : t.x.end]
        return _decoder_up(decoder, _TileState(crop, _core_window(t, 1, rows, cols), exact, parked))

    log.debug(
        "tiled decode %s: %d tile(s) of %d, overlap %d, norm %s, parked on %s",
        tuple(mid.shape),
        len(grid),
        tile,
        overlap,
        norm,
        parked,
    )
    return _assemble(grid, program, rows, cols, SCALE, exact)


def tiled_decode_vae(vae: Any, z: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """``vae.decode(z)`` for an SD ``AutoencoderKL``: ``post_quant_conv`` (if it has one), then
    :func:`tiled_decoder` on ``vae.decoder`` with ``kwargs``."""
    pqc = getattr(vae, "post_quant_conv", None)
    return tiled_decoder(vae.decoder, pqc(z) if pqc is not None else z, **kwargs)


@torch.no_grad()  # inference only: the in-place steps would break autograd, and graphs cost memory
def tiled_encoder(
    encoder: Any,
    x: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int | None = None,
    norm: str = DEFAULT_NORM,
    park: str | torch.device | None = "auto",
    blend: float = 0.0,
) -> torch.Tensor:
    """Run an SD VAE ``encoder`` on the image ``x`` ``(B, 3, H, W)`` in [-1, 1], tiled up to its mid block (the
    mid block, ``norm_out`` and ``conv_out`` run on the whole latent); returns what ``encoder(x)`` returns,
    ``(B, 8, H//8, W//8)`` (before ``quant_conv``). ``tile``/``overlap`` in latent pixels; see
    :func:`tiled_decoder` for ``norm``, ``park`` and ``blend``."""
    overlap = _checked_overlap(tile, overlap, norm, blend)
    if x.dim() != 4 or x.shape[2] < SCALE or x.shape[3] < SCALE:
        raise ValueError(f"[Optim] VAE tiling x: shape {tuple(x.shape)} is not allowed; allowed: (batch, 3, H≥8, W≥8)")
    check_layout(encoder, "encoder")
    height, width = x.shape[2:]
    rows, cols = height // SCALE, width // SCALE
    grid = tile_grid(rows, cols, tile, overlap, blend)
    exact = norm == "exact"
    parked = _park_device(park, x.device) if len(grid) > 1 else None

    def program(t: Tile) -> _Program:
        (y0, y1), (x0, x1) = _pixel_span(t.y, height), _pixel_span(t.x, width)
        crop = x[:, :, y0:y1, x0:x1]
        return _encoder_down(encoder, _TileState(crop, _core_window(t, SCALE, rows, cols), exact, parked))

    log.debug(
        "tiled encode %s: %d tile(s) of %d, overlap %d, norm %s, parked on %s",
        tuple(x.shape),
        len(grid),
        tile,
        overlap,
        norm,
        parked,
    )
    h = _mid(encoder.mid, _assemble(grid, program, rows, cols, 1, exact))
    return encoder.conv_out(_silu_(encoder.norm_out(h)))


def tiled_encode_vae(vae: Any, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The moments ``vae.encode`` computes for an SD ``AutoencoderKL`` (before wrapping them in a distribution):
    :func:`tiled_encoder` on ``vae.encoder`` with ``kwargs``, then ``quant_conv`` (if it has one)."""
    qc = getattr(vae, "quant_conv", None)
    h = tiled_encoder(vae.encoder, x, **kwargs)
    return qc(h) if qc is not None else h


# ---------------------------------------------------------------------------------------------------------
# Tile size from free memory.


def choose_tile(
    height: int,
    width: int,
    dtype_bytes: int,
    free_bytes: int,
    *,
    batch: int = 1,
    kind: str = "decode",
    level: str = "module",
    overlap: int | None = None,
    min_tile: int = 32,
    max_tile: int = 256,
    **model_kwargs: Any,
) -> int:
    """The tile (latent pixels) for a ``height × width`` image (pixels): the largest multiple of 8 from
    ``min_tile`` to ``max_tile`` whose predicted peak (:func:`lib_optim.vae.planner.predict_tiled_peak_bytes`)
    fits in ``free_bytes`` — ``min_tile`` when none does — then shrunk to the smallest tile that still needs no
    more tiles along each side (less overlap: less work, less memory). ``model_kwargs`` go to the planner."""
    if free_bytes <= 0:
        raise ValueError(
            f"[Optim] choose_tile free_bytes: {free_bytes!r} is not allowed; allowed: a positive byte count"
        )
    if not 8 <= min_tile <= max_tile:
        raise ValueError(
            f"[Optim] choose_tile min_tile: {min_tile!r} is not allowed; allowed: 8 to max_tile ({max_tile})"
        )
    if overlap is None:
        overlap = MODULE_OVERLAP if level == "module" else CALLABLE_OVERLAP
    best = min_tile
    for tile in range(min_tile - min_tile % 8 or 8, max_tile + 1, 8):
        if tile <= overlap:
            continue
        peak = vae_planner.predict_tiled_peak_bytes(
            height,
            width,
            tile=tile,
            overlap=overlap,
            batch=batch,
            dtype_bytes=dtype_bytes,
            kind=kind,
            level=level,
            **model_kwargs,
        )
        if peak <= free_bytes:
            best = tile
        if tile * SCALE >= max(height, width):
            break  # larger tiles are the same single tile
    return _fewest_pixels(best, overlap, height // SCALE, width // SCALE)


def _fewest_pixels(tile: int, overlap: int, rows: int, cols: int) -> int:
    """The smallest tile giving the same number of tiles along each side as ``tile`` does."""
    need = 1
    for length in (rows, cols):
        count = len(tile_axis(length, tile, overlap))
        need = max(need, length if count == 1 else math.ceil((length + (count - 1) * overlap) / count))
    return min(tile, need)


# ---------------------------------------------------------------------------------------------------------
# The auto rule at every call.


def tiling_forward(
    module: Any,
    part: str,
    original: Callable[..., torch.Tensor],
    *,
    free_bytes: Callable[[torch.device], int],
    budget_bytes: int | None = None,
    always: bool = False,
    inplace_silu: bool = False,
    attention: str = "sdpa",
    report: Callable[[TilingEvent], None] | None = None,
    max_tile: int = 256,
) -> Callable[..., torch.Tensor]:
    """A stand-in for ``module.forward`` — ``module`` an SD VAE ``decoder`` or ``encoder`` (``part``), ``original``
    its own forward — that decides at every call, for that call's size, batch, dtype and free memory: the
    original when :func:`lib_optim.vae.planner.needs_tiling` says it fits (unless ``always``), else
    :func:`tiled_decoder`/:func:`tiled_encoder` with :func:`choose_tile`'s tile, parking waiting tiles in CPU
    memory only when they would not fit on the GPU. ``free_bytes(device)``: free memory as the host counts it;
    ``inplace_silu``/``attention``: the host's VAE (see :mod:`lib_optim.vae.planner`); ``report`` gets a
    :class:`TilingEvent` for every call (tiled or not), for the infotext and telemetry; ``max_tile``: the largest
    tile (latent pixels) :func:`choose_tile` may pick."""
    check_layout(module, part)
    kind = "decode" if part == "decoder" else "encode"
    run = tiled_decoder if kind == "decode" else tiled_encoder
    # the base width (128 in SD): the finest level's channels
    channels = int(module.conv_out.in_channels if kind == "decode" else module.conv_in.out_channels)

    def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        batch, _c, rows, cols = x.shape
        height, width = (rows * SCALE, cols * SCALE) if kind == "decode" else (rows, cols)
        model: dict[str, Any] = {
            "inplace_silu": inplace_silu,
            "attention": attention,
            "device": "cuda" if x.device.type == "cuda" else "cpu",
            "channels": channels,
        }
        free = max(0, int(free_bytes(x.device)))
        limit = free if budget_bytes is None else min(free, budget_bytes)
        reason = "tiling always"
        if not always:
            tile_it, reason = vae_planner.needs_tiling(
                height,
                width,
                dtype_bytes=x.element_size(),
                free_bytes=free,
                budget_bytes=budget_bytes,
                batch=batch,
                kind=kind,
                **model,
            )
            if not tile_it:
                log.debug("VAE %s untiled: %s", kind, reason)
                if report is not None:
                    report(TilingEvent(kind, width, height, batch, 0, reason))
                return original(x, *args, **kwargs)
        common: dict[str, Any] = {"batch": batch, "kind": kind, **model}
        tile = choose_tile(
            height, width, x.element_size(), max(1, limit), max_tile=max_tile, min_tile=min(32, max_tile), **common
        )
        overlap = min(MODULE_OVERLAP, tile // 2)
        unparked = vae_planner.predict_tiled_peak_bytes(
            height, width, tile=tile, overlap=overlap, dtype_bytes=x.element_size(), park=False, **common
        )
        park = "cpu" if x.device.type != "cpu" and unparked > limit else None
        log.info(
            "[Optim] VAE %s %dx%d tiled (%s): tiles of %d latent pixels%s",
            kind,
            width,
            height,
            reason,
            tile,
            ", waiting tiles in CPU memory" if park else "",
        )
        if report is not None:
            report(TilingEvent(kind, width, height, batch, tile, reason))
        return run(module, x, tile=tile, overlap=overlap, park=park)

    return forward


@dataclass(frozen=True)
class TilingEvent:
    """One decode or encode under :func:`tiling_forward`: ``tile`` latent pixels, 0 when it ran untiled."""

    kind: str  # decode / encode
    width: int
    height: int
    batch: int
    tile: int
    reason: str

    @property
    def tiled(self) -> bool:
        return self.tile > 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "width": self.width,
            "height": self.height,
            "batch": self.batch,
            "tile": self.tile,
            "tiled": self.tiled,
            "reason": self.reason,
        }

    def text(self) -> str:
        """``decode 1024x1024 tiled (tiles of 64)`` / ``decode 512x512 untiled``, for the infotext."""
        how = f"tiled (tiles of {self.tile})" if self.tiled else "untiled"
        return f"{self.kind} {self.width}x{self.height} {how}"


__all__ = [  # the tile grid and the layer walk live in lib_optim.vae.tiles and lib_optim.vae.walk
    "CALLABLE_OVERLAP",
    "DEFAULT_NORM",
    "MODULE_OVERLAP",
    "NORM_MODES",
    "SCALE",
    "UPSAMPLE_BANDS",
    "AxisTile",
    "Tile",
    "TilingEvent",
    "check_layout",
    "choose_tile",
    "tile_axis",
    "tile_grid",
    "tiled_decode",
    "tiled_decode_vae",
    "tiled_decoder",
    "tiled_encode",
    "tiled_encode_vae",
    "tiled_encoder",
    "tiling_forward",
]
