"""The VAE: a torch-only SD VAE, our exact tiled decoder/encoder and the VAE memory model.

This is the wing's face: other parts of lib_optim import from here. ``planner`` (the memory model, plain Python)
and ``tiling`` (the tiled decoder/encoder, torch) are published whole; ``tiling`` loads on first use. ``session``
applies tiling to one generation (what the host adapters call).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lib_optim import lazy_exports
from lib_optim.vae import planner
from lib_optim.vae.session import VAE_MAX_TILE_ENV, tile_vae, tiled_vae_fits, vae_max_tile

if TYPE_CHECKING:  # the torch-heavy modules load on first use, so importing the wing stays cheap
    from lib_optim.vae import tiling
    from lib_optim.vae.model import build_sd_vae

_LAZY: dict[str, tuple[str, str | None]] = {
    "build_sd_vae": ("lib_optim.vae.model", "build_sd_vae"),
    "tiling": ("lib_optim.vae.tiling", None),
}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "VAE_MAX_TILE_ENV",
    "build_sd_vae",
    "planner",
    "tile_vae",
    "tiled_vae_fits",
    "tiling",
    "vae_max_tile",
]
