"""Side-by-side timing of the UNet blocks eager vs under :mod:`lib_optim.compile.regional`.

The model here is our own small re-creation of the *structure* of the SD1.x/SDXL UNets the hosts run
(ldm ``openaimodel.py`` in A1111, Forge ``backend/nn/unet.py``): ``ResBlock`` (GroupNorm, SiLU, conv, a
timestep projection), ``SpatialTransformer`` holding ``BasicTransformerBlock`` s whose attention goes
through the module-global :data:`attention_function` looked up at call time (as Forge's
``backend/nn/unet.py:5,154`` does), and the input/middle/output ``TimestepEmbedSequential`` containers
with skip connections. Like Forge, the UNet passes a ``transformer_options`` dict down that the blocks
read and write, so the per-position guards dynamo puts on it are exercised too. No host code is
imported or copied; the widths are parameters so the same model serves the unit tests (tiny) and the
benchmark (SD1.5-like layout).

:func:`run_compile_bench` times the eager model and the regionally compiled one in interleaved rounds
after the compile (medians), and reports the compile seconds measured by the compiler's own stats.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lib_optim.compile import RegionalCompiler, default_block_names
from lib_optim.log import get_logger

log = get_logger(__name__)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Multi-head attention on ``(batch, tokens, heads*dim_head)`` tensors via torch's SDPA."""
    b, _, inner = q.shape
    d = inner // heads
    # one statement per tensor: unpacking a generator is a graph break in torch 2.1's dynamo
    q = q.reshape(b, -1, heads, d).transpose(1, 2)
    k = k.reshape(b, -1, heads, d).transpose(1, 2)
    v = v.reshape(b, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(b, -1, inner)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """The same attention written out (softmax(QKᵀ/√d)V): a second, distinct implementation to switch to."""
    b, _, inner = q.shape
    d = inner // heads
    q = q.reshape(b, -1, heads, d).transpose(1, 2)
    k = k.reshape(b, -1, heads, d).transpose(1, 2)
    v = v.reshape(b, -1, heads, d).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d)), dim=-1)
    return (weights @ v).transpose(1, 2).reshape(b, -1, inner)


# Looked up at call time by CrossAttention.forward; tests and hosts switch attention by rebinding it.
attention_function: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor] = sdpa_attention


class CrossAttention(nn.Module):
    def __init__(self, dim: int, context_dim: int | None, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim or dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        out = attention_function(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, context_dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = CrossAttention(dim, None, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim * 4), nn.GELU(), nn.Linear(dim * 4, dim))

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, transformer_options: dict[str, Any] | None = None
    ) -> torch.Tensor:
        options = transformer_options or {}
        # Forge looks up per-position patches by ("input", id, block_index); an empty table still makes
        # dynamo guard on the position, as Forge's BasicTransformerBlock._forward does.
        block = options.get("block", ("none", 0))
        position = (block[0], block[1], options.get("block_index", 0))
        patches = options.get("patches_replace", {})
        h = self.norm1(x)
        x = x + (patches[position](h) if position in patches else self.attn1(h))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, channels: int, context_dim: int, heads: int, groups: int, depth: int = 1):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, context_dim, heads) for _ in range(depth)]
        )
        self.proj_out = nn.Linear(channels, channels)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor | None = None, transformer_options: dict[str, Any] | None = None
    ) -> torch.Tensor:
        options = {} if transformer_options is None else transformer_options
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x).reshape(b, c, h * w).transpose(1, 2))
        for index, block in enumerate(self.transformer_blocks):
            options["block_index"] = index  # written like Forge's SpatialTransformer does
            x = block(x, context=context, transformer_options=options)
        x = self.proj_out(x).transpose(1, 2).reshape(b, c, h, w)
        return x + x_in


class TimestepBlock(nn.Module):
    """Marks the blocks that take the timestep embedding."""


class ResBlock(TimestepBlock):
    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(groups, channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(groups, out_channels), nn.SiLU(), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection: nn.Module = (
            nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)
        )

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).type(h.dtype)[..., None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, output_shape: Sequence[int] | None = None) -> torch.Tensor:
        size = tuple(output_shape[2:4]) if output_shape is not None else None
        x = F.interpolate(x, size=size, scale_factor=None if size else 2.0, mode="nearest")
        return self.conv(x)


class TimestepEmbedSequential(nn.Sequential, TimestepBlock):
    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        emb: torch.Tensor,
        context: torch.Tensor | None = None,
        transformer_options: dict[str, Any] | None = None,
        output_shape: Sequence[int] | None = None,
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, transformer_options)
            elif isinstance(layer, Upsample):
                x = layer(x, output_shape=output_shape)
            else:
                x = layer(x)
        return x


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TinyUNet(nn.Module):
    """An ldm/Forge-shaped UNet: input blocks, a middle block and output blocks with skip connections.

    ``channel_mult`` gives the levels, ``attention_levels`` the levels with a SpatialTransformer after
    each ResBlock (SD1.5: mult (1, 2, 4, 4), attention at levels 0-2, 2 ResBlocks per level).
    """

    def __init__(
        self,
        *,
        in_channels: int = 4,
        model_channels: int = 8,
        channel_mult: Sequence[int] = (1, 2),
        num_res_blocks: int = 1,
        attention_levels: Sequence[int] = (0, 1),
        heads: int = 2,
        context_dim: int = 16,
        groups: int = 4,
        transformer_depth: int = 1,
    ):
        super().__init__()
        self.model_channels = model_channels
        emb_dim = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))

        def attention(ch: int) -> SpatialTransformer:
            return SpatialTransformer(ch, context_dim, heads, groups, transformer_depth)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))]
        )
        skip_channels = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, emb_dim, model_channels * mult, groups)]
                ch = model_channels * mult
                if level in attention_levels:
                    layers.append(attention(ch))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_channels.append(ch)
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, emb_dim, ch, groups), attention(ch), ResBlock(ch, emb_dim, ch, groups)
        )
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skip_channels.pop(), emb_dim, model_channels * mult, groups)]
                ch = model_channels * mult
                if level in attention_levels:
                    layers.append(attention(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        self.out = nn.Sequential(nn.GroupNorm(groups, ch), nn.SiLU(), nn.Conv2d(ch, in_channels, 3, padding=1))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        transformer_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        options = {} if transformer_options is None else transformer_options
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        hs = []
        h = x
        for index, module in enumerate(self.input_blocks):
            options["block"] = ("input", index)
            h = module(h, emb, context, options)
            hs.append(h)
        options["block"] = ("middle", 0)
        h = self.middle_block(h, emb, context, options)
        for index, module in enumerate(self.output_blocks):
            options["block"] = ("output", index)
            h = torch.cat([h, hs.pop()], dim=1)
            h = module(h, emb, context, options, hs[-1].shape if hs else None)
        return self.out(h)


def sd15_like_unet(model_channels: int = 32, context_dim: int = 64, heads: int = 4) -> TinyUNet:
    """SD1.5's block layout (4 levels, 2 ResBlocks each, attention at levels 0-2) at a chosen width."""
    return TinyUNet(
        model_channels=model_channels,
        channel_mult=(1, 2, 4, 4),
        num_res_blocks=2,
        attention_levels=(0, 1, 2),
        heads=heads,
        context_dim=context_dim,
        groups=min(32, model_channels),
    )


def one_level_unet(model_channels: int = 8, context_dim: int = 16, heads: int = 2) -> TinyUNet:
    """The smallest UNet of the same structure (one level: ResBlocks and SpatialTransformers), for quick runs."""
    return TinyUNet(
        model_channels=model_channels,
        channel_mult=(1,),
        num_res_blocks=1,
        attention_levels=(0,),
        heads=heads,
        context_dim=context_dim,
        groups=min(4, model_channels),
    )


# ``unet=`` of run_compile_bench: the block layouts it can time.
UNETS: dict[str, Callable[[int, int, int], TinyUNet]] = {"sd15": sd15_like_unet, "one-level": one_level_unet}


@dataclass
class CompileBenchResult:
    """Median seconds per UNet call, eager and compiled, and what compiling cost."""

    latent: tuple[int, int]
    batch: int
    model_channels: int
    blocks: int
    backend: str
    mode: str
    device: str
    dtype: str
    rounds: int
    eager_s: float
    compiled_s: float
    compile_s: float
    compiles: int
    graphs: int
    recompiles_while_timing: int
    eager_samples: list[float] = field(default_factory=list)
    compiled_samples: list[float] = field(default_factory=list)
    fell_back: bool = False
    fallback_reason: str = ""
    max_abs_diff: float = 0.0
    unet: str = "sd15"
    context_dim: int = 64
    # CUDA only (None elsewhere): torch.cuda.max_memory_allocated over one steady call, weights included
    eager_peak_bytes: int | None = None
    compiled_peak_bytes: int | None = None

    @property
    def speedup(self) -> float:
        """Eager time over compiled time (>1: compiled is faster)."""
        return self.eager_s / self.compiled_s if self.compiled_s > 0 else float("nan")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["speedup"] = self.speedup
        data["extra_bytes"] = self.extra_bytes
        return data

    @property
    def extra_bytes(self) -> int | None:
        """What the compiled steady call's peak adds to the eager one's (CUDA only)."""
        if self.eager_peak_bytes is None or self.compiled_peak_bytes is None:
            return None
        return self.compiled_peak_bytes - self.eager_peak_bytes


def run_compile_bench(
    *,
    latent: tuple[int, int] = (32, 32),
    batch: int = 2,
    model_channels: int = 32,
    context_dim: int = 64,
    heads: int = 4,
    unet: str = "sd15",
    rounds: int = 5,
    mode: str = "on",
    backend: str | Callable[..., Any] = "inductor",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    compiler: RegionalCompiler | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> CompileBenchResult:
    """Time the SD1.5-like UNet eager and with its ResBlocks/SpatialTransformers compiled.

    The first compiled calls (eager warm-up, then the compile) are not timed as steady state; their cost
    is the stats' ``compile_seconds``. Then ``rounds`` interleaved eager/compiled calls (medians), so a
    machine that speeds up or slows down during the run affects both sides alike. On CUDA, then one more
    eager and one more compiled call each under ``torch.cuda.max_memory_allocated`` (the peaks).
    ``unet``: a :data:`UNETS` layout (``sd15``, or ``one-level`` for quick runs).
    """
    _check_compile_bench(rounds, batch, latent)
    if unet not in UNETS:
        raise ValueError(f"[Optim] compile bench: unet={unet!r} is unknown; allowed: {', '.join(UNETS)}")
    torch.manual_seed(seed)
    dev = torch.device(device)
    model = UNETS[unet](model_channels, context_dim, heads).to(dev, dtype).eval()
    x = torch.randn(batch, 4, *latent, device=dev, dtype=dtype)
    timesteps = torch.full((batch,), 500.0, device=dev)
    context = torch.randn(batch, 77, context_dim, device=dev, dtype=dtype)
    compiler = compiler or RegionalCompiler(backend=backend, clock=clock)

    def call() -> torch.Tensor:
        out = model(x, timesteps, context)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return out

    timing = _time_eager_and_compiled(call, model, compiler, mode=mode, rounds=rounds, clock=clock)
    eager_peak, compiled_peak = _steady_peaks(call, model, compiler, mode=mode, device=dev)
    setup = timing.setup
    return CompileBenchResult(
        latent=(int(latent[0]), int(latent[1])),
        batch=batch,
        model_channels=model_channels,
        blocks=setup.blocks,
        backend=backend if isinstance(backend, str) else getattr(backend, "__name__", "custom"),
        mode=mode,
        device=str(dev),
        dtype=str(dtype).replace("torch.", ""),
        rounds=rounds,
        eager_s=statistics.median(timing.eager_samples),
        compiled_s=statistics.median(timing.compiled_samples),
        compile_s=setup.compile_seconds,
        compiles=setup.compiles,
        graphs=setup.graphs,
        recompiles_while_timing=timing.recompiles,
        eager_samples=timing.eager_samples,
        compiled_samples=timing.compiled_samples,
        fell_back=setup.fell_back,
        fallback_reason=setup.fallback_reason,
        max_abs_diff=timing.max_abs_diff,
        unet=unet,
        context_dim=context_dim,
        eager_peak_bytes=eager_peak,
        compiled_peak_bytes=compiled_peak,
    )


def _check_compile_bench(rounds: int, batch: int, latent: tuple[int, int]) -> None:
    if rounds < 1:
        raise ValueError(f"[Optim] compile bench: rounds={rounds!r} must be >= 1")
    if batch < 1 or min(latent) < 8:
        raise ValueError(f"[Optim] compile bench: batch={batch!r} and latent={latent!r} must be >= 1 and >= 8")


@dataclass
class _Timing:
    """What :func:`_time_eager_and_compiled` measured."""

    setup: Any  # the warm-up application's CompileStats: the compile's cost
    max_abs_diff: float
    eager_samples: list[float]
    compiled_samples: list[float]
    recompiles: int


def _time_eager_and_compiled(
    call: Callable[[], torch.Tensor],
    model: torch.nn.Module,
    compiler: RegionalCompiler,
    *,
    mode: str,
    rounds: int,
    clock: Callable[[], float],
) -> _Timing:
    """A warm-up (the compile), then ``rounds`` interleaved eager and compiled calls of ``call``."""
    names = default_block_names("sd")

    def timed() -> tuple[float, torch.Tensor]:
        start = clock()
        out = call()
        return clock() - start, out

    eager_samples: list[float] = []
    compiled_samples: list[float] = []
    with torch.inference_mode():
        reference = call()
        # Warm-up: the first call of each block is eager by design, the second compiles.
        with compiler.apply(model, names, key="bench", mode=mode) as app:
            call()
            first = call()
        setup = app.stats
        diff = float((first.float() - reference.float()).abs().max())
        recompiles = 0
        for _ in range(rounds):
            seconds, _ = timed()
            eager_samples.append(seconds)
            with compiler.apply(model, names, key="bench", mode=mode) as app:
                call()  # the per-generation eager first call, not timed
                seconds, _ = timed()
            compiled_samples.append(seconds)
            recompiles += app.stats.compiles
    return _Timing(setup, diff, eager_samples, compiled_samples, recompiles)


def _steady_peaks(
    call: Callable[[], torch.Tensor],
    model: torch.nn.Module,
    compiler: RegionalCompiler,
    *,
    mode: str,
    device: torch.device,
) -> tuple[int | None, int | None]:
    """``torch.cuda.max_memory_allocated`` over one steady eager call and one steady compiled call (the compiled
    code is already built: this is what each generation's steps cost, not the compile's own peak); CPU: None."""
    if device.type != "cuda":
        return None, None
    names = default_block_names("sd")
    with torch.inference_mode():
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        call()
        eager = int(torch.cuda.max_memory_allocated(device))
        with compiler.apply(model, names, key="bench", mode=mode):
            call()  # the per-generation eager first call, not measured
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            call()
            compiled = int(torch.cuda.max_memory_allocated(device))
    return eager, compiled


def format_compile_table(result: CompileBenchResult | Sequence[CompileBenchResult]) -> str:
    """A plain-text table, one row per result."""
    results = [result] if isinstance(result, CompileBenchResult) else list(result)
    header = (
        "latent",
        "batch",
        "blocks",
        "mode",
        "device",
        "dtype",
        "eager ms",
        "compiled ms",
        "speedup",
        "compile s",
        "graphs",
        "recompiles",
        "max |diff|",
    )
    rows = [header]
    for r in results:
        rows.append(
            (
                f"{r.latent[0]}x{r.latent[1]}",
                str(r.batch),
                str(r.blocks),
                r.mode + (" (fell back)" if r.fell_back else ""),
                r.device,
                r.dtype,
                f"{r.eager_s * 1000:.1f}",
                f"{r.compiled_s * 1000:.1f}",
                f"{r.speedup:.2f}x",
                f"{r.compile_s:.1f}",
                str(r.graphs),
                str(r.recompiles_while_timing),
                f"{r.max_abs_diff:.1e}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
