"""lib_optim.vae.tiling: tiled VAE decode/encode, on local stand-in functions (exact) and the real SD VAE."""

from __future__ import annotations

import itertools
import math
import weakref

import pytest
import torch
from torch.nn import functional as F

from lib_optim.vae import planner as vae_planner
from lib_optim.vae import tiles as vae_tiles
from lib_optim.vae import tiling as vae_tiling
from lib_optim.vae.model import build_sd_vae


def local_decode(z: torch.Tensor) -> torch.Tensor:
    """A decode whose every output pixel depends on one latent pixel: tiled must equal untiled."""
    return F.interpolate(z[:, :3] * 2 - z[:, 3:4], scale_factor=8, mode="nearest")


def local_encode(x: torch.Tensor) -> torch.Tensor:
    """Each latent pixel from its own 8×8 block (pixels past the last multiple of 8 are dropped, as the
    VAE's stride-2 convolutions drop them)."""
    pooled = F.avg_pool2d(x, 8)
    return torch.cat([pooled, pooled**2, -pooled[:, :2]], 1)  # 8 channels, like the moments


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)


# ---------------------------------------------------------------------------------------------------------
# The grid.


@pytest.mark.parametrize(
    ("length", "tile", "overlap"), [(100, 32, 8), (64, 32, 8), (33, 32, 8), (130, 64, 16), (70, 64, 16), (200, 40, 30)]
)
@pytest.mark.parametrize("blend", [0.0, 0.5, 1.0])
def test_tiles_cover_the_axis_and_their_weights_sum_to_one(length, tile, overlap, blend):
    tiles = vae_tiling.tile_axis(length, tile, overlap, blend)
    assert tiles[0].start == 0 and tiles[-1].end == length
    assert all(t.end - t.start == tile for t in tiles)  # the last tile moves back rather than shrinking
    assert [t.core_start for t in tiles[1:]] == [t.core_end for t in tiles[:-1]]
    assert tiles[0].core_start == 0 and tiles[-1].core_end == length
    for a, b in itertools.pairwise(tiles):
        assert a.end - b.start >= overlap
        assert b.start <= a.core_end <= a.end
    for scale in (1, 8):
        total = torch.zeros(length * scale)
        for t in tiles:
            lo, hi, w = vae_tiles._axis_weight(t, scale, length * scale, torch.device("cpu"))
            assert t.start * scale <= lo and hi <= t.end * scale  # no weight outside the tile
            total[lo:hi] += w
        torch.testing.assert_close(total, torch.ones_like(total))


def test_short_axis_is_one_tile():
    assert vae_tiling.tile_axis(40, 64, 16) == [vae_tiling.AxisTile(0, 40, 0, 40, 0.0, 0.0)]


# ---------------------------------------------------------------------------------------------------------
# Callable level with a local function: exact.


@pytest.mark.parametrize("shape", [(1, 4, 37, 53), (3, 4, 16, 70)])
@pytest.mark.parametrize("blend", [0.0, 1.0])
def test_tiled_decode_of_a_local_function_is_exact(shape, blend):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    calls = []

    def decode(latent):
        calls.append(tuple(latent.shape))
        return local_decode(latent)

    out = vae_tiling.tiled_decode(decode, z, tile=16, overlap=4, blend=blend)
    torch.testing.assert_close(out, local_decode(z), rtol=0, atol=1e-5)
    assert len(calls) > 1 and all(c[0] == shape[0] and c[2] <= 16 and c[3] <= 16 for c in calls)


def test_one_tile_is_the_untiled_call_itself():
    z = torch.randn(2, 4, 20, 24)
    seen = []
    result = vae_tiling.tiled_decode(lambda latent: seen.append(latent) or local_decode(latent), z, tile=24)
    assert seen == [z] and torch.equal(result, local_decode(z))


def test_dtype_and_device_follow_the_decode():
    z = torch.randn(1, 4, 30, 20).half()
    out = vae_tiling.tiled_decode(local_decode, z, tile=12, overlap=4)
    assert out.dtype == torch.float16 and out.device == z.device
    assert torch.equal(out, local_decode(z))  # float32 accumulation rounds back to the same halves


def test_earlier_tiles_are_released_before_the_next_is_decoded():
    alive: list[weakref.ref] = []

    def decode(latent):
        assert all(ref() is None for ref in alive), "an earlier tile's output is still alive"
        out = local_decode(latent)
        alive.append(weakref.ref(out))
        return out

    vae_tiling.tiled_decode(decode, torch.randn(1, 4, 40, 40), tile=16, overlap=4)
    assert len(alive) == 9


def test_a_decode_with_the_wrong_scale_is_reported():
    with pytest.raises(RuntimeError, match=r"came back as \(1, 3, 64, 64\).*8 output pixels"):
        vae_tiling.tiled_decode(
            lambda z: F.interpolate(z[:, :3], scale_factor=4), torch.randn(1, 4, 30, 30), tile=16, overlap=4
        )


@pytest.mark.parametrize("size", [(96, 160), (101, 77)])
def test_tiled_encode_of_a_local_function_is_exact(size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    out = vae_tiling.tiled_encode(local_encode, x, tile=4, overlap=1)
    assert out.shape == (2, 8, size[0] // 8, size[1] // 8)
    torch.testing.assert_close(out, local_encode(x), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tile": 0}, "tile: 0 is not allowed"),
        ({"tile": 16, "overlap": 16}, "overlap: 16 is not allowed; allowed: a whole number from 0 to 15"),
        ({"blend": 1.5}, "blend: 1.5 is not allowed"),
    ],
)
def test_bad_sizes_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        vae_tiling.tiled_decode(local_decode, torch.randn(1, 4, 8, 8), **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Tile choice.


def test_choose_tile_grows_with_free_memory():
    need = [vae_planner.predict_tiled_peak_bytes(2048, 2048, tile=t, overlap=16) for t in (64, 96, 136)]
    frees = [1, need[0], need[1] - 1, need[1], need[2], 64 << 30]
    tiles = [vae_tiling.choose_tile(2048, 2048, 2, free) for free in frees]
    for tile, free in zip(tiles[1:], frees[1:], strict=True):
        assert vae_planner.predict_tiled_peak_bytes(2048, 2048, tile=tile, overlap=16) <= free
    # the largest multiple of 8 that fits, shrunk to what its number of tiles a side needs (n·t - (n-1)·16 = 256):
    # nothing fits → the smallest; 88 → four a side → 76; 96..128 → three → 96; 136..248 → two → 136; one piece
    assert tiles == [32, 64, 76, 96, 136, 256]


def test_choose_tile_is_smaller_for_a_bigger_batch_and_wider_dtype():
    free = 3 << 30
    assert vae_tiling.choose_tile(2048, 2048, 2, free, batch=4) < vae_tiling.choose_tile(2048, 2048, 2, free)
    assert vae_tiling.choose_tile(2048, 2048, 4, free // 2) < vae_tiling.choose_tile(2048, 2048, 2, free // 2)


def test_choose_tile_is_monotone_even_where_the_peak_is_not():
    """On CPU the waiting tiles are not parked: fewer, larger tiles can need less than more, smaller ones. The
    choice — the largest tile that fits — still only grows with free memory."""
    peaks = [vae_planner.predict_tiled_peak_bytes(2048, 2048, tile=t, overlap=16, device="cpu") for t in (64, 96)]
    assert peaks[1] < peaks[0]
    frees = [1 << 30, 3 << 30, 4 << 30, 6 << 30, 8 << 30, 16 << 30]
    tiles = [vae_tiling.choose_tile(2048, 2048, 2, free, device="cpu") for free in frees]
    assert tiles == sorted(tiles) and tiles[0] < tiles[-1]


# ---------------------------------------------------------------------------------------------------------
# The real SD VAE (channels scaled to 1/4, random weights).


@pytest.fixture(scope="module")
def vae():
    return build_sd_vae(seed=0, scale=0.25)


def latent(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_module_level_one_tile_is_the_untiled_decode(vae):
    z = latent(1, 4, 12, 10)
    torch.testing.assert_close(vae_tiling.tiled_decode_vae(vae, z, tile=16), vae.decode(z), rtol=1e-4, atol=1e-5)


def smooth_latent(rows: int, cols: int, seed: int = 3) -> torch.Tensor:
    """Large blobs plus a little noise: GroupNorm statistics differ from one tile to the next."""
    base = latent(1, 4, 3, 2, seed=seed) * 2
    return F.interpolate(base, size=(rows, cols), mode="bicubic", align_corners=False) + 0.3 * latent(1, 4, rows, cols)


@torch.no_grad()
def test_module_level_exact_statistics_reproduce_the_untiled_decode(vae):
    """Whole-image GroupNorm statistics and the default margin: every kept pixel is the untiled one (to float
    rounding), for every batch item, across a tile boundary at an odd place, with or without parking."""
    z = latent(2, 4, 36, 6)
    ref = vae.decode(z)
    for park in (None, "cpu"):
        out = vae_tiling.tiled_decode_vae(vae, z, tile=26, norm="exact", park=park)
        assert [(t.start, t.end) for t in vae_tiling.tile_axis(36, 26, 13)] == [(0, 26), (10, 36)]
        torch.testing.assert_close(out, ref, rtol=1e-3, atol=2e-4)


@torch.no_grad()
def test_module_level_seams_on_uneven_content(vae):
    """Uneven content cut into two tiles: exact statistics keep the decode intact; each tile's own statistics
    (the callable level, or norm="tile") leave seams and colour shifts."""
    z = smooth_latent(32, 8)
    ref = vae.decode(z)
    assert len(vae_tiling.tile_grid(32, 8, 24, 12)) == 2
    assert psnr(vae_tiling.tiled_decode_vae(vae, z, tile=24), ref) >= 60
    assert psnr(vae_tiling.tiled_decode_vae(vae, z, tile=24, norm="tile"), ref) < 40
    assert psnr(vae_tiling.tiled_decode(vae.decode, z, tile=24, overlap=16), ref) < 40


@torch.no_grad()
def test_module_level_encode_matches_untiled(vae):
    x = vae.decode(latent(1, 4, 40, 6)).clamp(-1, 1)[:, :, :, :45]  # 45 pixels wide: 5 latent columns
    ref = vae.encode(x)
    out = vae_tiling.tiled_encode_vae(vae, x, tile=32)
    assert len(vae_tiling.tile_axis(40, 32, 16)) == 2
    assert out.shape == ref.shape == (1, 8, 40, 5)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=2e-4)


def test_layout_check_names_what_is_missing(vae):
    with pytest.raises(TypeError, match=r"Decoder decoder lacks mid\.attn_1"):
        broken = build_sd_vae(scale=0.25).decoder
        del broken.mid.attn_1
        vae_tiling.check_layout(broken, "decoder")
    with pytest.raises(TypeError, match="lacks conv_in, mid, norm_out, conv_out, down"):
        vae_tiling.tiled_encoder(torch.nn.Identity(), torch.zeros(1, 3, 64, 64))
    vae_tiling.check_layout(vae.encoder, "encoder")


@torch.no_grad()
def test_tiling_forward_applies_the_auto_rule_per_call(vae, caplog):
    calls = []

    def original(h):
        calls.append(tuple(h.shape))
        return vae.decoder(h)

    z = vae.post_quant_conv(latent(1, 4, 36, 6))
    need = vae_planner.predict_decode_peak_bytes(288, 48, dtype_bytes=4, channels=32, device="cpu")
    roomy = vae_tiling.tiling_forward(vae.decoder, "decoder", original, free_bytes=lambda _dev: need)
    torch.testing.assert_close(roomy(z), vae.decoder(z))
    assert calls == [(1, 4, 36, 6)]
    # the budget, not free memory, is what the decode has to fit in
    tight = vae_tiling.tiling_forward(
        vae.decoder, "decoder", original, free_bytes=lambda _dev: need, budget_bytes=need // 2
    )
    with caplog.at_level("INFO", logger="lib_optim"):
        out = tight(z)
    assert calls == [(1, 4, 36, 6)]  # not called again: tiled
    torch.testing.assert_close(out, vae.decoder(z), rtol=1e-3, atol=2e-4)
    assert "VAE decode 48x288 tiled (decode 48x288 needs" in caplog.text and "more than the budget" in caplog.text
