"""Write a random-weight Stable Diffusion 1.5 checkpoint (single-file layout).

The key names and shapes follow the original ``v1-5-pruned-emaonly`` file:
``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.text_model.*`` (CLIP ViT-L/14 text encoder,
built with transformers) and the DDPM schedule buffers (``alphas_cumprod`` ...).
Hosts such as AUTOMATIC1111's WebUI detect the model type from these shapes.
The weights are random, so generated images are noise.

    python tests/integration/sd15_checkpoint.py OUT.safetensors [--seed N] [--dtype fp16|fp32]
"""

from __future__ import annotations

import argparse

import torch
from checkpoint_parts import UNetSpec, clip_text_tensors, random_tensors, vae_shapes
from checkpoint_parts import unet_shapes as _unet_shapes

__all__ = ["build_state_dict", "random_tensors", "unet_shapes", "vae_shapes", "write_checkpoint"]

SD15_UNET = UNetSpec(
    channel_mult=(1, 2, 4, 4), transformer_depth=(1, 1, 1, 0), middle_depth=1, context_dim=768, linear_proj=False
)


def unet_shapes(prefix="model.diffusion_model."):
    return _unet_shapes(SD15_UNET, prefix)


def schedule_tensors(timesteps=1000, start=0.00085, end=0.012):
    betas = torch.linspace(start**0.5, end**0.5, timesteps, dtype=torch.float64) ** 2
    ac = torch.cumprod(1.0 - betas, 0)
    ac_prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
    out = {
        "betas": betas,
        "alphas_cumprod": ac,
        "alphas_cumprod_prev": ac_prev,
        "sqrt_alphas_cumprod": ac.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - ac_prev) * (1.0 - betas).sqrt() / (1.0 - ac),
    }
    out = {k: v.float() for k, v in out.items()}
    out["model_ema.decay"] = torch.tensor(0.9999)
    out["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    return out


def build_state_dict(seed=0, dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    sd = random_tensors({**unet_shapes(), **vae_shapes()}, gen, dtype)
    sd.update(clip_text_tensors(seed, dtype, prefix="cond_stage_model.transformer."))
    sd.update(schedule_tensors())
    return sd


def write_checkpoint(path, seed=0, dtype=torch.float16):
    from safetensors.torch import save_file

    sd = build_state_dict(seed, dtype)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata={"format": "pt"})
    return len(sd)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out", help="output .safetensors path")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("fp16", "fp32"), default="fp16")
    a = ap.parse_args(argv)
    n = write_checkpoint(a.out, a.seed, torch.float16 if a.dtype == "fp16" else torch.float32)
    print(f"wrote {a.out}: {n} tensors")


if __name__ == "__main__":
    main()
