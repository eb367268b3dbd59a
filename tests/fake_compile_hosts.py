"""Imitations of the host code inside the UNet blocks that regional compile compiles (tests/test_compile_region.py).

Each piece cites what it imitates: A1111 v1.10.1 (/work/hosts/a1111; the ldm code is stablediffusion's
``repositories/stable-diffusion-stability-ai``), Forge f2 (/work/hosts/forge). Only the behaviour regional compile
meets is kept: what a block reads at call time (module globals, class attributes, an options object with
``__getattr__``), what A1111's LoRA does to the weights on a layer's first call after the selection changed, and a
free-memory query dynamo cannot trace.

This module stands in for the host modules themselves: its globals ``rearrange``/``repeat`` are read by the block
code as ldm's ``attention.py`` reads its own (``from einops import rearrange, repeat``, ldm/modules/attention.py:6),
and :data:`memory_management` is read at call time as Forge's ``backend/attention.py:6`` module global.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from einops import rearrange, repeat  # noqa: F401  (repeat: a global the patches also cover, as in ldm)
from torch import nn

# ----------------------------------------------------------------------------------------- A1111 options


class Options:
    """A1111 ``modules/options.py:131-142``: settings are read as attributes through ``__getattr__`` from ``data``."""

    def __init__(self, **data: Any) -> None:
        self.data = dict(data)

    def __getattr__(self, item: str) -> Any:
        if item in ("data",):  # options_builtin_fields
            return super().__getattribute__(item)
        if self.data is not None and item in self.data:
            return self.data[item]
        return super().__getattribute__(item)


shared = types.SimpleNamespace(opts=Options(lora_functional=False))  # modules/shared.py: opts


class UpcastAttention(nn.Module):
    """An attention block reading a setting through ``shared.opts`` as A1111's attention functions do
    (modules/sd_hijack_optimizations.py:195, ``if shared.opts.upcast_attn:``)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return h * 2 if shared.opts.upcast_attn else h


# --------------------------------------------------------------------------------------- A1111 CondFunc


always_true_func = lambda *args, **kwargs: True  # noqa: E731  (modules/sd_hijack_utils.py:4)


class CondFunc:
    """A1111 ``modules/sd_hijack_utils.py:7-36``: the attribute becomes ``lambda *args, **kwargs: self(*args,
    **kwargs)`` (:22) over an instance whose ``__call__`` tests ``not self.__cond_func`` (:33). The host resolves a
    dotted path (:10-21); here the owner and the attribute name are given."""

    def __new__(cls, owner: Any, name: str, sub_func: Any, cond_func: Any = always_true_func) -> Any:
        self = super().__new__(cls)
        orig_func = getattr(owner, name)
        # the lambdas are A1111's (compile_regions finds the CondFunc in their closure)
        setattr(owner, name, lambda *args, **kwargs: self(*args, **kwargs))  # noqa: PLW0108
        self.__init__(orig_func, sub_func, cond_func)  # type: ignore[misc]
        return lambda *args, **kwargs: self(*args, **kwargs)  # noqa: PLW0108

    def __init__(self, orig_func: Any, sub_func: Any, cond_func: Any) -> None:
        self.__orig_func = orig_func
        self.__sub_func = sub_func
        self.__cond_func = cond_func

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self.__cond_func or self.__cond_func(self.__orig_func, *args, **kwargs):
            return self.__sub_func(self.__orig_func, *args, **kwargs)
        return self.__orig_func(*args, **kwargs)


# ------------------------------------------------------------------------------------------ A1111 LoRA


@dataclass
class Network:
    """A loaded LoRA as ``network_apply_weights`` reads it (extensions-builtin/Lora/networks.py:423, :456-475): its
    name and multipliers, and per layer name the weight change ``module.calc_updown`` computes (:469)."""

    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    dyn_dim: int | None = None
    updowns: dict[str, torch.Tensor] = field(default_factory=dict)


loaded_networks: list[Network] = []  # networks.py: the selection of the current generation


def store_weights_backup(weight: torch.Tensor | None) -> torch.Tensor | None:
    """networks.py:375-379."""
    return None if weight is None else weight.to("cpu", copy=True)


def network_restore_weights_from_backup(self: nn.Module) -> None:
    """networks.py:391-408 (without the MultiheadAttention branch)."""
    weights_backup = getattr(self, "network_weights_backup", None)
    bias_backup = getattr(self, "network_bias_backup", None)
    if weights_backup is None and bias_backup is None:
        return
    with torch.no_grad():
        if weights_backup is not None:
            self.weight.copy_(weights_backup)
        if bias_backup is not None:
            self.bias.copy_(bias_backup)


def network_apply_weights(self: nn.Module) -> None:
    """networks.py:411-542: applies the selected networks to the layer's weights *in place* (``copy_``, :475), once
    per selection: ``network_current_names`` records what is applied (:422, :453, :542)."""
    network_layer_name = getattr(self, "network_layer_name", None)
    if network_layer_name is None:
        return
    current_names = getattr(self, "network_current_names", ())
    wanted_names = tuple((x.name, x.te_multiplier, x.unet_multiplier, x.dyn_dim) for x in loaded_networks)
    weights_backup = getattr(self, "network_weights_backup", None)
    if weights_backup is None and wanted_names != ():
        self.network_weights_backup = store_weights_backup(self.weight)
    bias_backup = getattr(self, "network_bias_backup", None)
    if bias_backup is None and wanted_names != ():
        self.network_bias_backup = store_weights_backup(getattr(self, "bias", None))
    if current_names != wanted_names:
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            updown = net.updowns.get(network_layer_name)
            if updown is not None:
                with torch.no_grad():
                    self.weight.copy_(self.weight + updown * net.unet_multiplier)
        self.network_current_names = wanted_names


def network_reset_cached_weight(self: nn.Module) -> None:
    """networks.py:572-575."""
    self.network_current_names = ()
    self.network_weights_backup = None
    self.network_bias_backup = None


class LoraPatches:
    """extensions-builtin/Lora/lora_patches.py:7-30 over :data:`patches` (modules/patches.py): the layers' class
    ``forward`` (and ``_load_from_state_dict``) replaced by networks.py's (:578-635), originals kept."""

    LAYERS = ("Linear", "Conv2d", "GroupNorm", "LayerNorm")

    def __init__(self) -> None:
        for name in self.LAYERS:
            cls = getattr(nn, name)
            setattr(self, f"{name}_forward", patches.patch(PATCH_KEY, cls, "forward", _network_forward(name)))
            setattr(
                self,
                f"{name}_load_state_dict",
                patches.patch(PATCH_KEY, cls, "_load_from_state_dict", _network_load_state_dict(name)),
            )

    def undo(self) -> None:
        for name in self.LAYERS:
            cls = getattr(nn, name)
            patches.undo(PATCH_KEY, cls, "forward")
            patches.undo(PATCH_KEY, cls, "_load_from_state_dict")


def _network_forward(layer: str) -> Any:
    """networks.py:578-584 ``network_Linear_forward`` and its Conv2d/GroupNorm/LayerNorm twins (:593, :608, :623)."""

    def forward(self: nn.Module, input: torch.Tensor) -> torch.Tensor:
        original = getattr(originals, f"{layer}_forward")
        if shared.opts.lora_functional:
            raise NotImplementedError("network_forward (:545-569) is not imitated here")
        network_apply_weights(self)
        return original(self, input)

    forward.__name__ = forward.__qualname__ = f"network_{layer}_forward"
    return forward


def _network_load_state_dict(layer: str) -> Any:
    """networks.py:587-590 and twins: a load (a checkpoint switch into the same model) forgets what was applied."""

    def load(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        network_reset_cached_weight(self)
        return getattr(originals, f"{layer}_load_state_dict")(self, *args, **kwargs)

    load.__name__ = load.__qualname__ = f"network_{layer}_load_state_dict"
    return load


def _patch(key: str, obj: Any, name: str, replacement: Any) -> Any:
    """modules/patches.py:4-29."""
    patch_key = (obj, name)
    if patch_key in patches.originals[key]:
        raise RuntimeError(f"patch for {name} is already applied")
    original_func = getattr(obj, name)
    patches.originals[key][patch_key] = original_func
    setattr(obj, name, replacement)
    return original_func


def _undo(key: str, obj: Any, name: str) -> None:
    """modules/patches.py:32-54."""
    patch_key = (obj, name)
    if patch_key not in patches.originals[key]:
        raise RuntimeError(f"there is no patch for {name} to undo")
    setattr(obj, name, patches.originals[key].pop(patch_key))


PATCH_KEY = "lora_patches"  # lora_patches.py:9 patches under its module's __name__
patches = types.SimpleNamespace(originals=defaultdict(dict), patch=_patch, undo=_undo)  # modules/patches.py
originals: Any = None  # networks.py:725, set by scripts/lora_script.py:27


@contextlib.contextmanager
def lora_installed() -> Iterator[None]:
    """The built-in Lora extension loaded (lora_script.py:27) for the duration, undone whatever happens."""
    global originals
    originals = LoraPatches()
    try:
        yield
    finally:
        originals.undo()
        originals = None
        loaded_networks.clear()
        shared.opts.data["lora_functional"] = False


def name_layers(root: nn.Module) -> None:
    """What ``assign_network_names_to_compvis_modules`` does (networks.py): every LoRA-able layer gets its name."""
    for name, module in root.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, nn.GroupNorm, nn.LayerNorm)):
            module.network_layer_name = name  # type: ignore[assignment]


# ------------------------------------------------------------------------------------ Forge free memory


class _Statistics:
    """What Forge's ``get_free_memory`` reads: ``psutil.virtual_memory()`` / ``torch.cuda.memory_stats``
    (backend/memory_management.py:1008-1038) — C calls dynamo cannot trace. Counts its reads; figures in bytes."""

    def __init__(self) -> None:
        self.reads = 0
        self.free = 3 << 30

    @torch._dynamo.disable
    def read(self) -> tuple[int, int]:
        self.reads += 1
        return self.free, self.free // 2


statistics = _Statistics()


def get_free_memory(dev: Any = None, torch_free_too: bool = False) -> Any:
    """Forge backend/memory_management.py:1008-1038."""
    mem_free_total, mem_free_torch = statistics.read()
    if torch_free_too:
        return (mem_free_total, mem_free_torch)
    return mem_free_total


memory_management = types.SimpleNamespace(get_free_memory=get_free_memory)  # backend/attention.py:6


def attention_split_like(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Forge backend/attention.py:185-230 (attention_split): the free memory, asked inside the attention (:196; with
    ``torch_free_too`` as attention_sub_quad asks, :126), decides how many slices the attention runs in; the einops
    calls are ldm's (ldm/modules/attention.py:171, :193)."""
    q = rearrange(q, "b n (h d) -> (b h) n d", h=heads)
    k = rearrange(k, "b n (h d) -> (b h) n d", h=heads)
    v = rearrange(v, "b n (h d) -> (b h) n d", h=heads)
    mem_free_total, _ = memory_management.get_free_memory(q.device, True)
    element_size = 4  # :199-200 (attn_precision float32)
    mem_required = q.shape[0] * q.shape[1] * k.shape[1] * element_size * 3
    scale = 1.0 / math.sqrt(q.shape[-1])
    if mem_required > mem_free_total:  # never with the figures the tests use: one slice
        steps = 2 ** math.ceil(math.log(mem_required / mem_free_total, 2))
        outs = [torch.softmax(qs @ k.transpose(1, 2) * scale, dim=-1) @ v for qs in q.chunk(steps, dim=1)]
        out = torch.cat(outs, dim=1)
    else:
        out = torch.softmax(q @ k.transpose(1, 2) * scale, dim=-1) @ v
    return rearrange(out, "(b h) n d -> b n (h d)", h=heads)


# ------------------------------------------------------------------------------------------------ blocks


class ResBlock(nn.Module):
    """ldm openaimodel.py ResBlock's layers (GroupNorm, conv, the timestep projection): LoRA-able torch layers."""

    def __init__(self, channels: int = 8, emb: int = 16) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(4, channels)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.emb = nn.Linear(emb, channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv(torch.nn.functional.silu(self.norm(x)))
        return x + h + self.emb(emb)[..., None, None]


class SpatialTransformer(nn.Module):
    """ldm/modules/attention.py:278-345 in miniature; its class ``forward`` is what A1111 replaces by a CondFunc
    (modules/sd_hijack_unet.py:127, :83-102)."""

    def __init__(self, channels: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(4, channels)
        self.proj_in = nn.Linear(channels, channels)
        self.ln = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor, context: Any = None) -> torch.Tensor:  # ldm's own, replaced below
        raise AssertionError("A1111 replaces this forward by a CondFunc")


def spatial_transformer_forward(_: Any, self: SpatialTransformer, x: torch.Tensor, context: Any = None) -> torch.Tensor:
    """A1111 modules/sd_hijack_unet.py:83-102, with ldm's einops (ldm/modules/attention.py:330, :337)."""
    _, _, h, w = x.shape
    x_in = x
    x = rearrange(self.norm(x), "b c h w -> b (h w) c").contiguous()
    x = self.proj_in(x)
    n = self.ln(x)
    x = x + attention_split_like(self.to_q(n), self.to_k(n), self.to_v(n), self.heads)
    x = self.proj_out(x)
    x = rearrange(x, "b (h w) c -> b c h w", h=h, w=w).contiguous()
    return x + x_in


CondFunc(SpatialTransformer, "forward", spatial_transformer_forward)


class UNet(nn.Module):
    """Blocks called the way the UNet calls them, with a layer between them that stays eager (the input conv)."""

    def __init__(self, channels: int = 8) -> None:
        super().__init__()
        self.conv_in = nn.Conv2d(channels, channels, 1)
        self.res = ResBlock(channels)
        self.st = SpatialTransformer(channels)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        return self.st(self.res(self.conv_in(x), emb))


def make_unet(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    unet = UNet().eval()
    name_layers(unet)
    return unet


def unet_inputs(size: int = 8, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + size * 10 + batch)
    return torch.randn(batch, 8, size, size, generator=gen), torch.randn(batch, 16, generator=gen)


# ------------------------------------------------------------------------ A1111 sdp-no-mem attention


class CrossAttention(nn.Module):
    """ldm/modules/attention.py CrossAttention's layers; A1111's optimizers replace its class ``forward``
    (modules/sd_hijack_optimizations.py:75-79, ``SdOptimizationSdpNoMem.apply``)."""

    def __init__(self, channels: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(channels, channels, bias=False)
        self.to_v = nn.Linear(channels, channels, bias=False)
        self.to_out = nn.Linear(channels, channels)


def scaled_dot_product_attention_forward(
    self: CrossAttention, x: torch.Tensor, context: Any = None, mask: Any = None, **kwargs: Any
) -> torch.Tensor:
    """modules/sd_hijack_optimizations.py:508-546 in miniature (views, SDPA, the output projection)."""
    batch, _, inner = x.shape
    context = x if context is None else context
    head = inner // self.heads
    projected = (self.to_q(x), self.to_k(context), self.to_v(context))
    q, k, v = (t.view(batch, -1, self.heads, head).transpose(1, 2) for t in projected)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return self.to_out(out.transpose(1, 2).reshape(batch, -1, inner))


def scaled_dot_product_no_mem_attention_forward(
    self: CrossAttention, x: torch.Tensor, context: Any = None, mask: Any = None, **kwargs: Any
) -> torch.Tensor:
    """modules/sd_hijack_optimizations.py:549-551, verbatim."""
    with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=False):
        return scaled_dot_product_attention_forward(self, x, context, mask)


def sdp_attnblock_forward(self: Any, x: torch.Tensor) -> torch.Tensor:  # :636-656, not used by the fakes' blocks
    raise AssertionError("not called")


def sdp_no_mem_attnblock_forward(self: Any, x: torch.Tensor) -> torch.Tensor:  # :658-660
    with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=False):
        return sdp_attnblock_forward(self, x)


sd_hijack_optimizations = types.SimpleNamespace(  # the module's functions compile_regions looks up by name
    scaled_dot_product_attention_forward=scaled_dot_product_attention_forward,
    scaled_dot_product_no_mem_attention_forward=scaled_dot_product_no_mem_attention_forward,
    sdp_attnblock_forward=sdp_attnblock_forward,
    sdp_no_mem_attnblock_forward=sdp_no_mem_attnblock_forward,
)
CrossAttention.forward = scaled_dot_product_no_mem_attention_forward  # type: ignore[method-assign]
