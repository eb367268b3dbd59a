"""Tiled VAE decode and encode: the image is processed in overlapping tiles so the VAE's largest activations
are a tile's, not the whole image's.

Two levels:

- **callable** (:func:`tiled_decode`, :func:`tiled_encode`): any function from latent to image (or back) is run
  on overlapping tiles whose outputs are blended. Works with any VAE, but each tile normalizes with its own
  GroupNorm statistics and its mid-block attention only sees the tile, so tiles disagree a little; the
  feathered overlap hides the seams but not the drift.
- **module** (:func:`tiled_decode_vae`, :func:`tiled_encode_vae`): walks an SD ``AutoencoderKL``'s layers
  itself (the ldm/sgm layout: ``decoder.conv_in``, ``decoder.mid.block_1/attn_1/block_2``,
  ``decoder.up[i].block[j]``, ``decoder.up[i].upsample.conv``, ``decoder.norm_out``, ``decoder.conv_out``,
  ``post_quant_conv``; the encoder's mirror image and ``quant_conv``). The mid block, with its global
  attention, runs untiled at latent resolution (cheap: 1/64 of the pixels); only the full-resolution path
  is tiled, and every GroupNorm in it uses statistics of the whole image (``norm=``, see
  :data:`NORM_MODES`), so a tile computes what the untiled network computes wherever the tile's margin
  covers the receptive field, and the tiles are joined by cropping in the middle of their overlap.

Both assemble into one preallocated output; only one tile's activations are alive at a time (except
``norm="sync"``, which holds every tile's current activation while it waits for the statistics).

Sizes: ``tile`` and ``overlap`` are in latent pixels (an image pixel is 1/8 of one). Tiles are all ``tile``
wide (the last is moved back, not shrunk), spaced evenly with at least ``overlap`` in common; an image no
larger than one tile is processed whole, exactly as untiled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from lib_optim import vae_planner
from lib_optim.log import get_logger

log = get_logger(__name__)

SCALE = 8  # image pixels per latent pixel in the SD VAE
LOWRES_STEP = 2  # norm="lowres": the statistics pass sees every LOWRES_STEP-th pixel in each direction
# How the module-level tiles normalize (GroupNorm) in the tiled part of the network:
# - "lowres": statistics of the whole image, measured in one untiled pass at half resolution (the mid block's
#   output subsampled 2×; 1/4 of the untiled work, activations 1/4 of the untiled ones), then frozen;
# - "two-pass": statistics gathered over all tiles in a first tiled pass (each tile normalized by itself),
#   then frozen for the second pass that produces the output (twice the work, tile-sized memory);
# - "sync": exact: every tile advances to the next GroupNorm, the statistics are combined over all tiles'
#   own regions, then all continue (the untiled result to rounding; holds one activation of every tile);
# - "tile": each tile's own statistics, as the callable level does (for comparison).
NORM_MODES = ("lowres", "two-pass", "sync", "tile")
DEFAULT_NORM = "lowres"
# Receptive-field radius of the tiled parts in latent pixels: decoder after the mid block (six 3×3 convolutions
# at each of four resolutions, the upsampling convolutions and conv_out: 6 + 3 + 1.5 + 0.75 + 1) and encoder
# before it (conv_in, four convolutions per level, the downsampling ones: about 75 image pixels).
DECODER_REACH = 13
ENCODER_REACH = 10


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
        room = min(cut - starts[i + 1], ends[i] - cut)  # the ramp stays inside the overlap ...
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

    def add(self, tile: Tile, piece: torch.Tensor, *, input_scale: int = 1) -> None:
        """``piece`` covers the tile (``piece`` pixels per latent pixel = ``self.scale``)."""
        s = self.scale
        b, c = piece.shape[:2]
        expected = ((tile.y.end - tile.y.start) * s, (tile.x.end - tile.x.start) * s)
        out_h, out_w = self.rows * s, self.cols * s
        if self.out is None:
            self.dtype = piece.dtype
            acc = torch.promote_types(piece.dtype, torch.float32)
            self.out = torch.zeros((b, c, out_h, out_w), dtype=acc, device=piece.device)
        # the last tile of a ragged encode ends at the image's edge: compare with what is left
        expected = (min(expected[0], out_h - tile.y.start * s), min(expected[1], out_w - tile.x.start * s))
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
    overlap: int = 16,
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
    overlap: int = 16,
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

# A program is a generator that runs one tile through the tiled part of the network. At every GroupNorm it
# yields (key, activation, window) — window = the tile's own region in that activation's pixels — and is
# sent back the (mean, var) per (batch, group) to normalize with, or None for the tile's own statistics.
_Request = tuple[Any, torch.Tensor, tuple[int, int, int, int]]
_Stats = tuple[torch.Tensor, torch.Tensor]
_Program = Generator[_Request, "_Stats | None", torch.Tensor]


def _silu_(x: torch.Tensor) -> torch.Tensor:
    return F.silu(x, inplace=True)  # our own temporary: in place saves one activation


def _normalize(norm: Any, x: torch.Tensor, stats: _Stats | None) -> torch.Tensor:
    if stats is None:
        return norm(x)
    mean, var = stats  # (B, G) float64
    per_group = x.shape[1] // norm.num_groups
    rstd = (var + norm.eps).rsqrt().repeat_interleave(per_group, dim=1)
    mean_c = mean.repeat_interleave(per_group, dim=1)
    scale = rstd * norm.weight.double() if norm.weight is not None else rstd
    # (x - mean)·scale + bias: subtracting first keeps half-precision activations as accurate as GroupNorm's
    y = (x - mean_c.to(x.dtype)[:, :, None, None]).mul_(scale.to(x.dtype)[:, :, None, None])
    return y if norm.bias is None else y.add_(norm.bias.to(x.dtype)[None, :, None, None])


def _gn(norm: Any, key: Any, x: torch.Tensor, window: tuple[int, int, int, int]) -> _Program:
    stats = yield key, x, window
    return _normalize(norm, x, stats)


def _resnet(block: Any, key: Any, x: torch.Tensor, window: tuple[int, int, int, int]) -> _Program:
    h = yield from _gn(block.norm1, (key, 1), x, window)
    h = block.conv1(_silu_(h))
    h = yield from _gn(block.norm2, (key, 2), h, window)
    h = block.conv2(_silu_(h))
    if hasattr(block, "nin_shortcut"):
        x = block.nin_shortcut(x)
    elif hasattr(block, "conv_shortcut"):
        x = block.conv_shortcut(x)
    return h.add_(x)


def _scaled(window: tuple[int, int, int, int], factor: float) -> tuple[int, int, int, int]:
    return tuple(round(v * factor) if v >= 0 else v for v in window)  # type: ignore[return-value]


def _decoder_up(decoder: Any, h: torch.Tensor, window: tuple[int, int, int, int]) -> _Program:
    """Everything after the mid block: the up levels (coarsest first), norm_out, SiLU, conv_out."""
    for level in reversed(range(len(decoder.up))):
        up = decoder.up[level]
        for j, block in enumerate(up.block):
            h = yield from _resnet(block, ("up", level, j), h, window)
        if level != 0:
            h = up.upsample.conv(F.interpolate(h, scale_factor=2.0, mode="nearest"))
            window = _scaled(window, 2)
    h = yield from _gn(decoder.norm_out, "norm_out", h, window)
    return decoder.conv_out(_silu_(h))


def _encoder_down(encoder: Any, x: torch.Tensor, window: tuple[int, int, int, int]) -> _Program:
    """Everything before the mid block: conv_in and the down levels with their stride-2 convolutions."""
    h = encoder.conv_in(x)
    for level, down in enumerate(encoder.down):
        for j, block in enumerate(down.block):
            h = yield from _resnet(block, ("down", level, j), h, window)
        if level != len(encoder.down) - 1:
            h = down.downsample.conv(F.pad(h, (0, 1, 0, 1)))
            window = _scaled(window, 0.5)
    return h


def _mid(mid: Any, h: torch.Tensor) -> torch.Tensor:
    h = mid.block_1(h, None)
    h = mid.attn_1(h)
    return mid.block_2(h, None)


def _window(t: Tile, factor: int, rows: int, cols: int) -> tuple[int, int, int, int]:
    """The tile's own region in its activation at ``factor`` pixels per latent pixel (-1 = to the end)."""
    y1 = (t.y.core_end - t.y.start) * factor if t.y.core_end < rows else -1
    x1 = (t.x.core_end - t.x.start) * factor if t.x.core_end < cols else -1
    return (t.y.core_start - t.y.start) * factor, y1, (t.x.core_start - t.x.start) * factor, x1


def _moments(
    x: torch.Tensor, groups: int, window: tuple[int, int, int, int] | None
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Count, mean and sum of squared deviations per (batch, group) over ``window`` of ``x``, in float64.

    Per channel first (a reduction over a strided view needs no copy), then per group; half-precision
    activations are widened a few groups at a time so the float32 copy stays small."""
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
    """Combines moments from several regions (Chan et al.'s parallel variance) into (mean, var)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, n: int, mean: torch.Tensor, m2: torch.Tensor) -> None:
        if n == 0:
            return
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


def _run(program: _Program, answer: Callable[[_Request], _Stats | None]) -> torch.Tensor:
    try:
        request = next(program)
        while True:
            request = program.send(answer(request))
    except StopIteration as done:
        return done.value


def _norm_groups(modules: dict[Any, Any], key: Any) -> int:
    return int(modules[key].num_groups)


def _norm_modules(root: Any, prefix: str) -> dict[Any, Any]:
    """The GroupNorms of the tiled path by the keys the programs yield (to know their group counts)."""
    found: dict[Any, Any] = {}
    levels = root.up if prefix == "up" else root.down
    for level, lv in enumerate(levels):
        for j, block in enumerate(lv.block):
            found[((prefix, level, j), 1)] = block.norm1
            found[((prefix, level, j), 2)] = block.norm2
    if prefix == "up":
        found["norm_out"] = root.norm_out
    return found


def _assemble(
    tiles: Sequence[Tile],
    programs: Callable[[Tile], _Program],
    canvas: _Canvas,
    norm: str,
    groups: Callable[[Any], int],
    lowres: Callable[[], dict[Any, _Stats]] | None,
) -> None:
    """Run every tile's program under the chosen normalization and blend the outputs into ``canvas``."""
    if norm == "tile":
        for t in tiles:
            canvas.add(t, _run(programs(t), lambda _request: None))
        return
    if norm == "sync":
        running = [(t, programs(t)) for t in tiles]
        requests: list[_Request | None] = [next(p) for _, p in running]
        while running:
            pool = _Pool()
            key = requests[0][0] if requests[0] is not None else None
            for request in requests:
                assert request is not None and request[0] == key, "tiles out of step"
                pool.add(*_moments(request[1], groups(key), request[2]))
            stats = pool.stats()
            requests = []
            still = []
            for t, p in running:
                try:
                    requests.append(p.send(stats))
                    still.append((t, p))
                except StopIteration as done:
                    canvas.add(t, done.value)
            running = still
        return
    if norm == "two-pass":
        pools: dict[Any, _Pool] = {}

        def gather(request: _Request) -> None:
            key, x, window = request
            pools.setdefault(key, _Pool()).add(*_moments(x, groups(key), window))

        for t in tiles:
            _run(programs(t), gather)  # the first pass's outputs only serve its statistics
        frozen = {k: p.stats() for k, p in pools.items()}
    else:
        assert lowres is not None
        frozen = lowres()
    for t in tiles:
        canvas.add(t, _run(programs(t), lambda request: frozen[request[0]]))


def _whole_image_stats(program: _Program, groups: Callable[[Any], int]) -> dict[Any, _Stats]:
    """Run ``program`` on a whole (low-resolution) image with ordinary GroupNorms and record their statistics."""
    recorded: dict[Any, _Stats] = {}

    def exact(request: _Request) -> _Stats:
        key, x, _window = request
        pool = _Pool()
        pool.add(*_moments(x, groups(key), None))
        recorded[key] = pool.stats()
        return recorded[key]

    _run(program, exact)
    return recorded


def check_vae_layout(vae: Any, part: str = "decoder") -> None:
    """Raise ``TypeError`` naming what is missing when ``vae`` is not an SD ``AutoencoderKL`` whose ``part``
    ("decoder" or "encoder") this module can walk."""
    if part not in ("decoder", "encoder"):
        raise ValueError(f"[Optim] VAE tiling part: {part!r} is not allowed; allowed: decoder, encoder")
    root = getattr(vae, part, None)
    levels_name, resampler = ("up", "upsample") if part == "decoder" else ("down", "downsample")
    missing = [n for n in ("conv_in", "mid", "norm_out", "conv_out", levels_name) if not hasattr(root, n)]
    if root is not None and not missing:
        missing += [f"mid.{n}" for n in ("block_1", "attn_1", "block_2") if not hasattr(root.mid, n)]
        if not isinstance(root.norm_out, torch.nn.GroupNorm):
            missing.append("norm_out as a GroupNorm")
        if getattr(root, "tanh_out", False) or getattr(root, "give_pre_end", False):
            missing.append("the plain output (tanh_out/give_pre_end set)")
        levels = getattr(root, levels_name)
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
    if missing:
        raise TypeError(f"[Optim] VAE tiling: {type(vae).__name__}.{part} lacks {', '.join(missing)}")


def tiled_decode_vae(
    vae: Any,
    z: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int = 2 * DECODER_REACH,
    norm: str = DEFAULT_NORM,
    blend: float = 0.0,
) -> torch.Tensor:
    """Decode ``z`` ``(B, 4, h, w)`` with the SD ``AutoencoderKL`` ``vae`` (``post_quant_conv`` — may be absent
    or None — then ``decoder``), tiling the decoder after its mid block (see the module doc).

    Default overlap: twice the decoder's reach, so a hard crop in the middle of each overlap (``blend=0``)
    leaves every kept pixel with its whole receptive field. Same result as ``vae.decode(z)`` up to rounding
    with ``norm="sync"``, and close to it with ``"lowres"``/``"two-pass"``."""
    _check_sizes(tile, overlap, blend)
    if norm not in NORM_MODES:
        raise ValueError(f"[Optim] VAE tiling norm: {norm!r} is not allowed; allowed: {', '.join(NORM_MODES)}")
    check_vae_layout(vae, "decoder")
    decoder = vae.decoder
    pqc = getattr(vae, "post_quant_conv", None)
    h, w = z.shape[2:]
    grid = tile_grid(h, w, tile, overlap, blend)
    if pqc is not None:
        z = pqc(z)
    mid = _mid(decoder.mid, decoder.conv_in(z))
    del z
    norms = _norm_modules(decoder, "up")

    def groups(key: Any) -> int:
        return _norm_groups(norms, key)

    factor = SCALE  # image pixels per latent pixel after all the upsamplings
    if len(grid) == 1 and norm != "tile":  # one tile: the whole image, exact statistics
        return _run(_decoder_up(decoder, mid, (0, -1, 0, -1)), lambda r: _exact_stats(r, groups))

    def program(t: Tile) -> _Program:
        crop = mid[:, :, t.y.start : t.y.end, t.x.start : t.x.end]
        return _decoder_up(decoder, crop, _window(t, 1, h, w))

    def lowres() -> dict[Any, _Stats]:
        small = mid[:, :, ::LOWRES_STEP, ::LOWRES_STEP]  # every other latent pixel: same local statistics, fewer pixels
        return _whole_image_stats(_decoder_up(decoder, small, (0, -1, 0, -1)), groups)

    canvas = _Canvas(h, w, factor)
    _assemble(grid, program, canvas, norm, groups, lowres)
    return canvas.result()


def _exact_stats(request: _Request, groups: Callable[[Any], int]) -> _Stats:
    pool = _Pool()
    pool.add(*_moments(request[1], groups(request[0]), None))
    return pool.stats()


def tiled_encode_vae(
    vae: Any,
    x: torch.Tensor,
    *,
    tile: int = 64,
    overlap: int = 2 * ENCODER_REACH,
    norm: str = DEFAULT_NORM,
    blend: float = 0.0,
) -> torch.Tensor:
    """Encode ``x`` ``(B, 3, H, W)`` in [-1, 1] with the SD ``AutoencoderKL`` ``vae``: the encoder up to its mid
    block tiled, the mid block, ``norm_out``, ``conv_out`` and ``quant_conv`` (if present) untiled. Returns the
    moments ``(B, 8, H//8, W//8)`` (mean and log-variance), what ``vae.encode`` turns into a distribution."""
    _check_sizes(tile, overlap, blend)
    if norm not in NORM_MODES:
        raise ValueError(f"[Optim] VAE tiling norm: {norm!r} is not allowed; allowed: {', '.join(NORM_MODES)}")
    if x.dim() != 4 or x.shape[2] < SCALE or x.shape[3] < SCALE:
        raise ValueError(f"[Optim] VAE tiling x: shape {tuple(x.shape)} is not allowed; allowed: (batch, 3, H≥8, W≥8)")
    check_vae_layout(vae, "encoder")
    encoder = vae.encoder
    height, width = x.shape[2:]
    rows, cols = height // SCALE, width // SCALE
    grid = tile_grid(rows, cols, tile, overlap, blend)
    norms = _norm_modules(encoder, "down")

    def groups(key: Any) -> int:
        return _norm_groups(norms, key)

    if len(grid) == 1 and norm != "tile":
        features = _run(_encoder_down(encoder, x, (0, -1, 0, -1)), lambda r: _exact_stats(r, groups))
    else:

        def program(t: Tile) -> _Program:
            (y0, y1), (x0, x1) = _pixel_span(t.y, height), _pixel_span(t.x, width)
            return _encoder_down(encoder, x[:, :, y0:y1, x0:x1], _window(t, SCALE, rows, cols))

        def lowres() -> dict[Any, _Stats]:
            return _whole_image_stats(
                _encoder_down(encoder, x[:, :, ::LOWRES_STEP, ::LOWRES_STEP], (0, -1, 0, -1)), groups
            )

        canvas = _Canvas(rows, cols, 1)
        _assemble(grid, program, canvas, norm, groups, lowres)
        features = canvas.result()
    h = _mid(encoder.mid, features)
    del features
    h = encoder.conv_out(_silu_(encoder.norm_out(h)))
    qc = getattr(vae, "quant_conv", None)
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
    """The largest tile (latent pixels, a multiple of 8 from ``min_tile`` to ``max_tile``) whose predicted peak
    (:func:`lib_optim.vae_planner.predict_tiled_peak_bytes`) fits in ``free_bytes``; ``min_tile`` when none
    fits (the smallest that still tiles sensibly). ``height``/``width`` are the image's, in pixels."""
    if free_bytes <= 0:
        raise ValueError(
            f"[Optim] choose_tile free_bytes: {free_bytes!r} is not allowed; allowed: a positive byte count"
        )
    if not 8 <= min_tile <= max_tile:
        raise ValueError(
            f"[Optim] choose_tile min_tile: {min_tile!r} is not allowed; allowed: 8 to max_tile ({max_tile})"
        )
    if overlap is None:
        overlap = (2 * (DECODER_REACH if kind == "decode" else ENCODER_REACH)) if level == "module" else 16
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
    return best
