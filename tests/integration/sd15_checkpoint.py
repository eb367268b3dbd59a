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
import math

import torch

UNET_CH, UNET_MULT, UNET_ATTN_LEVELS, NUM_RES = 320, (1, 2, 4, 4), (0, 1, 2), 2
CONTEXT_DIM, TIME_DIM = 768, 1280
VAE_CH, VAE_MULT, Z_CH = 128, (1, 2, 4, 4), 4


def _norm(p, c, out):
    out[p + ".weight"] = (c,)
    out[p + ".bias"] = (c,)


def _lin(p, i, o, out, bias=True, k=None):
    out[p + ".weight"] = (o, i) if k is None else (o, i, k, k)
    if bias:
        out[p + ".bias"] = (o,)


def _unet_res(p, i, o, out):
    _norm(p + ".in_layers.0", i, out)
    _lin(p + ".in_layers.2", i, o, out, k=3)
    _lin(p + ".emb_layers.1", TIME_DIM, o, out)
    _norm(p + ".out_layers.0", o, out)
    _lin(p + ".out_layers.3", o, o, out, k=3)
    if i != o:
        _lin(p + ".skip_connection", i, o, out, k=1)


def _unet_attn(p, c, out):
    _norm(p + ".norm", c, out)
    _lin(p + ".proj_in", c, c, out, k=1)
    b = p + ".transformer_blocks.0"
    for a, kv in (("attn1", c), ("attn2", CONTEXT_DIM)):
        _lin(f"{b}.{a}.to_q", c, c, out, bias=False)
        _lin(f"{b}.{a}.to_k", kv, c, out, bias=False)
        _lin(f"{b}.{a}.to_v", kv, c, out, bias=False)
        _lin(f"{b}.{a}.to_out.0", c, c, out)
    _lin(b + ".ff.net.0.proj", c, c * 8, out)
    _lin(b + ".ff.net.2", c * 4, c, out)
    for n in ("norm1", "norm2", "norm3"):
        _norm(f"{b}.{n}", c, out)
    _lin(p + ".proj_out", c, c, out, k=1)


def unet_shapes(prefix="model.diffusion_model."):
    out: dict[str, tuple] = {}
    p = prefix
    _lin(p + "time_embed.0", UNET_CH, TIME_DIM, out)
    _lin(p + "time_embed.2", TIME_DIM, TIME_DIM, out)
    _lin(p + "input_blocks.0.0", 4, UNET_CH, out, k=3)
    chans, ch, n = [UNET_CH], UNET_CH, 1
    for level, mult in enumerate(UNET_MULT):
        for _ in range(NUM_RES):
            _unet_res(f"{p}input_blocks.{n}.0", ch, mult * UNET_CH, out)
            ch = mult * UNET_CH
            if level in UNET_ATTN_LEVELS:
                _unet_attn(f"{p}input_blocks.{n}.1", ch, out)
            chans.append(ch)
            n += 1
        if level != len(UNET_MULT) - 1:
            _lin(f"{p}input_blocks.{n}.0.op", ch, ch, out, k=3)
            chans.append(ch)
            n += 1
    _unet_res(p + "middle_block.0", ch, ch, out)
    _unet_attn(p + "middle_block.1", ch, out)
    _unet_res(p + "middle_block.2", ch, ch, out)
    n = 0
    for level, mult in reversed(list(enumerate(UNET_MULT))):
        for i in range(NUM_RES + 1):
            _unet_res(f"{p}output_blocks.{n}.0", ch + chans.pop(), mult * UNET_CH, out)
            ch = mult * UNET_CH
            sub = 1
            if level in UNET_ATTN_LEVELS:
                _unet_attn(f"{p}output_blocks.{n}.1", ch, out)
                sub = 2
            if level and i == NUM_RES:
                _lin(f"{p}output_blocks.{n}.{sub}.conv", ch, ch, out, k=3)
            n += 1
    _norm(p + "out.0", UNET_CH, out)
    _lin(p + "out.2", UNET_CH, 4, out, k=3)
    return out


def _vae_res(p, i, o, out):
    _norm(p + ".norm1", i, out)
    _lin(p + ".conv1", i, o, out, k=3)
    _norm(p + ".norm2", o, out)
    _lin(p + ".conv2", o, o, out, k=3)
    if i != o:
        _lin(p + ".nin_shortcut", i, o, out, k=1)


def _vae_mid(p, c, out):
    _vae_res(p + ".mid.block_1", c, c, out)
    _norm(p + ".mid.attn_1.norm", c, out)
    for n in ("q", "k", "v", "proj_out"):
        _lin(f"{p}.mid.attn_1.{n}", c, c, out, k=1)
    _vae_res(p + ".mid.block_2", c, c, out)


def vae_shapes(prefix="first_stage_model."):
    out: dict[str, tuple] = {}
    e, d = prefix + "encoder", prefix + "decoder"
    _lin(e + ".conv_in", 3, VAE_CH, out, k=3)
    ch = VAE_CH
    for level, mult in enumerate(VAE_MULT):
        for j in range(NUM_RES):
            _vae_res(f"{e}.down.{level}.block.{j}", ch, VAE_CH * mult, out)
            ch = VAE_CH * mult
        if level != len(VAE_MULT) - 1:
            _lin(f"{e}.down.{level}.downsample.conv", ch, ch, out, k=3)
    _vae_mid(e, ch, out)
    _norm(e + ".norm_out", ch, out)
    _lin(e + ".conv_out", ch, 2 * Z_CH, out, k=3)
    _lin(d + ".conv_in", Z_CH, ch, out, k=3)
    _vae_mid(d, ch, out)
    for level in reversed(range(len(VAE_MULT))):
        for j in range(NUM_RES + 1):
            _vae_res(f"{d}.up.{level}.block.{j}", ch, VAE_CH * VAE_MULT[level], out)
            ch = VAE_CH * VAE_MULT[level]
        if level:
            _lin(f"{d}.up.{level}.upsample.conv", ch, ch, out, k=3)
    _norm(d + ".norm_out", ch, out)
    _lin(d + ".conv_out", ch, 3, out, k=3)
    _lin(prefix + "quant_conv", 2 * Z_CH, 2 * Z_CH, out, k=1)
    _lin(prefix + "post_quant_conv", Z_CH, Z_CH, out, k=1)
    return out


def random_tensors(shapes, gen, dtype):
    """Norm weights 1, biases 0, other weights N(0, 1/fan_in): finite activations."""
    out = {}
    for name, shape in shapes.items():
        if name.endswith(".bias"):
            t = torch.zeros(shape)
        elif len(shape) == 1:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        out[name] = t.to(dtype)
    return out


def clip_text_tensors(seed, dtype, prefix="cond_stage_model.transformer."):
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(  # openai/clip-vit-large-patch14 text tower
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
    sd.setdefault("text_model.embeddings.position_ids", torch.arange(77)[None])  # persisted in SD1.5 files
    return {prefix + k: (v.to(dtype) if v.is_floating_point() else v.to(torch.int64)) for k, v in sd.items()}


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
    sd.update(clip_text_tensors(seed, dtype))
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
