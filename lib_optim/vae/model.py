"""The Stable Diffusion VAE (latent diffusion's ``AutoencoderKL``), written from its architecture.

Used by the tests and by ``vae_bench`` as a stand-in for the hosts' VAE: same layers, same parameter names
as the ``first_stage_model.*`` part of an SD1.x/SDXL checkpoint (so such a state dict loads into it), random
weights by default. The hosts never run this module; they run their own VAE.

Architecture (``ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2, z_channels=4``):

- encoder: ``conv_in`` (3→128) · four levels of ``num_res_blocks`` ResNet blocks (128, 256, 512, 512 channels),
  each level but the last ending in a stride-2 3×3 convolution padded (0, 1, 0, 1) · mid block (ResNet,
  single-head self-attention over all positions, ResNet) · GroupNorm, SiLU, ``conv_out`` (512→8: mean and
  log-variance) · ``quant_conv`` (1×1, 8→8);
- decoder: ``post_quant_conv`` (1×1, 4→4) · ``conv_in`` (4→512) · mid block · four levels of
  ``num_res_blocks + 1`` ResNet blocks (512, 512, 256, 128 channels from the coarsest), each level but the
  finest ending in a 2× nearest upsampling and a 3×3 convolution · GroupNorm, SiLU, ``conv_out`` (128→3).

Every normalization is ``GroupNorm(32, eps=1e-6)``. A ResNet block is norm → SiLU → conv → norm → SiLU → conv
plus the input (through a 1×1 ``nin_shortcut`` where the channel count changes).

Memory behaviour follows the hosts, because :mod:`lib_optim.vae.planner` is checked against this module:
SiLU is ``x * sigmoid(x)`` out of place as in latent diffusion's ``nonlinearity`` (A1111 runs ldm/sgm's
VAE), or in place with ``inplace_silu=True`` as Forge's ResNet blocks do (Forge f2 backend/nn/vae.py:83).
The mid-block attention runs through ``torch.nn.functional.scaled_dot_product_attention`` (no
``(h·w)²`` score matrix on the flash/memory-efficient kernels), or through an explicit score matrix with
``attention="math"`` (A1111 without an SDP/xformers optimization).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

CH, CH_MULT, NUM_RES_BLOCKS, Z_CHANNELS = 128, (1, 2, 4, 4), 2, 4
GROUPS, EPS = 32, 1e-6
ATTENTIONS = ("sdpa", "math")


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(GROUPS, channels, eps=EPS, affine=True)


def _conv(cin: int, cout: int, k: int = 3, stride: int = 1, padding: int | None = None) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=(k // 2) if padding is None else padding)


class Swish(nn.Module):
    """SiLU as the hosts compute it: out of place (ldm's ``x * sigmoid(x)``) or in place (Forge)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.inplace:
            return F.silu(x, inplace=True)
        return x * torch.sigmoid(x)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, inplace_silu: bool = False) -> None:
        super().__init__()
        self.in_channels, self.out_channels = cin, cout
        self.norm1 = _norm(cin)
        self.conv1 = _conv(cin, cout)
        self.norm2 = _norm(cout)
        self.conv2 = _conv(cout, cout)
        if cin != cout:
            self.nin_shortcut = _conv(cin, cout, k=1)
        self.swish = Swish(inplace_silu)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(self.swish(self.norm1(x)))
        h = self.conv2(self.swish(self.norm2(h)))
        if self.in_channels != self.out_channels:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the ``h·w`` positions, ``channels``-dim queries, keys and values."""

    def __init__(self, channels: int, attention: str = "sdpa") -> None:
        super().__init__()
        if attention not in ATTENTIONS:
            raise ValueError(
                f"[Optim] sd_vae attention: {attention!r} is not allowed; allowed: {', '.join(ATTENTIONS)}"
            )
        self.attention = attention
        self.norm = _norm(channels)
        self.q = _conv(channels, channels, k=1)
        self.k = _conv(channels, channels, k=1)
        self.v = _conv(channels, channels, k=1)
        self.proj_out = _conv(channels, channels, k=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.norm(x)
        b, c, h, w = x.shape
        # (b, 1, h·w, c): one head whose tokens are the positions. Contiguous, as the hosts make them: on a
        # transposed view SDPA falls back to its math kernel and materializes the (h·w)² scores.
        q, k, v = (proj(n).reshape(b, 1, c, h * w).transpose(2, 3).contiguous() for proj in (self.q, self.k, self.v))
        del n
        if self.attention == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v)
        else:
            scores = torch.softmax((q @ k.transpose(2, 3)) * (c**-0.5), dim=-1)
            out = scores @ v
            del scores
        del q, k, v
        out = out.transpose(2, 3).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = _conv(channels, channels, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the asymmetric pad makes a stride-2 3×3 convolution map n pixels to floor(n/2)
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class _Mid(nn.Module):
    def __init__(self, channels: int, inplace_silu: bool, attention: str) -> None:
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, inplace_silu)
        self.attn_1 = AttnBlock(channels, attention)
        self.block_2 = ResnetBlock(channels, channels, inplace_silu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class _Level(nn.Module):
    """One resolution of the encoder (``down[i]``) or decoder (``up[i]``): its ResNet blocks, then a resampler."""

    upsample: Upsample  # decoder levels but the finest
    downsample: Downsample  # encoder levels but the coarsest

    def __init__(self, blocks: list[ResnetBlock]) -> None:
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList()  # the SD VAE has no attention outside the mid block; ldm keeps the name


class Encoder(nn.Module):
    def __init__(
        self,
        ch: int = CH,
        ch_mult: tuple[int, ...] = CH_MULT,
        num_res_blocks: int = NUM_RES_BLOCKS,
        z_channels: int = Z_CHANNELS,
        inplace_silu: bool = False,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.conv_in = _conv(3, ch)
        self.down = nn.ModuleList()
        cin = ch
        for level, mult in enumerate(ch_mult):
            blocks = []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(cin, ch * mult, inplace_silu))
                cin = ch * mult
            down = _Level(blocks)
            if level != len(ch_mult) - 1:
                down.downsample = Downsample(cin)
            self.down.append(down)
        self.mid = _Mid(cin, inplace_silu, attention)
        self.norm_out = _norm(cin)
        self.nonlinearity = Swish(inplace=False)  # both hosts: out of place here, whatever their blocks do
        self.conv_out = _conv(cin, 2 * z_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level, down in enumerate(self.down):
            assert isinstance(down, _Level)
            for block in down.block:
                h = block(h)
            if level != self.num_resolutions - 1:
                h = down.downsample(h)
        h = self.mid(h)
        h = self.norm_out(h)
        h = self.nonlinearity(h)
        return self.conv_out(h)


class Decoder(nn.Module):
    def __init__(
        self,
        ch: int = CH,
        ch_mult: tuple[int, ...] = CH_MULT,
        num_res_blocks: int = NUM_RES_BLOCKS,
        z_channels: int = Z_CHANNELS,
        inplace_silu: bool = False,
        attention: str = "sdpa",
    ) -> None:
        super().__init__()
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        cin = ch * ch_mult[-1]
        self.conv_in = _conv(z_channels, cin)
        self.mid = _Mid(cin, inplace_silu, attention)
        levels: list[_Level] = []
        for level in reversed(range(len(ch_mult))):
            blocks = []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(cin, ch * ch_mult[level], inplace_silu))
                cin = ch * ch_mult[level]
            up = _Level(blocks)
            if level != 0:
                up.upsample = Upsample(cin)
            levels.insert(0, up)  # up[0] is the finest level, as in the checkpoint's names
        self.up = nn.ModuleList(levels)
        self.norm_out = _norm(cin)
        self.nonlinearity = Swish(inplace=False)  # both hosts: out of place here, whatever their blocks do
        self.conv_out = _conv(cin, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(range(self.num_resolutions)):
            up = self.up[level]
            assert isinstance(up, _Level)
            for block in up.block:
                h = block(h)
            if level != 0:
                h = up.upsample(h)
        h = self.norm_out(h)
        h = self.nonlinearity(h)
        return self.conv_out(h)


class AutoencoderKL(nn.Module):
    """``encode``: image in [-1, 1] ``(B, 3, H, W)`` → moments ``(B, 8, H/8, W/8)`` (mean, log-variance);
    ``decode``: latent ``(B, 4, h, w)`` → image ``(B, 3, 8h, 8w)``."""

    def __init__(self, ch: int = CH, inplace_silu: bool = False, attention: str = "sdpa") -> None:
        super().__init__()
        self.encoder = Encoder(ch, inplace_silu=inplace_silu, attention=attention)
        self.decoder = Decoder(ch, inplace_silu=inplace_silu, attention=attention)
        self.quant_conv = _conv(2 * Z_CHANNELS, 2 * Z_CHANNELS, k=1)
        self.post_quant_conv = _conv(Z_CHANNELS, Z_CHANNELS, k=1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights that keep activations finite through the whole network, the same rule as
    tests/integration/sd15_checkpoint.py: norm weights 1, biases 0, other weights N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith(".bias"):
                p.zero_()
            elif p.dim() == 1:
                p.fill_(1.0)
            else:
                fan_in = math.prod(p.shape[1:])
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(fan_in))
    return model


def build_sd_vae(
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    scale: float = 1.0,
    *,
    inplace_silu: bool = False,
    attention: str = "sdpa",
    device: str | torch.device = "cpu",
) -> AutoencoderKL:
    """A random-weight SD VAE in eval mode. ``scale`` < 1 shrinks every channel count (``ch = 128·scale``,
    which has to stay a multiple of the 32 GroupNorm groups: 0.25, 0.5, 0.75 or 1) for fast tests."""
    ch = round(CH * scale)
    if not (0 < scale <= 1) or ch % GROUPS:
        raise ValueError(
            f"[Optim] build_sd_vae scale: {scale!r} is not allowed; allowed: a value in (0, 1] making 128·scale a "
            f"multiple of {GROUPS} (0.25, 0.5, 0.75, 1)"
        )
    model = AutoencoderKL(ch, inplace_silu=inplace_silu, attention=attention)
    randomize_(model, seed)
    model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    return model


def load_sd_state_dict(model: AutoencoderKL, state_dict: dict[str, torch.Tensor], prefix: str = "first_stage_model."):
    """Load the VAE part of an SD checkpoint's state dict (keys under ``prefix``); every VAE key must be there."""
    own = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    model.load_state_dict(own, strict=True)
    return model
