"""Predicted peak memory of an SD VAE decode or encode, whole or tiled, and the ``auto`` rule for tiling.

No torch here (like :mod:`lib_optim.attention.planner`): the rule runs before anything is on the GPU.

The prediction replays the network's layers in order, counting the bytes of the tensors alive after each
allocation and free — a ResNet block's input is held by its caller until the block returns, a norm's output
until the SiLU after it returns, and so on — and reports the most. The layer sequence is the SD
``AutoencoderKL``'s (see :mod:`lib_optim.vae.model`); how a host computes each layer changes what is alive:

- ``inplace_silu``: A1111 runs latent diffusion's (SD1) and sgm's (SDXL) VAE, whose ``nonlinearity`` is
  ``x * sigmoid(x)``: while it runs, the block input, the norm output, the sigmoid and the product are alive.
  Forge's ResNet blocks use ``SiLU(inplace=True)`` (Forge f2 backend/nn/vae.py:83), which leaves two.
- ``attention`` of the mid block, at latent resolution over all ``h·w`` positions, one head:
  ``"sdpa"`` — no ``(h·w)²`` score matrix (A1111's sdp/sdp-no-mem/xformers VAE forwards, Forge's
  ``attention_function_single_head_spatial`` on PyTorch/xformers, sub-quadratic attention: chunked);
  ``"math"`` — the score matrix and its softmax, ``2·(h·w)²`` elements per image (ldm's own ``AttnBlock``, which
  A1111 keeps when no cross-attention optimization applies to the VAE). A1111's Doggettx forward slices the
  score matrix to fit free memory; count it as ``"sdpa"``.
- ``device``: on CPU every convolution also holds a copy of its input (and weights) in oneDNN's blocked
  layout while it runs (measured with :mod:`lib_optim.bench.vae`); on CUDA no workspace is counted (cuDNN's
  is small next to these activations, but that is not measured here).

Let ``X = 128·H·W·e`` (one 128-channel activation at the image's size, ``e`` bytes per element, per image).
A decode peaks in the first ResNet block at full size (256 channels in, 128 out): ``8·X`` with ldm's SiLU,
``5·X`` with Forge's (``7·X`` on CPU) — 2 GiB and 1.25 GiB at 1024² in fp16. The mid block's math attention
overtakes them above about 1450². An encode peaks in its first level: ``5·X`` (ldm).

Tiled (:mod:`lib_optim.vae.tiling`): the callable level replays the host's whole decoder on one tile, plus the
float32 output canvas. The module level replays the host's mid block on the whole latent (its output stays
alive: the tiles are cut from it), then its own executor on one tile — SiLU and the residual add in place, a
block's input freed after the shortcut: ``4.5·X`` of the tile, at the last upsampling — plus the canvas; with
``norm="exact"`` the waiting tiles' activations (up to ``2·X`` of each tile) too, unless parked off the device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

CH, CH_MULT, NUM_RES_BLOCKS, Z_CHANNELS = 128, (1, 2, 4, 4), 2, 4
SCALE = 8
ATTENTIONS = ("sdpa", "math")
KINDS = ("decode", "encode")
LEVELS = ("callable", "module")
NORMS = ("exact", "tile")
DEVICES = ("cuda", "cpu")
MIB = 1 << 20


@dataclass(frozen=True)
class _Host:
    """How the layers are computed: by the host's modules (SiLU in place or not) or by vae_tiling's executor
    (SiLU and the residual add in place, the block input freed early); the mid-block attention; whether each
    convolution copies its input; element size and batch."""

    inplace_silu: bool
    executor: bool
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
        """A convolution of an alive input: allocates its output. On CPU, oneDNN reorders the input and the
        weights into its blocked layout for the call (measured: a copy of the input's size, plus the weights)."""
        extra = 0.0
        if self.host.conv_copies_input:
            extra = self.act(cin, px_in) + cin * cout * k * k * self.host.dtype_bytes
        self.alloc(self.act(cout, px_out) + extra, what)
        self.free(extra)

    def branch(self, host: _Host) -> _Trace:
        """The same memory, layers computed another way from here on."""
        return _Trace(host, self.live, self.peak, self.where)

    def join(self, other: _Trace) -> None:
        self.live = other.live
        if other.peak > self.peak:
            self.peak, self.where = other.peak, other.where


def _resnet(t: _Trace, cin: int, cout: int, px: float, where: str) -> None:
    """One ResNet block at ``px`` pixels: consumes its alive input, leaves its output alive."""
    if t.host.executor:
        _executor_resnet(t, cin, cout, px, where)
        return
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
    t.alloc(b, f"{where} residual add")
    t.free(b)  # conv2's output
    if cin != cout:
        t.free(b)
    t.free(a)  # the caller drops the input after the block returns


def _executor_resnet(t: _Trace, cin: int, cout: int, px: float, where: str) -> None:
    """vae_tiling's ResNet block: the shortcut first, then the input normalized in place; SiLU and the residual
    add in place; norm2 in place on conv1's output."""
    a, b = t.act(cin, px), t.act(cout, px)
    if cin != cout:
        t.conv(cin, cout, 1, px, px, f"{where} nin_shortcut")  # the residual
    else:
        t.alloc(a, f"{where} norm1 (the input is the residual)")
    t.conv(cin, cout, 3, px, px, f"{where} conv1")
    t.free(a)  # the normalized input
    t.conv(cout, cout, 3, px, px, f"{where} conv2")
    t.free(2 * b)  # norm2's output (conv1's, normalized in place) and the residual, added in place


def _attention(t: _Trace, c: int, positions: float, where: str) -> None:
    """Single-head self-attention: consumes its alive input, leaves its output alive."""
    a = t.act(c, positions)
    t.alloc(a, f"{where} norm")
    for name in "qkv":
        t.conv(c, c, 1, positions, positions, f"{where} {name}")
        t.alloc(a, f"{where} {name} as (positions, channels)")  # the hosts' contiguous copy
        t.free(a)
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
    t.free(3 * a)  # the attention output, proj_out's, and the input


def _mid(t: _Trace, c: int, px: float, where: str) -> None:
    """The mid block: consumes its alive input, leaves its output alive."""
    _resnet(t, c, c, px, f"{where}.block_1")
    _attention(t, c, px, f"{where}.attn_1")
    _resnet(t, c, c, px, f"{where}.block_2")


def _decoder_up(t: _Trace, ch: int, px_latent: float) -> None:
    """The up levels, norm_out, SiLU, conv_out: consumes the alive mid output, leaves the image alive."""
    cin = ch * CH_MULT[-1]
    px = px_latent
    for level in reversed(range(len(CH_MULT))):
        cout = ch * CH_MULT[level]
        for j in range(NUM_RES_BLOCKS + 1):
            _resnet(t, cin, cout, px, f"up[{level}].block[{j}]")
            cin = cout
        if level != 0:
            _upsample(t, cin, px, f"up[{level}].upsample")
            px *= 4
    _tail(t, cin, 3, px)


UPSAMPLE_BANDS = 8  # as vae_tiling.UPSAMPLE_BANDS


def _upsample(t: _Trace, c: int, px: float, where: str) -> None:
    """2× nearest upsampling and a 3×3 convolution: consumes its alive input, leaves its output alive. The hosts
    interpolate the whole input first; the executor goes band by band (one source row of halo each side)."""
    if not t.host.executor:
        t.alloc(t.act(c, 4 * px), f"{where} interpolate")
        t.conv(c, c, 3, 4 * px, 4 * px, f"{where} conv")
        t.free(t.act(c, 4 * px) + t.act(c, px))  # the interpolated copy and the input
        return
    rows = max(1.0, math.sqrt(px))  # tiles are about square
    step = math.ceil(rows / UPSAMPLE_BANDS)
    band = 4 * px * min(1.0, (step + 2) / rows)
    t.alloc(t.act(c, 4 * px), f"{where} output")
    t.alloc(t.act(c, band), f"{where} band interpolate")
    t.conv(c, c, 3, band, band, f"{where} band conv")
    t.free(2 * t.act(c, band) + t.act(c, px))


def _tail(t: _Trace, cin: int, cout: int, px: float) -> None:
    """norm_out, SiLU, conv_out on an alive input: consumes it. Both hosts rebind the input to the norm's output
    (freeing it) and apply their out-of-place ``nonlinearity`` here, in-place SiLU blocks or not; the executor
    normalizes in place."""
    if not t.host.executor:
        t.alloc(t.act(cin, px), "norm_out")
        t.free(t.act(cin, px))
        t.alloc(t.act(2 * cin, px), "norm_out SiLU")
        t.free(t.act(2 * cin, px))
    t.conv(cin, cout, 3, px, px, "conv_out")
    t.free(t.act(cin, px))


def _encoder_down(t: _Trace, ch: int, px_image: float) -> None:
    """conv_in and the down levels: leaves the latent-resolution features alive (the image is the caller's)."""
    px = px_image
    cin = ch
    t.conv(3, ch, 3, px, px, "conv_in")
    for level, m in enumerate(CH_MULT):
        cout = ch * m
        for j in range(NUM_RES_BLOCKS):
            _resnet(t, cin, cout, px, f"down[{level}].block[{j}]")
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
    batch: int, dtype_bytes: int, inplace_silu: bool, attention: str, device: str, *, executor: bool = False
) -> _Host:
    if not isinstance(batch, int) or batch < 1:
        raise ValueError(f"[Optim] VAE planner batch: {batch!r} is not allowed; allowed: a whole number ≥ 1")
    if dtype_bytes not in (1, 2, 4, 8):
        raise ValueError(f"[Optim] VAE planner dtype_bytes: {dtype_bytes!r} is not allowed; allowed: 1, 2, 4, 8")
    _check("attention", attention, ATTENTIONS)
    _check("device", device, DEVICES)
    return _Host(inplace_silu, executor, attention, device == "cpu", dtype_bytes, batch)


def _check_size(height: int, width: int) -> None:
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value < SCALE:
            raise ValueError(f"[Optim] VAE planner {name}: {value!r} is not allowed; allowed: pixels ≥ {SCALE}")


def _decode_head(t: _Trace, channels: int, lat: float) -> None:
    """post_quant_conv, conv_in and the mid block on the whole latent (alive before): leaves the mid output."""
    t.conv(Z_CHANNELS, Z_CHANNELS, 1, lat, lat, "post_quant_conv")
    t.conv(Z_CHANNELS, channels * CH_MULT[-1], 3, lat, lat, "conv_in")
    t.free(t.act(Z_CHANNELS, lat))
    _mid(t, channels * CH_MULT[-1], lat, "mid")


def _encode_tail(t: _Trace, channels: int, lat: float) -> None:
    """The mid block, norm_out, SiLU, conv_out, quant_conv on alive features: leaves the moments."""
    top = channels * CH_MULT[-1]
    _mid(t, top, lat, "mid")
    _tail(t, top, 2 * Z_CHANNELS, lat)
    t.conv(2 * Z_CHANNELS, 2 * Z_CHANNELS, 1, lat, lat, "quant_conv")


def _decode_trace(height: int, width: int, channels: int, host: _Host) -> _Trace:
    lat = (height // SCALE) * (width // SCALE)
    t = _Trace(host)
    _decode_head(t, channels, lat)
    _decoder_up(t, channels, lat)
    return t


def _encode_trace(height: int, width: int, channels: int, host: _Host) -> _Trace:
    t = _Trace(host)
    _encoder_down(t, channels, height * width)
    _encode_tail(t, channels, (height // SCALE) * (width // SCALE))
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


def _tile_count(length: int, tile: int, overlap: int) -> int:
    return 1 if length <= tile else math.ceil((length - overlap) / (tile - overlap))


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
    norm: str = "exact",
    park: bool | None = None,
    channels: int = CH,
    inplace_silu: bool = False,
    attention: str = "sdpa",
    device: str = "cuda",
) -> int:
    """Peak bytes (on the compute device) of a tiled decode/encode with ``tile`` latent pixels a side.

    ``inplace_silu``/``attention`` describe the host's modules: what the callable level runs on each tile, and
    the module level's untiled mid block. ``park``: exact-norm tiles waiting for statistics hold their
    activations off the device (``None`` = as :func:`lib_optim.vae.tiling.tiled_decoder`'s ``park="auto"``:
    on CUDA yes, on CPU no); what they hold there is :func:`predict_parked_bytes`."""
    _check_size(height, width)
    _check("kind", kind, KINDS)
    _check("level", level, LEVELS)
    _check("norm", norm, NORMS)
    host = _host(batch, dtype_bytes, inplace_silu, attention, device)
    ours = _host(batch, dtype_bytes, inplace_silu, attention, device, executor=True)
    if not isinstance(tile, int) or tile < 1:
        raise ValueError(f"[Optim] VAE planner tile: {tile!r} is not allowed; allowed: latent pixels ≥ 1")
    rows, cols = height // SCALE, width // SCALE
    tiles = _tile_count(rows, tile, overlap) * _tile_count(cols, tile, overlap)
    tile_h, tile_w = min(rows, tile), min(cols, tile)
    whole = _decode_trace if kind == "decode" else _encode_trace
    if tiles == 1 and level == "callable":
        return int(whole(height, width, channels, host).peak)  # the untiled call itself
    wide = max(4, dtype_bytes) * batch  # canvases accumulate in float32 (or wider)
    if level == "callable":
        out_channels, out_px = (3, height * width) if kind == "decode" else (2 * Z_CHANNELS, rows * cols)
        return int(out_channels * out_px * wide + whole(tile_h * SCALE, tile_w * SCALE, channels, host).peak)
    if park is None:
        park = device == "cuda"
    held = 0.0 if (park or norm != "exact" or tiles == 1) else _held_per_tile(ours, channels, tile_h * tile_w)
    lat = rows * cols
    t = _Trace(host)
    if kind == "decode":
        _decode_head(t, channels, lat)  # its output stays alive to the end: the tiles are cut from it
        if tiles > 1:
            t.alloc(3 * height * width * wide, "output canvas")
        t.alloc(held * (tiles - 1), "waiting tiles")
        tt = t.branch(ours)
        tt.alloc(tt.act(channels * CH_MULT[-1], tile_h * tile_w), "tile input")  # counted until consumed
        _decoder_up(tt, channels, tile_h * tile_w)
        t.join(tt)
        if tiles > 1 and dtype_bytes < 4:
            t.alloc(3 * height * width * host.unit, "output cast")
        return int(t.peak)
    top = channels * CH_MULT[-1]
    if tiles > 1:
        t.alloc(top * lat * wide, "feature canvas")
    t.alloc(held * (tiles - 1), "waiting tiles")
    tt = t.branch(ours)
    _encoder_down(tt, channels, tile_h * tile_w * SCALE**2)
    t.join(tt)
    if tiles > 1:
        t.free(held * (tiles - 1) + t.act(top, tile_h * tile_w))  # the canvas holds the features now
        if dtype_bytes < 4:
            t.alloc(t.act(top, lat), "features cast")
            t.free(top * lat * wide)
    _encode_tail(t, channels, lat)
    return int(t.peak)


def _held_per_tile(ours: _Host, channels: int, tile_px_latent: float) -> float:
    """The most one waiting tile holds at a GroupNorm: a block's input, or its residual and conv1's output —
    256 channels' worth at full size (decode: the last level's first block; encode: the first level's)."""
    return 2 * channels * tile_px_latent * SCALE**2 * ours.unit


def predict_parked_bytes(
    height: int,
    width: int,
    *,
    tile: int,
    overlap: int,
    batch: int = 1,
    dtype_bytes: int = 2,
    kind: str = "decode",
    channels: int = CH,
) -> int:
    """Bytes the waiting tiles of an exact-norm module-level tiling park off the device (host RAM on CUDA)."""
    _check_size(height, width)
    _check("kind", kind, KINDS)
    ours = _host(batch, dtype_bytes, True, "sdpa", "cuda", executor=True)
    rows, cols = height // SCALE, width // SCALE
    tiles = _tile_count(rows, tile, overlap) * _tile_count(cols, tile, overlap)
    if tiles == 1:
        return 0
    return int(_held_per_tile(ours, channels, min(rows, tile) * min(cols, tile)) * tiles)


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
    verdict = "more than" if need > limit else "fits in"
    return need > limit, f"{kind} {size} needs ~{need / MIB:.0f} MiB, {verdict} {limit_name} ({limit / MIB:.0f} MiB)"
