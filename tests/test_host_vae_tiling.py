"""``vae_tiling`` in the three host adapters, with a real (scaled-down, random-weight) SD VAE.

The VAE module is :func:`lib_optim.vae.model.build_sd_vae`, which has the ldm/sgm layout every host's VAE has
(docs/hosts.md §5.6). Around it:

- A1111: ``sd_model.first_stage_model`` is that module and its ``decode`` calls ``self.decoder(z)``
  (stablediffusion ``ldm/models/autoencoder.py``, docs/hosts.md §5.1).
- Forge f2 and ldm_patched: a VAE object whose ``decode`` calls ``decode_inner``, which reads the module global
  ``VAE_ALWAYS_TILED`` at call time and then tiles by itself, else decodes whole (Forge f2
  ``backend/patcher/vae.py:128-160``, Forge previous ``ldm_patched/modules/sd.py:261-288``; docs/hosts.md §5.4,
  §5.5). The built-in Never OOM script sets that global in its ``process``, after ours (§5.4).
"""

from __future__ import annotations

import math
import types
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lib_optim.adapter import HostAdapter
from lib_optim.host_specs.kinds import HostKind
from lib_optim.hosts.a1111 import A1111Adapter
from lib_optim.hosts.forge import ForgeAdapter
from lib_optim.hosts.ldm_patched import MODEL_MANAGEMENT, LdmPatchedAdapter
from lib_optim.runtime import vae_tiling_summary
from lib_optim.settings import GenerationSettings, VaeTiling
from lib_optim.vae.model import build_sd_vae


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = float(((a.float() - b.float()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)  # images in [-1, 1]: peak-to-peak 2


class HostVAE:
    """The Forge f2 / ldm_patched VAE object, as far as tiling goes (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, mm: Any) -> None:
        self.first_stage_model = model
        self.mm = mm
        self.host_tiled = 0

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        return self.decode_inner(samples)

    def decode_inner(self, samples: torch.Tensor) -> torch.Tensor:
        if self.mm.VAE_ALWAYS_TILED:
            self.host_tiled += 1
            halves = samples.split(samples.shape[3] // 2, dim=3)
            return torch.cat([self.first_stage_model.decode(h) for h in halves], dim=3)
        return self.first_stage_model.decode(samples)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encode_inner(pixels)

    def encode_inner(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.mm.VAE_ALWAYS_TILED:
            self.host_tiled += 1
        return self.first_stage_model.encode(pixels)


@pytest.fixture(scope="module")
def vae_module() -> torch.nn.Module:
    return build_sd_vae(seed=3, scale=0.25)


def host(kind: str, vae_module: torch.nn.Module) -> SimpleNamespace:
    mm = types.SimpleNamespace(VAE_ALWAYS_TILED=False)
    if kind == "a1111":
        adapter: HostAdapter = A1111Adapter(modules={"modules.sd_hijack": None, "modules.devices": None})
        sd_model = SimpleNamespace(first_stage_model=vae_module)

        def decode(z: torch.Tensor) -> torch.Tensor:
            return vae_module.decode(z)

        def encode(x: torch.Tensor) -> torch.Tensor:
            return vae_module.encode(x)

        return SimpleNamespace(
            adapter=adapter, p=SimpleNamespace(sd_model=sd_model), mm=mm, decode=decode, encode=encode
        )
    vae = HostVAE(vae_module, mm)
    if kind == "forge":
        adapter = ForgeAdapter(modules={"backend.memory_management": mm, "backend.attention": None})
    else:
        adapter = LdmPatchedAdapter(HostKind.FORGE_PREVIOUS, modules={MODEL_MANAGEMENT: mm})
    p = SimpleNamespace(sd_model=SimpleNamespace(forge_objects=SimpleNamespace(vae=vae)))
    return SimpleNamespace(adapter=adapter, p=p, mm=mm, vae=vae, decode=vae.decode, encode=vae.encode)


KINDS = ("a1111", "forge", "ldm_patched")


def tiling(value: VaeTiling) -> GenerationSettings:
    return GenerationSettings(enabled=True, vae_tiling=value)


@pytest.mark.parametrize("kind", KINDS)
def test_on_tiles_every_decode_and_encode_without_seams_and_restores(
    kind: str, vae_module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lib_optim.attention import impl as attention_impl

    # little free memory: the tile size chosen from it gives several tiles a side
    monkeypatch.setattr(attention_impl, "free_memory_bytes", lambda _device: 24 << 20)
    h = host(kind, vae_module)
    z = torch.randn(1, 4, 48, 40, generator=torch.Generator().manual_seed(1))
    x = torch.rand(1, 3, 384, 320, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        untiled = h.decode(z)
        untiled_latent = h.encode(x)
        session = h.adapter.begin(h.p, tiling(VaeTiling.ON))
        assert "forward" in vars(vae_module.decoder) and "forward" in vars(vae_module.encoder)
        tiled = h.decode(z)
        tiled_latent = h.encode(x)
    events = session.data["vae_tiling_events"]
    assert [(e.kind, e.tiled) for e in events] == [("decode", True), ("encode", True)]
    assert events[0].tile < 40 and events[1].tile < 40, events  # latent pixels: fewer than the image has
    assert psnr(tiled, untiled) >= 40, psnr(tiled, untiled)
    assert psnr(tiled_latent, untiled_latent) >= 40
    summary = vae_tiling_summary(session)
    assert summary is not None and summary["text"].startswith("VAE decode 320x384 tiled (tiles of ")
    session.restorer.close()
    assert "forward" not in vars(vae_module.decoder) and "forward" not in vars(vae_module.encoder)


@pytest.mark.parametrize("kind", KINDS)
def test_auto_tiles_exactly_when_the_prediction_says_it_must(
    kind: str, vae_module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lib_optim.attention import impl as attention_impl
    from lib_optim.vae import planner as vae_planner

    h = host(kind, vae_module)
    z = torch.randn(1, 4, 32, 32)
    need = vae_planner.predict_decode_peak_bytes(256, 256, dtype_bytes=4, channels=32, device="cpu")
    for free, expect in ((need * 4, False), (need // 2, True)):
        monkeypatch.setattr(attention_impl, "free_memory_bytes", lambda _device, free=free: free)
        session = h.adapter.begin(h.p, tiling(VaeTiling.AUTO))
        with torch.no_grad():
            h.decode(z)
        (event,) = session.data["vae_tiling_events"]
        assert event.tiled is expect, (free, event)
        assert ("more than" in event.reason) is expect
        session.restorer.close()


@pytest.mark.parametrize("kind", ("forge", "ldm_patched"))
@pytest.mark.parametrize("value", (VaeTiling.OFF, VaeTiling.ON, VaeTiling.AUTO))
def test_never_oom_switch_is_ignored_for_the_generation_and_kept(
    kind: str, value: VaeTiling, vae_module: torch.nn.Module
) -> None:
    h = host(kind, vae_module)
    session = h.adapter.begin(h.p, tiling(value))
    h.mm.VAE_ALWAYS_TILED = True  # Never OOM's process(), after ours
    with torch.no_grad():
        h.decode(torch.randn(1, 4, 16, 16))
        h.encode(torch.rand(1, 3, 128, 128))
    assert h.vae.host_tiled == 0
    assert h.mm.VAE_ALWAYS_TILED is True  # read as false inside each call only
    assert ("vae_tiling_events" in session.data) is (value is not VaeTiling.OFF)
    session.restorer.close()
    assert "decode_inner" not in vars(HostVAE) or HostVAE.decode_inner.__name__ == "decode_inner"
    with torch.no_grad():
        h.decode(torch.randn(1, 4, 16, 16))
    assert h.vae.host_tiled == 1  # the host's own switch works again


def test_a1111_off_changes_nothing(vae_module: torch.nn.Module) -> None:
    h = host("a1111", vae_module)
    session = h.adapter.begin(h.p, tiling(VaeTiling.OFF))
    assert "forward" not in vars(vae_module.decoder)
    assert any("never tiles" in note for note in session.restorer.notes)
    session.restorer.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_vae_of_another_layout_is_left_alone_with_a_reason(kind: str) -> None:
    odd = torch.nn.Module()
    odd.decoder = torch.nn.Conv2d(4, 3, 1)
    h = host(kind, odd)
    session = h.adapter.begin(h.p, tiling(VaeTiling.ON))
    assert "forward" not in vars(odd.decoder)
    assert "lacks" in session.data["vae_tiling_unavailable"]
    summary = vae_tiling_summary(session)
    assert summary is not None and summary["text"].startswith("VAE tiling not applied")
    session.restorer.close()


@pytest.mark.parametrize("kind", KINDS)
def test_every_adapter_supports_the_field(kind: str, vae_module: torch.nn.Module) -> None:
    assert "vae_tiling" in host(kind, vae_module).adapter.supported_fields()


def test_max_tile_from_the_environment(vae_module: torch.nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    from lib_optim.vae import VAE_MAX_TILE_ENV, vae_max_tile

    assert vae_max_tile({}) == 256
    assert vae_max_tile({VAE_MAX_TILE_ENV: "32"}) == 32
    for bad in ("12", "16", "0", "36", "512", "big"):
        assert vae_max_tile({VAE_MAX_TILE_ENV: bad}) == 256, bad
    monkeypatch.setenv(VAE_MAX_TILE_ENV, "32")
    h = host("a1111", vae_module)  # plenty of free memory: the cap alone makes the tiles
    session = h.adapter.begin(h.p, tiling(VaeTiling.ON))
    with torch.no_grad():
        h.decode(torch.randn(1, 4, 48, 48))
    (event,) = session.data["vae_tiling_events"]
    assert event.tile == 32
    session.restorer.close()
