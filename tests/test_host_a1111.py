"""A1111Adapter against fake A1111 v1.10.1 modules.

The fakes are plain module objects handed to the adapter by name. Their logic imitates the A1111 v1.10.1 lines
cited next to it (restated, not copied): the optimizer list and ``SdOptimization`` subclasses
(modules/sd_hijack_optimizations.py:25-155), ``apply_optimizations``/``undo_optimizations``
(modules/sd_hijack.py:59-110), the model reload that re-applies the setting (sd_hijack.py:250, 303;
sd_models.py:966-987) and the VAE helpers of modules/sd_samplers_common.py:55-112. The models are tiny real
torch modules with conv layers.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lib_optim.adapter import NotSupportedHere
from lib_optim.host_specs.kinds import HostKind
from lib_optim.hosts.a1111 import A1111Adapter, titles
from lib_optim.patching import Restorer
from lib_optim.settings import Attention, GenerationSettings, Tri


def fn(label: str) -> Callable[..., Any]:
    """A distinct function object standing for one host function."""

    def f(*args: Any, **kwargs: Any) -> str:
        return label

    f.__name__ = label
    return f


# --- the fake host -----------------------------------------------------------------------------------------


class FakeOptimization:
    """One ``SdOptimization`` (sd_hijack_optimizations.py:25-49 and the subclasses at :51-143)."""

    def __init__(
        self,
        world: FakeA1111,
        name: str,
        label: str | None,
        cmd_opt: str,
        priority: int,
        attnblock: bool,
    ) -> None:
        self.world = world
        self.name = name
        self.label = label
        self.cmd_opt = cmd_opt
        self.priority = priority
        self.cross_attention_fn = fn(f"{name}_cross_attention_forward")
        # V1 and InvokeAI only replace CrossAttention.forward (:110-131)
        self.attnblock_fn = fn(f"{name}_attnblock_forward") if attnblock else None
        self.fail_in_apply = False

    def title(self) -> str:  # :31-35
        return self.name if self.label is None else f"{self.name} - {self.label}"

    def apply(self) -> None:  # e.g. :88-92 — ldm first, then sgm
        w = self.world
        w.ldm_attention.CrossAttention.forward = self.cross_attention_fn
        if self.attnblock_fn is not None:
            w.ldm_model.AttnBlock.forward = self.attnblock_fn
        if self.fail_in_apply:
            raise RuntimeError("apply failed half-way")
        w.sgm_attention.CrossAttention.forward = self.cross_attention_fn
        if self.attnblock_fn is not None:
            w.sgm_model.AttnBlock.forward = self.attnblock_fn

    def undo(self) -> None:  # :43-48 — note sgm's AttnBlock goes back to *sgm's own* forward (:22, :48)
        w = self.world
        w.ldm_attention.CrossAttention.forward = w.hypernetwork_forward
        w.ldm_model.AttnBlock.forward = w.captured_ldm_attnblock
        w.sgm_attention.CrossAttention.forward = w.hypernetwork_forward
        w.sgm_model.AttnBlock.forward = w.captured_sgm_attnblock


class FakeOpts:
    """``shared.opts``: values live in ``data`` (modules/options.py Options.__getattr__)."""

    def __init__(self) -> None:
        self.data: dict[str, Any] = {}

    def __getattr__(self, key: str) -> Any:
        data = self.__dict__["data"]
        if key in data:
            return data[key]
        if key == "cross_attention_optimization":
            return "Automatic"  # shared_options.py:233 default
        raise AttributeError(key)


class FakeShared(types.ModuleType):
    """``modules.shared``; its ``sd_model`` property would load a model (shared_items.py:171-175)."""

    @property
    def sd_model(self) -> Any:
        raise AssertionError("shared.sd_model was read: in A1111 that loads a model")


class FakeModelHijack:
    optimization_method = None  # class attribute, as StableDiffusionModelHijack (sd_hijack.py:173)

    def __init__(self, sd_hijack: Any) -> None:
        self._sd_hijack = sd_hijack

    def apply_optimizations(self, option: str | None = None) -> None:  # sd_hijack.py:184-189
        try:
            self.optimization_method = self._sd_hijack.apply_optimizations(option)
        except Exception:  # noqa: BLE001 - as the host: errors.display, then undo
            self._sd_hijack.undo_optimizations()


class FakeA1111:
    """ldm/sgm attention modules, modules.sd_hijack/shared/devices/sd_models, and a loaded tiny model."""

    def __init__(self, *, xformers: bool = False, sdp: bool = True) -> None:
        mod = types.ModuleType
        # ldm/sgm as imported (sd_hijack.py:10-21); sgm has its own functions
        self.ldm_attention = mod("ldm.modules.attention")
        self.ldm_attention.CrossAttention = type("CrossAttention", (), {"forward": fn("ldm_cross_attention_forward")})
        self.ldm_model = mod("ldm.modules.diffusionmodules.model")
        self.ldm_model.AttnBlock = type("AttnBlock", (), {"forward": fn("ldm_attnblock_forward")})
        self.ldm_model.nonlinearity = fn("ldm_nonlinearity")
        self.ldm_openaimodel = mod("ldm.modules.diffusionmodules.openaimodel")
        self.ldm_openaimodel.th = torch
        self.sgm_attention = mod("sgm.modules.attention")
        self.sgm_attention.CrossAttention = type("CrossAttention", (), {"forward": fn("sgm_cross_attention_forward")})
        self.sgm_model = mod("sgm.modules.diffusionmodules.model")
        self.sgm_model.AttnBlock = type("AttnBlock", (), {"forward": fn("sgm_attnblock_forward")})
        self.sgm_model.nonlinearity = fn("sgm_nonlinearity")
        self.sgm_openaimodel = mod("sgm.modules.diffusionmodules.openaimodel")
        self.sgm_openaimodel.th = torch

        self.hypernetwork_forward = fn("hypernetwork_attention_CrossAttention_forward")  # hypernetwork.py:382
        self.unet_th = SimpleNamespace(name="TorchHijackForUnet")  # sd_hijack_unet.py:36
        # captured at import: sd_hijack.py:23-25 (ldm's) and sd_hijack_optimizations.py:21-22 (ldm's and sgm's)
        self.captured_ldm_nonlinearity = self.ldm_model.nonlinearity
        self.captured_ldm_attnblock = self.ldm_model.AttnBlock.forward
        self.captured_sgm_attnblock = self.sgm_model.AttnBlock.forward

        self.shared = FakeShared("modules.shared")
        self.shared.opts = FakeOpts()
        self.shared.cmd_opts = SimpleNamespace(disable_opt_split_attention=False)

        self.devices = mod("modules.devices")
        self.devices.dtype_vae = torch.float16
        self.devices.cpu = torch.device("cpu")
        self.devices.gc_calls = 0

        def torch_gc() -> None:
            self.devices.gc_calls += 1

        self.devices.torch_gc = torch_gc

        # the built-in list (sd_hijack_optimizations.py:146-155), filtered and sorted (sd_hijack.py:48-56);
        # priorities as on CUDA without MPS
        candidates = [
            (FakeOptimization(self, "xformers", None, "xformers", 100, True), xformers),
            (
                FakeOptimization(
                    self,
                    "sdp-no-mem",
                    "scaled dot product without memory efficient attention",
                    "opt_sdp_no_mem_attention",
                    80,
                    True,
                ),
                sdp,
            ),
            (FakeOptimization(self, "sdp", "scaled dot product", "opt_sdp_attention", 70, True), sdp),
            (FakeOptimization(self, "sub-quadratic", None, "opt_sub_quad_attention", 10, True), True),
            (FakeOptimization(self, "V1", "original v1", "opt_split_attention_v1", 10, False), True),
            (FakeOptimization(self, "InvokeAI", None, "opt_split_attention_invokeai", 10, False), True),
            (FakeOptimization(self, "Doggettx", None, "opt_split_attention", 90, True), True),
        ]
        self.sd_hijack = mod("modules.sd_hijack")
        self.sd_hijack.optimizers = sorted((o for o, ok in candidates if ok), key=lambda o: o.priority, reverse=True)
        self.sd_hijack.current_optimizer = None
        self.sd_hijack.apply_optimizations = self.apply_optimizations
        self.sd_hijack.undo_optimizations = self.undo_optimizations
        self.sd_hijack.model_hijack = FakeModelHijack(self.sd_hijack)
        self.apply_calls: list[str | None] = []

        self.sd_model = TinyLatentDiffusion()
        self.sd_models = mod("modules.sd_models")
        self.sd_models.model_data = SimpleNamespace(sd_model=self.sd_model)
        self.launch = mod("launch")

    # sd_hijack.py:103-110: sgm gets *ldm's* nonlinearity and AttnBlock.forward
    def undo_optimizations(self) -> None:
        self.ldm_model.nonlinearity = self.captured_ldm_nonlinearity
        self.ldm_attention.CrossAttention.forward = self.hypernetwork_forward
        self.ldm_model.AttnBlock.forward = self.captured_ldm_attnblock
        self.sgm_model.nonlinearity = self.captured_ldm_nonlinearity
        self.sgm_attention.CrossAttention.forward = self.hypernetwork_forward
        self.sgm_model.AttnBlock.forward = self.captured_ldm_attnblock

    # sd_hijack.py:59-100
    def apply_optimizations(self, option: str | None = None) -> str:
        self.apply_calls.append(option)
        h = self.sd_hijack
        self.undo_optimizations()
        if not h.optimizers:  # :64-67
            h.current_optimizer = None
            return ""
        silu = torch.nn.functional.silu  # :69-73
        self.ldm_model.nonlinearity = silu
        self.ldm_openaimodel.th = self.unet_th
        self.sgm_model.nonlinearity = silu
        self.sgm_openaimodel.th = self.unet_th
        if h.current_optimizer is not None:  # :75-77
            h.current_optimizer.undo()
            h.current_optimizer = None
        selection = option or self.shared.opts.cross_attention_optimization  # :79
        if selection == "Automatic":  # :80-81 — first with its flag set, else the top one
            flagged = [o for o in h.optimizers if o.cmd_opt and getattr(self.shared.cmd_opts, o.cmd_opt, False)]
            matching = (flagged or h.optimizers)[0]
        else:  # :83 — exact title
            matching = next((o for o in h.optimizers if o.title() == selection), None)
        disabled = selection == "Automatic" and self.shared.cmd_opts.disable_opt_split_attention
        if selection == "None" or disabled:  # :85-88
            matching = None
        elif matching is None:  # :89-90
            matching = h.optimizers[0]  # the silent fallback for an unknown title
        if matching is None:  # :92-100
            return ""
        matching.apply()
        h.current_optimizer = matching
        return matching.name

    def reload_model(self) -> None:
        """A model reload during the generation: undo_hijack then hijack (sd_models.py:966-987), which
        undoes and re-applies the optimizations with the setting's value (sd_hijack.py:303, 250)."""
        self.undo_optimizations()
        self.sd_hijack.model_hijack.apply_optimizations()

    def optimizer(self, name: str) -> FakeOptimization:
        return next(o for o in self.sd_hijack.optimizers if o.name == name)

    def modules(self) -> dict[str, Any]:
        return {
            "ldm.modules.attention": self.ldm_attention,
            "ldm.modules.diffusionmodules.model": self.ldm_model,
            "ldm.modules.diffusionmodules.openaimodel": self.ldm_openaimodel,
            "sgm.modules.attention": self.sgm_attention,
            "sgm.modules.diffusionmodules.model": self.sgm_model,
            "sgm.modules.diffusionmodules.openaimodel": self.sgm_openaimodel,
            "modules.shared": self.shared,
            "modules.sd_hijack": self.sd_hijack,
            "modules.devices": self.devices,
            "modules.sd_models": self.sd_models,
            "launch": self.launch,
            "modules.launch_utils": None,
        }

    def bindings(self) -> dict[str, Any]:
        """Every object apply/undo rebind, by name (what an exact restore must put back)."""
        h = self.sd_hijack
        return {
            "ldm.CrossAttention.forward": vars(self.ldm_attention.CrossAttention)["forward"],
            "ldm.AttnBlock.forward": vars(self.ldm_model.AttnBlock)["forward"],
            "ldm.nonlinearity": self.ldm_model.nonlinearity,
            "ldm.openaimodel.th": self.ldm_openaimodel.th,
            "sgm.CrossAttention.forward": vars(self.sgm_attention.CrossAttention)["forward"],
            "sgm.AttnBlock.forward": vars(self.sgm_model.AttnBlock)["forward"],
            "sgm.nonlinearity": self.sgm_model.nonlinearity,
            "sgm.openaimodel.th": self.sgm_openaimodel.th,
            "current_optimizer": h.current_optimizer,
            "optimization_method": vars(h.model_hijack).get("optimization_method", "<class attribute>"),
            "opts": dict(self.shared.opts.data),
        }

    def startup(self, setting: str = "Automatic") -> None:
        """The first model load at startup: hijack → apply with the setting (sd_hijack.py:250)."""
        if setting != "Automatic":
            self.shared.opts.data["cross_attention_optimization"] = setting
        self.sd_hijack.model_hijack.apply_optimizations()
        self.apply_calls.clear()


def assert_same(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key, value in before.items():
        if key == "opts":
            assert after[key] == value, key
        else:
            assert after[key] is value, f"{key}: {after[key]!r} is not {value!r}"


# --- tiny real models ----------------------------------------------------------------------------------------


class TinyPosterior:
    """``DiagonalGaussianDistribution`` (stablediffusion ldm/modules/distributions/distributions.py:24-36)."""

    def __init__(self, parameters: torch.Tensor) -> None:
        self.parameters = parameters
        self.mean, self.logvar = torch.chunk(parameters, 2, dim=1)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self) -> torch.Tensor:
        return self.mean + self.std * torch.randn(self.mean.shape).to(device=self.parameters.device)


class TinyVAE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.decoder = torch.nn.Conv2d(4, 3, 3, padding=1)
        self.seen: list[tuple[str, torch.device, torch.dtype, torch.dtype]] = []
        self.to_calls: list[tuple[Any, Any]] = []

    @property
    def dtype(self) -> torch.dtype:  # what Lightning's DeviceDtypeModuleMixin reports
        return self.decoder.weight.dtype

    def to(self, *args: Any, **kwargs: Any) -> Any:
        self.to_calls.append((args, kwargs))
        return super().to(*args, **kwargs)

    def encode(self, x: torch.Tensor) -> TinyPosterior:
        self.seen.append(("encode", x.device, x.dtype, self.encoder.weight.dtype))
        return TinyPosterior(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        self.seen.append(("decode", z.device, z.dtype, self.decoder.weight.dtype))
        return self.decoder(z)


class TinyLatentDiffusion(torch.nn.Module):
    """The methods of LatentDiffusion the VAE path uses (stablediffusion ldm/models/diffusion/ddpm.py:653-660,
    817-830)."""

    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.diffusion_model = torch.nn.Sequential(
            torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3, padding=1)
        )
        self.first_stage_model = TinyVAE().to(torch.float16)
        self.first_stage_model.to_calls.clear()
        self.scale_factor = 0.18215

    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False, force_not_quantize: bool = False) -> Any:
        z = 1.0 / self.scale_factor * z
        return self.first_stage_model.decode(z)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> Any:
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: Any) -> torch.Tensor:
        z = encoder_posterior.sample() if isinstance(encoder_posterior, TinyPosterior) else encoder_posterior
        return self.scale_factor * z


def host_decode(world: FakeA1111, model: Any, x: torch.Tensor) -> torch.Tensor:
    """sd_samplers_common.decode_first_stage + samples_to_images_tensor "Full" (:73-76, :55-58)."""
    x = x.to(world.devices.dtype_vae)
    return model.decode_first_stage(x.to(model.first_stage_model.dtype))


def host_encode(world: FakeA1111, model: Any, image: torch.Tensor) -> torch.Tensor:
    """sd_samplers_common.images_tensor_to_samples "Full" (:96-110); the GPU here is the CPU."""
    model.first_stage_model.to(world.devices.dtype_vae)
    image = image.to(torch.device("cpu"), dtype=world.devices.dtype_vae)
    image = image * 2 - 1
    return model.get_first_stage_encoding(model.encode_first_stage(image))


# --- fixtures ----------------------------------------------------------------------------------------------


@pytest.fixture
def world() -> FakeA1111:
    w = FakeA1111()
    w.startup()  # Automatic → Doggettx (top priority without xformers)
    return w


@pytest.fixture
def adapter(world: FakeA1111) -> A1111Adapter:
    return A1111Adapter(modules=world.modules())


def make_p(world: FakeA1111, **kw: Any) -> SimpleNamespace:
    return SimpleNamespace(sd_model=world.sd_model, width=512, height=512, batch_size=1, **kw)


def on(**kw: Any) -> GenerationSettings:
    return GenerationSettings(enabled=True, **kw)


# --- reading -----------------------------------------------------------------------------------------------


def test_module_imports_without_a_webui() -> None:
    a = A1111Adapter()
    assert a.kind is HostKind.A1111
    assert a.supported_fields() == ("enabled", "attention", "channels_last", "vae_on_cpu", "compile", "vae_tiling")


def test_attention_backends_titles_and_reasons(adapter: A1111Adapter) -> None:
    backends = {b.attention: b for b in adapter.attention_backends()}
    # the host's optimizers by title, and the kernels we call inside its sdp optimizer
    assert set(backends) == {Attention.HOST, Attention.AUTO, *titles(), Attention.SAGE, Attention.FLASH}
    assert backends[Attention.HOST].available
    assert backends[Attention.AUTO].available
    for name in (Attention.SDP, Attention.SDP_NO_MEM, Attention.SPLIT, Attention.SUB_QUAD, Attention.V1):
        assert backends[name].available, name
        assert backends[name].host_name == titles()[name]
    assert backends[Attention.SPLIT].host_name == "Doggettx"
    assert backends[Attention.INVOKEAI].host_name == "InvokeAI"
    assert backends[Attention.NONE].available and backends[Attention.NONE].host_name == "None"
    xformers = backends[Attention.XFORMERS]
    assert not xformers.available
    assert "--xformers" in xformers.reason and "6.0-9.0" in xformers.reason


def test_backends_without_sdp_and_before_listing() -> None:
    w = FakeA1111(sdp=False, xformers=True)
    backends = {b.attention: b for b in A1111Adapter(modules=w.modules()).attention_backends()}
    assert backends[Attention.XFORMERS].available
    assert not backends[Attention.SDP].available and "PyTorch 2.0" in backends[Attention.SDP].reason
    w.sd_hijack.optimizers = []
    backends = {b.attention: b for b in A1111Adapter(modules=w.modules()).attention_backends()}
    assert not backends[Attention.SPLIT].available and "not listed" in backends[Attention.SPLIT].reason
    assert backends[Attention.NONE].available


def test_effective_state_reads_without_loading_a_model(world: FakeA1111, adapter: A1111Adapter) -> None:
    state = adapter.effective_state()
    assert state.attention == "Doggettx"
    assert state.model_loaded is True
    assert state.unet_channels_last is False
    assert state.vae_device == "cpu" and state.vae_dtype == "float16"
    assert state.inference_memory_mb is None
    assert state.extra["optimizers"][0] == "Doggettx"
    world.sd_models.model_data.sd_model = None  # no model: shared.sd_model (FakeShared) must not be read
    world.sd_hijack.current_optimizer = None
    state = adapter.effective_state()
    assert state.model_loaded is False and state.unet_channels_last is None and state.vae_device is None
    assert state.attention == "none"
    assert state.to_dict()["host"] == "a1111"


def test_version_from_launch(world: FakeA1111) -> None:
    calls = []

    def git_tag() -> str:
        calls.append(1)
        return "v1.10.1"

    world.launch.git_tag = git_tag
    adapter = A1111Adapter(modules=world.modules())
    assert adapter.version() == "v1.10.1"
    assert adapter.version() == "v1.10.1"
    assert len(calls) == 1  # cached: git_tag runs `git describe`
    modules = world.modules()
    modules["launch"] = None
    assert A1111Adapter(modules=modules).version() == ""


# --- attention ---------------------------------------------------------------------------------------------


EXPECTED_NAME = {
    Attention.SDP: "sdp",
    Attention.SDP_NO_MEM: "sdp-no-mem",
    Attention.SPLIT: "Doggettx",
    Attention.SUB_QUAD: "sub-quadratic",
    Attention.V1: "V1",
    Attention.INVOKEAI: "InvokeAI",
}


@pytest.mark.parametrize("name", list(EXPECTED_NAME))
def test_each_backend_switches_bindings_and_restores_exactly(
    world: FakeA1111, adapter: A1111Adapter, name: Attention
) -> None:
    before = world.bindings()
    session = adapter.begin(make_p(world), on(attention=name))
    opt = world.optimizer(EXPECTED_NAME[name])
    assert session.attention_used == name.value  # what ran, in our names (A1111 calls it opt.name)
    assert world.ldm_attention.CrossAttention.forward is opt.cross_attention_fn
    assert world.sgm_attention.CrossAttention.forward is opt.cross_attention_fn
    if opt.attnblock_fn is not None:
        assert world.ldm_model.AttnBlock.forward is opt.attnblock_fn
        assert world.sgm_model.AttnBlock.forward is opt.attnblock_fn
    assert world.sd_hijack.current_optimizer is opt
    assert world.sd_hijack.model_hijack.optimization_method == opt.name
    assert world.shared.opts.data["cross_attention_optimization"] == titles()[name]
    assert world.apply_calls in ([titles()[name]], [])  # [] only for the optimizer already active
    assert session.restorer.close() is True
    assert_same(before, world.bindings())
    assert "cross_attention_optimization" not in world.shared.opts.data


def test_none_disables_and_restores(world: FakeA1111, adapter: A1111Adapter) -> None:
    before = world.bindings()
    session = adapter.begin(make_p(world), on(attention=Attention.NONE))
    assert session.attention_used == "none"
    assert world.apply_calls == ["None"]
    assert world.ldm_attention.CrossAttention.forward is world.hypernetwork_forward
    assert world.sgm_attention.CrossAttention.forward is world.hypernetwork_forward
    assert world.sd_hijack.current_optimizer is None
    assert world.shared.opts.data["cross_attention_optimization"] == "None"
    session.restorer.close()
    assert_same(before, world.bindings())


def test_restore_is_exact_where_reapplying_is_not(world: FakeA1111) -> None:
    """docs/hosts.md §3.2 trap: the original sgm AttnBlock.forward came from undo_optimizations (ldm's function);
    re-applying the old optimizer leaves sgm's own function instead."""
    fresh = FakeA1111()
    fresh.startup("V1 - original v1")  # first apply: no current optimizer to undo → sgm gets ldm's (:110)
    assert fresh.sgm_model.AttnBlock.forward is fresh.captured_ldm_attnblock
    before = fresh.bindings()
    adapter = A1111Adapter(modules=fresh.modules())
    session = adapter.begin(make_p(fresh), on(attention=Attention.SDP))
    assert fresh.sgm_model.AttnBlock.forward is fresh.optimizer("sdp").attnblock_fn
    session.restorer.close()
    assert_same(before, fresh.bindings())
    assert fresh.sgm_model.AttnBlock.forward is fresh.captured_ldm_attnblock

    # what a restore by re-applying would have left (so the assertion above can fail)
    naive = FakeA1111()
    naive.startup("V1 - original v1")
    naive.apply_optimizations("sdp - scaled dot product")
    naive.apply_optimizations("V1 - original v1")
    assert naive.sgm_model.AttnBlock.forward is naive.captured_sgm_attnblock
    assert naive.sgm_model.AttnBlock.forward is not naive.captured_ldm_attnblock


def test_restores_original_nonlinearity_and_th_before_any_apply() -> None:
    """Before the first apply, sgm's nonlinearity is sgm's own and th is torch; apply replaces both."""
    w = FakeA1111()
    before = w.bindings()
    assert before["sgm.nonlinearity"].__name__ == "sgm_nonlinearity"
    session = A1111Adapter(modules=w.modules()).begin(make_p(w), on(attention=Attention.SUB_QUAD))
    assert w.sgm_model.nonlinearity is torch.nn.functional.silu and w.ldm_openaimodel.th is w.unet_th
    session.restorer.close()
    assert_same(before, w.bindings())
    assert "optimization_method" not in vars(w.sd_hijack.model_hijack)  # the class attribute shows again


def test_short_or_unknown_title_is_refused_and_changes_nothing(world: FakeA1111, adapter: A1111Adapter) -> None:
    before = world.bindings()
    restorer = Restorer("test")
    for title in ("sdp", "Automatic", "doggettx", "V1"):
        with pytest.raises(NotSupportedHere) as info:
            adapter.switch_optimizer(restorer, title)
        text = str(info.value)
        assert "attention" in text and repr(title) in text and "allowed:" in text
        assert "sdp - scaled dot product" in text and "None" in text
    assert world.apply_calls == []
    assert_same(before, world.bindings())
    assert restorer.close() is True and not restorer.notes


def test_title_missing_from_the_host_list_is_refused(world: FakeA1111, adapter: A1111Adapter) -> None:
    """An extension's optimizer named "sdp" without label has title "sdp", not ours: A1111 would silently apply
    its top optimizer for our title, so begin() must refuse instead."""
    world.sd_hijack.optimizers = [o for o in world.sd_hijack.optimizers if o.name != "sdp"]
    world.sd_hijack.optimizers.append(FakeOptimization(world, "sdp", None, "x", 5, True))
    before = world.bindings()
    with pytest.raises(NotSupportedHere, match=r"attention: 'sdp' is not available here.*allowed: host, auto"):
        adapter.begin(make_p(world), on(attention=Attention.SDP))
    with pytest.raises(NotSupportedHere, match=r"'xformers' is not available here \(start the WebUI with --xformers"):
        adapter.begin(make_p(world), on(attention=Attention.XFORMERS))
    assert world.apply_calls == []
    assert_same(before, world.bindings())


def test_model_reload_during_generation_keeps_our_optimizer(world: FakeA1111, adapter: A1111Adapter) -> None:
    before = world.bindings()
    session = adapter.begin(make_p(world), on(attention=Attention.SDP))
    sdp = world.optimizer("sdp")
    world.reload_model()  # per-batch reload_model_weights / refiner switch
    assert world.apply_calls[-1] is None  # the reload applied "the setting", not an explicit title
    assert world.ldm_attention.CrossAttention.forward is sdp.cross_attention_fn
    assert world.sgm_model.AttnBlock.forward is sdp.attnblock_fn
    assert world.sd_hijack.current_optimizer is sdp
    session.restorer.close()
    assert_same(before, world.bindings())


def test_already_active_optimizer_is_not_reapplied(world: FakeA1111, adapter: A1111Adapter) -> None:
    before = world.bindings()
    session = adapter.begin(make_p(world), on(attention=Attention.SPLIT))  # Doggettx is active
    assert world.apply_calls == []
    assert session.attention_used == "split"
    assert world.shared.opts.data["cross_attention_optimization"] == "Doggettx"  # reloads keep it too
    session.restorer.close()
    assert_same(before, world.bindings())


def test_host_changes_nothing(world: FakeA1111, adapter: A1111Adapter) -> None:
    before = world.bindings()
    session = adapter.begin(make_p(world), on(attention=Attention.HOST))
    assert session.attention_used == "split"
    assert world.apply_calls == []
    assert_same(before, world.bindings())
    session = adapter.begin(make_p(world), GenerationSettings(enabled=False, attention=Attention.SDP))
    assert world.apply_calls == []
    session.restorer.close()


def test_auto_picks_an_available_backend(world: FakeA1111, adapter: A1111Adapter) -> None:
    before = world.bindings()
    session = adapter.begin(make_p(world), on(attention=Attention.AUTO))
    assert session.attention_used == "sdp"  # planner preference: sdp first
    assert world.apply_calls == ["sdp - scaled dot product"]
    assert "sdp" in session.data["auto_reason"]
    session.restorer.close()
    assert_same(before, world.bindings())
    no_sdp = FakeA1111(sdp=False)
    no_sdp.startup()
    session = A1111Adapter(modules=no_sdp.modules()).begin(make_p(no_sdp), on(attention=Attention.AUTO))
    assert session.attention_used in ("sub-quad", "split")
    session.restorer.close()


def test_failure_inside_apply_optimizations_restores(world: FakeA1111, adapter: A1111Adapter) -> None:
    before = world.bindings()
    world.optimizer("sdp").fail_in_apply = True  # ldm rebound, sgm not yet
    with pytest.raises(RuntimeError, match="half-way"):
        adapter.begin(make_p(world), on(attention=Attention.SDP))
    assert_same(before, world.bindings())


def test_failure_later_in_begin_restores_attention(
    world: FakeA1111, adapter: A1111Adapter, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = world.bindings()
    unet = world.sd_model.model.diffusion_model

    def broken_to(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(unet, "to", broken_to)
    with pytest.raises(RuntimeError, match="out of memory"):
        adapter.begin(make_p(world), on(attention=Attention.SDP, channels_last=Tri.ON))
    assert_same(before, world.bindings())


def test_close_twice_is_a_no_op(world: FakeA1111, adapter: A1111Adapter) -> None:
    before = world.bindings()
    session = adapter.begin(make_p(world), on(attention=Attention.SUB_QUAD, vae_on_cpu=Tri.ON))
    assert session.restorer.close() is True
    after = world.bindings()
    world.apply_optimizations("sdp - scaled dot product")  # the user switches later; a second close must not undo it
    world.apply_calls.clear()
    switched = world.bindings()
    assert session.restorer.close() is False
    assert_same(before, after)
    assert_same(switched, world.bindings())


def test_inference_memory_is_ignored_with_a_warning(
    world: FakeA1111, adapter: A1111Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    assert "inference_memory_mb" not in adapter.supported_fields()
    before = world.bindings()
    with caplog.at_level(logging.WARNING, logger="lib_optim"):
        session = adapter.begin(make_p(world), on(inference_memory_mb=2048))
    assert sum("inference_memory_mb" in r.getMessage() for r in caplog.records) == 1
    assert_same(before, world.bindings())
    session.restorer.close()


# --- channels-last -------------------------------------------------------------------------------------------


def conv_formats(module: torch.nn.Module) -> list[bool]:
    return [p.is_contiguous(memory_format=torch.channels_last) for p in module.parameters() if p.dim() == 4]


def test_channels_last_converts_and_converts_back(world: FakeA1111, adapter: A1111Adapter) -> None:
    unet = world.sd_model.model.diffusion_model
    assert conv_formats(unet) == [False, False]
    session = adapter.begin(make_p(world), on(channels_last=Tri.ON))
    assert conv_formats(unet) == [True, True]
    assert adapter.effective_state().unet_channels_last is True
    session.restorer.close()
    assert conv_formats(unet) == [False, False]
    assert all(p.is_contiguous() for p in unet.parameters())


def test_channels_last_only_when_needed(world: FakeA1111, adapter: A1111Adapter) -> None:
    unet = world.sd_model.model.diffusion_model
    pointers = [p.data_ptr() for p in unet.parameters()]
    session = adapter.begin(make_p(world), on(channels_last=Tri.OFF))  # already contiguous
    assert [p.data_ptr() for p in unet.parameters()] == pointers
    session.restorer.close()
    assert [p.data_ptr() for p in unet.parameters()] == pointers

    unet.to(memory_format=torch.channels_last)  # as --opt-channelslast leaves it (sd_models.py:461-463)
    pointers = [p.data_ptr() for p in unet.parameters()]
    session = adapter.begin(make_p(world), on(channels_last=Tri.ON))
    assert [p.data_ptr() for p in unet.parameters()] == pointers
    assert "UNet already channels_last" in session.restorer.notes
    session.restorer.close()
    assert [p.data_ptr() for p in unet.parameters()] == pointers

    session = adapter.begin(make_p(world), on(channels_last=Tri.OFF))  # channels-last → contiguous → back
    assert conv_formats(unet) == [False, False]
    session.restorer.close()
    assert conv_formats(unet) == [True, True]


# --- VAE on CPU ----------------------------------------------------------------------------------------------


def test_vae_on_cpu_decodes_in_float32_and_restores(world: FakeA1111, adapter: A1111Adapter) -> None:
    model = world.sd_model
    vae = model.first_stage_model
    assert vae.decoder.weight.dtype == torch.float16
    session = adapter.begin(make_p(world), on(vae_on_cpu=Tri.ON))
    assert world.devices.dtype_vae == torch.float32
    assert vae.decoder.weight.dtype == torch.float32 and vae.decoder.weight.device.type == "cpu"
    assert world.devices.gc_calls == 1
    assert "decode_first_stage" in vars(model) and "encode_first_stage" in vars(model)

    latent = torch.randn(1, 4, 8, 8, dtype=torch.float16)
    image = host_decode(world, model, latent)  # the host's "Full" decode path
    assert vae.seen[-1] == ("decode", torch.device("cpu"), torch.float32, torch.float32)
    assert image.shape == (1, 3, 8, 8) and image.dtype == torch.float32

    direct = model.decode_first_stage(latent)  # a caller passing float16 gets float16 back
    assert vae.seen[-1][2:] == (torch.float32, torch.float32)
    assert direct.dtype == torch.float16

    latent_out = host_encode(world, model, torch.rand(1, 3, 8, 8))  # the img2img encode path
    assert vae.seen[-1] == ("encode", torch.device("cpu"), torch.float32, torch.float32)
    assert latent_out.shape == (1, 4, 8, 8) and latent_out.dtype == torch.float32
    assert vae.decoder.weight.dtype == torch.float32  # the encode path's re-cast kept float32

    vae.to_calls.clear()
    session.restorer.close()
    assert world.devices.dtype_vae == torch.float16
    assert all(p.dtype == torch.float16 for p in vae.parameters())
    assert vae.dtype == torch.float16
    assert "decode_first_stage" not in vars(model) and "encode_first_stage" not in vars(model)
    # moved back to the original device (here the CPU: there is no GPU in the tests)
    devices = [kw.get("device", args[0] if args else None) for args, kw in vae.to_calls]
    assert torch.device("cpu") in devices
    assert torch.float16 in [kw.get("dtype") for _args, kw in vae.to_calls]


def test_vae_on_cpu_keeps_an_existing_instance_override(world: FakeA1111, adapter: A1111Adapter) -> None:
    model = world.sd_model
    theirs = model.decode_first_stage
    model.decode_first_stage = theirs  # another extension's instance attribute
    session = adapter.begin(make_p(world), on(vae_on_cpu=Tri.ON))
    assert vars(model)["decode_first_stage"] is not theirs
    session.restorer.close()
    assert vars(model)["decode_first_stage"] is theirs


def test_vae_on_cpu_keeps_the_hosts_nan_autofix(world: FakeA1111, adapter: A1111Adapter) -> None:
    """processing.py:650-663: the NaN auto-fix switches dtype_vae and the VAE for good; restore keeps that."""
    session = adapter.begin(make_p(world), on(vae_on_cpu=Tri.ON))
    world.devices.dtype_vae = torch.bfloat16
    world.sd_model.first_stage_model.to(torch.bfloat16)
    session.restorer.close()
    assert world.devices.dtype_vae == torch.bfloat16
    assert world.sd_model.first_stage_model.decoder.weight.dtype == torch.bfloat16


def test_vae_on_cpu_skipped_under_lowvram(
    world: FakeA1111, adapter: A1111Adapter, caplog: pytest.LogCaptureFixture
) -> None:
    world.sd_model.lowvram = True
    with caplog.at_level(logging.WARNING, logger="lib_optim"):
        session = adapter.begin(make_p(world), on(vae_on_cpu=Tri.ON))
    assert any("lowvram" in r.getMessage() for r in caplog.records)
    assert world.devices.dtype_vae == torch.float16
    assert world.sd_model.first_stage_model.decoder.weight.dtype == torch.float16
    assert "decode_first_stage" not in vars(world.sd_model)
    session.restorer.close()


def test_everything_at_once_restores_everything(world: FakeA1111, adapter: A1111Adapter) -> None:
    before = world.bindings()
    model = world.sd_model
    session = adapter.begin(make_p(world), on(attention=Attention.INVOKEAI, channels_last=Tri.ON, vae_on_cpu=Tri.ON))
    assert session.attention_used == "invokeai"
    host_decode(world, model, torch.randn(1, 4, 8, 8))
    session.restorer.close()
    assert_same(before, world.bindings())
    assert conv_formats(model.model.diffusion_model) == [False, False]
    assert model.first_stage_model.decoder.weight.dtype == torch.float16
    assert world.devices.dtype_vae == torch.float16


def test_auto_uses_the_hires_size(world: FakeA1111, adapter: A1111Adapter, planner_requests: Any) -> None:
    calls = planner_requests("a1111")
    p = make_p(world, enable_hr=True, hr_scale=2.0, hr_resize_x=0, hr_resize_y=0)
    adapter.begin(p, on(attention=Attention.AUTO)).restorer.close()
    [seen] = calls
    assert (seen["width"], seen["height"], seen["batch"]) == (1024, 1024, 1)
    # no device known: planned as the CPU (A1111's devices.device is None until it is set at start-up)
    assert (seen["family"], seen["device"], seen["dtype_bytes"], seen["budget_mb"]) == ("sd15", "cpu", 4, None)
    assert seen["free_mb"] > 0  # MemAvailable


def test_auto_plans_for_the_model_device_and_dtype(
    world: FakeA1111, adapter: A1111Adapter, planner_requests: Any
) -> None:
    """devices.device/dtype_unet (devices.py:120-127) and sd_model.is_sdxl (sd_models.py:382-390) reach the
    planner, so an SDXL model on a GPU is planned with SDXL's attention shapes in its dtype."""
    calls = planner_requests("a1111")
    world.devices.device = torch.device("cuda:0")  # no CUDA here: free memory unknown, planned without a limit
    world.devices.dtype_unet = torch.bfloat16
    p = make_p(world)
    p.batch_size = 2
    p.sd_model.is_sdxl = True
    adapter.begin(p, on(attention=Attention.AUTO)).restorer.close()
    [seen] = calls
    assert (seen["family"], seen["device"], seen["dtype_bytes"], seen["batch"]) == ("sdxl", "cuda", 2, 2)
    assert seen["free_mb"] is None if not torch.cuda.is_available() else seen["free_mb"] > 0


# --- compile -------------------------------------------------------------------------------------------------


class ResBlock(torch.nn.Module):
    """Named like ldm's openaimodel.ResBlock (stablediffusion ldm/modules/diffusionmodules/openaimodel.py)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


@pytest.fixture
def eager_compiler(monkeypatch: pytest.MonkeyPatch) -> Any:
    """The process compiler with dynamo's eager backend: the glue runs for real, nothing waits for a C++ build."""
    from lib_optim.compile import regional as rc

    compiler = rc.RegionalCompiler(backend="eager")
    monkeypatch.setattr("lib_optim.compile.get_compiler", lambda: compiler)  # the face the adapter reads
    return compiler


def test_compile_applies_per_generation_keyed_by_the_attention(
    world: FakeA1111, adapter: A1111Adapter, eager_compiler: Any
) -> None:
    from lib_optim.settings import Compile

    world.sd_model.model.diffusion_model = torch.nn.Sequential(ResBlock(), ResBlock())
    blocks = list(world.sd_model.model.diffusion_model)
    session = adapter.begin(make_p(world), on(attention=Attention.SDP, compile=Compile.ON))
    assert all("forward" in vars(b) for b in blocks)  # compiled forwards for the generation
    x = torch.zeros(1, 4, 8, 8)
    world.sd_model.model.diffusion_model(x)
    world.sd_model.model.diffusion_model(x)
    stats = session.data["compile"].stats
    assert stats.blocks == 2 and stats.compiles >= 1
    # the key is the attention A1111 bound for this generation: switching it is another cache entry
    assert str(vars(world.ldm_attention.CrossAttention)["forward"]) in stats.key
    session.restorer.close()
    assert all("forward" not in vars(b) for b in blocks)  # exactly as before
    sdp_key = stats.key
    session = adapter.begin(make_p(world), on(attention=Attention.SPLIT, compile=Compile.ON))
    assert session.data["compile"].stats.key != sdp_key
    session.restorer.close()


class ResnetBlock(ResBlock):
    """Named like the VAE's ResnetBlock (stablediffusion ldm/modules/diffusionmodules/model.py:90)."""


def test_compile_also_compiles_the_vae_blocks_and_restores_them(
    world: FakeA1111, adapter: A1111Adapter, eager_compiler: Any
) -> None:
    """With compile on, the VAE's ResnetBlock/AttnBlock are regions of their own for the generation (the decode
    and encode of ``first_stage_model``), in the UNet's mode; restored exactly afterwards; nothing when the UNet
    did not compile."""
    from lib_optim.settings import Compile

    world.sd_model.model.diffusion_model = torch.nn.Sequential(ResBlock())
    world.sd_model.first_stage_model = vae = torch.nn.Sequential(ResnetBlock(), ResnetBlock())
    session = adapter.begin(make_p(world), on(compile=Compile.ON))
    assert all("forward" in vars(b) for b in vae)
    vae(torch.zeros(1, 4, 8, 8))  # one decode: each block is called once, and compiled from that first call
    stats = session.data["compile_vae"].stats
    assert (stats.blocks, stats.mode) == (2, "on") and stats.compiles >= 1 and stats.graph_breaks == 0
    assert stats.eager_calls == 0  # A1111's LoRA never edits the VAE's weights: no eager first call
    session.restorer.close()
    assert all("forward" not in vars(b) for b in vae)
    session = adapter.begin(make_p(world), on(compile=Compile.OFF))
    assert "compile_vae" not in session.data and all("forward" not in vars(b) for b in vae)
    session.restorer.close()


def test_compile_unavailable_runs_eagerly_with_one_line(
    world: FakeA1111, adapter: A1111Adapter, monkeypatch: pytest.MonkeyPatch, caplog: Any
) -> None:
    import logging

    from lib_optim.compile import regional as rc
    from lib_optim.settings import Compile

    compiler = rc.RegionalCompiler()  # the real backend, without a C++ compiler on this "machine"
    monkeypatch.setattr("lib_optim.compile.get_compiler", lambda: compiler)  # the face the adapter reads
    monkeypatch.setattr(rc, "compile_availability", lambda device, mode="on": (False, "install a C++ compiler"))
    monkeypatch.setattr(logging.getLogger("lib_optim"), "propagate", True)
    world.sd_model.model.diffusion_model = torch.nn.Sequential(ResBlock())
    with caplog.at_level(logging.WARNING, logger="lib_optim"):
        session = adapter.begin(make_p(world), on(compile=Compile.ON))
    assert "compile" not in session.data and "C++ compiler" in session.data["compile_unavailable"]
    assert [r for r in caplog.records if "compile: not available" in r.getMessage()]
    session.restorer.close()


@pytest.fixture
def cpu_from_torch_2_5(monkeypatch: pytest.MonkeyPatch) -> None:
    """compile auto's CPU estimate from torch 2.5 (×1.10), whichever torch runs the test (before 2.5 it is ×1.0)."""
    from lib_optim.compile import auto

    monkeypatch.setattr(auto, "estimated_speedup", lambda device_type, torch: auto.SPEEDUP_CPU)


def test_compile_auto_one_image_runs_eagerly_twenty_compile(
    world: FakeA1111, adapter: A1111Adapter, eager_compiler: Any, cpu_from_torch_2_5: None
) -> None:
    """The job is ``p.steps`` × ``p.n_iter`` × ``p.batch_size`` (docs/hosts.md §7.7: ``state.job_count`` is -1 at
    the ``process`` hook outside a grid); nothing measured yet on this CPU: 120 s of cold compile against
    ≈ 0.36 s saved per image-step. The decision and its figures are what infotext's ``Optim compile`` shows."""
    from lib_optim.runtime import compile_summary, compiled_text
    from lib_optim.settings import Compile

    world.sd_model.model.diffusion_model = torch.nn.Sequential(ResBlock(), ResBlock())
    world.shared.state = SimpleNamespace(job_count=-1, job_no=0, processing_has_refined_job_count=False)
    p = make_p(world, steps=20, n_iter=1, sd_model_hash="0123456789")
    session = adapter.begin(p, on(compile=Compile.AUTO))
    assert "compile" not in session.data
    plan = session.data["compile_auto"]
    assert plan.job.key.model == "sd15:0123456789" and plan.job.key.attention == "split" and plan.job.images == 1
    assert compiled_text(compile_summary(session) or {}) == (
        "auto→eager (compile ≈ 120 s cold, estimated; saves ≈ 0.36 s/step × 20 steps = 7 s, estimated)"
    )
    session.restorer.close()

    p = make_p(world, steps=20, n_iter=10)
    p.batch_size = 2
    session = adapter.begin(p, on(compile=Compile.AUTO))
    assert "compile" in session.data and session.data["compile_auto"].job.images == 20
    assert compiled_text(compile_summary(session) or {}).startswith(
        "auto→compile (compile ≈ 120 s cold, estimated; saves ≈ 0.36 s/step × 400 steps (20 images) = 145 s"
    )
    session.restorer.close()
    assert all("forward" not in vars(b) for b in world.sd_model.model.diffusion_model)


def test_compile_auto_counts_the_cells_left_in_an_xyz_grid(
    world: FakeA1111, adapter: A1111Adapter, eager_compiler: Any, cpu_from_torch_2_5: None
) -> None:
    """X/Y/Z sets ``state.job_count`` for the whole grid before its first cell (scripts/xyz_grid.py:296), each
    batch then counts one ``job_no`` (modules/processing.py:1014), and txt2img's ``init`` doubles the count once
    for hires fix (:1290-1299): a one-image cell compiles when twenty cells follow."""
    from lib_optim.hosts.base import job_images
    from lib_optim.settings import Compile

    world.sd_model.model.diffusion_model = torch.nn.Sequential(ResBlock())
    world.shared.state = SimpleNamespace(job_count=20, job_no=0, processing_has_refined_job_count=False)
    session = adapter.begin(make_p(world, steps=20, n_iter=1), on(compile=Compile.AUTO))
    assert session.data["compile_auto"].job.images == 20 and "compile" in session.data
    session.restorer.close()
    hires = SimpleNamespace(batch_size=2, n_iter=1, enable_hr=True)
    refined = SimpleNamespace(job_count=40, job_no=10, processing_has_refined_job_count=True)
    assert job_images(hires, refined) == 15 * 2
    assert job_images(SimpleNamespace(batch_size=1, n_iter=3), SimpleNamespace(job_count=4, job_no=3)) == 3
    assert job_images(SimpleNamespace(), None) == 1
