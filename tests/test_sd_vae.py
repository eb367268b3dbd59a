"""lib_optim.vae.model: the SD VAE stand-in used by the tiling tests and the VAE benchmark."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from lib_optim.vae.model import AutoencoderKL, build_sd_vae, load_sd_state_dict

sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
import sd15_checkpoint  # the checkpoint writer of the integration tests, a plain script


def test_parameter_names_and_shapes_are_the_checkpoints():
    with torch.device("meta"):  # the full-size model without its 330 MB of weights
        model = AutoencoderKL()
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k.removeprefix("first_stage_model."): v for k, v in sd15_checkpoint.vae_shapes().items()}
    assert ours == theirs


def test_a_checkpoint_state_dict_loads_and_decodes():
    shapes = sd15_checkpoint.vae_shapes()
    state = sd15_checkpoint.random_tensors(shapes, torch.Generator().manual_seed(0), torch.float32)
    state["model.diffusion_model.out.2.bias"] = torch.zeros(4)  # other parts of the checkpoint are ignored
    model = load_sd_state_dict(build_sd_vae(seed=5), state)
    assert torch.equal(model.decoder.conv_in.weight, state["first_stage_model.decoder.conv_in.weight"])
    with torch.no_grad():
        image = model.decode(torch.randn(1, 4, 1, 2))
    assert image.shape == (1, 3, 8, 16)
    assert torch.isfinite(image).all()


def test_missing_keys_are_an_error():
    with pytest.raises(RuntimeError, match="Missing key"):
        load_sd_state_dict(build_sd_vae(scale=0.25), {"first_stage_model.quant_conv.weight": torch.zeros(8, 8, 1, 1)})


def test_shapes_of_decode_and_encode():
    model = build_sd_vae(seed=1, scale=0.25)
    with torch.no_grad():
        image = model.decode(torch.randn(2, 4, 3, 5))
        moments = model.encode(torch.randn(2, 3, 28, 44))  # not multiples of 8: each stride-2 step floors
    assert image.shape == (2, 3, 24, 40)
    assert moments.shape == (2, 8, 3, 5)


def test_same_seed_same_weights_and_scale_shrinks_channels():
    a, b = build_sd_vae(seed=3, scale=0.25), build_sd_vae(seed=3, scale=0.25)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert a.decoder.conv_out.in_channels == 32
    assert build_sd_vae(seed=4, scale=0.25).decoder.conv_in.weight.ne(a.decoder.conv_in.weight).any()


def test_memory_variants_compute_the_same_image():
    """In-place SiLU (Forge's layout) and the explicit score matrix (ldm without an optimization) change
    what is alive, not the result."""
    z = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    base = build_sd_vae(seed=2, scale=0.25)
    with torch.no_grad():
        ref = base.decode(z)
        inplace = build_sd_vae(scale=0.25, inplace_silu=True)
        inplace.load_state_dict(base.state_dict())
        math_attn = build_sd_vae(scale=0.25, attention="math")
        math_attn.load_state_dict(base.state_dict())
        inplace, math_attn = inplace.decode(z), math_attn.decode(z)
    torch.testing.assert_close(inplace, ref)
    torch.testing.assert_close(math_attn, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("scale", [0.2, 0.0, 1.5])
def test_bad_scale_names_the_field(scale):
    with pytest.raises(ValueError, match=r"build_sd_vae scale: .* allowed: .*0\.25"):
        build_sd_vae(scale=scale)


def test_bad_attention_names_the_field():
    with pytest.raises(ValueError, match="sd_vae attention: 'flash' is not allowed; allowed: sdpa, math"):
        build_sd_vae(scale=0.25, attention="flash")
