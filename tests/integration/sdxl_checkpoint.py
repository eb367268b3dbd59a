"""Write a random-weight Stable Diffusion XL base checkpoint (single-file layout).

The key names and shapes follow the original ``sd_xl_base_1.0.safetensors``:
``model.diffusion_model.*`` (the SDXL UNet of sgm's ``configs/inference/sd_xl_base.yaml``: 320 channels,
channel_mult (1, 2, 4), transformer depth (0, 2, 10) and 10 in the middle, linear proj_in/out, context 2048,
label_emb from the 2816-wide size/crop vector), ``conditioner.embedders.0.transformer.text_model.*`` (CLIP ViT-L/14
text, built with transformers), ``conditioner.embedders.1.model.*`` (OpenCLIP ViT-bigG/14 text: 32 resblocks of
width 1280, ``text_projection``, ``logit_scale``) and ``first_stage_model.*`` (the VAE, as in SD1.5).
A1111 (``conditioner.embedders.1.model.ln_final.weight``), Forge's huggingface_guess and ldm_patched (the UNet
config read from the shapes) all detect it as SDXL. The weights are random, so generated images are noise.
The file (about 7 GB in float16) is written one tensor at a time.

    python tests/integration/sdxl_checkpoint.py OUT.safetensors [--seed N] [--dtype fp16|fp32]
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from checkpoint_parts import (
    UNetSpec,
    clip_text_tensors,
    lin,
    norm,
    random_tensor,
    unet_shapes,
    vae_shapes,
    write_safetensors,
)

SDXL_UNET = UNetSpec(
    channel_mult=(1, 2, 4),
    transformer_depth=(0, 2, 10),
    middle_depth=10,
    context_dim=2048,
    linear_proj=True,
    adm_in_channels=2816,
)
BIGG_WIDTH, BIGG_LAYERS, BIGG_VOCAB, BIGG_CONTEXT = 1280, 32, 49408, 77
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
BIGG_PREFIX = "conditioner.embedders.1.model."


def openclip_text_shapes(prefix: str = BIGG_PREFIX, width: int = BIGG_WIDTH, layers: int = BIGG_LAYERS) -> dict:
    """open_clip's ``CLIP`` text tower (``del model.visual`` in sgm's FrozenOpenCLIPEmbedder2), mlp ratio 4."""
    out: dict[str, tuple[int, ...]] = {
        prefix + "positional_embedding": (BIGG_CONTEXT, width),
        prefix + "text_projection": (width, width),
        prefix + "logit_scale": (),
        prefix + "token_embedding.weight": (BIGG_VOCAB, width),
    }
    for n in range(layers):
        b = f"{prefix}transformer.resblocks.{n}"
        norm(b + ".ln_1", width, out)
        out[b + ".attn.in_proj_weight"] = (3 * width, width)
        out[b + ".attn.in_proj_bias"] = (3 * width,)
        lin(b + ".attn.out_proj", width, width, out)
        norm(b + ".ln_2", width, out)
        lin(b + ".mlp.c_fc", width, 4 * width, out)
        lin(b + ".mlp.c_proj", 4 * width, width, out)
    norm(prefix + "ln_final", width, out)
    return out


def layout(clip_l: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor of the file with its shape and dtype, sorted by name (as safetensors' own writer orders them)."""
    shapes = {**unet_shapes(SDXL_UNET), **vae_shapes(), **openclip_text_shapes()}
    out = {k: (v, dtype) for k, v in shapes.items()}
    out.update({k: (tuple(v.shape), v.dtype) for k, v in clip_l.items()})
    return dict(sorted(out.items()))


def write_checkpoint(path, seed: int = 0, dtype: torch.dtype = torch.float16) -> tuple[int, int]:
    """Returns (tensors, bytes). Peak memory: the CLIP-L tower (0.5 GB) plus one tensor at a time."""
    gen = torch.Generator().manual_seed(seed)
    clip_l = clip_text_tensors(seed, dtype, CLIP_L_PREFIX)
    plan = layout(clip_l, dtype)

    def make(name: str) -> torch.Tensor:
        if name in clip_l:
            return clip_l.pop(name)
        if name.endswith("logit_scale"):
            return torch.tensor(math.log(1 / 0.07), dtype=dtype)  # open_clip's init_logit_scale
        return random_tensor(name, plan[name][0], gen).to(dtype)

    size = write_safetensors(path, plan, make)
    return len(plan), size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output .safetensors path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    a = ap.parse_args(argv)
    start = time.monotonic()
    n, size = write_checkpoint(a.out, a.seed, torch.float16 if a.dtype == "fp16" else torch.float32)
    print(f"wrote {a.out}: {n} tensors, {size / 2**30:.2f} GiB in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
