"""ForgeAdapter against fake Forge f2 modules.

The fakes are module objects put in ``sys.modules`` whose code is executed in their own namespace, so
by-name imports (``from backend.attention import attention_function``) and call-time global lookups behave
as in Forge. Each imitates the Forge f2 (main, 2025-06) lines cited next to it.
"""

from __future__ import annotations

import logging
import sys
import textwrap
import types
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lib_optim.adapter import NotSupportedHere
from lib_optim.hosts.forge import ForgeAdapter
from lib_optim.settings import Attention, GenerationSettings, Tri

MB = 1024 * 1024
CUDA = torch.device("cuda")  # a device object only: nothing is ever moved there
CPU = torch.device("cpu")


def make_module(monkeypatch: pytest.MonkeyPatch, name: str, source: str = "", package: bool = False) -> Any:
    module = types.ModuleType(name)
    if package:
        module.__path__ = []  # a package with no files: a submodule not in sys.modules does not import
    monkeypatch.setitem(sys.modules, name, module)
    exec(textwrap.dedent(source), module.__dict__)
    return module


# backend/attention.py: functions (:96, :167, :280, :324, :342-427) chosen once at import (:430-451);
# attention_xformers reads the module global `xformers` at call time (:307), imported only if enabled (:10-19).
ATTENTION_SRC = """
CALLS = []
BROKEN_XFORMERS = False

def attention_sub_quad(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    CALLS.append("attention_sub_quad"); return q

def attention_split(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    CALLS.append("attention_split"); return q

def attention_xformers(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    CALLS.append("attention_xformers"); return xformers.ops.memory_efficient_attention(q, k, v, attn_bias=mask)

def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False):
    CALLS.append("attention_pytorch"); return q

def slice_attention_single_head_spatial(q, k, v):
    CALLS.append("slice_attention_single_head_spatial"); return q

def normal_attention_single_head_spatial(q, k, v):
    CALLS.append("normal_attention_single_head_spatial"); return q

def xformers_attention_single_head_spatial(q, k, v):
    CALLS.append("xformers_attention_single_head_spatial"); return xformers.ops.memory_efficient_attention(q, k, v)

def pytorch_attention_single_head_spatial(q, k, v):
    CALLS.append("pytorch_attention_single_head_spatial"); return q

attention_function = attention_pytorch
attention_function_single_head_spatial = pytorch_attention_single_head_spatial
"""

# backend/nn/unet.py:5 + :154, backend/nn/flux.py:11 + :15-18, backend/nn/chroma.py:10, backend/nn/vae.py:3 + :135
UNET_SRC = """
from backend.attention import attention_function
def cross_attention(q, k, v, heads):
    return attention_function(q, k, v, heads, None)
"""
FLUX_SRC = """
from backend.attention import attention_function
def attention(q, k, v, pe=None):
    return attention_function(q, k, v, q.shape[1], skip_reshape=True)
"""
CHROMA_SRC = "from backend.attention import attention_function\n"
VAE_NN_SRC = """
from backend.attention import attention_function_single_head_spatial
def attn_block(q, k, v):
    return attention_function_single_head_spatial(q, k, v)
"""

# backend/memory_management.py: VRAMState (:17-23), vram_state/lowvram_available (:33, :39), OOM_EXCEPTION
# (:142-145), VAE_ALWAYS_TILED (:212), current_loaded_models (:288), LoadedModel (:443-541: device from
# load_device, model_unload moves to offload_device unless avoid_model_moving), current_inference_memory
# (:544), the swap budget formula (:603-611), load_models_gpu's "already loaded" shortcut (:621-643),
# soft_empty_cache (:1194). Weights on the "GPU" are bookkeeping (fake_gpu); CPU moves are real.
MM_SRC = """
import enum
import torch

class VRAMState(enum.Enum):
    DISABLED = 0
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4
    SHARED = 5

vram_state = VRAMState.NORMAL_VRAM
lowvram_available = True
directml_enabled = False
OOM_EXCEPTION = type("FakeOutOfMemoryError", (Exception,), {})
VAE_ALWAYS_TILED = False
current_loaded_models = []
current_inference_memory = 1024 * 1024 * 1024
GPU_TOTAL = 0
EMPTY_CACHE_CALLS = []

def _move(model, device):
    if isinstance(model, torch.nn.Module):
        if device.type == "cpu":
            model.to(device)
        model.fake_device = device
    else:
        model.fake_gpu = model.fake_total if device.type == "cuda" else 0

class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.model_accelerated = False
        self.device = model.load_device

    def model_load(self):
        _move(self.model.model, self.device)

    def model_unload(self, avoid_model_moving=False):
        if not avoid_model_moving:
            _move(self.model.model, self.model.offload_device)

def minimum_inference_memory():
    return current_inference_memory

def module_size(module, exclude_device=None, include_device=None):
    if include_device is None:
        return module.fake_total
    return module.fake_gpu if include_device.type == "cuda" else module.fake_total - module.fake_gpu

def get_free_memory(dev=None, torch_free_too=False):
    if dev is not None and dev.type == "cpu":
        return 64 * 1024 ** 3
    return GPU_TOTAL - sum(getattr(e.model.model, "fake_gpu", 0) for e in current_loaded_models)

def compute_model_gpu_memory_when_using_cpu_swap(current_free_mem, inference_memory):
    available = current_free_mem - inference_memory
    return int(max(0, max(available / 1.3, available - 1024 * 1024 * 1024 * 1.25)))

def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    for patcher in models:
        if any(e.model is patcher for e in current_loaded_models):
            continue
        entry = LoadedModel(patcher)
        entry.model_load()
        current_loaded_models.insert(0, entry)

def load_model_gpu(model):
    return load_models_gpu([model])

def soft_empty_cache(force=False):
    EMPTY_CACHE_CALLS.append(force)
"""


class TinyDecoder(torch.nn.Module):
    """Stands in for the VAE's first_stage_model: records where and in what dtype decode ran."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, kernel_size=3, padding=1)
        self.seen: list[tuple[torch.device, torch.dtype, torch.dtype]] = []
        self.oom_above_width: int | None = None

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.conv.weight.device, self.conv.weight.dtype, x.dtype))
        if self.oom_above_width is not None and x.shape[-1] > self.oom_above_width:
            raise sys.modules["backend.memory_management"].OOM_EXCEPTION("fake OOM")
        return self.conv(x)


class FakePatcher:
    """backend/patcher/base.py:51-71: model, load_device, offload_device; UnetPatcher (unet.py:19-24)."""

    def __init__(self, model: Any, load_device: torch.device, offload_device: torch.device) -> None:
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.extra_preserved_memory_during_sampling = 0


class FakeVAE:
    """backend/patcher/vae.py: attributes set at construction (:70-89); decode (:128-160) reads
    self.device / self.vae_dtype / self.output_device / self.patcher at call time, falls back to a tiled
    decode on OOM (:143-145) and decodes tiled when VAE_ALWAYS_TILED (:129-130, :157-160)."""

    def __init__(self, model: TinyDecoder) -> None:
        self.vae_dtype = torch.bfloat16
        self.first_stage_model = model.to(self.vae_dtype)
        self.device = CUDA
        self.output_device = CPU
        self.patcher = FakePatcher(self.first_stage_model, load_device=CUDA, offload_device=CPU)

    def _mm(self) -> Any:
        return sys.modules["backend.memory_management"]

    def decode_tiled_(self, samples: torch.Tensor) -> torch.Tensor:
        def decode_fn(a: torch.Tensor) -> torch.Tensor:
            return self.first_stage_model.decode(a.to(self.vae_dtype).to(self.device)).float()

        tiles = [decode_fn(tile).to(self.output_device) for tile in samples.split(4, dim=3)]
        return torch.cat(tiles, dim=3)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        mm = self._mm()
        if mm.VAE_ALWAYS_TILED:
            mm.load_model_gpu(self.patcher)
            return self.decode_tiled_(samples).to(self.output_device)
        try:
            mm.load_models_gpu([self.patcher], memory_required=1)
            out = self.first_stage_model.decode(samples.to(self.vae_dtype).to(self.device))
            out = out.to(self.output_device).float()
        except mm.OOM_EXCEPTION:
            out = self.decode_tiled_(samples)
        return out.to(self.output_device)


class FakeLoraLoader:
    """backend/patcher/lora.py:344-447: refresh() puts new Parameters into the model (:384, :441)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.backup: dict[str, Any] = {}
        self.refreshed = 0

    def refresh(self, lora_patches: Any = None, offload_device: Any = CPU, force_refresh: bool = False) -> None:
        self.refreshed += 1
        conv = self.model[0]
        self.backup["0.weight"] = conv.weight.to(device="cpu", copy=True)
        conv.weight = torch.nn.Parameter(conv.weight.detach().contiguous() + 0.0, requires_grad=False)


class FakeKModel:
    """backend/modules/k_model.py: .diffusion_model; ModelPatcher gives the model a lora_loader (base.py:63-66)."""

    def __init__(self, diffusion_model: torch.nn.Module, total_mb: int) -> None:
        self.diffusion_model = diffusion_model
        self.lora_loader = FakeLoraLoader(diffusion_model)
        self.fake_total = total_mb * MB
        self.fake_gpu = 0


def tiny_unet() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3))


def conv_formats(model: torch.nn.Module) -> list[bool]:
    return [m.weight.is_contiguous(memory_format=torch.channels_last) for m in model if hasattr(m, "weight")]


@pytest.fixture
def forge(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    monkeypatch.setitem(sys.modules, "xformers", None)  # not installed unless a test says so
    make_module(monkeypatch, "backend", package=True)
    make_module(monkeypatch, "backend.nn", package=True)
    make_module(monkeypatch, "backend.args", "args = type('A', (), {'disable_xformers': False})()")
    mm = make_module(monkeypatch, "backend.memory_management", MM_SRC)
    attn = make_module(monkeypatch, "backend.attention", ATTENTION_SRC)
    unet_nn = make_module(monkeypatch, "backend.nn.unet", UNET_SRC)
    flux = make_module(monkeypatch, "backend.nn.flux", FLUX_SRC)
    chroma = make_module(monkeypatch, "backend.nn.chroma", CHROMA_SRC)
    vae_nn = make_module(monkeypatch, "backend.nn.vae", VAE_NN_SRC)
    make_module(monkeypatch, "modules", package=True)
    make_module(monkeypatch, "modules_forge", package=True)
    make_module(monkeypatch, "modules_forge.forge_version", "version = '2.0.1v1.10.1'")
    # modules/sd_models.py:396-408: model_data.sd_model, None before the first generation
    sd_models = make_module(monkeypatch, "modules.sd_models", "class _D:\n    sd_model = None\nmodel_data = _D()")

    kmodel = FakeKModel(tiny_unet(), total_mb=2000)
    unet = FakePatcher(kmodel, load_device=CUDA, offload_device=CPU)
    vae = FakeVAE(TinyDecoder())
    # backend/diffusion_engine/base.py:7-20 ForgeObjects
    sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=unet, vae=vae, clip=None, clipvision=None))
    p = SimpleNamespace(sd_model=sd_model, width=512, height=512, batch_size=1)
    yield SimpleNamespace(
        mm=mm,
        attn=attn,
        unet_nn=unet_nn,
        flux=flux,
        chroma=chroma,
        vae_nn=vae_nn,
        sd_models=sd_models,
        kmodel=kmodel,
        unet=unet,
        vae=vae,
        p=p,
        adapter=ForgeAdapter(),
    )


def on(**kwargs: Any) -> GenerationSettings:
    return GenerationSettings(enabled=True, **kwargs)


def bindings(f: SimpleNamespace) -> dict[str, Any]:
    return {
        "attention.attention_function": f.attn.attention_function,
        "unet.attention_function": f.unet_nn.attention_function,
        "flux.attention_function": f.flux.attention_function,
        "chroma.attention_function": f.chroma.attention_function,
        "attention.attention_function_single_head_spatial": f.attn.attention_function_single_head_spatial,
        "vae.attention_function_single_head_spatial": f.vae_nn.attention_function_single_head_spatial,
    }


# --------------------------------------------------------------------------------------------- attention


def test_module_imports_without_forge() -> None:
    import subprocess

    code = "import lib_optim.hosts.forge, sys; assert 'backend' not in sys.modules and 'modules' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_backends_offered(forge: SimpleNamespace) -> None:
    names = {b.attention: b for b in forge.adapter.attention_backends()}
    assert set(names) == {
        Attention.HOST,
        Attention.AUTO,
        Attention.SDP,
        Attention.SPLIT,
        Attention.SUB_QUAD,
        Attention.XFORMERS,
        Attention.SAGE,  # kernels we call ourselves: offered, unavailable on this CPU with the fix named
        Attention.FLASH,
    }
    assert not names[Attention.SAGE].available and "pip install sageattention" in names[Attention.SAGE].reason
    assert names[Attention.HOST].host_name == "attention_pytorch"
    assert names[Attention.SPLIT].available and names[Attention.SUB_QUAD].available and names[Attention.SDP].available
    assert not names[Attention.XFORMERS].available
    assert "xformers" in names[Attention.XFORMERS].reason


@pytest.mark.parametrize(
    ("choice", "unet_fn", "vae_fn"),
    [
        (Attention.SPLIT, "attention_split", "normal_attention_single_head_spatial"),
        (Attention.SUB_QUAD, "attention_sub_quad", "normal_attention_single_head_spatial"),
        (Attention.SDP, "attention_pytorch", "pytorch_attention_single_head_spatial"),
    ],
)
def test_every_binding_switches_and_is_restored(forge: SimpleNamespace, choice: Attention, unet_fn: str, vae_fn: str):
    forge.attn.attention_function = forge.attn.attention_sub_quad  # host chose something else (or same for sdp)
    forge.unet_nn.attention_function = forge.attn.attention_sub_quad
    forge.flux.attention_function = forge.attn.attention_sub_quad
    forge.chroma.attention_function = forge.attn.attention_sub_quad
    before = bindings(forge)
    session = forge.adapter.begin(forge.p, on(attention=choice))
    assert session.attention_used == choice.value  # in our names (Forge calls it unet_fn)
    during = bindings(forge)
    for key, value in during.items():
        expected = vae_fn if "single_head" in key else unet_fn
        assert value is getattr(forge.attn, expected), key
    forge.attn.CALLS.clear()
    forge.unet_nn.cross_attention(torch.zeros(1, 2, 8), None, None, 1)
    forge.flux.attention(torch.zeros(1, 1, 2, 8), None, None)
    forge.vae_nn.attn_block(None, None, None)
    calls = list(forge.attn.CALLS)
    assert calls == [unet_fn, unet_fn, vae_fn]
    session.restorer.close()
    after = bindings(forge)
    assert all(after[k] is before[k] for k in before)


def test_modules_the_host_has_not_imported_are_left_alone_until_it_does(
    forge: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flux and Chroma are imported by Forge only when such a model loads (backend/loader.py:116-123): the
    switch must not import them, and one imported during the generation copies the switched function by name
    (``from backend.attention import attention_function``) — it gets the switch at the next sampling start
    and the host's own function back at the end."""
    host_fn = forge.attn.attention_function
    monkeypatch.delitem(sys.modules, "backend.nn.flux")
    monkeypatch.delitem(sys.modules, "backend.nn.chroma")
    session = forge.adapter.begin(forge.p, on(attention=Attention.SPLIT))
    assert "backend.nn.flux" not in sys.modules and "backend.nn.chroma" not in sys.modules
    assert forge.unet_nn.attention_function is forge.attn.attention_split
    # a Flux model loads during the generation: its module copies what backend.attention holds now
    flux = make_module(monkeypatch, "backend.nn.flux", FLUX_SRC)
    assert flux.attention_function is forge.attn.attention_split
    forge.adapter.before_sampling(forge.p, session)
    # ... and Chroma after the last sampling start: the restore finds its copy too
    chroma = make_module(monkeypatch, "backend.nn.chroma", CHROMA_SRC)
    session.restorer.close()
    assert forge.attn.attention_function is host_fn
    assert flux.attention_function is host_fn and chroma.attention_function is host_fn
    assert forge.unet_nn.attention_function is host_fn


def test_host_changes_nothing(forge: SimpleNamespace) -> None:
    before = bindings(forge)
    session = forge.adapter.begin(forge.p, on(attention=Attention.HOST, channels_last=Tri.INHERIT))
    assert session.attention_used == "sdp"
    assert session.restorer.notes == []
    assert all(bindings(forge)[k] is v for k, v in before.items())


def test_auto_uses_planner_over_available(forge: SimpleNamespace) -> None:
    session = forge.adapter.begin(forge.p, on(attention=Attention.AUTO))
    assert session.attention_used == "sdp"  # sdp first; xformers unavailable here
    assert "sdp" in session.data["auto_reason"]
    session.restorer.close()


@pytest.mark.parametrize(("asked", "budget"), [(None, 1024), (256, 256)])
def test_auto_fits_forges_inference_memory(
    forge: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, planner_requests: Any, asked: int | None, budget: int
) -> None:
    """On the GPU, auto's budget is the inference memory Forge keeps free for sampling
    (memory_management.py:544-549): this generation's if the accordion sets one, else Forge's current one."""
    calls = planner_requests("forge")
    devices = make_module(
        monkeypatch, "modules.devices", "import torch\ndevice = torch.device('cuda')\ndtype_unet = torch.float16"
    )
    assert devices.device.type == "cuda"
    forge.p.enable_hr, forge.p.hr_scale = True, 1.5
    session = forge.adapter.begin(forge.p, on(attention=Attention.AUTO, inference_memory_mb=asked))
    session.restorer.close()
    [seen] = calls
    assert (seen["budget_mb"], seen["device"], seen["dtype_bytes"]) == (budget, "cuda", 2)
    assert (seen["width"], seen["height"], seen["family"]) == (768, 768, "sd15")  # the hires pass's size


def test_binding_module_not_imported_is_skipped(forge: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "backend.nn.chroma")  # not importable: backend.nn has no files
    session = forge.adapter.begin(forge.p, on(attention=Attention.SPLIT))
    assert forge.unet_nn.attention_function is forge.attn.attention_split
    session.restorer.close()
    assert "backend.nn.chroma" not in sys.modules
    assert forge.unet_nn.attention_function is forge.attn.attention_pytorch


def test_xformers_unavailable_refuses_and_changes_nothing(forge: SimpleNamespace) -> None:
    before = bindings(forge)
    with pytest.raises(NotSupportedHere) as info:
        forge.adapter.validate(on(attention=Attention.XFORMERS))
    text = str(info.value)
    assert "attention" in text and "'xformers'" in text and "allowed: host, auto, sdp, split, sub-quad" in text
    with pytest.raises(NotSupportedHere):
        forge.adapter.begin(forge.p, on(attention=Attention.XFORMERS, channels_last=Tri.ON))
    assert all(bindings(forge)[k] is v for k, v in before.items())
    assert conv_formats(forge.kmodel.diffusion_model) == [False, False]


def fake_xformers(monkeypatch: pytest.MonkeyPatch, version: str = "0.0.27") -> Any:
    xformers = make_module(monkeypatch, "xformers", f"__version__ = {version!r}", package=True)
    ops = make_module(
        monkeypatch, "xformers.ops", "def memory_efficient_attention(q, k, v, attn_bias=None):\n return q"
    )
    xformers.ops = ops
    xformers.version = SimpleNamespace(__version__=version)
    return xformers


def test_xformers_needs_cuda(forge: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_xformers(monkeypatch)
    adapter = ForgeAdapter(cuda_available=lambda: False)
    info = {b.attention: b for b in adapter.attention_backends()}[Attention.XFORMERS]
    assert not info.available and "CUDA" in info.reason


def test_xformers_module_injected_and_removed(forge: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    xformers = fake_xformers(monkeypatch)
    adapter = ForgeAdapter(cuda_available=lambda: True)
    assert "xformers" not in vars(forge.attn)
    session = adapter.begin(forge.p, on(attention=Attention.XFORMERS))
    assert forge.attn.xformers is xformers
    assert forge.attn.BROKEN_XFORMERS is True  # as attention.py:17 would have computed it for 0.0.27
    q = torch.ones(1, 2, 8)
    assert forge.unet_nn.cross_attention(q, q, q, 1) is q
    assert forge.vae_nn.attn_block(q, q, q) is q
    session.restorer.close()
    assert "xformers" not in vars(forge.attn)
    assert forge.attn.BROKEN_XFORMERS is False
    assert forge.unet_nn.attention_function is forge.attn.attention_pytorch


# --------------------------------------------------------------------------------------------- lifecycle


def test_exception_mid_begin_restores(forge: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    before = bindings(forge)
    memory = forge.mm.current_inference_memory

    def boom(*args: Any) -> None:
        raise RuntimeError("mid-way")

    monkeypatch.setattr(forge.adapter, "apply_inference_memory_mb", boom)
    with pytest.raises(RuntimeError, match="mid-way"):
        forge.adapter.begin(
            forge.p, on(attention=Attention.SPLIT, channels_last=Tri.ON, vae_on_cpu=Tri.ON, inference_memory_mb=2048)
        )
    assert all(bindings(forge)[k] is v for k, v in before.items())
    assert conv_formats(forge.kmodel.diffusion_model) == [False, False]
    assert forge.vae.device is CUDA and forge.vae.vae_dtype is torch.bfloat16
    assert forge.vae.first_stage_model.conv.weight.dtype is torch.bfloat16
    assert "refresh" not in vars(forge.kmodel.lora_loader)
    assert forge.mm.current_inference_memory == memory


def test_close_twice_is_noop(forge: SimpleNamespace) -> None:
    session = forge.adapter.begin(forge.p, on(attention=Attention.SPLIT, channels_last=Tri.ON))
    assert session.restorer.close() is True
    forge.unet_nn.attention_function = "someone else's"
    assert session.restorer.close() is False
    assert forge.unet_nn.attention_function == "someone else's"


def test_before_sampling_twice_is_harmless(forge: SimpleNamespace) -> None:
    session = forge.adapter.begin(forge.p, on(attention=Attention.SPLIT, channels_last=Tri.ON, vae_on_cpu=Tri.ON))
    snapshot = bindings(forge)
    notes = list(session.restorer.notes)
    forge.adapter.before_sampling(forge.p, session)  # processing.py:1510 and :1522, the hires pass
    forge.adapter.before_sampling(forge.p, session)
    assert bindings(forge) == snapshot
    assert session.restorer.notes == notes
    assert conv_formats(forge.kmodel.diffusion_model) == [True, True]
    session.restorer.close()
    forge.adapter.before_sampling(forge.p, session)  # after restore: does nothing
    assert conv_formats(forge.kmodel.diffusion_model) == [False, False]


def test_disabled_changes_nothing(forge: SimpleNamespace) -> None:
    session = forge.adapter.begin(forge.p, GenerationSettings(enabled=False, attention=Attention.SPLIT))
    assert forge.unet_nn.attention_function is forge.attn.attention_pytorch
    assert session.restorer.notes == []


# --------------------------------------------------------------------------------------------- channels-last


def test_channels_last_converts_and_converts_back(forge: SimpleNamespace) -> None:
    model = forge.kmodel.diffusion_model
    params_before = [m.weight for m in model if hasattr(m, "weight")]
    session = forge.adapter.begin(forge.p, on(channels_last=Tri.ON))
    assert conv_formats(model) == [True, True]
    assert [m.weight for m in model if hasattr(m, "weight")] == params_before  # same Parameters, in place
    with torch.no_grad():
        out = model(torch.randn(1, 4, 6, 6))
    assert out.shape == (1, 4, 4, 4)
    session.restorer.close()
    assert conv_formats(model) == [False, False]


def test_channels_last_only_when_needed(forge: SimpleNamespace) -> None:
    model = forge.kmodel.diffusion_model
    model.to(memory_format=torch.channels_last)
    session = forge.adapter.begin(forge.p, on(channels_last=Tri.ON))
    assert "0 conv weights converted" in " ".join(session.restorer.notes)
    session.restorer.close()
    assert conv_formats(model) == [True, True]  # not "converted back" to something it never was


def test_channels_last_off_on_a_channels_last_model(forge: SimpleNamespace) -> None:
    model = forge.kmodel.diffusion_model
    model.to(memory_format=torch.channels_last)
    session = forge.adapter.begin(forge.p, on(channels_last=Tri.OFF))
    assert conv_formats(model) == [False, False]
    session.restorer.close()
    assert conv_formats(model) == [True, True]


def test_channels_last_reapplied_after_lora_refresh(forge: SimpleNamespace) -> None:
    model = forge.kmodel.diffusion_model
    loader = forge.kmodel.lora_loader
    session = forge.adapter.begin(forge.p, on(channels_last=Tri.ON))
    # model_load → refresh_loras (memory_management.py:518) inside the sampler, after our hook
    forge.kmodel.lora_loader.refresh(lora_patches={}, offload_device=CPU)
    assert loader.refreshed == 1
    assert conv_formats(model) == [True, True]
    session.restorer.close()
    assert "refresh" not in vars(loader)
    assert conv_formats(model) == [False, False]
    assert loader.backup["0.weight"].is_contiguous()  # the LoRA backup is back in the host's layout


def test_channels_last_dit_without_convs(forge: SimpleNamespace) -> None:
    forge.kmodel.diffusion_model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    session = forge.adapter.begin(forge.p, on(channels_last=Tri.ON))
    assert "no conv weights" in " ".join(session.restorer.notes)
    session.restorer.close()


# --------------------------------------------------------------------------------------------- VAE on CPU


def vae_state(vae: FakeVAE) -> tuple[Any, ...]:
    return (vae.device, vae.vae_dtype, vae.output_device, vae.patcher.load_device, vae.patcher.offload_device)


def test_vae_on_cpu_decodes_on_cpu_in_float32_and_restores(forge: SimpleNamespace) -> None:
    vae, mm = forge.vae, forge.mm
    mm.load_models_gpu([vae.patcher])  # resident "on the GPU" from an earlier generation
    gpu_entry = mm.current_loaded_models[0]
    assert gpu_entry.device is CUDA
    before = vae_state(vae)
    session = forge.adapter.begin(forge.p, on(vae_on_cpu=Tri.ON))
    assert gpu_entry not in mm.current_loaded_models  # unloaded: its GPU memory is freed
    assert mm.EMPTY_CACHE_CALLS
    latents = torch.randn(2, 4, 8, 8)
    with torch.inference_mode():  # sd15.py:80 decode_first_stage
        image = vae.decode(latents)
    assert image.dtype is torch.float32 and image.device == CPU and image.shape == (2, 3, 8, 8)
    assert vae.first_stage_model.seen[-1] == (CPU, torch.float32, torch.float32)
    assert mm.current_loaded_models[0].device == CPU
    session.restorer.close()
    assert vae_state(vae) == before
    assert all(a is b for a, b in zip(vae_state(vae), before, strict=True))
    assert vae.first_stage_model.conv.weight.dtype is torch.bfloat16
    assert not any(e.model is vae.patcher for e in mm.current_loaded_models)  # Forge reloads it to the GPU


def test_vae_on_cpu_tiled_paths(forge: SimpleNamespace) -> None:
    vae, mm = forge.vae, forge.mm
    session = forge.adapter.begin(forge.p, on(vae_on_cpu=Tri.ON))
    vae.first_stage_model.oom_above_width = 4  # full decode "runs out of memory" → tiled retry
    with torch.inference_mode():
        image = vae.decode(torch.randn(1, 4, 8, 8))
        assert image.shape == (1, 3, 8, 8) and image.dtype is torch.float32
        mm.VAE_ALWAYS_TILED = True  # set by the Never OOM script; left alone
        image = vae.decode(torch.randn(1, 4, 8, 8))
    assert image.shape == (1, 3, 8, 8)
    assert all(seen[:2] == (CPU, torch.float32) for seen in vae.first_stage_model.seen)
    session.restorer.close()
    assert mm.VAE_ALWAYS_TILED is True


# --------------------------------------------------------------------------------------------- inference memory


def load_unet(forge: SimpleNamespace, gpu_mb: int) -> Any:
    entry = forge.mm.LoadedModel(forge.unet)
    forge.kmodel.fake_gpu = gpu_mb * MB
    entry.model_accelerated = gpu_mb * MB < forge.kmodel.fake_total
    forge.mm.current_loaded_models.insert(0, entry)
    return entry


def test_inference_memory_set_and_restored_unet_not_loaded(forge: SimpleNamespace) -> None:
    mm = forge.mm
    mm.GPU_TOTAL = 3500 * MB
    session = forge.adapter.begin(forge.p, on(inference_memory_mb=2048))
    assert mm.current_inference_memory == 2048 * MB
    assert mm.current_loaded_models == [] and mm.EMPTY_CACHE_CALLS == []  # nothing loaded, nothing unloaded
    session.restorer.close()
    assert mm.current_inference_memory == 1024 * MB


def test_inference_memory_unloads_once_when_split_changes(forge: SimpleNamespace) -> None:
    mm = forge.mm
    mm.GPU_TOTAL = 3500 * MB  # a 2000 MB UNet fits with 1024 MB reserved, not with 2048 MB
    entry = load_unet(forge, 2000)
    session = forge.adapter.begin(forge.p, on(inference_memory_mb=2048))
    assert entry not in mm.current_loaded_models and forge.kmodel.fake_gpu == 0
    assert len(mm.EMPTY_CACHE_CALLS) == 1
    # the sampler reloads it under our budget, split (about 1116 MB on the GPU)
    split = load_unet(forge, mm.compute_model_gpu_memory_when_using_cpu_swap(3500 * MB, 2048 * MB) // MB)
    forge.adapter.before_sampling(forge.p, session)
    forge.adapter.before_sampling(forge.p, session)
    assert split in mm.current_loaded_models
    session.restorer.close()
    assert mm.current_inference_memory == 1024 * MB
    assert split not in mm.current_loaded_models  # would hold too much GPU under the host's budget


def test_inference_memory_no_unload_when_split_same(forge: SimpleNamespace) -> None:
    mm = forge.mm
    mm.GPU_TOTAL = 3500 * MB
    entry = load_unet(forge, 2000)
    session = forge.adapter.begin(forge.p, on(inference_memory_mb=512))  # still fits entirely
    assert entry in mm.current_loaded_models and mm.EMPTY_CACHE_CALLS == []
    session.restorer.close()
    assert entry in mm.current_loaded_models


def test_inference_memory_high_vram_never_splits(forge: SimpleNamespace) -> None:
    mm = forge.mm
    mm.GPU_TOTAL = 3500 * MB
    mm.vram_state = mm.VRAMState.HIGH_VRAM
    entry = load_unet(forge, 2000)
    session = forge.adapter.begin(forge.p, on(inference_memory_mb=4096))
    assert entry in mm.current_loaded_models
    session.restorer.close()


def test_inference_memory_host_change_during_generation_is_kept(forge: SimpleNamespace) -> None:
    mm = forge.mm
    session = forge.adapter.begin(forge.p, on(inference_memory_mb=2048))
    mm.current_inference_memory = 3000 * MB  # the Forge UI slider moved meanwhile (main_entry.py:192)
    session.restorer.close()
    assert mm.current_inference_memory == 3000 * MB


# --------------------------------------------------------------------------------------------- reading


def test_effective_state_and_version(forge: SimpleNamespace) -> None:
    state = forge.adapter.effective_state()
    assert state.attention == "attention_pytorch" and not state.model_loaded
    assert state.unet_channels_last is None and state.vae_device is None
    assert state.inference_memory_mb == 1024
    # before the first generation Forge f2 holds a FakeInitialModel there (modules/sd_models.py:385-397)
    forge.sd_models.model_data.sd_model = type("FakeInitialModel", (), {"cond_stage_model": None, "chunk_length": 75})()
    assert not forge.adapter.effective_state().model_loaded
    forge.sd_models.model_data.sd_model = forge.p.sd_model
    state = forge.adapter.effective_state()
    assert state.model_loaded and state.unet_channels_last is False
    assert state.vae_device == "cuda" and state.vae_dtype == "bfloat16"
    assert state.extra["vram_state"] == "NORMAL_VRAM"
    assert forge.adapter.version() == "2.0.1v1.10.1"
    assert "inference_memory_mb" in forge.adapter.supported_fields()


def test_adapter_without_forge() -> None:
    adapter = ForgeAdapter(modules={"backend.attention": None, "modules_forge.forge_version": None})  # type: ignore[dict-item]
    backends = {b.attention: b for b in adapter.attention_backends()}
    assert not backends[Attention.SDP].available and not backends[Attention.AUTO].available
    assert adapter.version() == "unknown"


@pytest.mark.parametrize(
    ("flags", "named"),
    [({"always_cpu": True}, "--always-cpu"), ({"vae_in_cpu": True}, "--vae-in-cpu"), ({}, "Forge's own choice")],
)
def test_vae_off_names_the_flag_that_put_it_on_the_cpu(
    forge: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, caplog: Any, flags: dict[str, bool], named: str
) -> None:
    logger = logging.getLogger("lib_optim")
    monkeypatch.setattr(logger, "propagate", True)
    for key, value in flags.items():
        monkeypatch.setattr(sys.modules["backend.args"].args, key, value, raising=False)
    forge.vae.device = CPU  # Forge chose it at load (backend/patcher/vae.py:72-73 with either flag)
    with caplog.at_level(logging.WARNING, logger="lib_optim"):
        forge.adapter.begin(forge.p, on(vae_on_cpu=Tri.OFF)).restorer.close()
    (record,) = [r for r in caplog.records if "vae_on_cpu=off" in r.getMessage()]
    assert named in record.getMessage()
    assert forge.vae.device is CPU


def test_directml_offers_only_what_runs_there(forge: SimpleNamespace) -> None:
    """Forge with --directml (backend/memory_management.py:46-56): auto and the accordion may only pick the
    attention that torch-directml runs well — split and sub-quad (sub-quad is Forge's own default there)."""
    forge.mm.directml_enabled = True
    backends = {b.attention: b for b in forge.adapter.attention_backends()}
    assert backends[Attention.SPLIT].available and backends[Attention.SUB_QUAD].available
    assert not backends[Attention.SDP].available and "DirectML" in backends[Attention.SDP].reason
    with pytest.raises(NotSupportedHere, match="DirectML"):
        forge.adapter.validate(on(attention=Attention.SDP))
    session = forge.adapter.begin(forge.p, on(attention=Attention.AUTO))
    assert session.attention_used in ("split", "sub-quad")
    session.restorer.close()


# --------------------------------------------------------------------------------------------- compile auto


class ResBlock(torch.nn.Module):
    """Named like backend/nn/unet.py's ResBlock, a block regional compile selects (docs/hosts.md §6.3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_compile_auto_counts_the_grid_and_compiles_when_it_pays(
    forge: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Forge f2's X/Y/Z sets ``shared.state.job_count`` for the grid before its first cell (scripts/xyz_grid.py:320;
    docs/hosts.md §7.7): a one-image cell compiles when twenty cells are left, and runs eagerly on its own."""
    from lib_optim.compile import RegionalCompiler, auto
    from lib_optim.settings import Compile

    compiler = RegionalCompiler(backend="eager")
    monkeypatch.setattr("lib_optim.compile.get_compiler", lambda: compiler)  # the face the adapter reads
    monkeypatch.setattr(auto, "estimated_speedup", lambda device_type, torch: auto.SPEEDUP_CPU)  # any torch
    shared = make_module(monkeypatch, "modules.shared")
    shared.state = SimpleNamespace(job_count=-1, job_no=0, processing_has_refined_job_count=False)
    forge.kmodel.diffusion_model = torch.nn.Sequential(ResBlock(), ResBlock())
    forge.p.steps, forge.p.n_iter = 20, 1
    session = forge.adapter.begin(forge.p, on(compile=Compile.AUTO))
    assert "compile" not in session.data and session.data["compile_auto"].job.images == 1
    session.restorer.close()
    shared.state.job_count = 20
    session = forge.adapter.begin(forge.p, on(compile=Compile.AUTO))
    assert "compile" in session.data and session.data["compile_auto"].decision.compile
    session.restorer.close()
    assert all("forward" not in vars(b) for b in forge.kmodel.diffusion_model)
