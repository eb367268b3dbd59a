"""LdmPatchedAdapter (Forge previous, reForge) against fake ``ldm_patched`` modules.

The fakes are module objects put in ``sys.modules`` whose code is executed in their own namespace, so by-name
imports (``from ldm_patched.ldm.modules.attention import optimized_attention``) and call-time global lookups
behave as in the hosts. Each imitates the lines cited next to it: FP = Forge tag ``previous`` (bfee03d8),
RF = reForge main (3b56b268).
"""

from __future__ import annotations

import collections
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
from lib_optim.host_specs.kinds import HostKind
from lib_optim.hosts import create_adapter
from lib_optim.hosts.ldm_patched import VAE_FUNCTIONS, LdmPatchedAdapter
from lib_optim.settings import Attention, GenerationSettings, Tri

MB = 1024 * 1024
CUDA = torch.device("cuda")  # a device object only: nothing is ever moved there
CPU = torch.device("cpu")
FP, RF = HostKind.FORGE_PREVIOUS, HostKind.REFORGE


def make_module(monkeypatch: pytest.MonkeyPatch, name: str, source: str = "", package: bool = False) -> Any:
    module = types.ModuleType(name)
    if package:
        module.__path__ = []  # a package with no files: a submodule not in sys.modules does not import
    monkeypatch.setitem(sys.modules, name, module)
    exec(textwrap.dedent(source), module.__dict__)
    return module


# ldm_patched/ldm/modules/attention.py: the functions (FP :94-337, RF :145-525), chosen once at import
# (FP :339-355, RF :685-710: `optimized_attention_masked = optimized_attention`); attention_xformers reads the
# module global `xformers` (imported only when enabled, FP :20-22, RF :17-19) and BROKEN_XFORMERS (FP :284-288,
# RF :405-411) at call time; CrossAttention.forward reads the two globals at call time (FP :388-402, RF :744-758).
ATTENTION_SRC = """
CALLS = []
BROKEN_XFORMERS = False

def attention_basic(q, k, v, heads, mask=None, attn_precision=None):
    CALLS.append("attention_basic"); return q

def attention_sub_quad(q, k, v, heads, mask=None, attn_precision=None):
    CALLS.append("attention_sub_quad"); return q

def attention_split(q, k, v, heads, mask=None, attn_precision=None):
    CALLS.append("attention_split"); return q

def attention_xformers(q, k, v, heads, mask=None, attn_precision=None):
    CALLS.append("attention_xformers"); return xformers.ops.memory_efficient_attention(q, k, v, attn_bias=mask)

def attention_pytorch(q, k, v, heads, mask=None, attn_precision=None):
    CALLS.append("attention_pytorch"); return q

optimized_attention = attention_sub_quad  # the CPU's choice (no SDPA without NVIDIA, no --attention-split)
optimized_attention_masked = optimized_attention

def cross_attention(q, k, v, heads, mask=None):
    if mask is None:
        return optimized_attention(q, k, v, heads)
    return optimized_attention_masked(q, k, v, heads, mask)
"""

# ldm_patched/ldm/modules/diffusionmodules/model.py: normal/xformers/pytorch_attention (FP :204-247,
# RF :246-296) and AttnBlock, which stores its choice on the instance in __init__ (FP :250-294: xformers if
# enabled for the VAE, else SDPA if enabled, else normal_attention; RF :298-345 through vae_attention()).
VAE_MODEL_SRC = """
import torch
CALLS = []
PYTORCH_ENABLED = False

def normal_attention(q, k, v):
    CALLS.append("normal_attention"); return q

def xformers_attention(q, k, v):
    CALLS.append("xformers_attention"); return xformers.ops.memory_efficient_attention(q, k, v)

def pytorch_attention(q, k, v):
    CALLS.append("pytorch_attention"); return q

class AttnBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.optimized_attention = pytorch_attention if PYTORCH_ENABLED else normal_attention

    def forward(self, x):
        return self.optimized_attention(x, x, x)
"""

# Modules that copy the UNet function by name at their import: FP ldm_patched/contrib/external_sag.py:10,
# extensions-builtin/sd_forge_ipadapter/lib_ipadapter/IPAdapterPlus.py:11; RF ldm_patched/ldm/flux/math.py:5,
# ldm_patched/ldm/lumina/model.py:12 (the masked one).
SAG_SRC = """
from ldm_patched.ldm.modules.attention import optimized_attention
def attn(q, k, v, heads):
    return optimized_attention(q, k, v, heads=heads)
"""
LUMINA_SRC = "from ldm_patched.ldm.modules.attention import optimized_attention_masked\n"

# ldm_patched/modules/model_management.py (FP): VRAMState (:14-20), vram_state (:28), lowvram_available (:34),
# directml_enabled (:41-44), total_vram (:122), current_loaded_models (:289), module_size(module,
# exclude_device) (:291-302), LoadedModel (:304-381: device = patcher.load_device; model_load → patch_model;
# model_unload moves to the offload device), minimum_inference_memory() (:384-385), load_models_gpu (:422-500:
# splits when free − model − minimum_inference_memory() < 0, keeping (free − reserve) / 1.3), soft_empty_cache
# (:824). RF has the same names with reForge's reserve (:562-576) and is_amd() (:272). GPU weights are
# bookkeeping (fake_gpu); CPU moves are real.
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
AMD = False
total_vram = 8192.0
VAE_ALWAYS_TILED = False
OOM_EXCEPTION = type("FakeOutOfMemoryError", (Exception,), {})
current_loaded_models = []
GPU_TOTAL = 0
EMPTY_CACHE_CALLS = []
RESERVE = 1024 * 1024 * 1024

def is_amd():
    return AMD

def minimum_inference_memory():
    return RESERVE

def module_size(module, exclude_device=None):
    if exclude_device is None:
        return module.fake_total
    return module.fake_total - module.fake_gpu if exclude_device.type == "cuda" else module.fake_gpu

def get_free_memory(dev=None, torch_free_too=False):
    if dev is not None and dev.type == "cpu":
        return 64 * 1024 ** 3
    return GPU_TOTAL - sum(getattr(e.model.model, "fake_gpu", 0) for e in current_loaded_models)

class LoadedModel:
    def __init__(self, model):
        self.model = model
        self.device = model.load_device

    def model_load(self, async_kept_memory=-1):
        self.model.patch_model(self.device)
        target = self.model.model
        if isinstance(target, torch.nn.Module) and self.device.type == "cpu":
            target.to(self.device)
        elif hasattr(target, "fake_total"):
            full = async_kept_memory < 0
            target.fake_gpu = target.fake_total if full else min(target.fake_total, async_kept_memory)
        return target

    def model_unload(self, avoid_model_moving=False):
        target = self.model.model
        if isinstance(target, torch.nn.Module) and self.model.offload_device.type == "cpu":
            target.to(self.model.offload_device)
        elif hasattr(target, "fake_total"):
            target.fake_gpu = 0

def load_models_gpu(models, memory_required=0):
    for patcher in models:
        if any(e.model is patcher for e in current_loaded_models):
            continue
        entry = LoadedModel(patcher)
        kept = -1
        splittable = hasattr(patcher.model, "fake_total")  # the UNet; the VAE is small enough here
        if splittable and entry.device.type != "cpu" and vram_state in (VRAMState.LOW_VRAM, VRAMState.NORMAL_VRAM):
            free = get_free_memory(entry.device)
            size = module_size(patcher.model)
            if free - size - minimum_inference_memory() < 0:
                kept = int(max(0, (free - minimum_inference_memory()) / 1.3))
        entry.model_load(kept)
        current_loaded_models.insert(0, entry)

def load_model_gpu(model):
    return load_models_gpu([model])

def soft_empty_cache(force=False):
    EMPTY_CACHE_CALLS.append(force)
"""


class FakePatcher:
    """ldm_patched/modules/model_patcher.py (FP): model, load_device, offload_device, backup (:21);
    patch_model (:191-227) backs a patched weight up and sets a new Parameter (set_attr, utils.py:281-287)
    when weight_inplace_update is off — what a LoRA does at every load."""

    def __init__(self, model: Any, load_device: torch.device, offload_device: torch.device) -> None:
        self.model = model
        self.load_device = load_device
        self.offload_device = offload_device
        self.backup: dict[str, Any] = {}
        self.patches: dict[str, float] = {}
        self.extra_preserved_memory_during_sampling = 0

    def patch_model(self, device_to: Any = None) -> Any:
        diffusion_model = getattr(self.model, "diffusion_model", None)
        for key, delta in self.patches.items():
            conv = diffusion_model[int(key.split(".")[1])]
            if key not in self.backup:
                self.backup[key] = conv.weight.detach()
            conv.weight = torch.nn.Parameter(conv.weight.detach().contiguous() + delta, requires_grad=False)
        return self.model


class TinyVAEModel(torch.nn.Module):
    """The VAE's first_stage_model: a conv and two AttnBlocks of the fake diffusionmodules.model module."""

    def __init__(self, attn_block: type) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, kernel_size=1)
        self.mid = torch.nn.ModuleList([attn_block(), attn_block()])
        self.seen: list[tuple[torch.device, torch.dtype]] = []

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append((self.conv.weight.device, self.conv.weight.dtype))
        h = self.conv(x)
        for block in self.mid:
            h = block(h)
        return h


class FakeVAE:
    """ldm_patched/modules/sd.py VAE (FP :165-232, RF :325-559): device, vae_dtype, output_device and patcher
    set at construction; decode_inner (FP :257-283) reads them and the patcher at call time."""

    def __init__(self, model: TinyVAEModel) -> None:
        self.vae_dtype = torch.bfloat16
        self.first_stage_model = model.to(self.vae_dtype)
        self.device = CUDA
        self.output_device = CPU
        self.patcher = FakePatcher(self.first_stage_model, load_device=CUDA, offload_device=CPU)

    def decode(self, samples: torch.Tensor) -> torch.Tensor:
        mm = sys.modules["ldm_patched.modules.model_management"]
        mm.load_models_gpu([self.patcher], memory_required=1)
        out = self.first_stage_model.decode(samples.to(self.vae_dtype).to(self.device))
        return out.to(self.output_device).float()


class FakeBaseModel:
    """ldm_patched/modules/model_base.py BaseModel: .diffusion_model; sizes are bookkeeping for the split."""

    def __init__(self, diffusion_model: torch.nn.Module, total_mb: int) -> None:
        self.diffusion_model = diffusion_model
        self.fake_total = total_mb * MB
        self.fake_gpu = 0


def tiny_unet() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 4, 3))


def conv_formats(model: torch.nn.Module) -> list[bool]:
    return [m.weight.is_contiguous(memory_format=torch.channels_last) for m in model if hasattr(m, "weight")]


def build_host(monkeypatch: pytest.MonkeyPatch, kind: HostKind) -> SimpleNamespace:
    monkeypatch.setitem(sys.modules, "xformers", None)  # A1111's import hook, kept by both (import_hook.py:4-5)
    for package in ("ldm_patched", "ldm_patched.ldm", "ldm_patched.ldm.modules", "ldm_patched.modules"):
        make_module(monkeypatch, package, package=True)
    make_module(monkeypatch, "ldm_patched.ldm.modules.diffusionmodules", package=True)
    # ldm_patched/modules/args_parser.py: FP --gpu-device-id (:51), RF --cuda-device/--reserve-vram (:54, :147)
    own = "gpu_device_id=None" if kind is FP else "cuda_device=None, reserve_vram=None"
    make_module(
        monkeypatch,
        "ldm_patched.modules.args_parser",
        "import types\n"
        f"args = types.SimpleNamespace(disable_xformers=False, always_cpu=False, vae_in_cpu=False, {own})",
    )
    mm = make_module(monkeypatch, "ldm_patched.modules.model_management", MM_SRC)
    if kind is RF:
        mm.RESERVE = int(1024 * MB * 0.8) + 400 * MB  # 0.8 GiB + EXTRA_RESERVED_VRAM (RF :564-576)
    attn = make_module(monkeypatch, "ldm_patched.ldm.modules.attention", ATTENTION_SRC)
    vae_model = make_module(monkeypatch, "ldm_patched.ldm.modules.diffusionmodules.model", VAE_MODEL_SRC)
    copies = {}
    if kind is FP:
        make_module(monkeypatch, "ldm_patched.contrib", package=True)
        copies["sag"] = make_module(monkeypatch, "ldm_patched.contrib.external_sag", SAG_SRC)
        make_module(monkeypatch, "lib_ipadapter", package=True)
        copies["ipadapter"] = make_module(monkeypatch, "lib_ipadapter.IPAdapterPlus", SAG_SRC)
    else:
        make_module(monkeypatch, "ldm_patched.ldm.flux", package=True)
        copies["flux"] = make_module(monkeypatch, "ldm_patched.ldm.flux.math", SAG_SRC)
        make_module(monkeypatch, "ldm_patched.ldm.lumina", package=True)
        copies["lumina"] = make_module(monkeypatch, "ldm_patched.ldm.lumina.model", LUMINA_SRC)
    make_module(monkeypatch, "modules", package=True)
    make_module(monkeypatch, "modules_forge", package=True)
    version = "0.0.17v1.8.0rc" if kind is FP else "1.0.0v2-v1.10.1RC"
    make_module(monkeypatch, "modules_forge.forge_version", f"version = {version!r}")
    # modules/sd_models.py model_data.sd_model: the loaded model (None before one loads)
    sd_models = make_module(monkeypatch, "modules.sd_models", "class _D:\n    sd_model = None\nmodel_data = _D()")

    base_model = FakeBaseModel(tiny_unet(), total_mb=2000)
    unet = FakePatcher(base_model, load_device=CUDA, offload_device=CPU)
    vae = FakeVAE(TinyVAEModel(vae_model.AttnBlock))
    # modules_forge/forge_loader.py ForgeSD (FP :40-52): unet, clip, vae, clipvision
    sd_model = SimpleNamespace(forge_objects=SimpleNamespace(unet=unet, vae=vae, clip=None, clipvision=None))
    p = SimpleNamespace(sd_model=sd_model, width=512, height=512, batch_size=1)
    return SimpleNamespace(
        kind=kind,
        mm=mm,
        attn=attn,
        vae_model=vae_model,
        copies=copies,
        sd_models=sd_models,
        base_model=base_model,
        unet=unet,
        vae=vae,
        p=p,
        adapter=LdmPatchedAdapter(kind),
    )


@pytest.fixture(params=[FP, RF], ids=["forge-previous", "reforge"])
def host(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    yield build_host(monkeypatch, request.param)


@pytest.fixture
def previous(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    return build_host(monkeypatch, FP)


@pytest.fixture
def reforge(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    return build_host(monkeypatch, RF)


def on(**kwargs: Any) -> GenerationSettings:
    return GenerationSettings(enabled=True, **kwargs)


def unet_bindings(h: SimpleNamespace) -> dict[str, Any]:
    out = {
        "attention.optimized_attention": h.attn.optimized_attention,
        "attention.optimized_attention_masked": h.attn.optimized_attention_masked,
    }
    for name, module in h.copies.items():
        attr = "optimized_attention_masked" if name == "lumina" else "optimized_attention"
        out[f"{name}.{attr}"] = vars(module)[attr]
    return out


def vae_blocks(h: SimpleNamespace) -> list[Any]:
    return [b.optimized_attention for b in h.vae.first_stage_model.mid]


def snapshot(h: SimpleNamespace) -> tuple[dict[str, Any], list[Any]]:
    return unet_bindings(h), vae_blocks(h)


def same(a: tuple[dict[str, Any], list[Any]], b: tuple[dict[str, Any], list[Any]]) -> bool:
    return all(a[0][k] is b[0][k] for k in a[0]) and all(x is y for x, y in zip(a[1], b[1], strict=True))


# --------------------------------------------------------------------------------------------- basics


def test_module_imports_without_a_host() -> None:
    import subprocess

    code = (
        "import lib_optim.hosts.ldm_patched, sys; "
        "assert not any(m.split('.')[0] in ('ldm_patched', 'modules', 'modules_forge') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_create_adapter_gives_the_ldm_patched_adapter() -> None:
    for kind in (FP, RF):
        adapter = create_adapter(kind)
        assert isinstance(adapter, LdmPatchedAdapter) and adapter.kind is kind
    with pytest.raises(ValueError, match=r"'forge'.*allowed: forge-previous, reforge"):
        LdmPatchedAdapter(HostKind.FORGE)


def test_backends_offered(host: SimpleNamespace) -> None:
    backends = {b.attention: b for b in host.adapter.attention_backends()}
    assert set(backends) == {
        Attention.HOST,
        Attention.AUTO,
        Attention.SDP,
        Attention.SPLIT,
        Attention.SUB_QUAD,
        Attention.XFORMERS,
        Attention.NONE,
        Attention.SAGE,  # kernels we call ourselves: offered, unavailable on this CPU with the fix named
        Attention.FLASH,
    }
    assert not backends[Attention.FLASH].available and "needs a CUDA GPU" in backends[Attention.FLASH].reason
    assert backends[Attention.HOST].host_name == "attention_sub_quad"
    assert all(backends[a].available for a in (Attention.SDP, Attention.SPLIT, Attention.SUB_QUAD, Attention.NONE))
    assert backends[Attention.NONE].host_name == "attention_basic"
    xformers = backends[Attention.XFORMERS]
    assert not xformers.available and "--xformers" in xformers.reason  # the import hook blocked it
    assert host.adapter.supported_fields() == (
        "enabled",
        "attention",
        "channels_last",
        "vae_on_cpu",
        "inference_memory_mb",
        "compile",
        "vae_tiling",
    )


# --------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize(
    ("choice", "unet_fn", "vae_fn"),
    [
        (Attention.SPLIT, "attention_split", "normal_attention"),
        (Attention.SDP, "attention_pytorch", "pytorch_attention"),
        (Attention.NONE, "attention_basic", "normal_attention"),
        (Attention.SUB_QUAD, "attention_sub_quad", "normal_attention"),  # what the host has: no change
    ],
)
def test_every_binding_switches_and_is_restored(host: SimpleNamespace, choice: Attention, unet_fn: str, vae_fn: str):
    host.vae_model.PYTORCH_ENABLED = True  # a VAE built with SDPA: every choice but sdp changes it
    host.vae.first_stage_model.mid = torch.nn.ModuleList([host.vae_model.AttnBlock(), host.vae_model.AttnBlock()])
    before = snapshot(host)
    session = host.adapter.begin(host.p, on(attention=choice))
    assert session.attention_used == choice.value
    bindings, blocks = snapshot(host)
    assert all(fn is getattr(host.attn, unet_fn) for fn in bindings.values()), bindings
    assert all(fn is getattr(host.vae_model, vae_fn) for fn in blocks)
    host.attn.CALLS.clear()
    host.vae_model.CALLS.clear()
    q = torch.zeros(1, 2, 8)
    host.attn.cross_attention(q, q, q, 1)
    host.attn.cross_attention(q, q, q, 1, mask=q)
    first = next(iter(host.copies.values()))
    if hasattr(first, "attn"):
        first.attn(q, q, q, 1)
    host.vae.first_stage_model.decode(torch.zeros(1, 4, 2, 2, dtype=torch.bfloat16))
    assert set(host.attn.CALLS) == {unet_fn}
    assert [vae_fn, vae_fn] == host.vae_model.CALLS
    session.restorer.close()
    assert same(snapshot(host), before)


def test_modules_imported_during_the_generation_get_the_host_function_back(
    host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A model family the host loads lazily (RF ldm_patched/ldm/flux/math.py:5 imports on a Flux load) copies
    whatever the attention module holds at its import: our switch. It is switched at the next sampling start
    (nothing to do: it holds ours), and gets the host's own function back at the end; one imported after the
    last sampling start too."""
    host_fn = host.attn.optimized_attention
    session = host.adapter.begin(host.p, on(attention=Attention.SPLIT))
    early = make_module(monkeypatch, "ldm_patched.early_family", SAG_SRC)
    assert early.optimized_attention is host.attn.attention_split
    host.adapter.before_sampling(host.p, session)
    late = make_module(monkeypatch, "ldm_patched.late_family", SAG_SRC)
    session.restorer.close()
    assert early.optimized_attention is host_fn and late.optimized_attention is host_fn
    assert host.attn.optimized_attention is host_fn


def test_a_module_with_its_own_function_of_that_name_is_left_alone(
    host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only modules holding the host's chosen function are switched (RF modules/models/sd3/mmdit.py:185 defines
    an ``optimized_attention`` of its own); one that holds our target already is not 'given back' anything."""
    own = make_module(monkeypatch, "sd3_like", "def optimized_attention(qkv, num_heads):\n    return qkv\n")
    own_fn = own.optimized_attention
    holder = make_module(monkeypatch, "holds_split", "")
    holder.optimized_attention = host.attn.attention_split
    session = host.adapter.begin(host.p, on(attention=Attention.SPLIT))
    assert own.optimized_attention is own_fn
    session.restorer.close()
    assert own.optimized_attention is own_fn and holder.optimized_attention is host.attn.attention_split


def test_lazy_modules_are_never_touched(host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """A lazily loaded module (importlib.util.LazyLoader) imports itself on any attribute access: the scan reads
    plain modules only."""

    class Tripwire(types.ModuleType):
        def __getattribute__(self, name: str) -> Any:
            raise AssertionError(f"touched {name}")

    monkeypatch.setitem(sys.modules, "lazy_thing", Tripwire("lazy_thing"))
    host.adapter.begin(host.p, on(attention=Attention.SPLIT)).restorer.close()


def test_host_changes_nothing(host: SimpleNamespace) -> None:
    before = snapshot(host)
    session = host.adapter.begin(host.p, on(attention=Attention.HOST, channels_last=Tri.INHERIT))
    assert session.attention_used == "sub-quad" and session.restorer.notes == []
    assert same(snapshot(host), before)


def test_a_vae_built_during_the_generation_is_switched_at_the_next_sampling(host: SimpleNamespace) -> None:
    """The VAE can be rebuilt mid-request (RF modules/sd_vae.py:280-299 replaces forge_objects.vae): its new
    AttnBlocks hold the host's choice until the next sampling start; every switched instance gets back what
    it held."""
    old_blocks = list(host.vae.first_stage_model.mid)
    session = host.adapter.begin(host.p, on(attention=Attention.SDP))
    rebuilt = FakeVAE(TinyVAEModel(host.vae_model.AttnBlock))
    host.p.sd_model.forge_objects.vae = rebuilt
    assert all(b.optimized_attention is host.vae_model.normal_attention for b in rebuilt.first_stage_model.mid)
    host.adapter.before_sampling(host.p, session)
    assert all(b.optimized_attention is host.vae_model.pytorch_attention for b in rebuilt.first_stage_model.mid)
    session.restorer.close()
    for block in (*old_blocks, *rebuilt.first_stage_model.mid):
        assert block.optimized_attention is host.vae_model.normal_attention
        assert "optimized_attention" in vars(block)  # an instance attribute again, as AttnBlock.__init__ made it


def test_auto_plans_within_the_hosts_reserve(
    host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, planner_requests: Any
) -> None:
    """On a GPU auto's budget is what load_models_gpu keeps free: minimum_inference_memory() (FP :384-385 1 GiB;
    RF :575-576 0.8 GiB + the extra reserve) or this generation's value."""
    calls = planner_requests("ldm_patched")
    make_module(
        monkeypatch, "modules.devices", "import torch\ndevice = torch.device('cuda')\ndtype_unet = torch.float16"
    )
    host.adapter.begin(host.p, on(attention=Attention.AUTO)).restorer.close()
    host.adapter.begin(host.p, on(attention=Attention.AUTO, inference_memory_mb=3000)).restorer.close()
    expected = 1024 if host.kind is FP else 1219
    assert [c["budget_mb"] for c in calls] == [expected, 3000]
    assert calls[0]["device"] == "cuda" and calls[0]["dtype_bytes"] == 2


def test_auto_records_its_choice(host: SimpleNamespace) -> None:
    session = host.adapter.begin(host.p, on(attention=Attention.AUTO))
    assert session.attention_used in ("sdp", "split", "sub-quad", "none")
    assert session.attention_used in session.data["auto_reason"]
    session.restorer.close()
    assert host.attn.optimized_attention is host.attn.attention_sub_quad


# --------------------------------------------------------------------------------------------- xformers


def fake_xformers(monkeypatch: pytest.MonkeyPatch, version: str) -> Any:
    xformers = make_module(monkeypatch, "xformers", f"__version__ = {version!r}", package=True)
    ops = make_module(
        monkeypatch, "xformers.ops", "def memory_efficient_attention(q, k, v, attn_bias=None):\n return q"
    )
    xformers.ops = ops
    xformers.version = SimpleNamespace(__version__=version)
    return xformers


@pytest.mark.parametrize(
    ("kind", "version", "broken"),
    [(FP, "0.0.22", True), (FP, "0.0.27", False), (RF, "0.0.27", True), (RF, "0.0.20", False)],
)
def test_xformers_module_injected_with_the_hosts_broken_rule(
    monkeypatch: pytest.MonkeyPatch, kind: HostKind, version: str, broken: bool
) -> None:
    """BROKEN_XFORMERS as each host computes it at import: FP attention.py:284-288 (0.0.21-0.0.23), RF
    :405-411 (0.0.2x but 0.0.20)."""
    h = build_host(monkeypatch, kind)
    xformers = fake_xformers(monkeypatch, version)
    adapter = LdmPatchedAdapter(kind, cuda_available=lambda: True)
    session = adapter.begin(h.p, on(attention=Attention.XFORMERS))
    assert h.attn.xformers is xformers and h.vae_model.xformers is xformers
    assert h.attn.BROKEN_XFORMERS is broken
    q = torch.ones(1, 2, 8)
    assert h.attn.cross_attention(q, q, q, 1) is q
    assert all(fn is h.vae_model.xformers_attention for fn in vae_blocks(h))
    session.restorer.close()
    assert "xformers" not in vars(h.attn) and "xformers" not in vars(h.vae_model)
    assert h.attn.BROKEN_XFORMERS is False
    assert h.attn.optimized_attention is h.attn.attention_sub_quad


def test_xformers_0_0_18_keeps_the_vae_off_it(previous: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """FP model_management.py:152-159: xformers 0.0.18 is disabled for the VAE (XFORMERS_ENABLED_VAE)."""
    fake_xformers(monkeypatch, "0.0.18")
    session = LdmPatchedAdapter(FP, cuda_available=lambda: True).begin(previous.p, on(attention=Attention.XFORMERS))
    assert all(fn is previous.vae_model.pytorch_attention for fn in vae_blocks(previous))
    session.restorer.close()


def test_xformers_needs_cuda_and_not_disabled(previous: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_xformers(monkeypatch, "0.0.27")
    no_cuda = {b.attention: b for b in LdmPatchedAdapter(FP, cuda_available=lambda: False).attention_backends()}
    assert not no_cuda[Attention.XFORMERS].available and "CUDA" in no_cuda[Attention.XFORMERS].reason
    sys.modules["ldm_patched.modules.args_parser"].args.disable_xformers = True
    adapter = LdmPatchedAdapter(FP, cuda_available=lambda: True)
    disabled = {b.attention: b for b in adapter.attention_backends()}[Attention.XFORMERS]
    assert not disabled.available and "--disable-xformers" in disabled.reason
    before = snapshot(previous)
    with pytest.raises(NotSupportedHere, match="'xformers' is not available"):
        adapter.begin(previous.p, on(attention=Attention.XFORMERS, channels_last=Tri.ON))
    assert same(snapshot(previous), before)
    assert conv_formats(previous.base_model.diffusion_model) == [False, False]


def test_reforge_keeps_sdpa_off_its_vae_on_amd(reforge: SimpleNamespace) -> None:
    """RF model_management.py:1124-1127: pytorch_attention_enabled_vae() is false on AMD ('causes crash when
    doing high res'), so the VAE stays on normal_attention when the UNet goes to SDPA."""
    reforge.mm.AMD = True
    session = reforge.adapter.begin(reforge.p, on(attention=Attention.SDP))
    assert reforge.attn.optimized_attention is reforge.attn.attention_pytorch
    assert all(fn is reforge.vae_model.normal_attention for fn in vae_blocks(reforge))
    session.restorer.close()


# --------------------------------------------------------------------------------------------- DirectML


def test_directml_offers_only_what_runs_there(host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """--directml (FP model_management.py:41-50, RF :91-102): xformers is never used there (FP :680-689, RF
    :1095-1111), and SDPA runs torch-directml's math path (docs/hosts.md §4.8): auto and the accordion may only
    pick split and sub-quad. No DirectML device exists here; the flag is what the adapter reads."""
    host.mm.directml_enabled = True
    fake_xformers(monkeypatch, "0.0.27")
    backends = {b.attention: b for b in LdmPatchedAdapter(host.kind, cuda_available=lambda: True).attention_backends()}
    assert [a for a, b in backends.items() if b.available] == [
        Attention.HOST,
        Attention.AUTO,
        Attention.SPLIT,
        Attention.SUB_QUAD,
    ]
    assert "DirectML" in backends[Attention.SDP].reason and "DirectML" in backends[Attention.NONE].reason
    with pytest.raises(NotSupportedHere, match="DirectML"):
        host.adapter.validate(on(attention=Attention.SDP))
    session = host.adapter.begin(host.p, on(attention=Attention.AUTO))
    assert session.attention_used in ("split", "sub-quad")
    session.restorer.close()
    assert host.adapter.total_memory_mb() is None  # DirectML's memory is a constant 1 GiB (FP :102-104)


# --------------------------------------------------------------------------------------------- lifecycle


def test_exception_mid_begin_restores_everything(host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    before = snapshot(host)
    reserve = host.mm.minimum_inference_memory
    model_load = host.mm.LoadedModel.model_load

    def boom(*args: Any) -> None:
        raise RuntimeError("mid-way")

    monkeypatch.setattr(host.adapter, "apply_inference_memory_mb", boom)
    with pytest.raises(RuntimeError, match="mid-way"):
        host.adapter.begin(
            host.p, on(attention=Attention.SPLIT, channels_last=Tri.ON, vae_on_cpu=Tri.ON, inference_memory_mb=2048)
        )
    assert same(snapshot(host), before)
    assert conv_formats(host.base_model.diffusion_model) == [False, False]
    assert host.vae.device is CUDA and host.vae.vae_dtype is torch.bfloat16
    assert host.vae.first_stage_model.conv.weight.dtype is torch.bfloat16
    assert host.mm.minimum_inference_memory is reserve and host.mm.LoadedModel.model_load is model_load


def test_restored_after_an_out_of_memory_error_in_sampling(host: SimpleNamespace) -> None:
    """The generation raises (out of memory) after begin: the p.close() path closes the restorer."""
    before = snapshot(host)
    session = host.adapter.begin(host.p, on(attention=Attention.SDP, channels_last=Tri.ON, inference_memory_mb=3000))
    host.adapter.before_sampling(host.p, session)
    try:
        raise host.mm.OOM_EXCEPTION("fake out of memory")
    except host.mm.OOM_EXCEPTION:
        assert session.restorer.close() is True
    assert same(snapshot(host), before)
    assert conv_formats(host.base_model.diffusion_model) == [False, False]
    assert host.mm.minimum_inference_memory() == host.mm.RESERVE


def test_before_sampling_is_idempotent(host: SimpleNamespace) -> None:
    session = host.adapter.begin(host.p, on(attention=Attention.SPLIT, channels_last=Tri.ON, vae_on_cpu=Tri.ON))
    during = snapshot(host)
    notes = list(session.restorer.notes)
    host.adapter.before_sampling(host.p, session)  # the hires pass calls it again (FP processing.py:1378)
    host.adapter.before_sampling(host.p, session)
    assert same(snapshot(host), during) and session.restorer.notes == notes
    assert conv_formats(host.base_model.diffusion_model) == [True, True]
    session.restorer.close()
    host.adapter.before_sampling(host.p, session)  # after the restore: nothing
    assert conv_formats(host.base_model.diffusion_model) == [False, False]
    assert host.attn.optimized_attention is host.attn.attention_sub_quad


def test_disabled_changes_nothing(host: SimpleNamespace) -> None:
    session = host.adapter.begin(host.p, GenerationSettings(enabled=False, attention=Attention.SPLIT))
    assert host.attn.optimized_attention is host.attn.attention_sub_quad and session.restorer.notes == []


# --------------------------------------------------------------------------------------------- channels-last


def test_channels_last_converts_in_place_and_back(host: SimpleNamespace) -> None:
    model = host.base_model.diffusion_model
    params = [m.weight for m in model if hasattr(m, "weight")]
    session = host.adapter.begin(host.p, on(channels_last=Tri.ON))
    assert conv_formats(model) == [True, True]
    assert [m.weight for m in model if hasattr(m, "weight")] == params
    with torch.no_grad():
        assert model(torch.randn(1, 4, 6, 6)).shape == (1, 4, 4, 4)
    session.restorer.close()
    assert conv_formats(model) == [False, False]


def test_channels_last_off_on_a_channels_last_model(reforge: SimpleNamespace) -> None:
    """RF --force-channels-last builds the UNet channels-last (model_base.py:136-137); off converts it back
    for the generation and leaves it channels-last after."""
    model = reforge.base_model.diffusion_model
    model.to(memory_format=torch.channels_last)
    session = reforge.adapter.begin(reforge.p, on(channels_last=Tri.OFF))
    assert conv_formats(model) == [False, False]
    session.restorer.close()
    assert conv_formats(model) == [True, True]


def test_channels_last_survives_weight_patching_at_load(host: SimpleNamespace) -> None:
    """The sampler loads the UNet after process_before_every_sampling (modules_forge/forge_sampler.py
    sampling_prepare, FP :92-107) and the load patches LoRA weights into new Parameters (FP
    model_patcher.py:191-227): they are converted too, and the backups the host took are put back in its
    layout at the end, so unpatching later restores the host's format."""
    model = host.base_model.diffusion_model
    host.unet.patches = {"diffusion_model.0.weight": 0.5}
    original = host.mm.LoadedModel.model_load
    session = host.adapter.begin(host.p, on(channels_last=Tri.ON))
    host.adapter.before_sampling(host.p, session)
    host.mm.load_models_gpu([host.unet])  # sampling_prepare
    assert conv_formats(model) == [True, True]
    backup = host.unet.backup["diffusion_model.0.weight"]
    assert backup.is_contiguous(memory_format=torch.channels_last)  # taken while ours was on
    session.restorer.close()
    assert host.mm.LoadedModel.model_load is original
    assert conv_formats(model) == [False, False]
    assert host.unet.backup["diffusion_model.0.weight"].is_contiguous()


def test_channels_last_fixes_reforges_backup_entries(reforge: SimpleNamespace) -> None:
    """RF model_patcher.py:559-570 keeps (weight, inplace_update) named tuples as backups."""
    entry = collections.namedtuple("Dimension", ["weight", "inplace_update"])
    session = reforge.adapter.begin(reforge.p, on(channels_last=Tri.ON))
    converted = reforge.base_model.diffusion_model[0].weight.detach()
    reforge.unet.backup["diffusion_model.0.weight"] = entry(converted, False)
    session.restorer.close()
    fixed = reforge.unet.backup["diffusion_model.0.weight"]
    assert fixed.weight.is_contiguous() and fixed.inplace_update is False


# --------------------------------------------------------------------------------------------- VAE on CPU


def vae_state(vae: FakeVAE) -> tuple[Any, ...]:
    return (vae.device, vae.vae_dtype, vae.output_device, vae.patcher.load_device, vae.patcher.offload_device)


def test_vae_on_cpu_decodes_on_cpu_in_float32_and_restores(host: SimpleNamespace) -> None:
    vae, mm = host.vae, host.mm
    mm.load_models_gpu([vae.patcher])  # resident on the GPU from an earlier generation
    resident = mm.current_loaded_models[0]
    before = vae_state(vae)
    session = host.adapter.begin(host.p, on(vae_on_cpu=Tri.ON))
    assert resident not in mm.current_loaded_models and mm.EMPTY_CACHE_CALLS
    with torch.inference_mode():  # modules_forge/forge_loader.py:236-240 patched_decode_first_stage
        image = vae.decode(torch.randn(2, 4, 4, 4))
    assert image.dtype is torch.float32 and image.device == CPU
    assert vae.first_stage_model.seen[-1] == (CPU, torch.float32)
    session.restorer.close()
    assert all(a is b for a, b in zip(vae_state(vae), before, strict=True))
    assert vae.first_stage_model.conv.weight.dtype is torch.bfloat16
    assert not any(e.model is vae.patcher for e in mm.current_loaded_models)


@pytest.mark.parametrize(
    ("flags", "named"), [({"always_cpu": True}, "--always-cpu"), ({"vae_in_cpu": True}, "--vae-in-cpu")]
)
def test_vae_off_names_the_flag_that_put_it_on_the_cpu(
    host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch, caplog: Any, flags: dict[str, bool], named: str
) -> None:
    """vae_device() is the CPU with --vae-in-cpu (FP model_management.py:622-625, RF :931-934) and everything is
    with --always-cpu."""
    monkeypatch.setattr(logging.getLogger("lib_optim"), "propagate", True)
    for key, value in flags.items():
        setattr(sys.modules["ldm_patched.modules.args_parser"].args, key, value)
    host.vae.device = CPU
    with caplog.at_level(logging.WARNING, logger="lib_optim"):
        host.adapter.begin(host.p, on(vae_on_cpu=Tri.OFF)).restorer.close()
    (record,) = [r for r in caplog.records if "vae_on_cpu=off" in r.getMessage()]
    assert named in record.getMessage() and host.vae.device is CPU


# --------------------------------------------------------------------------------------------- inference memory


def load_unet(h: SimpleNamespace, gpu_mb: int) -> Any:
    entry = h.mm.LoadedModel(h.unet)
    h.base_model.fake_gpu = gpu_mb * MB
    h.mm.current_loaded_models.insert(0, entry)
    return entry


def test_inference_memory_is_the_reserve_load_models_gpu_keeps(host: SimpleNamespace) -> None:
    mm = host.mm
    host_reserve = mm.minimum_inference_memory
    assert host.adapter.effective_state().inference_memory_mb == (1024 if host.kind is FP else 1219)
    session = host.adapter.begin(host.p, on(inference_memory_mb=2048))
    assert mm.minimum_inference_memory() == 2048 * MB
    assert host.adapter.effective_state().inference_memory_mb == 2048
    assert mm.EMPTY_CACHE_CALLS == []  # nothing loaded, nothing unloaded
    session.restorer.close()
    assert mm.minimum_inference_memory is host_reserve


def test_forge_previous_resplits_a_loaded_unet_once(previous: SimpleNamespace) -> None:
    """FP load_models_gpu splits at load only (:466-489) and an already loaded model is kept as it is (:429-446):
    a reserve that changes the split unloads the UNet once, now and again after the restore."""
    mm = previous.mm
    mm.GPU_TOTAL = 3500 * MB  # a 2000 MB UNet fits with 1024 MB reserved, not with 2048 MB
    entry = load_unet(previous, 2000)
    session = previous.adapter.begin(previous.p, on(inference_memory_mb=2048))
    assert entry not in mm.current_loaded_models and previous.base_model.fake_gpu == 0
    mm.load_models_gpu([previous.unet])  # the sampler reloads it under our reserve, split
    split = mm.current_loaded_models[0]
    assert previous.base_model.fake_gpu == int((3500 - 2048) * MB / 1.3)
    previous.adapter.before_sampling(previous.p, session)
    session.restorer.close()
    assert split not in mm.current_loaded_models  # it would hold too little under the host's 1 GiB
    assert mm.minimum_inference_memory() == 1024 * MB


def test_forge_previous_keeps_a_unet_whose_split_does_not_change(previous: SimpleNamespace) -> None:
    mm = previous.mm
    mm.GPU_TOTAL = 3500 * MB
    entry = load_unet(previous, 2000)
    session = previous.adapter.begin(previous.p, on(inference_memory_mb=512))  # still fits entirely
    assert entry in mm.current_loaded_models and mm.EMPTY_CACHE_CALLS == []
    session.restorer.close()
    assert entry in mm.current_loaded_models


def test_forge_previous_high_vram_never_splits(previous: SimpleNamespace) -> None:
    previous.mm.GPU_TOTAL = 3500 * MB
    previous.mm.vram_state = previous.mm.VRAMState.HIGH_VRAM
    entry = load_unet(previous, 2000)
    previous.adapter.begin(previous.p, on(inference_memory_mb=4096)).restorer.close()
    assert entry in previous.mm.current_loaded_models


def test_reforge_never_unloads_for_the_reserve(reforge: SimpleNamespace) -> None:
    """RF load_models_gpu re-plans every loaded model at every call (partial loading, :636-705; free_memory
    partially unloads, :578-615): the new reserve takes effect at the next load without an unload."""
    reforge.mm.GPU_TOTAL = 3500 * MB
    entry = load_unet(reforge, 2000)
    session = reforge.adapter.begin(reforge.p, on(inference_memory_mb=3000))
    assert entry in reforge.mm.current_loaded_models and reforge.mm.EMPTY_CACHE_CALLS == []
    session.restorer.close()
    assert entry in reforge.mm.current_loaded_models


def test_a_reserve_someone_else_sets_meanwhile_is_kept(host: SimpleNamespace) -> None:
    session = host.adapter.begin(host.p, on(inference_memory_mb=2048))

    def their_reserve() -> int:
        return 3000 * MB

    host.mm.minimum_inference_memory = their_reserve
    session.restorer.close()
    assert host.mm.minimum_inference_memory is their_reserve


# --------------------------------------------------------------------------------------------- reading


def test_effective_state_version_and_memory(host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    state = host.adapter.effective_state()
    assert state.host is host.kind and state.attention == "attention_sub_quad" and not state.model_loaded
    assert state.unet_channels_last is None and state.vae_device is None
    host.sd_models.model_data.sd_model = host.p.sd_model
    state = host.adapter.effective_state()
    assert state.model_loaded and state.unet_channels_last is False
    assert (state.vae_device, state.vae_dtype) == ("cuda", "bfloat16")
    assert state.extra == {"vae_attention": "normal_attention", "vae_always_tiled": False, "vram_state": "NORMAL_VRAM"}
    assert host.adapter.version() == ("0.0.17v1.8.0rc" if host.kind is FP else "1.0.0v2-v1.10.1RC")
    make_module(monkeypatch, "modules.devices", "import torch\ndevice = torch.device('cuda')")
    assert host.adapter.total_memory_mb() == 8192
    make_module(monkeypatch, "modules.devices", "import torch\ndevice = torch.device('cpu')")
    assert host.adapter.total_memory_mb() is None  # --always-cpu: total_vram is the RAM (FP :122)
    assert host.adapter.meaningful_fields() == ("enabled", "attention", "channels_last", "compile", "vae_tiling")


def test_adapter_without_a_host() -> None:
    adapter = LdmPatchedAdapter(FP, modules={"ldm_patched.ldm.modules.attention": None})  # type: ignore[dict-item]
    backends = {b.attention: b for b in adapter.attention_backends()}
    assert backends[Attention.HOST].available and not backends[Attention.AUTO].available
    assert not backends[Attention.SDP].available and "not loaded" in backends[Attention.SDP].reason
    with pytest.raises(NotSupportedHere, match="attention"):
        adapter.apply_attention(None, on(attention=Attention.SDP), None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- the registry


MIRRORS = {
    FP: ("/work/.mirror/lllyasviel+stable-diffusion-webui-forge/repo", "previous"),
    RF: ("/work/.mirror/Panchovix+stable-diffusion-webui-reForge/repo", "main"),
}


@pytest.mark.parametrize("kind", [FP, RF], ids=["forge-previous", "reforge"])
def test_registry_bindings_exist_in_the_hosts_code(kind: HostKind) -> None:
    """Every ldm_patched binding of the attention registry names a function the host defines at module level,
    and its flag is one the host's parser has (read from the host mirrors at the pinned commits)."""
    import subprocess
    from pathlib import Path

    from lib_optim.attention import registry
    from lib_optim.launch.flagtables import flags_for

    git_dir, rev = MIRRORS[kind]
    if not Path(git_dir).is_dir():
        pytest.skip(f"host mirror {git_dir} not present")

    def source(path: str) -> str:
        return subprocess.run(
            ["git", f"--git-dir={git_dir}", "show", f"{rev}:{path}"], capture_output=True, text=True, check=True
        ).stdout

    unet = source("ldm_patched/ldm/modules/attention.py")
    vae = source("ldm_patched/ldm/modules/diffusionmodules/model.py")
    flags = flags_for(kind)
    bindings = [b.ldm_patched for b in registry.algorithms() if b.ldm_patched is not None]
    assert len(bindings) == 5
    for binding in bindings:
        assert f"\ndef {binding.unet}(" in unet, binding
        assert f"\ndef {binding.vae}(" in vae, binding
        assert binding.flag is None or binding.flag in flags, binding
    for name in ("optimized_attention", "optimized_attention_masked"):
        assert f"\n{name} = " in unet
    for name in VAE_FUNCTIONS:
        assert f"\ndef {name}(" in vae


# --------------------------------------------------------------------------------------------- compile auto


class ResBlock(torch.nn.Module):
    """Named like ldm_patched's openaimodel.ResBlock, a block regional compile selects (docs/hosts.md §6.5)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


def test_compile_auto_one_image_eager_twenty_compiled(host: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
    """The job is ``steps`` × ``n_iter`` × ``batch_size`` outside a grid (docs/hosts.md §7.7)."""
    from lib_optim.compile import RegionalCompiler, auto
    from lib_optim.settings import Compile

    compiler = RegionalCompiler(backend="eager")
    monkeypatch.setattr("lib_optim.compile.get_compiler", lambda: compiler)  # the face the adapter reads
    monkeypatch.setattr(auto, "estimated_speedup", lambda device_type, torch: auto.SPEEDUP_CPU)  # any torch
    host.base_model.diffusion_model = torch.nn.Sequential(ResBlock())
    host.p.steps, host.p.n_iter = 20, 1
    session = host.adapter.begin(host.p, on(compile=Compile.AUTO))
    assert "compile" not in session.data and not session.data["compile_auto"].decision.compile
    session.restorer.close()
    host.p.n_iter = 20
    session = host.adapter.begin(host.p, on(compile=Compile.AUTO))
    assert "compile" in session.data and session.data["compile_auto"].job.images == 20
    session.restorer.close()
