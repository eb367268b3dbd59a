"""What each host's blocks call that dynamo cannot trace on the torch it pins, and what runs instead while
compiled code runs (lib_optim.compile.region; the host sites are in docs/hosts.md §6.10):

- einops' ``rearrange``/``repeat`` (module globals of the block code): einops 0.4.1 fails on symbolic sizes;
- A1111's ``CondFunc`` class attributes (``modules/sd_hijack_utils.py``): ``if not self.__cond_func`` on a
  function is a graph break on torch 2.1;
- A1111's built-in LoRA forwards on ``torch.nn`` layers (``extensions-builtin/Lora/lora_patches.py``): Python
  bookkeeping per layer; once the eager first call has applied the LoRA weights in place, the layers' own
  torch forwards compute the same;
- the Forges' ``get_free_memory`` inside the attention functions (``psutil``/CUDA statistics): measured once,
  before the region;
- ``functools.partial`` in the sub-quadratic attention: a closure; A1111's sdp-no-mem ``sdp_kernel`` context:
  the plain SDPA forward inside, the same kernel choice entered around the compiled call;
- constructs in the hosts' functions (a generator unpacked into names, ``element_size()``, a loop over
  ``torch.arange``): traceable copies of the functions (lib_optim.compile.rewrite).

Every replacement is built once per process and reused: dynamo guards on the identity of what it read.
"""

from __future__ import annotations

import functools
import sys
import types
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from lib_optim.compile import (
    FrozenAvailableMemory,
    FrozenFreeMemory,
    RegionChange,
    RegionContext,
    RegionPatch,
    einops_namespace,
    einops_stand_in,
    helpers_of,
    traceable_function,
    traceable_functions,
    traceable_partial,
)
from lib_optim.compile import is_function as traceable_isfunction
from lib_optim.hosts.base import HostModules
from lib_optim.log import get_logger

log = get_logger(__name__)

# (module, global) the block code of each host family reads einops through (docs/hosts.md §6.10)
EINOPS_GLOBALS: dict[str, tuple[tuple[str, str], ...]] = {
    "a1111": (
        ("ldm.modules.attention", "rearrange"),
        ("ldm.modules.attention", "repeat"),
        ("ldm.modules.diffusionmodules.model", "rearrange"),
        ("sgm.modules.attention", "rearrange"),
        ("sgm.modules.attention", "repeat"),
        ("sgm.modules.diffusionmodules.openaimodel", "rearrange"),
        ("sgm.modules.diffusionmodules.model", "rearrange"),
        ("modules.sd_hijack_optimizations", "rearrange"),  # split, InvokeAI, sub-quad attention (§3.2)
    ),
    "forge": (
        ("backend.nn.unet", "rearrange"),
        ("backend.nn.unet", "repeat"),
        ("backend.nn.flux", "rearrange"),
        ("backend.nn.flux", "repeat"),
        ("backend.nn.chroma", "rearrange"),
        ("backend.nn.chroma", "repeat"),
        ("backend.attention", "einops"),
    ),
    "ldm_patched": (
        ("ldm_patched.ldm.modules.attention", "rearrange"),
        ("ldm_patched.ldm.modules.attention", "repeat"),
        ("ldm_patched.ldm.modules.diffusionmodules.openaimodel", "rearrange"),
        ("ldm_patched.ldm.modules.diffusionmodules.model", "rearrange"),
    ),
}

# (module, function) the attention functions ask for free memory (docs/hosts.md §6.10): Forge-style
# get_free_memory(dev, torch_free_too) or A1111's get_available_vram()
FREE_MEMORY_FUNCTION = {
    "forge": ("backend.memory_management", "get_free_memory"),
    "ldm_patched": ("ldm_patched.modules.model_management", "get_free_memory"),
    "a1111": ("modules.sd_hijack_optimizations", "get_available_vram"),
}

_LORA_PATCH_KEY = "lora_patches"  # A1111 lora_patches.py patches under its module name (modules/patches.py)
_LORA_LAYERS = ("Linear", "Conv2d", "GroupNorm", "LayerNorm")


def einops_patches(modules: HostModules, family: str) -> list[RegionPatch]:
    """Our traceable einops for the globals the family's block code reads (loaded modules only)."""
    patches = []
    for module_name, attr in EINOPS_GLOBALS.get(family, ()):
        module = modules.loaded(module_name)
        original = getattr(module, attr, None) if module is not None else None
        if original is None:
            continue
        replacement = einops_namespace(original) if attr == "einops" else einops_stand_in(attr, original)
        patches.append(RegionPatch(module, attr, replacement, f"{module_name}.{attr}: einops"))
    return patches


# modules whose functions the blocks call (attention above all) and may hold constructs torch 2.1's dynamo
# cannot trace (lib_optim.compile.rewrite; docs/hosts.md §6.10)
REWRITE_MODULES: dict[str, tuple[str, ...]] = {
    "a1111": (
        "modules.sd_hijack_optimizations",
        "modules.sub_quadratic_attention",
        "ldm.modules.attention",
        "sgm.modules.attention",
        "ldm.modules.diffusionmodules.model",
        "sgm.modules.diffusionmodules.model",
    ),
    "forge": ("backend.attention", "backend.misc.sub_quadratic_attention", "backend.nn.unet", "backend.nn.vae"),
    "ldm_patched": (
        "ldm_patched.ldm.modules.attention",
        "ldm_patched.ldm.modules.sub_quadratic_attention",
        "ldm_patched.ldm.modules.diffusionmodules.model",
    ),
}


def rewrite_patches(modules: HostModules, family: str, root: Any) -> list[RegionPatch]:
    """Traceable copies (:func:`lib_optim.compile.traceable_function`) of the family's module functions and of the
    ``forward`` s bound on the classes in ``root`` (A1111 binds its attention as ``CrossAttention.forward``), and
    the helpers the copies call as globals of their modules."""
    patches = []
    helpers: dict[tuple[int, str], RegionPatch] = {}
    for module_name in REWRITE_MODULES.get(family, ()):
        module = modules.loaded(module_name)
        if module is None:
            continue
        for name, copy in traceable_functions(module).items():
            patches.append(RegionPatch(module, name, copy, f"{module_name}.{name}: traceable copy"))
            _add_helpers(helpers, module, copy)
    for cls in _classes(root):
        forward = vars(cls).get("forward")
        rewritten = traceable_function(forward) if forward is not None else None
        if rewritten is not None:
            patches.append(RegionPatch(cls, "forward", rewritten, f"{cls.__qualname__}.forward: traceable copy"))
            _add_helpers(helpers, sys.modules.get(forward.__module__), rewritten)
    return patches + list(helpers.values())


def _add_helpers(helpers: dict[tuple[int, str], RegionPatch], module: Any, copy: Any) -> None:
    if module is None:
        return
    for name, helper in helpers_of(copy).items():
        helpers.setdefault((id(module), name), RegionPatch(module, name, helper, f"{module.__name__}.{name}: helper"))


# (module, global) bound to inspect.isfunction in the block code (docs/hosts.md §6.10): ldm's and sgm's default()
ISFUNCTION_GLOBALS: dict[str, tuple[tuple[str, str], ...]] = {
    "a1111": (
        ("ldm.util", "isfunction"),
        ("ldm.modules.attention", "isfunction"),
        ("sgm.util", "isfunction"),
        ("sgm.modules.attention", "isfunction"),
    ),
    "ldm_patched": (("ldm_patched.ldm.util", "isfunction"),),
}

# (module, global) bound to functools.partial in the sub-quadratic attention (docs/hosts.md §6.10): built and called
# per attention call; torch 2.1's dynamo traces neither (Forge f2's torch 2.3 traces both)
PARTIAL_GLOBALS: dict[str, tuple[tuple[str, str], ...]] = {
    "a1111": (("modules.sub_quadratic_attention", "partial"),),
    "ldm_patched": (("ldm_patched.ldm.modules.sub_quadratic_attention", "partial"),),
}


def isfunction_patches(modules: HostModules, family: str) -> list[RegionPatch]:
    """``inspect.isfunction`` (in dynamo's skip files on torch 2.1) as a plain ``isinstance`` inside the region."""
    return _global_patches(modules, ISFUNCTION_GLOBALS.get(family, ()), traceable_isfunction, "inspect")


def partial_patches(modules: HostModules, family: str) -> list[RegionPatch]:
    """``functools.partial`` as a closure inside the region (:func:`lib_optim.compile.traceable_partial`)."""
    return _global_patches(modules, PARTIAL_GLOBALS.get(family, ()), traceable_partial, "functools.partial")


def _global_patches(
    modules: HostModules, globals_: Iterable[tuple[str, str]], replacement: Any, what: str
) -> list[RegionPatch]:
    """``replacement`` for each (module, global) of a loaded module that has the global."""
    patches = []
    for module_name, attr in globals_:
        module = modules.loaded(module_name)
        if module is not None and getattr(module, attr, None) is not None:
            patches.append(RegionPatch(module, attr, replacement, f"{module_name}.{attr}: {what}"))
    return patches


# A1111's "no memory-efficient" SDPA forwards and the plain ones they call inside
# ``with torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=False)``
# (modules/sd_hijack_optimizations.py:549-551 and :658-660, bound by SdOptimizationSdpNoMem.apply, :75-79): a
# context manager dynamo cannot trace on torch 2.1
SDP_NO_MEM_FORWARDS = {
    "scaled_dot_product_no_mem_attention_forward": "scaled_dot_product_attention_forward",
    "sdp_no_mem_attnblock_forward": "sdp_attnblock_forward",
}


def sdp_no_mem_patches(modules: HostModules, root: Any) -> list[RegionChange]:
    """The plain SDPA forward in place of A1111's "no mem" one on the classes in ``root``, with the kernel choice
    it makes entered around the compiled call instead of inside it (the same flags when tracing and running)."""
    module = modules.loaded("modules.sd_hijack_optimizations")
    if module is None:
        return []
    swaps = {
        getattr(module, name): _traceable_or_same(getattr(module, plain, None))
        for name, plain in SDP_NO_MEM_FORWARDS.items()
        if getattr(module, name, None) is not None  # else a class without a forward of its own would match
    }
    changes: list[RegionChange] = []
    for cls in _classes(root):
        plain = swaps.get(vars(cls).get("forward"))
        if plain is not None:
            changes.append(RegionPatch(cls, "forward", plain, f"{cls.__qualname__}.forward: sdp-no-mem"))
    if changes:
        changes.append(RegionContext(_no_mem_kernels, "sdp-no-mem: torch.backends.cuda.sdp_kernel"))
    return changes


def _traceable_or_same(function: Any) -> Any:
    """The plain forward as the rewrites would make it (A1111's ``sdp_attnblock_forward`` unpacks a generator)."""
    return traceable_function(function) or function if function is not None else None


def _no_mem_kernels() -> Any:
    import torch

    return torch.backends.cuda.sdp_kernel(enable_flash=True, enable_math=True, enable_mem_efficient=False)


def _classes(root: Any) -> list[type]:
    classes = {cls for module in root.modules() for cls in type(module).__mro__}
    return sorted(classes, key=lambda c: f"{c.__module__}.{c.__qualname__}")


def condfunc_patches(root: Any) -> list[RegionPatch]:
    """A1111's ``CondFunc`` class attributes on the classes in ``root`` (``SpatialTransformer.forward`` always;
    ``GroupNorm32.forward``/``GEGLU.forward`` when the UNet is upcast), as functions dynamo can trace."""
    patches = []
    for cls in _classes(root):
        forward = vars(cls).get("forward")
        condfunc = _condfunc_of(forward)
        if condfunc is not None:
            patches.append(RegionPatch(cls, "forward", _traceable_condfunc(forward, condfunc), "CondFunc"))
    return patches


def _condfunc_of(function: Any) -> Any:
    """The ``CondFunc`` instance behind one of its ``lambda *args, **kwargs: self(*args, **kwargs)`` wrappers
    (``modules/sd_hijack_utils.py``), or None."""
    for cell in getattr(function, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if type(value).__name__ == "CondFunc" and hasattr(value, "_CondFunc__sub_func"):
            return value
    return None


@functools.cache
def _traceable_condfunc(wrapper: Any, condfunc: Any) -> Callable[..., Any]:
    """``CondFunc.__call__`` without its ``not self.__cond_func`` test on a function (a graph break on torch 2.1);
    one per wrapper for the process."""
    original = condfunc._CondFunc__orig_func
    sub = condfunc._CondFunc__sub_func
    cond = condfunc._CondFunc__cond_func

    def forward(*args: Any, **kwargs: Any) -> Any:
        if cond is None or cond(original, *args, **kwargs):
            return sub(original, *args, **kwargs)
        return original(*args, **kwargs)

    forward.__name__ = forward.__qualname__ = f"optim_condfunc_{getattr(wrapper, '__name__', 'forward')}"
    return forward


def lora_patches(modules: HostModules) -> list[RegionPatch]:
    """The ``torch.nn`` layers' own forwards in place of A1111's LoRA forwards (``lora_patches.py``), unless
    the "functional" LoRA option is on (then the LoRA is computed in the forward itself and must stay)."""
    opts = getattr(modules.loaded("modules.shared"), "opts", None)
    if getattr(opts, "lora_functional", False):
        return []
    patches_module = modules.loaded("modules.patches")
    originals = getattr(patches_module, "originals", {}).get(_LORA_PATCH_KEY, {})
    import torch

    result = []
    for name in _LORA_LAYERS:
        cls = getattr(torch.nn, name)
        original = originals.get((cls, "forward"))
        if original is not None and vars(cls).get("forward") is not original:
            result.append(RegionPatch(cls, "forward", original, f"torch.nn.{name}.forward: A1111 LoRA"))
    return result


@functools.cache
def _frozen(real: Callable[..., Any], zero_args: bool) -> FrozenFreeMemory | FrozenAvailableMemory:
    return FrozenAvailableMemory(real) if zero_args else FrozenFreeMemory(real)


def free_memory_patch(modules: HostModules, family: str) -> tuple[list[RegionPatch], Callable[[], None] | None]:
    """The family's free-memory query answered from a figure measured before the region, and the function that
    measures it (called at the first compiled call of a generation: after the host has loaded the model)."""
    module_name, attr = FREE_MEMORY_FUNCTION.get(family, ("", ""))
    module = modules.loaded(module_name) if module_name else None
    real = getattr(module, attr, None) if module is not None else None
    if real is None:
        return [], None
    if isinstance(real, (FrozenFreeMemory, FrozenAvailableMemory)):  # left by an interrupted restore
        real = real.real
    frozen = _frozen(real, family == "a1111")
    device = getattr(modules.loaded("modules.devices"), "device", None)

    def measure() -> None:
        frozen.measure(device)

    return [RegionPatch(module, attr, frozen, f"{module_name}.{attr}")], measure


# A1111's attention functions read their settings through the module global ``shared``
# (modules/sd_hijack_optimizations.py: ``shared.opts.upcast_attn`` :195-646, ``shared.cmd_opts.sub_quad_*`` :414,
# ``shared.loaded_hypernetworks`` :186-519); ``Options.__getattr__`` looks each name up in ``opts.data``
# (modules/options.py:131-142), so dynamo guards the dict's whole key set, and a setting saved for the first time
# between two generations (any extension's) recompiled every attention block
SHARED_GLOBALS: dict[str, tuple[tuple[str, str], ...]] = {"a1111": (("modules.sd_hijack_optimizations", "shared"),)}


class SharedSnapshot(types.SimpleNamespace):
    """What the attention functions read of A1111's ``shared``: its attributes, with ``opts`` as plain attributes
    holding each setting's current value (refreshed before each generation's region; one object per process, so
    dynamo guards only the values the blocks read)."""

    def refresh(self, real: Any) -> None:
        opts = real.opts
        names = set(getattr(opts, "data", None) or {}) | set(getattr(opts, "data_labels", None) or {})
        settings = vars(self).setdefault("opts", types.SimpleNamespace())
        vars(settings).update({name: getattr(opts, name) for name in names})
        for name, value in vars(real).items():
            if name != "opts" and not name.startswith("__"):
                setattr(self, name, value)


@functools.cache
def _snapshot(module_name: str, attr: str) -> SharedSnapshot:
    return SharedSnapshot()  # one per patched global for the process


def shared_patches(modules: HostModules, family: str) -> tuple[list[RegionPatch], Callable[[], None] | None]:
    """The family's ``shared`` module global as a :class:`SharedSnapshot`, and the function that refreshes it
    (called before the generation's first compiled call, outside the region)."""
    patches: list[RegionPatch] = []
    refreshes: list[Callable[[], None]] = []
    for module_name, attr in SHARED_GLOBALS.get(family, ()):
        module = modules.loaded(module_name)
        real = getattr(module, attr, None) if module is not None else None
        if isinstance(real, SharedSnapshot) or getattr(real, "opts", None) is None:
            continue  # not loaded, or left by an interrupted restore (the next generation patches again)
        snapshot = _snapshot(module_name, attr)
        patches.append(RegionPatch(module, attr, snapshot, f"{module_name}.{attr}: settings snapshot"))
        refreshes.append(functools.partial(snapshot.refresh, real))
    return patches, (lambda: _each(refreshes)) if refreshes else None


def _each(calls: Iterable[Callable[[], None]]) -> None:
    for call in calls:
        call()


def prepare_all(*prepares: Callable[[], None] | None) -> Callable[[], None] | None:
    """One ``prepare`` (CompileRegion) calling each of ``prepares`` that is not None, in order."""
    present = [prepare for prepare in prepares if prepare is not None]
    return (lambda: _each(present)) if present else None


def interrupt_check(modules: HostModules) -> Callable[[], None] | None:
    """Raise the host's ``InterruptedException`` when Interrupt or Skip was pressed (what the host's own denoiser
    does at each step, ``modules/sd_samplers_cfg_denoiser.py``; the sampler returns the last latent)."""
    shared = modules.loaded("modules.shared")
    common = modules.loaded("modules.sd_samplers_common")
    exception = getattr(common, "InterruptedException", None)
    if shared is None or exception is None:
        return None

    def check() -> None:
        state = getattr(shared, "state", None)
        if getattr(state, "interrupted", False) or getattr(state, "skipped", False):
            log.info("[Optim] compile: Interrupt/Skip pressed; stopping between blocks")
            raise exception

    return check


def lora_token(modules: HostModules, root: Any = None) -> Callable[[], Any]:
    """A1111's LoRA state as ``network_apply_weights`` compares it (``extensions-builtin/Lora/networks.py:422-423``,
    ``:453``): the selection, and how many of ``root``'s LoRA layers have neither it nor a weights backup. While the
    token is unchanged, the weights the blocks hold are the ones a previous eager call left.

    The count catches a checkpoint loaded into the same model (A1111 loads weights in place when the architecture
    matches, and its ``_load_from_state_dict`` patch drops what was applied and the backup, ``:587-590``, ``:572-575``):
    the selection is the same, the layers no longer hold it. A selection change alone keeps the backups
    (``:425-435``), so the count does not move from one generation to the next without a load; it moves once after a
    model's first LoRA (no backups before), which costs one more eager first call per block."""

    def token() -> Any:
        networks = modules.loaded("networks")
        loaded: Iterable[Any] = getattr(networks, "loaded_networks", None) or ()
        wanted = tuple(_network_key(n) for n in loaded)
        return wanted, _layers_without(root, wanted)

    return token


def lora_dirty(modules: HostModules) -> Callable[[Any], bool]:
    """Whether A1111 will edit a block's weights in its next forward: a LoRA layer in it whose applied selection
    (``network_current_names``) is not the wanted one (``networks.py:422-423``: then ``network_apply_weights``
    restores and applies in place). An eager generation between two compiled ones (a LoRA used with compile off)
    leaves such layers behind while the token, read from the selection, looks unchanged."""

    def dirty(block: Any) -> bool:
        networks = modules.loaded("networks")
        loaded: Iterable[Any] = getattr(networks, "loaded_networks", None) or ()
        wanted = tuple(_network_key(n) for n in loaded)
        for module in block.modules():
            state = vars(module)
            if state.get("network_layer_name") is not None and state.get("network_current_names", ()) != wanted:
                return True
        return False

    return dirty


def _network_key(network: Any) -> tuple[Any, ...]:
    """One selected network as A1111 records it in ``network_current_names`` (``networks.py:422``)."""
    return (
        getattr(network, "name", None),
        getattr(network, "te_multiplier", None),
        getattr(network, "unet_multiplier", None),
        getattr(network, "dyn_dim", None),
    )


def _layers_without(root: Any, wanted: tuple[Any, ...]) -> int:
    """How many of ``root``'s named LoRA layers (``network_layer_name``) hold neither ``wanted`` nor a weights backup
    (read from the instance dicts, no ``nn.Module.__getattr__``: about a millisecond for an SDXL UNet)."""
    if root is None or not wanted:
        return 0  # no LoRA selected: nothing a load could have undone
    count = 0
    for module in root.modules():
        state = vars(module)
        if (
            state.get("network_layer_name") is not None
            and state.get("network_weights_backup") is None
            and state.get("network_current_names", ()) != wanted
        ):
            count += 1
    return count


def all_patches(groups: Sequence[Sequence[RegionChange]]) -> list[RegionChange]:
    return [patch for group in groups for patch in group]
