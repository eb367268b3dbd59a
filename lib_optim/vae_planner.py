"""Predicted peak memory of an SD VAE decode or encode, whole or tiled, and the ``auto`` rule for tiling.

No torch here (like :mod:`lib_optim.planner`): the rule runs before anything is on the GPU.

The prediction replays the network's layers in order and counts the bytes of the tensors alive after each
allocation and free — the input of a ResNet block is held by its caller until the block returns, a norm's
output until the SiLU after it returns, and so on — and reports the most. The layer sequence is the SD
``AutoencoderKL``'s (see :mod:`lib_optim.sd_vae`); how a host computes each layer changes what is alive:

- ``inplace_silu``: A1111 runs latent diffusion's (SD1) and sgm's (SDXL) VAE, whose ``nonlinearity`` is
  ``x * sigmoid(x)``: while it runs, the block input, the norm output, the sigmoid and the product are alive —
  four activations of the block's input width. Forge's ResNet blocks use ``SiLU(inplace=True)`` (Forge f2
  backend/nn/vae.py:83), which leaves two.
- ``attention`` of the mid block, at latent resolution over all ``h·w`` positions, one head:
  ``"sdpa"`` — no ``(h·w)²`` score matrix (A1111's sdp/sdp-no-mem/xformers VAE forwards, Forge's
  ``attention_function_single_head_spatial`` on PyTorch/xformers, sub-quadratic attention: chunked);
  ``"math"`` — the score matrix and its softmax, ``2·(h·w)²`` elements per image (ldm's own ``AttnBlock``, which
  A1111 keeps when no cross-attention optimization applies to the VAE). A1111's Doggettx forward slices the
  score matrix to fit free memory; count it as ``"sdpa"``.

The largest activations of a decode are at full image resolution in the last up level (256 channels entering
its first ResNet block, 128 after): with out-of-place SiLU the peak is about ``8 · 128·H·W·e`` (``e`` bytes per
element), with in-place SiLU about ``5 ·``. At 1024² in fp16 that is 2 GiB and 1.25 GiB. The mid block's
math attention overtakes them above about 1450² pixels.

Tiled (``predict_tiled_peak_bytes``): the callable level replays the whole decoder on one tile (its attention
sees only the tile); the module level (:mod:`lib_optim.vae_tiling`) replays the mid block on the whole latent,
the statistics pass if any, and its own executor on one tile (in-place SiLU and residual add), with the mid
block's output and the output canvas (float32) alive throughout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CH, CH_MULT, NUM_RES_BLOCKS, Z_CHANNELS = 128, (1, 2, 4, 4), 2, 4
SCALE = 8
ATTENTIONS = ("sdpa", "math")
KINDS = ("decode", "encode")
LEVELS = ("callable", "module")
NORMS = ("lowres", "two-pass", "sync", "tile")
DEVICES = ("cuda", "cpu")


@dataclass(frozen=True)
class _Host:
    """How the layers are computed: SiLU and the residual add in place or not, the mid-block attention,
    whether each convolution copies its input (and weights) into another layout while it runs, the
    element size, and the batch."""

    inplace_silu: bool
    inplace_add: bool
    attention: str
    conv_copies_input: bool
    dtype_bytes: int
    batch: int

    @property
    def unit(self) -> int:
        return self.dtype_bytes * self.batch


@dataclass
class _Trace:
    """Bytes alive, the most seen, and where."""

    host: _Host
    live: float = 0
    peak: float = 0
    where: str = ""

    def alloc(self, nbytes: float, what: str) -> None:
        self.live += nbytes
        if self.live > self.peak:
            self.peak, self.where = self.live, what

    def free(self, nbytes: float) -> None:
        self.live -= nbytes

    def act(self, channels: float, px: float) -> float:
        """Bytes of an activation."""
        return channels * px * self.host.unit

    def conv(self, cin: int, cout: int, k: int, px_in: float, px_out: float, what: str) -> None:
        """A convolution on an alive input: allocates its output. On CPU, oneDNN reorders the input and the
        weights into its blocked layout for the call (measured: a copy of the input's size, plus the weights)."""
        extra = 0.0
        if self.host.conv_copies_input:
            extra = self.act(cin, px_in) + cin * cout * k * k * self.host.dtype_bytes
        self.alloc(self.act(cout, px_out) + extra, what)
        self.free(extra)


def _resnet(t: _Trace, cin: int, cout: int, px: float, where: str) -> None:
    """One ResNet block at ``px`` pixels on an alive input, which its caller frees after the block returns;
    leaves the block's output alive."""
    a, b = t.act(cin, px), t.act(cout, px)

    def norm_silu(size: float, label: str) -> None:  # leaves the activated tensor alive
        t.alloc(size, f"{where} {label}")  # GroupNorm output
        if not t.host.inplace_silu:
            t.alloc(size, f"{where} {label} sigmoid")
            t.alloc(size, f"{where} {label} x·sigmoid")
            t.free(2 * size)  # the sigmoid, then the norm output once SiLU returns

    norm_silu(a, "norm1/SiLU")
    t.conv(cin, cout, 3, px, px, f"{where} conv1")
    t.free(a)
    norm_silu(b, "norm2/SiLU")
    t.conv(cout, cout, 3, px, px, f"{where} conv2")
    t.free(2 * b)  # the activated norm2 output; conv1's output once the local is rebound
    if cin != cout:
        t.conv(cin, cout, 1, px, px, f"{where} nin_shortcut")
    if not t.host.inplace_add:
        t.alloc(b, f"{where} residual add")
        t.free(b)  # conv2's output
    if cin != cout:
        t.free(b)  # the shortcut


def _attention(t: _Trace, c: int, positions: float, where: str) -> None:
    """Single-head self-attention on an alive input; leaves its output alive."""
    a = t.act(c, positions)
    t.alloc(a, f"{where} norm")
    for name in "qkv":
        t.conv(c, c, 1, positions, positions, f"{where} {name}")
    if t.host.attention == "math":
        scores = positions * positions * t.host.unit
        t.alloc(scores, f"{where} scores")
        t.alloc(scores, f"{where} scaled scores / softmax")
        t.free(scores)
        t.alloc(a, f"{where} attention output")
        t.free(scores)
    else:
        t.alloc(a, f"{where} attention output")
    t.free(4 * a)  # q, k, v and the norm output
    t.conv(c, c, 1, positions, positions, f"{where} proj_out")
    t.alloc(a, f"{where} residual add")
    t.free(2 * a)


def _mid(t: _Trace, c: int, px: float, where: str) -> None:
    """The mid block on an alive input: frees the input, leaves the output alive."""
    a = t.act(c, px)
    _resnet(t, c, c, px, f"{where}.block_1")
    t.free(a)
    _attention(t, c, px, f"{where}.attn_1")
    t.free(a)
    _resnet(t, c, c, px, f"{where}.block_2")
    t.free(a)


def _decoder_up(t: _Trace, ch: int, px_latent: float) -> None:
    """The up levels, norm_out, conv_out on an alive mid output: frees it, leaves the image alive."""
    cin = ch * CH_MULT[-1]
    px = px_latent
    for level in reversed(range(len(CH_MULT))):
        cout = ch * CH_MULT[level]
        for j in range(NUM_RES_BLOCKS + 1):
            _resnet(t, cin, cout, px, f"up[{level}].block[{j}]")
            t.free(t.act(cin, px))
            cin = cout
        if level != 0:
            t.alloc(t.act(cin, 4 * px), f"up[{level}].upsample interpolate")
            t.conv(cin, cin, 3, 4 * px, 4 * px, f"up[{level}].upsample conv")
            t.free(t.act(cin, 4 * px) + t.act(cin, px))
            px *= 4
    t.alloc(t.act(cin, px), "norm_out")
    if not t.host.inplace_silu:
        t.alloc(t.act(2 * cin, px), "norm_out SiLU")
        t.free(t.act(2 * cin, px))
    t.conv(cin, 3, 3, px, px, "conv_out")
    t.free(t.act(2 * cin, px))


def _encoder_down(t: _Trace, ch: int, px_image: float) -> None:
    """conv_in and the down levels on an alive image: leaves the latent-resolution features alive."""
    px = px_image
    cin = ch
    t.conv(3, ch, 3, px, px, "conv_in")
    for level, m in enumerate(CH_MULT):
        cout = ch * m
        for j in range(NUM_RES_BLOCKS):
            _resnet(t, cin, cout, px, f"down[{level}].block[{j}]")
            t.free(t.act(cin, px))
            cin = cout
        if level != len(CH_MULT) - 1:
            t.alloc(t.act(cin, px), f"down[{level}].downsample pad")
            t.conv(cin, cin, 3, px, px / 4, f"down[{level}].downsample conv")
            t.free(2 * t.act(cin, px))
            px /= 4


def _check(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"[Optim] VAE planner {name}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


def _host(
    batch: int, dtype_bytes: int, inplace_silu: bool, attention: str, device: str, *, ours: bool = False
) -> _Host:
    for name, value in (("batch", batch),):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"[Optim] VAE planner {name}: {value!r} is not allowed; allowed: a whole number ≥ 1")
    if dtype_bytes not in (1, 2, 4, 8):
        raise ValueError(f"[Optim] VAE planner dtype_bytes: {dtype_bytes!r} is not allowed; allowed: 1, 2, 4, 8")
    _check("attention", attention, ATTENTIONS)
    _check("device", device, DEVICES)
    if ours:  # vae_tiling's executor: SiLU and the residual add in place, the host's convolutions
        return _Host(True, True, attention, device == "cpu", dtype_bytes, batch)
    return _Host(inplace_silu, False, attention, device == "cpu", dtype_bytes, batch)


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < SCALE:
            raise ValueError(f"[Optim] VAE planner {name}: {value!r} is not allowed; allowed: pixels ≥ {SCALE}")


def _decode_trace(height: int, width: int, channels: int, host: _Host) -> _Trace:
    lat = (height // SCALE) * (width // SCALE)
    t = _Trace(host)
    t.conv(Z_CHANNELS, Z_CHANNELS, 1, lat, lat, "post_quant_conv")
    t.conv(Z_CHANNELS, channels * CH_MULT[-1], 3, lat, lat, "conv_in")
    t.free(t.act(Z_CHANNELS, lat))
    _mid(t, channels * CH_MULT[-1], lat, "mid")
    _decoder_up(t, channels, lat)
    return t


def _encode_trace(height: int, width: int, channels: int, host: _Host) -> _Trace:
    lat = (height // SCALE) * (width // SCALE)
    top = channels * CH_MULT[-1]
    t = _Trace(host)
    _encoder_down(t, channels, height * width)
    _mid(t, top, lat, "mid")
    t.alloc(t.act(top, lat), "norm_out")
    if not host.inplace_silu:
        t.alloc(t.act(2 * top, lat), "norm_out SiLU")
        t.free(t.act(2 * top, lat))
    t.conv(top, 2 * Z_CHANNELS, 3, lat, lat, "conv_out")
    t.conv(2 * Z_CHANNELS, 2 * Z_CHANNELS, 1, lat, lat, "quant_conv")
    return t


def predict_decode_peak_bytes(
    height: int,
    width: int,
    *,
    batch: int = 1,
    dtype_bytes: int = 2,
    channels: int = CH,
    inplace_silu: bool = False,
    attention: str = "sdpa",
    device: str = "cuda",
) -> int:
    """Peak bytes of an untiled decode to a ``height × width`` image beyond its input latent (the image
    included). ``channels``: the VAE's base width (128 in SD; less for scaled-down test models)."""
    _check_size(height, width)
    host = _host(batch, dtype_bytes, inplace_silu, attention, device)
    return int(_decode_trace(height, width, channels, host).peak)


def predict_encode_peak_bytes(
    height: int,
    width: int,
    *,
    batch: int = 1,
    dtype_bytes: int = 2,
    channels: int = CH,
    inplace_silu: bool = False,
    attention: str = "sdpa",
    device: str = "cuda",
) -> int:
    """Peak bytes of an untiled encode of a ``height × width`` image to its moments, beyond the input image."""
    _check_size(height, width)
    host = _host(batch, dtype_bytes, inplace_silu, attention, device)
    return int(_encode_trace(height, width, channels, host).peak)


def peak_location(
    height: int,
    width: int,
    *,
    kind: str = "decode",
    channels: int = CH,
    inplace_silu: bool = False,
    attention: str = "sdpa",
    device: str = "cuda",
) -> str:
    """The layer at which the predicted untiled peak is reached (for reports)."""
    _check("kind", kind, KINDS)
    _check_size(height, width)
    host = _host(1, 2, inplace_silu, attention, device)
    trace = _decode_trace if kind == "decode" else _encode_trace
    return trace(height, width, channels, host).where


def predict_tiled_peak_bytes(
    height: int,
    width: int,
    *,
    tile: int,
    overlap: int,
    batch: int = 1,
    dtype_bytes: int = 2,
    kind: str = "decode",
    level: str = "module",
    norm: str = "lowres",
    channels: int = CH,
    inplace_silu: bool = False,
    attention: str = "sdpa",
    device: str = "cuda",
    lowres_step: int = 2,
) -> int:
    """Peak bytes of a tiled decode/encode (:mod:`lib_optim.vae_tiling`) with ``tile`` latent pixels a side.

    ``inplace_silu``/``attention`` describe the host's modules: what the callable level runs on each tile,
    and the module level's untiled mid block."""
    _check_size(height, width)
    _check("kind", kind, KINDS)
    _check("level", level, LEVELS)
    _check("norm", norm, NORMS)
    host = _host(batch, dtype_bytes, inplace_silu, attention, device)
    ours = _host(batch, dtype_bytes, inplace_silu, attention, device, ours=True)
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"[Optim] VAE planner tile: {tile!r} is not allowed; allowed: latent pixels ≥ 1")
    rows, cols = height // SCALE, width // SCALE
    tile_h, tile_w = min(rows, tile), min(cols, tile)
    single = rows <= tile and cols <= tile
    whole = _decode_trace if kind == "decode" else _encode_trace
    if single and (level == "callable" or norm == "tile"):
        return int(whole(height, width, channels, host).peak)  # done untiled
    wide = max(4, dtype_bytes) * batch  # canvases accumulate in float32 (or wider)
    if level == "callable":
        out_channels, out_px = (3, height * width) if kind == "decode" else (2 * Z_CHANNELS, rows * cols)
        canvas = out_channels * out_px * wide
        one = whole(tile_h * SCALE, tile_w * SCALE, channels, host).peak
        return int(canvas + one)
    top = channels * CH_MULT[-1]
    lat = rows * cols
    t = _Trace(host)
    if kind == "decode":
        t.conv(Z_CHANNELS, Z_CHANNELS, 1, lat, lat, "post_quant_conv")
        t.conv(Z_CHANNELS, top, 3, lat, lat, "conv_in")
        t.free(t.act(Z_CHANNELS, lat))
        _mid(t, top, lat, "mid (untiled)")  # its output stays alive: the tiles are cut from it
        if single:
            tt = _Trace(ours, t.live, t.peak, t.where)
            _decoder_up(tt, channels, lat)
            return int(tt.peak)
        if norm == "lowres":
            tt = _Trace(ours, t.live, t.peak, t.where)
            _decoder_up(tt, channels, lat / lowres_step**2)
            t.peak, t.where = tt.peak, tt.where
        t.alloc(3 * height * width * wide, "output canvas")
        if norm == "sync":
            # each tile waits at a GroupNorm holding its block input and conv1's output; at full resolution
            # that is up to 256 + 128 channels (the up path's last level) over the tiles' total area
            held = t.act(channels * CH_MULT[1] + channels, height * width) * _overlap_factor(rows, cols, tile, overlap)
            t.alloc(held, "all tiles' held activations")
        tt = _Trace(ours, t.live, t.peak, t.where)
        tt.alloc(tt.act(top, tile_h * tile_w), "tile input")
        _decoder_up(tt, channels, tile_h * tile_w)
        if dtype_bytes < 4:
            tt.alloc(3 * height * width * host.unit, "output cast")
        return int(tt.peak)
    # encode: tiles through the down path into a latent-resolution canvas, then the mid block untiled
    if single:
        tt = _Trace(ours)
        _encoder_down(tt, channels, height * width)
        features = tt.act(top, lat)
        t.peak, t.where = tt.peak, tt.where
        t.alloc(features, "features")
    else:
        if norm == "lowres":
            tt = _Trace(ours)
            _encoder_down(tt, channels, height * width / lowres_step**2)
            t.peak, t.where = tt.peak, tt.where
        features = top * lat * wide
        t.alloc(features, "latent canvas")
        if norm == "sync":
            held = t.act(2 * channels, height * width) * _overlap_factor(rows, cols, tile, overlap)
            t.alloc(held, "all tiles' held activations")
        tt = _Trace(ours, t.live, t.peak, t.where)
        _encoder_down(tt, channels, tile_h * tile_w * SCALE**2)
        t.peak, t.where = tt.peak, tt.where
        if dtype_bytes < 4:
            t.alloc(t.act(top, lat), "features cast")
            t.free(features)
    _mid(t, top, lat, "mid (untiled)")
    t.alloc(t.act(top, lat), "norm_out")
    t.conv(top, 2 * Z_CHANNELS, 3, lat, lat, "conv_out")
    t.conv(2 * Z_CHANNELS, 2 * Z_CHANNELS, 1, lat, lat, "quant_conv")
    return int(t.peak)


def _overlap_factor(rows: int, cols: int, tile: int, overlap: int) -> float:
    """Total tile area over image area (tiles overlap)."""

    def count(length: int) -> int:
        return 1 if length <= tile else math.ceil((length - overlap) / (tile - overlap))

    return count(rows) * min(rows, tile) * count(cols) * min(cols, tile) / (rows * cols)


def needs_tiling(
    height: int,
    width: int,
    *,
    dtype_bytes: int,
    free_bytes: int,
    budget_bytes: int | None = None,
    batch: int = 1,
    kind: str = "decode",
    channels: int = CH,
    inplace_silu: bool = False,
    attention: str = "sdpa",
    device: str = "cuda",
) -> tuple[bool, str]:
    """The ``auto`` rule: tile exactly when the predicted untiled decode (or encode) does not fit in free
    memory, or in ``budget_bytes`` when that is smaller. Returns (tile?, the reason in words)."""
    _check("kind", kind, KINDS)
    if not isinstance(free_bytes, int) or free_bytes < 0:
        raise ValueError(f"[Optim] VAE planner free_bytes: {free_bytes!r} is not allowed; allowed: bytes ≥ 0")
    if budget_bytes is not None and (not isinstance(budget_bytes, int) or budget_bytes <= 0):
        raise ValueError(
            f"[Optim] VAE planner budget_bytes: {budget_bytes!r} is not allowed; allowed: bytes > 0, or None"
        )
    predict = predict_decode_peak_bytes if kind == "decode" else predict_encode_peak_bytes
    need = predict(
        height,
        width,
        batch=batch,
        dtype_bytes=dtype_bytes,
        channels=channels,
        inplace_silu=inplace_silu,
        attention=attention,
        device=device,
    )
    limit, limit_name = free_bytes, "free memory"
    if budget_bytes is not None and budget_bytes < free_bytes:
        limit, limit_name = budget_bytes, "the budget"
    size = f"{width}x{height}" + (f", batch {batch}" if batch > 1 else "")
    mib = 1 << 20
    verdict = "more than" if need > limit else "fits in"
    return need > limit, f"{kind} {size} needs ~{need / mib:.0f} MiB, {verdict} {limit_name} ({limit / mib:.0f} MiB)"
