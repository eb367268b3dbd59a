"""The compile warm-up's UNet call on each host: one sampling step as the host's own sampling makes it
(docs/hosts.md §6.11), and the host glue around it (its queue lock, the status line, the script's hook).

The fakes imitate what the adapters call, with the hosts' lines cited at each."""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lib_optim.adapter import NotSupportedHere
from lib_optim.compile import CompileWarmup, WarmupState
from lib_optim.host_specs import HostKind
from lib_optim.hosts import warmup as host_warmup
from lib_optim.hosts.a1111 import A1111Adapter
from lib_optim.hosts.forge import ForgeAdapter
from lib_optim.hosts.ldm_patched import LdmPatchedAdapter

# --- A1111 ----------------------------------------------------------------------------------------------------


class A1111World:
    """What A1111's k-diffusion sampling step goes through (A1111 v1.10.1): ``devices.autocast`` around the
    conds (``modules/processing.py:487``) and, unless ``unet_needs_upcast``, around sampling (``:987``), under
    ``torch.no_grad()`` (``:919``); ``txt2img_image_conditioning`` (``:100-125``: zeros of 5×1×1 for a model
    without an image input); ``SdConditioning``, a list with the size (``modules/prompt_parser.py:139-156``);
    ``opts.batch_cond_uncond`` (``modules/shared_options.py:242``)."""

    def __init__(self, *, sdxl: bool = False, together: bool = True, upcast: bool = False) -> None:
        self.events: list[str] = []
        self.autocast_depth = 0
        world = self

        @contextlib.contextmanager
        def autocast() -> Iterator[None]:
            world.autocast_depth += 1
            try:
                yield
            finally:
                world.autocast_depth -= 1

        @contextlib.contextmanager
        def without_autocast() -> Iterator[None]:
            world.events.append("without_autocast")
            yield

        self.devices = types.ModuleType("modules.devices")
        self.devices.device = torch.device("cpu")
        self.devices.autocast = autocast
        self.devices.without_autocast = without_autocast
        self.devices.unet_needs_upcast = upcast
        self.processing = types.ModuleType("modules.processing")

        def txt2img_image_conditioning(sd_model: Any, x: torch.Tensor, width: int, height: int) -> torch.Tensor:
            world.events.append(f"image_cond {width}x{height}")
            return x.new_zeros(x.shape[0], 5, 1, 1)

        self.processing.txt2img_image_conditioning = txt2img_image_conditioning
        self.prompt_parser = types.ModuleType("modules.prompt_parser")

        class SdConditioning(list):  # type: ignore[type-arg]
            def __init__(self, prompts: list[str], width: int | None = None, height: int | None = None) -> None:
                super().__init__(prompts)
                self.width, self.height = width, height

        self.prompt_parser.SdConditioning = SdConditioning
        self.shared = types.ModuleType("modules.shared")
        self.shared.opts = SimpleNamespace(batch_cond_uncond=together)
        self.calls: list[dict[str, Any]] = []
        self.sd_model = SimpleNamespace(is_sdxl=sdxl, is_sd1=not sdxl, model=SimpleNamespace(diffusion_model=object()))
        self.sd_model.get_learned_conditioning = self.get_learned_conditioning
        self.sd_model.apply_model = self.apply_model
        self.sdxl = sdxl

    def modules(self) -> dict[str, Any]:
        return {
            "modules.devices": self.devices,
            "modules.processing": self.processing,
            "modules.prompt_parser": self.prompt_parser,
            "modules.shared": self.shared,
        }

    def get_learned_conditioning(self, texts: Any) -> Any:
        self.events.append(f"conds {len(texts)} at {texts.width}x{texts.height}, autocast {self.autocast_depth}")
        if self.sdxl:  # sd_models_xl.py get_learned_conditioning: crossattn and vector
            return {"crossattn": torch.zeros(len(texts), 77, 2048), "vector": torch.zeros(len(texts), 2816)}
        return torch.zeros(len(texts), 77, 768)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: dict[str, Any]) -> torch.Tensor:
        self.calls.append(
            {"x": x, "t": t, "cond": cond, "grad": torch.is_grad_enabled(), "autocast": self.autocast_depth}
        )
        return x


@pytest.mark.parametrize("together", [True, False])
def test_a1111_runs_one_k_diffusion_step_with_cond_and_uncond_as_it_batches_them(together: bool) -> None:
    world = A1111World(together=together)
    run = A1111Adapter(modules=world.modules()).warmup_forward(world.sd_model, 768, 512, 3)
    assert world.calls == []  # nothing runs until the warm-up calls it
    run()
    [call] = world.calls
    rows = 6 if together else 3  # batch_cond_uncond: cond and uncond in one UNet batch, else each alone
    assert call["x"].shape == (rows, 4, 64, 96) and call["x"].dtype == torch.float32
    assert call["t"].shape == (rows,) and call["t"].dtype == torch.float32  # k-diffusion's sigma_to_t
    assert set(call["cond"]) == {"c_crossattn", "c_concat"} and call["cond"]["c_crossattn"][0].shape == (rows, 77, 768)
    assert call["cond"]["c_concat"][0].shape == (rows, 5, 1, 1)
    assert not call["grad"] and call["autocast"] == 1
    assert world.events[0] == f"conds {rows} at 768x512, autocast 1"


def test_a1111_sdxl_passes_its_conditioner_dict_and_the_upcast_mode() -> None:
    world = A1111World(sdxl=True, upcast=True)
    A1111Adapter(modules=world.modules()).warmup_forward(world.sd_model, 1024, 1024, 1)()
    [call] = world.calls
    assert set(call["cond"]) == {"crossattn", "vector", "c_concat"}  # {**uncond dict, "c_concat": [...]}
    assert call["cond"]["vector"].shape == (2, 2816)
    assert call["autocast"] == 0 and "without_autocast" in world.events  # unet_needs_upcast: no autocast


def test_a1111_family_from_the_models_flags() -> None:
    adapter = A1111Adapter(modules=A1111World().modules())
    assert adapter.model_family(A1111World().sd_model) == "sd"
    assert adapter.model_family(A1111World(sdxl=True).sd_model) == "sdxl"
    assert adapter.model_family(SimpleNamespace(is_sd1=True)) is None  # no UNet loaded


# --- the Forges -----------------------------------------------------------------------------------------------


class ForgeWorld:
    """A Forge-lineage sampling step: ``sampling_prepare(unet, x)`` loads the UNet, the CFG function takes (model,
    x, sigma, uncond, cond, cond_scale, model_options, seed) and batches cond and uncond as memory allows,
    ``sampling_cleanup(unet)`` after (Forge f2 ``backend/sampling/sampling_function.py:292``, ``:366``, ``:402``;
    ldm_patched ``ldm_patched/modules/samplers.py:278`` Forge previous, ``:413`` reForge, with
    ``modules_forge/forge_sampler.py:92``/``:116`` and ``:119``/``:143``); the text encoder's output becomes a
    condition list (Forge f2 ``backend/sampling/condition.py:91``, ldm_patched ``forge_sampler.py:8``); the host
    samples under ``torch.inference_mode()`` (Forge f2 ``modules/processing.py:911``)."""

    def __init__(self, names: dict[str, tuple[str, str]], *, in_channels: int = 4, fail: bool = False) -> None:
        self.events: list[Any] = []
        world = self
        self.module_objects: dict[str, Any] = {}

        def define(role: str, function: Any) -> None:
            module_name, attr = names[role]
            module = self.module_objects.setdefault(module_name, types.ModuleType(module_name))
            setattr(module, attr, function)

        def prepare(unet: Any, x: torch.Tensor) -> None:
            world.events.append(("prepare", unet, tuple(x.shape), torch.is_inference_mode_enabled()))

        def sample(*args: Any) -> torch.Tensor:
            world.events.append(("sample", args, torch.is_inference_mode_enabled()))
            if fail:
                raise RuntimeError("sampling failed")
            return args[1]

        def cleanup(unet: Any) -> None:
            world.events.append(("cleanup", unet))

        def conditions(cond: torch.Tensor) -> list[dict[str, Any]]:
            return [{"cross_attn": cond}]

        define("prepare", prepare)
        define("sample", sample)
        define("cleanup", cleanup)
        define("conditions", conditions)
        devices = types.ModuleType("modules.devices")
        devices.device = torch.device("cpu")
        self.module_objects["modules.devices"] = devices
        self.module_objects["modules.prompt_parser"] = None
        diffusion = SimpleNamespace(in_channels=in_channels)
        self.unet = SimpleNamespace(model=SimpleNamespace(diffusion_model=diffusion), model_options={"o": 1})
        self.sd_model = SimpleNamespace(
            is_sd1=True,
            forge_objects=SimpleNamespace(unet=self.unet, vae=SimpleNamespace(latent_channels=4)),
            get_learned_conditioning=lambda texts: torch.zeros(len(texts), 77, 768),
        )


FORGE_NAMES = {
    "prepare": ("backend.sampling.sampling_function", "sampling_prepare"),
    "sample": ("backend.sampling.sampling_function", "sampling_function_inner"),
    "cleanup": ("backend.sampling.sampling_function", "sampling_cleanup"),
    "conditions": ("backend.sampling.condition", "compile_conditions"),
}
LDM_PATCHED_NAMES = {
    "prepare": ("modules_forge.forge_sampler", "sampling_prepare"),
    "sample": ("ldm_patched.modules.samplers", "sampling_function"),
    "cleanup": ("modules_forge.forge_sampler", "sampling_cleanup"),
    "conditions": ("modules_forge.forge_sampler", "cond_from_a1111_to_patched_ldm"),
}


def forge_adapter(kind: HostKind, world: ForgeWorld) -> Any:
    if kind is HostKind.FORGE:
        return ForgeAdapter(modules=world.module_objects)
    return LdmPatchedAdapter(kind, modules=world.module_objects)


@pytest.mark.parametrize(
    ("kind", "names"),
    [
        (HostKind.FORGE, FORGE_NAMES),
        (HostKind.FORGE_PREVIOUS, LDM_PATCHED_NAMES),
        (HostKind.REFORGE, LDM_PATCHED_NAMES),
    ],
)
def test_the_forges_run_one_step_through_their_own_sampling_functions(kind: HostKind, names: Any) -> None:
    world = ForgeWorld(names)
    adapter = forge_adapter(kind, world)
    assert adapter.model_family(world.sd_model) == "sd"
    adapter.warmup_forward(world.sd_model, 640, 512, 2)()
    (prepare, unet, x_shape, inference_prepare), (sample, args, inference), cleanup = world.events
    assert (prepare, sample, cleanup[0]) == ("prepare", "sample", "cleanup")
    assert unet is world.unet and cleanup[1] is world.unet
    assert x_shape == (2, 4, 64, 80) and inference_prepare and inference
    model, x, sigma, uncond, cond, scale, options, _seed = args
    assert model is world.unet.model and options is world.unet.model_options
    assert sigma.shape == (2,) and x.dtype == torch.float32
    assert scale != 1.0  # at cfg 1 the hosts drop the uncond batch
    assert uncond[0]["cross_attn"].shape == cond[0]["cross_attn"].shape == (2, 77, 768)


def test_the_forges_clean_up_after_a_failed_step_and_refuse_inpainting_models() -> None:
    world = ForgeWorld(FORGE_NAMES, fail=True)
    with pytest.raises(RuntimeError, match="sampling failed"):
        forge_adapter(HostKind.FORGE, world).warmup_forward(world.sd_model, 512, 512, 1)()
    assert world.events[-1][0] == "cleanup"
    inpainting = ForgeWorld(FORGE_NAMES, in_channels=9)
    with pytest.raises(NotSupportedHere, match="inpainting"):
        forge_adapter(HostKind.FORGE, inpainting).warmup_forward(inpainting.sd_model, 512, 512, 1)
    missing = ForgeWorld({**FORGE_NAMES, "sample": ("backend.sampling.sampling_function", "nothing_here")})
    with pytest.raises(NotSupportedHere):
        forge_adapter(HostKind.FORGE, missing).warmup_forward(missing.sd_model, 512, 512, 1)


# --- the decode: the host's own decode_latent_batch ---------------------------------------------------------------


def decode_world(devices: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``processing.decode_latent_batch(model, batch, target_device=None, check_for_nans=False)``: its txt2img's
    decode after sampling, with ``target_device=devices.cpu`` (A1111 ``modules/processing.py:625``, ``:1002``;
    Forge f2 ``:628``, ``:1010``; Forge previous ``:634``, ``:938``; reForge ``:744``, ``:1110``)."""
    calls: list[dict[str, Any]] = []
    processing = types.ModuleType("modules.processing")

    def decode_latent_batch(
        model: Any, batch: torch.Tensor, target_device: Any = None, check_for_nans: bool = False
    ) -> list[Any]:
        calls.append(
            {
                "model": model,
                "batch": batch,
                "target": target_device,
                "nans": check_for_nans,
                "grad": torch.is_grad_enabled(),
                "inference": torch.is_inference_mode_enabled(),
            }
        )
        return list(batch)

    processing.decode_latent_batch = decode_latent_batch
    devices.cpu = torch.device("cpu")
    return {"modules.processing": processing, "modules.devices": devices}, calls


def test_a1111_decodes_the_sampled_batch_through_its_own_decode_under_no_grad() -> None:
    world = A1111World(sdxl=True)
    modules, calls = decode_world(world.devices)
    world.sd_model.latent_channels = 4
    run = A1111Adapter(modules=modules).warmup_decode(world.sd_model, 768, 512, 3)
    assert calls == []  # nothing runs until the warm-up calls it
    run()
    [call] = calls
    assert call["model"] is world.sd_model and call["batch"].shape == (3, 4, 64, 96)
    assert call["batch"].dtype == torch.float32  # sampled latents; the host's decode casts to its VAE dtype
    assert call["target"] == torch.device("cpu") and not call["nans"]
    assert not call["grad"] and not call["inference"]  # A1111 decodes under no_grad (processing.py:919)


@pytest.mark.parametrize("kind", [HostKind.FORGE, HostKind.FORGE_PREVIOUS, HostKind.REFORGE])
def test_the_forges_decode_the_sampled_batch_under_inference_mode(kind: HostKind) -> None:
    world = ForgeWorld(FORGE_NAMES if kind is HostKind.FORGE else LDM_PATCHED_NAMES)
    modules, calls = decode_world(world.module_objects["modules.devices"])
    world.module_objects.update(modules)
    forge_adapter(kind, world).warmup_decode(world.sd_model, 640, 512, 2)()
    [call] = calls
    assert call["model"] is world.sd_model and call["batch"].shape == (2, 4, 64, 80)
    assert call["inference"]  # Forge f2 processing.py:911, Forge previous :818, reForge :997


def test_a_host_without_its_decode_has_no_vae_warm_up() -> None:
    world = A1111World()
    with pytest.raises(NotSupportedHere, match="decode_latent_batch"):
        A1111Adapter(modules={"modules.devices": world.devices}).warmup_decode(world.sd_model, 512, 512, 1)


# --- the glue: the host's queue lock, the script's hook, the status line ------------------------------------------


class FifoLock:
    """A1111's queue lock: a lock and a deque of the waiters' events (``modules/fifo_lock.py:6-37``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending_threads: list[threading.Event] = []

    def __enter__(self) -> None:
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def test_the_host_lock_is_the_queue_lock_and_a_waiter_is_a_job(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    lock = FifoLock()
    monkeypatch.setitem(sys.modules, "modules.call_queue", SimpleNamespace(queue_lock=lock))
    loading = threading.Lock()
    model = object()
    monkeypatch.setitem(
        sys.modules, "modules.sd_models", SimpleNamespace(model_data=SimpleNamespace(lock=loading, sd_model=model))
    )
    with host_warmup.host_job_lock():
        assert lock._lock.locked() and not loading.locked()  # A1111's start-up load is over
        assert not host_warmup.host_jobs_waiting()
        lock._pending_threads.append(threading.Event())
        assert host_warmup.host_jobs_waiting()
    assert not lock._lock.locked()
    assert host_warmup.still_loaded(model) and not host_warmup.still_loaded(object())


def test_every_generation_passes_the_gate_and_a_wait_shows_in_the_progress_text(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sys

    from fake_adapter import FakeAdapter

    from lib_optim.runtime import Runtime

    state = SimpleNamespace(textinfo="")
    monkeypatch.setitem(sys.modules, "modules.shared", SimpleNamespace(state=state))
    seen: dict[str, Any] = {}

    class Recording(CompileWarmup):
        def generation_starts(self, key: Any, *, wait: bool, report: Any = None) -> str:
            seen["wait"] = wait
            report(WarmupState("running", 3, 10))
            return "waited"

    adapter = FakeAdapter()
    adapter.model_family = lambda sd_model: "sdxl"  # type: ignore[method-assign]
    rt = Runtime(adapter=adapter, warmup=Recording())
    p = SimpleNamespace(sd_model=object(), width=1024, height=768, batch_size=1)
    host_warmup.before_generation(rt, p, None)
    assert seen["wait"] is False
    assert state.textinfo == "[Optim] waiting for the compile warm-up: running 3/10 blocks"
    assert rt.warmup_size("sdxl") == (1024, 768, 1)
