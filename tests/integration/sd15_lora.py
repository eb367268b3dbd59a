"""Write a random-weight LoRA for the random SD1.5 test checkpoint (kohya/diffusers key names).

It patches the first attention block of the UNet's first down block (q, k, v and out projections of both
attentions) strongly enough to change a 64×64 image, so a test can see that it is applied — and that a
compiled UNet follows the weights LoRA writes, never the weights it was compiled with.

    python tests/integration/sd15_lora.py OUT.safetensors [--seed N] [--rank R]
"""

from __future__ import annotations

import argparse

import torch

CHANNELS = 320  # SD1.5 down_blocks.0
CONTEXT = 768
PREFIX = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0"


def lora_tensors(seed: int = 0, rank: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v", "to_out_0"):
            fan_in = CONTEXT if attn == "attn2" and proj in ("to_k", "to_v") else CHANNELS
            key = f"{PREFIX}_{attn}_{proj}"
            out[f"{key}.lora_down.weight"] = torch.randn(rank, fan_in, generator=gen) / fan_in**0.5
            out[f"{key}.lora_up.weight"] = torch.randn(CHANNELS, rank, generator=gen) * 0.5
            out[f"{key}.alpha"] = torch.tensor(float(rank))
    return out


def main(argv: list[str] | None = None) -> None:
    from safetensors.torch import save_file

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=4)
    a = ap.parse_args(argv)
    tensors = lora_tensors(a.seed, a.rank)
    save_file({k: v.contiguous() for k, v in tensors.items()}, a.out, metadata={"ss_network_module": "networks.lora"})
    print(f"wrote {a.out}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
