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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from lib_optim.log import get_logger
from lib_optim.vae import planner as vae_planner

log = get_logger(__name__)

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


# ---------------------------------------------------------------------------------------------------------
# The tile grid.


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


def _pixel_span(a: AxisTile, length_px: int) -> tuple[int, int]:
    end = a.end * SCALE
    return a.start * SCALE, (length_px if end >= length_px - length_px % SCALE else end)


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


# ---------------------------------------------------------------------------------------------------------
# Module level: our own walk over the VAE's layers, with GroupNorm statistics of the whole image.

_Window = tuple[int, int, int, int]  # y0, y1, x0, x1 in an activation's pixels; -1 = to the end
_Moments = tuple[int, torch.Tensor, torch.Tensor]  # count, mean, sum of squared deviations per (batch, group)
_Stats = tuple[torch.Tensor, torch.Tensor]  # mean, variance per (batch, group), float64
# A tile's program is a generator running the tile through the tiled part of the network. With exact
# statistics it yields (GroupNorm key, its own region's moments) at every GroupNorm and is sent the
# statistics of the whole image; with the tile's own statistics it never yields.
_Program = Generator[tuple[Any, _Moments], _Stats, torch.Tensor]


def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)  # our own temporary: in place saves one activation


def _moments(x: torch.Tensor, groups: int, window: _Window | None) -> _Moments:
    """Count, mean and sum of squared deviations per (batch, group) over ``window`` of ``x``, in float64.

    Per channel first (a reduction over a strided view needs no copy), then per group; half-precision
    activations are widened a few channels at a time so the float32 copy stays small."""
    if window is not None:
        y0, y1, x0, x1 = window
        x = x[:, :, y0 : (y1 if y1 >= 0 else None), x0 : (x1 if x1 >= 0 else None)]
    b, c = x.shape[:2]
    n = x.shape[2] * x.shape[3]
    means, variances = [], []
    wide = x.dtype in (torch.float32, torch.float64)
    step = c if wide else max(1, c // 8)
    for c0 in range(0, c, step):
        part = x[:, c0 : c0 + step]
        var, mean = torch.var_mean(part if wide else part.float(), dim=(2, 3), correction=0)
        means.append(mean.double())
        variances.append(var.double())
    mean_c, var_c = torch.cat(means, 1).view(b, groups, -1), torch.cat(variances, 1).view(b, groups, -1)
    mean_g = mean_c.mean(-1)
    # within-channel spread plus the spread of the channel means around the group mean
    m2 = n * (var_c.sum(-1) + ((mean_c - mean_g[..., None]) ** 2).sum(-1))
    return n * mean_c.shape[-1], mean_g, m2


class _Pool:
    """Combines moments of several regions (Chan et al.'s parallel variance) into (mean, var)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if self.mean is None or self.m2 is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta**2 * (self.n * n / total)
        self.n = total

    def stats(self) -> _Stats:
        assert self.mean is not None and self.m2 is not None
        return self.mean, self.m2 / self.n


def _normalize(norm: Any, x: torch.Tensor, stats: _Stats, *, inplace: bool) -> torch.Tensor:
    """GroupNorm of ``x`` with given statistics and the module's affine weight and bias (in ``x`` itself when
    ``inplace``)."""
    mean, var = stats
    per_group = x.shape[1] // norm.num_groups
    scale = (var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)
    if norm.weight is not None:
        scale = scale * norm.weight.double()
    mean_c = mean.repeat_interleave(per_group, dim=1).to(x.dtype)[:, :, None, None]
    # (x - mean)·scale + bias: subtracting first keeps half-precision activations as accurate as GroupNorm's
    y = x.sub_(mean_c) if inplace else x - mean_c
    y.mul_(scale.to(x.dtype)[:, :, None, None])
    return y if norm.bias is None else y.add_(norm.bias.to(x.dtype)[None, :, None, None])


class _TileState:
    """What a tile's program holds between layers — the current activation ``h`` and a residual ``res`` — kept
    here rather than in local variables, so a tile waiting for statistics can move them to ``park`` (another
    device) and nothing else keeps them alive. ``window``: the tile's own region in ``h``'s pixels; ``owned``:
    ``h`` is ours to overwrite (not a view of the input shared with other tiles)."""

    def __init__(self, h: torch.Tensor, window: _Window, exact: bool, park: torch.device | None) -> None:
        self.h: torch.Tensor | None = h
        self.res: torch.Tensor | None = None
        self.owned = False
        self.window, self.exact, self.park = window, exact, park

    def set(self, h: torch.Tensor) -> None:
        self.h, self.owned = h, True

    def move(self, device: torch.device) -> None:
        if self.h is not None:
            self.h = self.h.to(device)
        if self.res is not None:
            self.res = self.res.to(device)

    def rescale(self, factor: float) -> None:
        self.window = tuple(round(v * factor) if v >= 0 else v for v in self.window)  # type: ignore[assignment]


def _stats(st: _TileState, norm: Any, key: Any) -> Generator[tuple[Any, _Moments], _Stats, _Stats]:
    """The statistics to normalize ``st.h`` with: the tile's own, or the whole image's, for which the tile
    yields the moments of its own region and waits (its activations parked, if a park device is set)."""
    assert st.h is not None
    if not st.exact:
        pool = _Pool()
        pool.add(*_moments(st.h, norm.num_groups, None))
        return pool.stats()
    moments = _moments(st.h, norm.num_groups, st.window)
    home = st.h.device
    park = st.park if st.park is not None and st.park != home else None
    if park is not None:
        st.move(park)
    stats = yield key, moments
    if park is not None:
        st.move(home)
    return stats


def _take_normalized(st: _TileState, norm: Any, stats: _Stats, *, keep_input: bool = False) -> torch.Tensor:
    """``st.h`` normalized, handed over (``st.h`` is cleared): in place when ``st.h`` is ours and not needed
    afterwards, so normalizing costs no extra activation."""
    assert st.h is not None
    out = _normalize(norm, st.h, stats, inplace=st.owned and not keep_input)
    st.h = None
    return out


def _resnet(st: _TileState, block: Any, key: Any) -> Generator[tuple[Any, _Moments], _Stats, None]:
    """One ResNet block on ``st.h``. Where the block has a shortcut convolution, it runs first and the input is
    then normalized in place: the block's input, a normalized copy and the shortcut are never alive together,
    which the hosts' blocks hold at their peak."""
    stats = yield from _stats(st, block.norm1, (key, 1))
    shortcut = getattr(block, "nin_shortcut", None) or getattr(block, "conv_shortcut", None)
    if shortcut is not None:
        st.res = shortcut(st.h)
        n = _take_normalized(st, block.norm1, stats)
    else:
        st.res = st.h  # the input is the residual: normalize a copy
        n = _take_normalized(st, block.norm1, stats, keep_input=True)
    st.set(block.conv1(_silu_(n)))
    del n
    stats = yield from _stats(st, block.norm2, (key, 2))
    n = _take_normalized(st, block.norm2, stats)
    out = block.conv2(_silu_(n))
    del n
    out.add_(st.res)
    st.res = None
    st.set(out)


UPSAMPLE_BANDS = 8  # the 2× upsampling runs in this many horizontal bands (see _upsample)


def _upsample(conv: Any, x: torch.Tensor) -> torch.Tensor:
    """``conv(interpolate(x, 2×, nearest))`` written band by band into one output, so the full-size interpolated
    copy never exists (it would be as large as the output). Each band takes one source row above and below, and
    the rows next to a cut, which the convolution padded with zeros, are dropped."""
    b, _c, h, w = x.shape
    out: torch.Tensor | None = None
    step = max(1, math.ceil(h / UPSAMPLE_BANDS))
    for r0 in range(0, h, step):
        r1 = min(h, r0 + step)
        lo, hi = max(0, r0 - 1), min(h, r1 + 1)
        band = conv(F.interpolate(x[:, :, lo:hi], scale_factor=2.0, mode="nearest"))
        if out is None:
            out = band.new_empty((b, band.shape[1], 2 * h, 2 * w))
        out[:, :, 2 * r0 : 2 * r1] = band[:, :, 2 * (r0 - lo) : 2 * (r1 - lo)]
        del band
    assert out is not None
    return out


def _decoder_up(decoder: Any, st: _TileState) -> _Program:
    """Everything after the mid block: the up levels (coarsest first), norm_out, SiLU, conv_out."""
    for level in reversed(range(len(decoder.up))):
        up = decoder.up[level]
        for j, block in enumerate(up.block):
            yield from _resnet(st, block, ("up", level, j))
        if level != 0:
            assert st.h is not None
            st.set(_upsample(up.upsample.conv, st.h))
            st.rescale(2)
    stats = yield from _stats(st, decoder.norm_out, "norm_out")
    return decoder.conv_out(_silu_(_take_normalized(st, decoder.norm_out, stats)))


def _encoder_down(encoder: Any, st: _TileState) -> _Program:
    """Everything before the mid block: conv_in and the down levels with their stride-2 convolutions."""
    st.set(encoder.conv_in(st.h))
    for level, down in enumerate(encoder.down):
        for j, block in enumerate(down.block):
            yield from _resnet(st, block, ("down", level, j))
        if level != len(encoder.down) - 1:
            # the asymmetric pad makes the stride-2 convolution map n pixels to floor(n/2)
            assert st.h is not None
            st.set(down.downsample.conv(F.pad(st.h, (0, 1, 0, 1))))
            st.rescale(0.5)
    out, st.h = st.h, None
    assert out is not None
    return out


def _mid(mid: Any, h: torch.Tensor) -> torch.Tensor:
    """The host's own mid block (its attention is the host's, over the whole latent)."""
    h = mid.block_1(h, None)
    h = mid.attn_1(h)
    return mid.block_2(h, None)


def _core_window(t: Tile, factor: int, rows: int, cols: int) -> _Window:
    """The tile's own region in its activation at ``factor`` pixels per latent pixel (-1 = to the end)."""
    y1 = (t.y.core_end - t.y.start) * factor if t.y.core_end < rows else -1
    x1 = (t.x.core_end - t.x.start) * factor if t.x.core_end < cols else -1
    return (t.y.core_start - t.y.start) * factor, y1, (t.x.core_start - t.x.start) * factor, x1


def _drive(
    tiles: Sequence[Tile],
    programs: Callable[[Tile], _Program],
    emit: Callable[[Tile, torch.Tensor], None],
    exact: bool,
) -> None:
    """Run every tile's program and hand its output to ``emit`` (and drop it). Exact: all tiles advance
    together from GroupNorm to GroupNorm, each normalized with the moments of all tiles' own regions pooled."""
    if not exact:  # one tile after the other; their programs never wait
        for t in tiles:
            try:
                next(programs(t))
            except StopIteration as done:
                emit(t, done.value)
                continue
            raise RuntimeError("[Optim] VAE tiling: a tile asked for shared statistics in tile mode")
        return
    running = [(t, programs(t)) for t in tiles]
    requests = [next(p) for _, p in running]
    while running:
        key = requests[0][0]
        pool = _Pool()
        for k, moments in requests:
            if k != key:
                raise RuntimeError(f"[Optim] VAE tiling: tiles out of step at GroupNorm {k!r} and {key!r}")
            pool.add(*moments)
        stats = pool.stats()
        still, requests = [], []
        for t, p in running:
            try:
                requests.append(p.send(stats))
                still.append((t, p))
            except StopIteration as done:
                emit(t, done.value)
        running = still


def _park_device(park: str | torch.device | None, device: torch.device) -> torch.device | None:
    if park == "auto":
        return torch.device("cpu") if device.type != "cpu" else None
    if park is None or isinstance(park, torch.device):
        return park
    return torch.device(park)


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


def _assemble(
    grid: list[Tile], program: Callable[[Tile], _Program], rows: int, cols: int, scale: int, exact: bool
) -> torch.Tensor:
    """Every tile's program run to the end, the outputs joined: one piece is returned as it is."""
    if len(grid) == 1:
        pieces: list[torch.Tensor] = []
        _drive(grid, program, lambda _t, out: pieces.append(out), exact)
        return pieces.pop()
    canvas = _Canvas(rows, cols, scale)
    _drive(grid, program, canvas.add, exact)
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
