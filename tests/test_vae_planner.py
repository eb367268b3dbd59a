"""lib_optim.vae.planner: the VAE memory model and the auto rule for tiling."""

from __future__ import annotations

import pytest

from lib_optim.vae import planner as vp

GIB = 1 << 30


def test_decode_peak_is_the_last_up_levels_first_block():
    # ldm's out-of-place SiLU: block input, norm output, sigmoid and product of 256 channels at full size
    assert vp.predict_decode_peak_bytes(1024, 1024, dtype_bytes=2) == 8 * 128 * 1024 * 1024 * 2
    assert vp.peak_location(1024, 1024) == "up[0].block[0] norm1/SiLU x·sigmoid"
    # Forge's in-place SiLU: input and norm output (256 ch) and conv1's output (128 ch)
    assert vp.predict_decode_peak_bytes(1024, 1024, dtype_bytes=2, inplace_silu=True) == 5 * 128 * 1024 * 1024 * 2
    assert vp.peak_location(1024, 1024, inplace_silu=True) == "up[0].block[0] conv1"


def test_peak_scales_with_batch_dtype_and_area():
    one = vp.predict_decode_peak_bytes(768, 512, dtype_bytes=2)
    assert vp.predict_decode_peak_bytes(768, 512, dtype_bytes=2, batch=3) == 3 * one
    assert vp.predict_decode_peak_bytes(768, 512, dtype_bytes=4) == 2 * one
    assert vp.predict_decode_peak_bytes(1536, 1024, dtype_bytes=2) == 4 * one
    assert vp.predict_encode_peak_bytes(768, 512, dtype_bytes=2, batch=2) == 2 * vp.predict_encode_peak_bytes(
        768, 512, dtype_bytes=2
    )


def test_cpu_convolutions_copy_their_input():
    cuda = vp.predict_decode_peak_bytes(512, 512, dtype_bytes=4, inplace_silu=True, device="cuda")
    cpu = vp.predict_decode_peak_bytes(512, 512, dtype_bytes=4, inplace_silu=True, device="cpu")
    # conv1 of the first full-resolution block also holds a copy of its 256-channel input
    assert cpu - cuda == pytest.approx(2 * 128 * 512 * 512 * 4, rel=0.01)


def test_math_attention_score_matrix_dominates_only_at_large_sizes():
    small = {"dtype_bytes": 2}
    assert vp.predict_decode_peak_bytes(512, 512, attention="math", **small) == vp.predict_decode_peak_bytes(
        512, 512, **small
    )
    tokens = (2048 // 8) ** 2
    big = vp.predict_decode_peak_bytes(2048, 2048, attention="math", **small)
    assert big >= 2 * tokens * tokens * 2 > vp.predict_decode_peak_bytes(2048, 2048, **small)
    assert vp.peak_location(2048, 2048, attention="math").startswith("mid.attn_1")


def test_encode_needs_less_than_decode():
    assert vp.predict_encode_peak_bytes(1024, 1024) < vp.predict_decode_peak_bytes(1024, 1024)
    # a first-level block's second SiLU: its input, conv1's output, the norm output, sigmoid and product,
    # 128 channels at full size each
    assert vp.predict_encode_peak_bytes(1024, 1024, dtype_bytes=2) == 5 * 128 * 1024 * 1024 * 2
    assert vp.peak_location(1024, 1024, kind="encode") == "down[0].block[0] norm2/SiLU x·sigmoid"


@pytest.mark.parametrize("kind", ["decode", "encode"])
@pytest.mark.parametrize("level", ["module", "callable"])
def test_tiled_peak_grows_with_the_tile_and_stays_under_untiled(kind, level):
    whole = (vp.predict_decode_peak_bytes if kind == "decode" else vp.predict_encode_peak_bytes)(2048, 2048)
    peaks = [vp.predict_tiled_peak_bytes(2048, 2048, tile=t, overlap=16, kind=kind, level=level) for t in (32, 64, 128)]
    assert peaks == sorted(peaks) and peaks[0] < peaks[-1]
    assert peaks[-1] < whole / 2


def test_one_tile_costs_what_untiled_costs():
    whole = vp.predict_decode_peak_bytes(512, 512)
    assert vp.predict_tiled_peak_bytes(512, 512, tile=64, overlap=16, level="callable") == whole
    # the module level runs its own executor (in-place SiLU and add): less than the host's decode
    assert vp.predict_tiled_peak_bytes(512, 512, tile=64, overlap=26) < whole


def test_exact_statistics_hold_the_waiting_tiles_unless_parked():
    common = {"tile": 128, "overlap": 26, "dtype_bytes": 2}
    parked = vp.predict_tiled_peak_bytes(2048, 2048, park=True, **common)
    held = vp.predict_tiled_peak_bytes(2048, 2048, park=False, **common)
    assert parked == vp.predict_tiled_peak_bytes(2048, 2048, norm="tile", **common)
    # 3 tiles a side; the other 8 hold 256 channels of their 1024² pixels each
    assert held - parked == 8 * 256 * 1024 * 1024 * 2
    assert vp.predict_parked_bytes(2048, 2048, **common) == 9 * 256 * 1024 * 1024 * 2
    assert vp.predict_parked_bytes(512, 512, **common) == 0  # one tile waits for nobody
    # park=None follows the device, as vae_tiling's park="auto"
    assert vp.predict_tiled_peak_bytes(2048, 2048, device="cpu", **common) == vp.predict_tiled_peak_bytes(
        2048, 2048, device="cpu", park=False, **common
    )


def test_module_level_peaks_in_the_executor_or_the_untiled_mid_block():
    """The executor's peak on a tile of X = 128·(8·tile)²·e: 4·X in the first full-size block (its normalized
    input, the shortcut and conv1's output), on top of the mid block's output and the float32 canvas. With small
    tiles the mid block, run on the whole latent, is the peak."""
    e = 2
    x = 128 * (8 * 128) ** 2 * e
    mid_out = 512 * (2048 // 8) ** 2 * e
    canvas = 3 * 2048 * 2048 * 4
    got = vp.predict_tiled_peak_bytes(2048, 2048, tile=128, overlap=26, dtype_bytes=e, norm="tile")
    assert got == mid_out + canvas + 4 * x
    small = vp.predict_tiled_peak_bytes(2048, 2048, tile=32, overlap=16, dtype_bytes=e)
    assert small == vp.predict_tiled_peak_bytes(2048, 2048, tile=48, overlap=16, dtype_bytes=e)
    assert small < vp.predict_decode_peak_bytes(2048, 2048, dtype_bytes=e) / 10


def test_needs_tiling_boundary():
    need = vp.predict_decode_peak_bytes(1024, 1024, dtype_bytes=2)
    assert vp.needs_tiling(1024, 1024, dtype_bytes=2, free_bytes=need) == (
        False,
        "decode 1024x1024 needs ~2048 MiB, fits in free memory (2048 MiB)",
    )
    tile, reason = vp.needs_tiling(1024, 1024, dtype_bytes=2, free_bytes=need - 1)
    assert tile and "more than free memory" in reason


def test_needs_tiling_budget_and_batch():
    need = vp.predict_decode_peak_bytes(1024, 1024, dtype_bytes=2, batch=2)
    tile, reason = vp.needs_tiling(1024, 1024, dtype_bytes=2, free_bytes=4 * need, budget_bytes=need - 1, batch=2)
    assert tile and reason.endswith(f"more than the budget ({(need - 1) / (1 << 20):.0f} MiB)") and "batch 2" in reason
    # a budget above free memory does not raise the limit
    assert vp.needs_tiling(1024, 1024, dtype_bytes=2, free_bytes=need - 1, budget_bytes=8 * need, batch=2)[0]
    assert not vp.needs_tiling(1024, 1024, dtype_bytes=2, free_bytes=need, budget_bytes=need, batch=2)[0]
    enc = vp.predict_encode_peak_bytes(1024, 1024, dtype_bytes=2)
    assert not vp.needs_tiling(1024, 1024, dtype_bytes=2, free_bytes=enc, kind="encode")[0]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"height": 4}, "height: 4 is not allowed"),
        ({"batch": 0}, "batch: 0 is not allowed"),
        ({"dtype_bytes": 3}, "dtype_bytes: 3 is not allowed; allowed: 1, 2, 4, 8"),
        ({"attention": "flash"}, "attention: 'flash' is not allowed; allowed: sdpa, math"),
        ({"device": "mps"}, "device: 'mps' is not allowed; allowed: cuda, cpu"),
    ],
)
def test_bad_input_names_the_field(kwargs, message):
    args = {"height": 512, "width": 512, **kwargs}
    with pytest.raises(ValueError, match=message):
        vp.predict_decode_peak_bytes(args.pop("height"), args.pop("width"), **args)


def test_bad_rule_input_names_the_field():
    with pytest.raises(ValueError, match="free_bytes: -1 is not allowed"):
        vp.needs_tiling(512, 512, dtype_bytes=2, free_bytes=-1)
    with pytest.raises(ValueError, match="budget_bytes: 0 is not allowed"):
        vp.needs_tiling(512, 512, dtype_bytes=2, free_bytes=1, budget_bytes=0)
    with pytest.raises(ValueError, match="kind: 'both' is not allowed; allowed: decode, encode"):
        vp.needs_tiling(512, 512, dtype_bytes=2, free_bytes=1, kind="both")
    with pytest.raises(ValueError, match="norm: 'lowres' is not allowed; allowed: exact, tile"):
        vp.predict_tiled_peak_bytes(512, 512, tile=32, overlap=8, norm="lowres")
