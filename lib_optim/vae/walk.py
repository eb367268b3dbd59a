"""The module level of :mod:`lib_optim.vae.tiling`: our own walk over an SD VAE's layers, tile by tile, with the
GroupNorm statistics of the whole image (``norm="exact"``) or of each tile (``norm="tile"``)."""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Sequence
from typing import Any

import torch
from torch.nn import functional as F

from lib_optim.vae.tiles import Tile, _Canvas

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
