"""The tile grid of :mod:`lib_optim.vae.tiling` and its checks: the sizes and modes allowed, where tiles start, end and
blend, the canvas their outputs are added into, and which VAE layouts the module level can walk."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

SCALE = 8  # image pixels per latent pixel in the SD VAE
# How the module level's tiles normalize (each GroupNorm of the tiled part of the network):
# - "exact": with the statistics of the whole image. Every tile runs to the next GroupNorm and reports the
#   moments of its own region (the regions partition the image); the pooled statistics go back to all tiles.
#   The result is the untiled one to rounding; the waiting tiles' activations are held meanwhile (in CPU memory
#   when decoding on a GPU, see ``park``), and every tile is resumed once per GroupNorm.
# - "tile": each tile with its own statistics, one tile after the other (no holding, no parking). Tiles of
#   different content normalize differently: fine on stationary content, visible drift on real images.
NORM_MODES = ("exact", "tile")
DEFAULT_NORM = "exact"
# The module level's default overlap (latent pixels): a margin of half of it around every kept pixel. The
# receptive field of the tiled part is wider (decoder: six 3×3 convolutions at each of four resolutions plus the
# resampling ones, about 13 latent pixels; encoder: about 10), but with exact statistics and the random-weight
# SD VAE a margin of 2 / 4 / 8 latent pixels measured 41 / 58 / 110 dB against the untiled decode.
MODULE_OVERLAP = 16
CALLABLE_OVERLAP = 16


@dataclass(frozen=True)
class AxisTile:
    """One tile along one axis, in latent pixels: it spans ``[start, end)`` and owns ``[core_start, core_end)``
    (the owned parts of all tiles partition the axis; a boundary lies in the middle of the two tiles' overlap,
    and ``ramp`` latent pixels around it are blended — 0 = a hard crop)."""

    start: int
    end: int
    core_start: int
    core_end: int
    ramp_before: float
    ramp_after: float


def tile_axis(length: int, tile: int, overlap: int, blend: float = 1.0) -> list[AxisTile]:
    """Tiles of ``tile`` pixels covering ``length`` with at least ``overlap`` in common, evenly spaced.

    ``blend`` in [0, 1]: the width of each blending ramp as a fraction of what fits around its boundary
    (the overlap, and half the distance to the neighbouring boundaries)."""
    if length <= tile:
        return [AxisTile(0, length, 0, length, 0.0, 0.0)]
    step = tile - overlap
    count = math.ceil((length - overlap) / step)
    starts = [round(i * (length - tile) / (count - 1)) for i in range(count)]
    ends = [s + tile for s in starts]
    cuts = [(starts[i + 1] + ends[i]) // 2 for i in range(count - 1)]  # the middle of each overlap
    bounds = [0, *cuts, length]
    ramps = []
    for i, cut in enumerate(cuts):
        room: float = min(cut - starts[i + 1], ends[i] - cut)  # the ramp stays inside the overlap ...
        if i > 0:
            room = min(room, (cut - cuts[i - 1]) / 2)  # ... and clear of its neighbours' ramps
        if i + 1 < len(cuts):
            room = min(room, (cuts[i + 1] - cut) / 2)
        ramps.append(2 * room * blend)
    return [
        AxisTile(
            starts[i],
            ends[i],
            bounds[i],
            bounds[i + 1],
            ramps[i - 1] if i > 0 else 0.0,
            ramps[i] if i < count - 1 else 0.0,
        )
        for i in range(count)
    ]


def _axis_weight(t: AxisTile, scale: int, out_length: int, device: torch.device) -> tuple[int, int, torch.Tensor]:
    """The tile's blending weight along one axis in output pixels: ``(lo, hi, w)`` with ``w`` on ``[lo, hi)``
    (zero outside). Adjacent tiles' ramps are complementary, so the weights of all tiles sum to 1."""
    lo_cut, hi_cut = t.core_start * scale, (t.core_end * scale if t.core_end * scale < out_length else out_length)
    ramp_lo, ramp_hi = t.ramp_before * scale, t.ramp_after * scale
    lo = max(t.start * scale, math.floor(lo_cut - ramp_lo / 2)) if t.start else 0
    hi = min(t.end * scale, math.ceil(hi_cut + ramp_hi / 2)) if hi_cut < out_length else out_length
    centres = torch.arange(lo, hi, device=device, dtype=torch.float64) + 0.5

    def rising(cut: float, ramp: float) -> torch.Tensor:
        if ramp <= 0:
            return (centres >= cut).double()
        return ((centres - cut) / ramp + 0.5).clamp(0.0, 1.0)

    w = torch.ones_like(centres)
    if t.start:
        w = rising(lo_cut, ramp_lo)
    if hi_cut < out_length:
        w = w - rising(hi_cut, ramp_hi)
    return lo, hi, w.float()


@dataclass(frozen=True)
class Tile:
    y: AxisTile
    x: AxisTile


def tile_grid(height: int, width: int, tile: int, overlap: int, blend: float = 1.0) -> list[Tile]:
    """The tiles of a ``height × width`` latent, row by row."""
    return [
        Tile(ty, tx) for ty in tile_axis(height, tile, overlap, blend) for tx in tile_axis(width, tile, overlap, blend)
    ]


def _check_sizes(tile: int, overlap: int, blend: float) -> None:
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(
            f"[Optim] VAE tiling tile: {tile!r} is not allowed; allowed: a whole number of latent pixels ≥ 1"
        )
    if not isinstance(overlap, int) or not 0 <= overlap < tile:
        raise ValueError(
            f"[Optim] VAE tiling overlap: {overlap!r} is not allowed; allowed: a whole number from 0 to {tile - 1} "
            "(less than the tile)"
        )
    if not 0.0 <= blend <= 1.0:
        raise ValueError(f"[Optim] VAE tiling blend: {blend!r} is not allowed; allowed: a fraction from 0 to 1")


class _Canvas:
    """The output, allocated at the first tile (its dtype and device), accumulated in at least float32."""

    def __init__(self, rows: int, cols: int, scale: int) -> None:
        self.rows, self.cols, self.scale = rows, cols, scale
        self.out: torch.Tensor | None = None
        self.dtype: torch.dtype | None = None

    def add(self, tile: Tile, piece: torch.Tensor) -> None:
        """Blend in ``piece``, the output for ``tile`` (``self.scale`` output pixels per latent pixel)."""
        s = self.scale
        b, c = piece.shape[:2]
        expected = ((tile.y.end - tile.y.start) * s, (tile.x.end - tile.x.start) * s)
        out_h, out_w = self.rows * s, self.cols * s
        if self.out is None:
            self.dtype = piece.dtype
            acc = torch.promote_types(piece.dtype, torch.float32)
            self.out = torch.zeros((b, c, out_h, out_w), dtype=acc, device=piece.device)
        if tuple(piece.shape[2:]) != expected or piece.shape[:2] != self.out.shape[:2]:
            raise RuntimeError(
                f"[Optim] VAE tiling: a tile came back as {tuple(piece.shape)}, expected "
                f"{(*self.out.shape[:2], *expected)}; the function does not map latent pixels to {s} output pixels"
            )
        y0, y1, wy = _axis_weight(tile.y, s, out_h, piece.device)
        x0, x1, wx = _axis_weight(tile.x, s, out_w, piece.device)
        oy, ox = tile.y.start * s, tile.x.start * s
        part = piece[:, :, y0 - oy : y1 - oy, x0 - ox : x1 - ox]
        self.out[:, :, y0:y1, x0:x1].addcmul_(part, (wy[:, None] * wx[None, :]).to(self.out.dtype))

    def result(self) -> torch.Tensor:
        assert self.out is not None and self.dtype is not None
        return self.out if self.out.dtype == self.dtype else self.out.to(self.dtype)


def _pixel_span(a: AxisTile, length_px: int) -> tuple[int, int]:
    end = a.end * SCALE
    return a.start * SCALE, (length_px if end >= length_px - length_px % SCALE else end)


def check_layout(module: Any, part: str = "decoder") -> None:
    """Raise ``TypeError`` naming what is missing when ``module`` is not an SD VAE ``part`` ("decoder" or
    "encoder") of the ldm/sgm layout that this module can walk."""
    if part not in ("decoder", "encoder"):
        raise ValueError(f"[Optim] VAE tiling part: {part!r} is not allowed; allowed: decoder, encoder")
    levels_name, resampler = ("up", "upsample") if part == "decoder" else ("down", "downsample")
    missing = [n for n in ("conv_in", "mid", "norm_out", "conv_out", levels_name) if not hasattr(module, n)]
    if not missing:
        missing += [f"mid.{n}" for n in ("block_1", "attn_1", "block_2") if not hasattr(module.mid, n)]
        if not isinstance(module.norm_out, torch.nn.GroupNorm):
            missing.append("norm_out as a GroupNorm")
        if getattr(module, "tanh_out", False) or getattr(module, "give_pre_end", False):
            missing.append("the plain output (tanh_out/give_pre_end set)")
        levels = getattr(module, levels_name)
        for i, level in enumerate(levels):
            name = f"{levels_name}[{i}]"
            if len(getattr(level, "attn", ())):
                missing.append(f"{name} without attention")
            resampled = i != 0 if part == "decoder" else i != len(levels) - 1
            if resampled and not hasattr(getattr(level, resampler, None), "conv"):
                missing.append(f"{name}.{resampler}.conv")
            for j, block in enumerate(getattr(level, "block", ())):
                if not all(isinstance(getattr(block, n, None), torch.nn.GroupNorm) for n in ("norm1", "norm2")):
                    missing.append(f"{name}.block[{j}].norm1/norm2 as GroupNorms")
                if getattr(block, "temb_proj", None) is not None:
                    missing.append(f"{name}.block[{j}] without a time embedding")
    if missing:
        raise TypeError(f"[Optim] VAE tiling: {type(module).__name__} {part} lacks {', '.join(missing)}")


def _check_norm(norm: str) -> None:
    if norm not in NORM_MODES:
        raise ValueError(f"[Optim] VAE tiling norm: {norm!r} is not allowed; allowed: {', '.join(NORM_MODES)}")


def _checked_overlap(tile: int, overlap: int | None, norm: str, blend: float) -> int:
    """``overlap`` (default :data:`MODULE_OVERLAP`, at most half the tile) once the sizes and norm are checked."""
    if overlap is None:
        overlap = min(MODULE_OVERLAP, tile // 2)
    _check_sizes(tile, overlap, blend)
    _check_norm(norm)
    return overlap
