"""Shared parts of the random-weight checkpoint writers (``sd15_checkpoint.py``, ``sdxl_checkpoint.py``).

Key names and shapes of the single-file layout (ldm/sgm ``model.diffusion_model.*`` UNet, ``first_stage_model.*``
VAE, a CLIP ViT-L/14 text tower built with transformers), random values that keep activations finite, and a
safetensors writer that makes one tensor at a time, so a 7 GB checkpoint never sits in memory.
Runs with any host's Python (torch, transformers); imported by the writer scripts, which run as plain scripts.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

VAE_CH, VAE_MULT, Z_CH, VAE_NUM_RES = 128, (1, 2, 4, 4), 4, 2
SAFETENSORS_DTYPES = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
}

Shapes = dict[str, tuple[int, ...]]


@dataclass(frozen=True)
class UNetSpec:
    """An ldm/sgm ``openaimodel.UNetModel`` (legacy=False, 64 channels per head) as far as its weights go."""

    channel_mult: tuple[int, ...]
    transformer_depth: tuple[int, ...]  # blocks per level; 0: no attention at that level
    middle_depth: int
    context_dim: int
    linear_proj: bool  # use_linear_in_transformer: proj_in/proj_out are Linear, not 1×1 convolutions
    adm_in_channels: int | None = None  # num_classes="sequential": the label_emb MLP (SDXL's size/crop vector)
    model_channels: int = 320
    num_res_blocks: int = 2
    in_channels: int = 4

    @property
    def time_dim(self) -> int:
        return 4 * self.model_channels


def norm(p: str, c: int, out: Shapes) -> None:
    out[p + ".weight"] = (c,)
    out[p + ".bias"] = (c,)


def lin(p: str, i: int, o: int, out: Shapes, bias: bool = True, k: int | None = None) -> None:
    out[p + ".weight"] = (o, i) if k is None else (o, i, k, k)
    if bias:
        out[p + ".bias"] = (o,)


def _unet_res(p: str, i: int, o: int, time_dim: int, out: Shapes) -> None:
    norm(p + ".in_layers.0", i, out)
    lin(p + ".in_layers.2", i, o, out, k=3)
    lin(p + ".emb_layers.1", time_dim, o, out)
    norm(p + ".out_layers.0", o, out)
    lin(p + ".out_layers.3", o, o, out, k=3)
    if i != o:
        lin(p + ".skip_connection", i, o, out, k=1)


def _unet_attn(p: str, c: int, depth: int, spec: UNetSpec, out: Shapes) -> None:
    k = None if spec.linear_proj else 1
    norm(p + ".norm", c, out)
    lin(p + ".proj_in", c, c, out, k=k)
    for d in range(depth):
        b = f"{p}.transformer_blocks.{d}"
        for a, kv in (("attn1", c), ("attn2", spec.context_dim)):
            lin(f"{b}.{a}.to_q", c, c, out, bias=False)
            lin(f"{b}.{a}.to_k", kv, c, out, bias=False)
            lin(f"{b}.{a}.to_v", kv, c, out, bias=False)
            lin(f"{b}.{a}.to_out.0", c, c, out)
        lin(b + ".ff.net.0.proj", c, c * 8, out)  # GEGLU
        lin(b + ".ff.net.2", c * 4, c, out)
        for n in ("norm1", "norm2", "norm3"):
            norm(f"{b}.{n}", c, out)
    lin(p + ".proj_out", c, c, out, k=k)


def unet_shapes(spec: UNetSpec, prefix: str = "model.diffusion_model.") -> Shapes:
    out: Shapes = {}
    p, mc, td = prefix, spec.model_channels, spec.time_dim
    lin(p + "time_embed.0", mc, td, out)
    lin(p + "time_embed.2", td, td, out)
    if spec.adm_in_channels is not None:
        lin(p + "label_emb.0.0", spec.adm_in_channels, td, out)
        lin(p + "label_emb.0.2", td, td, out)
    lin(p + "input_blocks.0.0", spec.in_channels, mc, out, k=3)
    chans, ch, n = [mc], mc, 1
    last = len(spec.channel_mult) - 1
    for level, mult in enumerate(spec.channel_mult):
        for _ in range(spec.num_res_blocks):
            _unet_res(f"{p}input_blocks.{n}.0", ch, mult * mc, td, out)
            ch = mult * mc
            if spec.transformer_depth[level]:
                _unet_attn(f"{p}input_blocks.{n}.1", ch, spec.transformer_depth[level], spec, out)
            chans.append(ch)
            n += 1
        if level != last:
            lin(f"{p}input_blocks.{n}.0.op", ch, ch, out, k=3)
            chans.append(ch)
            n += 1
    _unet_res(p + "middle_block.0", ch, ch, td, out)
    _unet_attn(p + "middle_block.1", ch, spec.middle_depth, spec, out)
    _unet_res(p + "middle_block.2", ch, ch, td, out)
    n = 0
    for level, mult in reversed(list(enumerate(spec.channel_mult))):
        for i in range(spec.num_res_blocks + 1):
            _unet_res(f"{p}output_blocks.{n}.0", ch + chans.pop(), mult * mc, td, out)
            ch = mult * mc
            sub = 1
            if spec.transformer_depth[level]:
                _unet_attn(f"{p}output_blocks.{n}.1", ch, spec.transformer_depth[level], spec, out)
                sub = 2
            if level and i == spec.num_res_blocks:
                lin(f"{p}output_blocks.{n}.{sub}.conv", ch, ch, out, k=3)
            n += 1
    norm(p + "out.0", mc, out)
    lin(p + "out.2", mc, spec.in_channels, out, k=3)
    return out


def _vae_res(p: str, i: int, o: int, out: Shapes) -> None:
    norm(p + ".norm1", i, out)
    lin(p + ".conv1", i, o, out, k=3)
    norm(p + ".norm2", o, out)
    lin(p + ".conv2", o, o, out, k=3)
    if i != o:
        lin(p + ".nin_shortcut", i, o, out, k=1)


def _vae_mid(p: str, c: int, out: Shapes) -> None:
    _vae_res(p + ".mid.block_1", c, c, out)
    norm(p + ".mid.attn_1.norm", c, out)
    for n in ("q", "k", "v", "proj_out"):
        lin(f"{p}.mid.attn_1.{n}", c, c, out, k=1)
    _vae_res(p + ".mid.block_2", c, c, out)


def vae_shapes(prefix: str = "first_stage_model.") -> Shapes:
    """The KL-f8 VAE of SD1.5 and SDXL (same architecture)."""
    out: Shapes = {}
    e, d = prefix + "encoder", prefix + "decoder"
    lin(e + ".conv_in", 3, VAE_CH, out, k=3)
    ch = VAE_CH
    for level, mult in enumerate(VAE_MULT):
        for j in range(VAE_NUM_RES):
            _vae_res(f"{e}.down.{level}.block.{j}", ch, VAE_CH * mult, out)
            ch = VAE_CH * mult
        if level != len(VAE_MULT) - 1:
            lin(f"{e}.down.{level}.downsample.conv", ch, ch, out, k=3)
    _vae_mid(e, ch, out)
    norm(e + ".norm_out", ch, out)
    lin(e + ".conv_out", ch, 2 * Z_CH, out, k=3)
    lin(d + ".conv_in", Z_CH, ch, out, k=3)
    _vae_mid(d, ch, out)
    for level in reversed(range(len(VAE_MULT))):
        for j in range(VAE_NUM_RES + 1):
            _vae_res(f"{d}.up.{level}.block.{j}", ch, VAE_CH * VAE_MULT[level], out)
            ch = VAE_CH * VAE_MULT[level]
        if level:
            lin(f"{d}.up.{level}.upsample.conv", ch, ch, out, k=3)
    norm(d + ".norm_out", ch, out)
    lin(d + ".conv_out", ch, 3, out, k=3)
    lin(prefix + "quant_conv", 2 * Z_CH, 2 * Z_CH, out, k=1)
    lin(prefix + "post_quant_conv", Z_CH, Z_CH, out, k=1)
    return out


def random_tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Biases 0 (``.bias``, ``in_proj_bias``), other 1-D weights (norms) 1, the rest N(0, 1/fan_in): activations stay
    finite through any depth of residual blocks."""
    if len(shape) == 1 and name.endswith("bias"):
        return torch.zeros(shape)
    if len(shape) == 1:
        return torch.ones(shape)
    return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))


def random_tensors(shapes: Shapes, gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: random_tensor(name, shape, gen).to(dtype) for name, shape in shapes.items()}


def clip_text_tensors(seed: int, dtype: torch.dtype, prefix: str) -> dict[str, torch.Tensor]:
    """The openai/clip-vit-large-patch14 text tower (transformers' ``CLIPTextModel``, its own random init)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        projection_dim=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
        layer_norm_eps=1e-5,
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    sd = CLIPTextModel(config).state_dict()
    # a persistent buffer before transformers 4.31, so SD1.5 and SDXL files carry it
    sd.setdefault("text_model.embeddings.position_ids", torch.arange(77)[None])
    return {prefix + k: (v.to(dtype) if v.is_floating_point() else v.to(torch.int64)) for k, v in sd.items()}


def _header(layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict[str, str]) -> bytes:
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, (shape, dtype) in layout.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the format allows trailing spaces; 8-byte aligned data


def write_safetensors(
    path: str | os.PathLike[str],
    layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
    make: Callable[[str], torch.Tensor],
    metadata: dict[str, str] | None = None,
) -> int:
    """Write a .safetensors file tensor by tensor: ``layout`` gives each name's shape and dtype (the file's order),
    ``make(name)`` the tensor, called once per name in that order. The format: an 8-byte little-endian header
    length, the JSON header, then the raw little-endian data (huggingface/safetensors, README "Format").
    Written to ``<path>.partial`` and renamed at the end, so an interrupted run leaves no half file behind.
    Returns the file size."""
    header = _header(layout, metadata or {"format": "pt"})
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    with partial.open("wb") as f:
        f.write(len(header).to_bytes(8, "little"))
        f.write(header)
        for name, (shape, dtype) in layout.items():
            t = make(name)
            if tuple(t.shape) != tuple(shape) or t.dtype != dtype:
                raise ValueError(f"{name}: made {tuple(t.shape)} {t.dtype}, the header says {shape} {dtype}")
            f.write(memoryview(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
    partial.replace(target)
    return target.stat().st_size
