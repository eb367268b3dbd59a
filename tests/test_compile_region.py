"""What runs inside a compiled block, and how a regional compile application treats the host around it.

lib_optim.compile.region swaps attributes while compiled code runs; lib_optim.hosts.compile_regions names what to
swap in each host (einops, A1111's CondFunc and LoRA forwards, the Forges' free-memory query); an application calls
a block's first call eagerly only when the host's weights token changed, honours Interrupt between blocks and
measures what the patches answer with before its first compiled call.

Real dynamo throughout (backends ``eager``/``aot_eager``: traced for real, no code generated). The host code comes
from tests/fake_compile_hosts.py, each piece citing the A1111/Forge source it imitates. No test depends on timing.
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import einops
import fake_compile_hosts as hosts
import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

from lib_optim.bench import compile as cb
from lib_optim.compile import (
    FrozenFreeMemory,
    RegionContext,
    RegionPatch,
    einops_namespace,
    einops_stand_in,
    traceable_function,
)
from lib_optim.compile.region import patched, specialisable
from lib_optim.compile.regional import CompileStats, RegionalCompiler
from lib_optim.hosts import compile_regions
from lib_optim.hosts.base import HostModules

SD_BLOCKS = ("ResBlock", "SpatialTransformer")


# ------------------------------------------------------------------------------------------- helpers


class Stack(nn.Module):
    """One UNet level (lib_optim.bench.compile's ResBlock/SpatialTransformer re-creations), called as the UNet does."""

    def __init__(self, pairs: int = 1) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(pairs):
            self.blocks.append(cb.ResBlock(8, 16, 8, groups=4))
            self.blocks.append(cb.SpatialTransformer(8, 16, heads=2, groups=4))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, emb) if isinstance(block, cb.ResBlock) else block(x, context, {})
        return x


def make_stack(pairs: int = 1) -> Stack:
    torch.manual_seed(0)
    return Stack(pairs).eval()


def inputs(size: int = 8) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1234 + size)
    return torch.randn(2, 8, size, size, generator=gen), torch.randn(2, 16, generator=gen), torch.randn(2, 5, 16)


def generation(
    compiler: RegionalCompiler, model: nn.Module, args: tuple[torch.Tensor, ...], **kw: Any
) -> tuple[torch.Tensor, CompileStats]:
    """One compiled "generation": two model calls."""
    with torch.no_grad(), compiler.apply(model, SD_BLOCKS, key="k", **kw) as app:
        model(*args)
        out = model(*args)
    return out, app.stats


def eager(model: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*args)


def graph_breaks() -> int:
    return sum(counters["graph_break"].values())


def unique_graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def host_modules(**extra: Any) -> HostModules:
    """The host modules compile_regions reads, as the fakes (A1111's and Forge's names)."""
    return HostModules(
        {
            "modules.patches": hosts.patches,
            "modules.shared": hosts.shared,
            "networks": hosts,
            "ldm.modules.attention": hosts,
            "backend.memory_management": hosts.memory_management,
            "modules.devices": types.SimpleNamespace(device=torch.device("cpu")),
            **extra,
        }
    )


def spy_backend(events: list[Any], record: Callable[[], Any]) -> Callable[..., Any]:
    """A dynamo backend that runs the graph as traced and appends ``record()`` to ``events`` at every run."""

    def backend(gm: Any, example_inputs: Any) -> Any:
        def run(*args: Any) -> Any:
            events.append(record())
            return gm.forward(*args)

        return run

    return backend


@pytest.fixture
def lora() -> Iterator[None]:
    """A1111's built-in Lora extension loaded (torch.nn layers' forwards replaced), undone after the test."""
    with hosts.lora_installed():
        yield


# ------------------------------------------------------------------------------------- region patches


class Base:
    def forward(self) -> str:
        return "base"


class Inherits(Base):
    pass


class Owns(Base):
    def forward(self) -> str:
        return "own"


def replacement(self: Any) -> str:
    return "patched"


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(2, 2)


def test_patched_restores_the_exact_values_even_on_an_exception():
    own_forward = vars(Owns)["forward"]
    namespace = types.SimpleNamespace(present="host")
    module = types.ModuleType("host_module")
    module.value = 1  # type: ignore[attr-defined]
    instance = Owns()
    holder = Holder()
    inner = holder.inner
    patches = [
        RegionPatch(Inherits, "forward", replacement),  # inherited: no own entry before, none after
        RegionPatch(Owns, "forward", replacement),
        RegionPatch(namespace, "present", "ours"),
        RegionPatch(namespace, "absent", "ours"),
        RegionPatch(module, "value", 2),
        RegionPatch(instance, "forward", lambda: "instance"),  # over the class's: removed again after
        RegionPatch(holder, "inner", nn.Identity()),  # an nn.Module keeps submodules outside __dict__
        RegionPatch(namespace, "present", "ours again"),  # the same attribute twice: undone in reverse order
    ]

    def check_restored() -> None:
        assert "forward" not in vars(Inherits) and Inherits().forward() == "base"
        assert vars(Owns)["forward"] is own_forward
        assert namespace.present == "host" and not hasattr(namespace, "absent")
        assert module.value == 1  # type: ignore[attr-defined]
        assert "forward" not in vars(instance) and instance.forward() == "own"
        assert holder.inner is inner and "inner" not in vars(holder)

    with patched(patches):
        assert Inherits().forward() == "patched" and Owns().forward() == "patched"
        assert namespace.present == "ours again" and namespace.absent == "ours"
        assert module.value == 2  # type: ignore[attr-defined]
        assert instance.forward() == "instance" and isinstance(holder.inner, nn.Identity)
    check_restored()
    with pytest.raises(KeyError), patched(patches):
        raise KeyError("the compiled call failed")
    check_restored()


def test_specialisable_takes_the_wrapper_out_and_puts_it_back():
    block = nn.Linear(2, 2)
    x = torch.ones(1, 2)

    def wrapper(*args: Any) -> str:
        return "wrapper"

    block.forward = wrapper  # type: ignore[method-assign]
    with specialisable(block):
        assert "forward" not in vars(block)
        assert torch.equal(block(x), nn.functional.linear(x, block.weight, block.bias))  # the class's forward
    assert vars(block)["forward"] is wrapper
    with pytest.raises(RuntimeError), specialisable(block):
        raise RuntimeError("the compiled call failed")
    assert vars(block)["forward"] is wrapper
    plain = nn.Linear(2, 2)
    with specialisable(plain):
        pass
    assert "forward" not in vars(plain)


# ------------------------------------------------------------------------------- the weights token


def test_an_unchanged_weights_token_skips_the_eager_first_calls():
    model = make_stack()
    args = inputs()
    compiler = RegionalCompiler(backend="eager")
    selection = ["a"]
    reads: list[str] = []

    def token() -> str:
        reads.append(selection[0])
        return selection[0]

    out, first = generation(compiler, model, args, weights_token=token)
    assert first.eager_calls == 2 and first.graphs == 2  # a new token: each block's first call is eager
    assert reads == ["a"]  # read once per application
    out, second = generation(compiler, model, args, weights_token=token)
    assert second.eager_calls == 0 and second.calls == 4 and second.compiles == 0
    assert torch.allclose(out, eager(model, args), atol=1e-5)
    selection[0] = "b"
    out, third = generation(compiler, model, args, weights_token=token)
    assert third.eager_calls == 2 and third.calls == 2 and third.compiles == 0  # changed: eager first calls again
    assert torch.allclose(out, eager(model, args), atol=1e-5)
    assert reads == ["a", "a", "b"]


def test_without_a_token_every_application_calls_each_block_eagerly_first():
    model = make_stack()
    args = inputs()
    compiler = RegionalCompiler(backend="eager")
    for _ in range(3):
        _, stats = generation(compiler, model, args)
        assert stats.eager_calls == 2 and stats.calls == 2


# --------------------------------------------------------------------------------------- A1111 LoRA


def region(unet: nn.Module, mods: HostModules) -> dict[str, Any]:
    """The host glue's patches, weights token and free-memory measure, as the adapters pass them."""
    free, measure = compile_regions.free_memory_patch(mods, "forge")
    patches = [
        *compile_regions.einops_patches(mods, "a1111"),
        *compile_regions.condfunc_patches(unet),
        *compile_regions.lora_patches(mods),
        *free,
    ]
    return {
        "patches": patches,
        "weights_token": compile_regions.lora_token(mods, unet),
        "weights_dirty": compile_regions.lora_dirty(mods),
        "prepare": measure,
    }


def lora_generation(
    compiler: RegionalCompiler, unet: nn.Module, mods: HostModules, args: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, CompileStats]:
    with torch.no_grad(), compiler.apply(unet, SD_BLOCKS, key="k", **region(unet, mods)) as app:
        unet(*args)
        out = unet(*args)
    return out, app.stats


def networks(unet: nn.Module) -> dict[str, hosts.Network]:
    gen = torch.Generator().manual_seed(5)
    layers = [(n, m) for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return {
        name: hosts.Network(name, updowns={n: torch.randn(m.weight.shape, generator=gen) * 0.2 for n, m in layers})
        for name in ("style", "detail")
    }


def test_lora_applied_lazily_is_never_stale_across_selection_changes(lora):
    unet = hosts.make_unet()
    mods = host_modules()
    args = hosts.unet_inputs()
    nets = networks(unet)
    half = hosts.Network("detail", unet_multiplier=0.5, updowns=nets["detail"].updowns)
    compiler = RegionalCompiler(backend="aot_eager")  # aot captures parameters before torch 2.5: staleness shows
    without = eager(unet, args)
    style, both = [nets["style"]], [nets["style"], nets["detail"]]
    selections = [[], style, style, style, both, [half], [], []]
    eager_calls = []
    for selection in selections:
        hosts.loaded_networks[:] = selection
        out, stats = lora_generation(compiler, unet, mods, args)
        reference = eager(unet, args)  # the host's own forwards: they apply the selection when it changed
        assert torch.allclose(out, reference, atol=1e-5), [n.name for n in selection]
        assert torch.allclose(out, without, atol=1e-5) == (not selection)  # the LoRA really changes the output
        assert not stats.fell_back
        eager_calls.append(stats.eager_calls)
    # an eager first call per block where the selection changed (the host applies it there), none where it did not;
    # once more after the model's first LoRA (its layers had no weights backup yet: see lora_token)
    assert eager_calls == [2, 2, 2, 0, 2, 2, 2, 0]


def test_a_lora_left_by_an_eager_generation_is_undone_before_a_compiled_one(lora):
    """A LoRA used with compile off, between two compiled generations without it: A1111's forwards applied it in
    place and undo it only in their next forward. The selection (the token) looks unchanged to the compiled
    generation; the layers' applied selection does not (``weights_dirty``), so its blocks run their first call
    eagerly, where the host restores the weights (seen in A1111: a compiled image 163/255 off after a LoRA)."""
    unet = hosts.make_unet()
    mods = host_modules()
    args = hosts.unet_inputs()
    compiler = RegionalCompiler(backend="aot_eager")
    without = eager(unet, args)
    lora_generation(compiler, unet, mods, args)
    hosts.loaded_networks[:] = [networks(unet)["style"]]
    assert not torch.allclose(eager(unet, args), without, atol=1e-4)  # compile off: the host applies it in place
    hosts.loaded_networks[:] = []
    out, stats = lora_generation(compiler, unet, mods, args)
    assert torch.allclose(out, without, atol=1e-5)
    assert stats.eager_calls == 2  # both blocks: the host undid the LoRA there
    out, stats = lora_generation(compiler, unet, mods, args)
    assert torch.allclose(out, without, atol=1e-5) and stats.eager_calls == 0  # clean again: compiled throughout


def test_a_checkpoint_loaded_into_the_same_model_gets_its_lora_applied(lora):
    """A1111 loads another checkpoint of the same architecture into the model in place, and its LoRA patch of
    ``_load_from_state_dict`` forgets what was applied (extensions-builtin/Lora/networks.py:587-590): the selection
    is unchanged, the weights are not the ones the last eager call left."""
    unet = hosts.make_unet()
    mods = host_modules()
    args = hosts.unet_inputs()
    hosts.loaded_networks[:] = [networks(unet)["style"]]
    compiler = RegionalCompiler(backend="aot_eager")
    for _ in range(3):
        _, same = lora_generation(compiler, unet, mods, args)
    assert same.eager_calls == 0
    unet.load_state_dict(hosts.make_unet(seed=7).state_dict())
    out, reloaded = lora_generation(compiler, unet, mods, args)
    assert reloaded.eager_calls == 2
    assert torch.allclose(out, eager(unet, args), atol=1e-5)
    for _ in range(2):
        out, after = lora_generation(compiler, unet, mods, args)
        assert torch.allclose(out, eager(unet, args), atol=1e-5)
    assert after.eager_calls == 0


def test_the_lora_forwards_give_way_to_torch_only_during_compiled_calls(lora):
    unet = hosts.make_unet()
    mods = host_modules()
    args = hosts.unet_inputs()
    network_forward = vars(nn.Linear)["forward"]
    torch_forward = hosts.patches.originals[hosts.PATCH_KEY][(nn.Linear, "forward")]
    assert network_forward is not torch_forward
    patches = compile_regions.lora_patches(mods)
    assert [(p.owner, p.replacement) for p in patches] == [
        (getattr(nn, name), hosts.patches.originals[hosts.PATCH_KEY][(getattr(nn, name), "forward")])
        for name in ("Linear", "Conv2d", "GroupNorm", "LayerNorm")
    ]
    inside: list[Any] = []
    outside: list[Any] = []
    unet.conv_in.register_forward_pre_hook(lambda *_: outside.append(vars(nn.Conv2d)["forward"]))
    unet.st.register_forward_pre_hook(lambda *_: outside.append(vars(nn.Linear)["forward"]))  # around our wrapper
    compiler = RegionalCompiler(backend=spy_backend(inside, lambda: vars(nn.Linear)["forward"]))
    with torch.no_grad(), compiler.apply(unet, SD_BLOCKS, key="k", **region(unet, mods)) as app:
        unet(*args)
        unet(*args)
    assert app.stats.calls == 2 and inside == [torch_forward, torch_forward]  # one graph per block
    assert outside and all(f is not torch_forward and f.__name__.startswith("network_") for f in outside)
    assert vars(nn.Linear)["forward"] is network_forward
    hosts.shared.opts.data["lora_functional"] = True  # the LoRA is computed in the forward itself: it must stay
    assert compile_regions.lora_patches(mods) == []


def test_no_lora_patches_without_the_lora_extension():
    assert compile_regions.lora_patches(host_modules()) == []  # torch's own forwards: nothing to swap
    assert compile_regions.lora_patches(HostModules({})) == []


# ----------------------------------------------------------------------------------------- interrupt


class Interrupted(BaseException):
    """A1111 modules/sd_samplers_common.py:142: ``InterruptedException`` is a BaseException."""


def test_interrupt_between_blocks_propagates_and_keeps_what_compiled():
    model = make_stack()
    args = inputs()
    before = eager(model, args)
    namespace = types.SimpleNamespace(value="host")
    patch = RegionPatch(namespace, "value", "ours")
    compiler = RegionalCompiler(backend="eager")
    checks: list[int] = []
    armed = [True]

    def interrupt() -> None:  # Interrupt pressed after the first block compiled
        checks.append(len(checks))
        if armed[0] and len(checks) > 1:
            raise Interrupted

    apply: dict[str, Any] = {"weights_token": lambda: "t", "interrupt": interrupt, "patches": [patch]}
    with pytest.raises(Interrupted), torch.no_grad(), compiler.apply(model, SD_BLOCKS, key="k", **apply) as app:
        model(*args)  # eager first calls: nothing compiled, no check
        assert checks == []
        model(*args)
    assert checks == [0, 1] and app.stats.graphs == 1 and app.stats.calls == 1  # the ResBlock compiled
    assert not app.stats.fell_back and compiler.failure(model, "k") is None
    assert all("forward" not in vars(b) for b in model.blocks) and namespace.value == "host"
    armed[0] = False
    out, again = generation(compiler, model, args, **apply)
    assert again.eager_calls == 0 and again.graphs == 1  # only the SpatialTransformer compiles now
    assert torch.allclose(out, before, atol=1e-5)
    _, third = generation(compiler, model, args, **apply)
    assert third.compiles == 0 and third.calls == 4
    assert torch.equal(eager(model, args), before)  # the model itself is untouched


def test_an_application_goes_on_after_skip():
    """Skip ends one image; the host catches the exception (sd_samplers_common.py:280-281), resets ``skipped`` at
    the next image (modules/processing.py:935-936) and goes on within the same generation."""
    model = make_stack()
    args = inputs()
    compiler = RegionalCompiler(backend="eager")
    skipped = [True]

    def interrupt() -> None:
        if skipped[0]:
            raise Interrupted

    apply: dict[str, Any] = {"weights_token": lambda: 1, "interrupt": interrupt}
    with torch.no_grad(), compiler.apply(model, SD_BLOCKS, key="k", **apply) as app:
        model(*args)
        with pytest.raises(Interrupted):
            model(*args)
        skipped[0] = False
        out = model(*args)
        assert app.active
    assert app.stats.graphs == 2 and app.stats.calls == 2 and not app.stats.fell_back
    assert torch.allclose(out, eager(model, args), atol=1e-5)


def test_interrupt_check_raises_the_hosts_exception():
    state = types.SimpleNamespace(interrupted=False, skipped=False)
    mods = HostModules(
        {
            "modules.shared": types.SimpleNamespace(state=state),
            "modules.sd_samplers_common": types.SimpleNamespace(InterruptedException=Interrupted),
        }
    )
    check = compile_regions.interrupt_check(mods)
    assert check is not None
    check()
    state.skipped = True
    with pytest.raises(Interrupted):
        check()
    state.skipped, state.interrupted = False, True
    with pytest.raises(Interrupted):
        check()
    assert compile_regions.interrupt_check(HostModules({})) is None


# ------------------------------------------------------------------------------------------- prepare


def test_prepare_runs_once_before_the_first_compiled_call_outside_the_patches():
    model = make_stack()
    args = inputs()
    namespace = types.SimpleNamespace(value="host")
    patches = [RegionPatch(namespace, "value", "ours")]
    events: list[str] = []
    compiler = RegionalCompiler(backend=spy_backend(events, lambda: f"compiled call sees {namespace.value}"))

    def prepare() -> None:
        events.append(f"prepare sees {namespace.value}")

    with torch.no_grad(), compiler.apply(model, SD_BLOCKS, key="k", patches=patches, prepare=prepare):
        model(*args)  # eager first calls only: nothing to prepare for yet
        assert events == []
        model(*args)
        model(*args)
    assert events == ["prepare sees host"] + ["compiled call sees ours"] * 4
    events.clear()
    generation(compiler, model, args, patches=patches, prepare=prepare)
    assert events == ["prepare sees host"] + ["compiled call sees ours"] * 2  # once per application


# ------------------------------------------------------------------------- the hosts' patterns, traced


def test_the_hosts_patterns_make_one_graph_per_block_and_no_graph_break(lora):
    unet = hosts.make_unet()
    mods = host_modules()
    hosts.loaded_networks[:] = [networks(unet)["style"]]
    compiler = RegionalCompiler(backend="eager")
    for size, graphs in ((8, 2), (8, 0), (12, None), (16, 0), (8, 0)):
        breaks0, graphs0, reads0 = graph_breaks(), unique_graphs(), hosts.statistics.reads
        args = hosts.unet_inputs(size)
        out, stats = lora_generation(compiler, unet, mods, args)
        assert graph_breaks() == breaks0, dict(counters["graph_break"])
        new = unique_graphs() - graphs0
        assert stats.graphs == new and not stats.fell_back
        if graphs is None:  # the first size change: each block at most once more, with symbolic sizes
            assert 1 <= new <= 2
        else:
            assert new == graphs  # one graph per block, then none
        if stats.eager_calls == 0:  # the statistics are read once, by prepare, never inside a compiled call
            assert hosts.statistics.reads == reads0 + 1
        assert torch.allclose(out, eager(unet, args), atol=1e-5)


def test_without_the_patches_the_same_blocks_break_the_graph(lora):
    """Proof that the test above can fail: the free-memory statistics break the graph on every torch; einops 0.4.1
    (the hosts' pin) fails on the symbolic sizes after a size change."""
    unet = hosts.make_unet()
    compiler = RegionalCompiler(backend="eager")
    breaks0 = graph_breaks()
    old_einops = einops.__version__.startswith("0.4.")
    with torch.no_grad(), compiler.apply(unet, SD_BLOCKS, key="k", weights_token=lambda: 1) as app:
        unet(*hosts.unet_inputs(8))
        unet(*hosts.unet_inputs(8))
        assert graph_breaks() > breaks0
        if old_einops:  # (einops 0.8 traces: the size change is only a cost there)
            unet(*hosts.unet_inputs(12))
    if old_einops:  # "unhashable type: 'SymInt'" inside einops (the reason keeps the first line)
        assert app.stats.fell_back and "rearrange" in app.stats.fallback_reason


# ---------------------------------------------------------------------------------- host glue pieces


def test_condfunc_patches_resolve_the_condfunc_once_per_wrapper():
    class Layer(nn.Module):
        def forward(self, x: int) -> str:
            return "original"

    hosts.CondFunc(Layer, "forward", lambda orig, self, x: f"sub({orig(self, x)})", lambda orig, self, x: x > 0)
    root = nn.Sequential(Layer(), hosts.make_unet())
    patches = compile_regions.condfunc_patches(root)
    assert {p.owner for p in patches} == {Layer, hosts.SpatialTransformer} and len(patches) == 2
    layer_patch = next(p for p in patches if p.owner is Layer)
    assert layer_patch.replacement(root[0], 1) == "sub(original)"
    assert layer_patch.replacement(root[0], -1) == "original"  # the condition still decides
    again = compile_regions.condfunc_patches(root)
    assert [p.replacement for p in again] == [p.replacement for p in patches]  # the same objects: no recompile
    assert compile_regions.condfunc_patches(make_stack()) == []  # no CondFunc, no patch


def test_einops_patches_cover_the_globals_of_loaded_modules_only():
    attention = types.SimpleNamespace(rearrange=einops.rearrange, repeat=einops.repeat)
    forge_attention = types.SimpleNamespace(einops=einops)
    mods = HostModules({"backend.nn.unet": attention, "backend.attention": forge_attention})
    patches = compile_regions.einops_patches(mods, "forge")
    assert [(p.owner, p.attr) for p in patches] == [
        (attention, "rearrange"),
        (attention, "repeat"),
        (forge_attention, "einops"),
    ]
    assert patches[0].replacement is einops_stand_in("rearrange", einops.rearrange)
    assert patches[2].replacement is einops_namespace(einops)
    assert compile_regions.einops_patches(HostModules({}), "forge") == []
    assert compile_regions.einops_patches(mods, "unknown family") == []


def test_free_memory_patch_is_one_frozen_figure_per_host_function(monkeypatch):
    real = hosts.get_free_memory
    memory = types.SimpleNamespace(get_free_memory=real)
    mods = HostModules({"backend.memory_management": memory, "modules.devices": types.SimpleNamespace(device="cpu")})
    patches, measure = compile_regions.free_memory_patch(mods, "forge")
    assert measure is not None and len(patches) == 1
    frozen = patches[0].replacement
    assert isinstance(frozen, FrozenFreeMemory) and frozen.real is real
    monkeypatch.setattr(hosts.statistics, "free", 5 << 30)
    monkeypatch.setattr(frozen, "figures", None)  # one per process: other tests measured it before
    measure()
    assert frozen() == 4 << 30 and frozen("cpu", True) == (4 << 30, 2 << 30)
    memory.get_free_memory = frozen  # left in place (an interrupted restore): looked through, the same object
    again, _ = compile_regions.free_memory_patch(mods, "forge")
    assert again[0].replacement is frozen and frozen.real is real
    assert compile_regions.free_memory_patch(HostModules({}), "forge") == ([], None)
    assert compile_regions.free_memory_patch(mods, "a1111") == ([], None)


def test_sdp_no_mem_runs_the_plain_forward_inside_its_kernel_choice():
    """A1111's sdp-no-mem forward enters ``torch.backends.cuda.sdp_kernel`` inside the block (a graph break on torch
    2.1): the compiled call runs the plain forward with the same kernel flags entered around it, and leaves the
    flags as they were."""
    torch.manual_seed(0)
    root = nn.Sequential(hosts.CrossAttention()).eval()
    mods = HostModules({"modules.sd_hijack_optimizations": hosts.sd_hijack_optimizations})
    changes = compile_regions.sdp_no_mem_patches(mods, root)
    patch, context = changes
    assert isinstance(patch, RegionPatch) and isinstance(context, RegionContext)
    assert (patch.owner, patch.attr) == (hosts.CrossAttention, "forward")
    assert patch.replacement is (
        traceable_function(hosts.scaled_dot_product_attention_forward) or hosts.scaled_dot_product_attention_forward
    )
    assert compile_regions.sdp_no_mem_patches(mods, make_stack()) == []  # no such forward: nothing entered

    mem_efficient: list[bool] = []  # as each compiled call sees it
    backends = torch.backends.cuda
    compiler = RegionalCompiler(backend=spy_backend(mem_efficient, backends.mem_efficient_sdp_enabled))
    before = (backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(), backends.math_sdp_enabled())
    x = torch.randn(2, 6, 8)
    breaks0 = graph_breaks()
    with warnings.catch_warnings():  # torch >= 2.3 calls sdp_kernel deprecated; A1111 calls it anyway
        warnings.simplefilter("ignore", FutureWarning)
        expected = eager(root, (x,))
        with torch.no_grad(), compiler.apply(root, ("CrossAttention",), key="k", patches=changes) as app:
            root(x)
            out = root(x)
    assert graph_breaks() == breaks0, dict(counters["graph_break"])
    assert app.stats.graphs == 1 and not app.stats.fell_back
    assert mem_efficient and not any(mem_efficient)  # off in every compiled call
    assert (backends.flash_sdp_enabled(), backends.mem_efficient_sdp_enabled(), backends.math_sdp_enabled()) == before
    assert vars(hosts.CrossAttention)["forward"] is hosts.scaled_dot_product_no_mem_attention_forward
    assert torch.allclose(out, expected, atol=1e-6)


def test_partial_patches_cover_the_loaded_sub_quadratic_modules():
    import functools

    from lib_optim.compile import traceable_partial

    subquad = types.SimpleNamespace(partial=functools.partial)
    mods = HostModules({"modules.sub_quadratic_attention": subquad})
    patches = compile_regions.partial_patches(mods, "a1111")
    assert [(p.owner, p.attr, p.replacement) for p in patches] == [(subquad, "partial", traceable_partial)]
    assert compile_regions.partial_patches(mods, "forge") == []  # Forge f2's torch 2.3 traces functools.partial
    assert compile_regions.partial_patches(HostModules({}), "a1111") == []


def test_the_settings_snapshot_ignores_new_settings_and_follows_changed_ones(monkeypatch):
    """A1111's ``Options.__getattr__`` looks names up in ``opts.data``: torch 2.1 guards the dict's key set, so a
    setting saved for the first time between two generations recompiled every attention block."""
    monkeypatch.setattr(hosts.shared.opts, "data", {"lora_functional": False, "upcast_attn": False})
    real_shared = hosts.shared
    mods = HostModules({"modules.sd_hijack_optimizations": hosts})
    patches, refresh = compile_regions.shared_patches(mods, "a1111")
    assert [(p.owner, p.attr) for p in patches] == [(hosts, "shared")] and refresh is not None
    torch.manual_seed(0)
    root = nn.Sequential(hosts.UpcastAttention()).eval()
    compiler = RegionalCompiler(backend="eager")
    x = torch.randn(2, 8)

    def generation_() -> tuple[torch.Tensor, CompileStats]:
        with (
            torch.no_grad(),
            compiler.apply(
                root, ("UpcastAttention",), key="k", patches=patches, prepare=refresh, weights_token=lambda: 1
            ) as app,
        ):
            root(x)
            out = root(x)
        return out, app.stats

    generation_()
    hosts.shared.opts.data["some_extension_setting"] = 1  # saved for the first time between two generations
    out, stats = generation_()
    assert stats.compiles == 0, stats.recompile_reasons
    assert torch.equal(out, eager(root, (x,)))
    hosts.shared.opts.data["upcast_attn"] = True  # a setting the blocks read changed: compiled again, followed
    out, stats = generation_()
    assert stats.compiles == 1
    assert torch.equal(out, eager(root, (x,))) and hosts.shared is real_shared
    again, _ = compile_regions.shared_patches(mods, "a1111")
    assert again[0].replacement is patches[0].replacement  # one snapshot per process: nothing to recompile


def test_without_the_snapshot_a_new_setting_recompiles_before_torch_2_5(monkeypatch):
    """Proof that the test above can fail: the guard it avoids (2.1: the key set; 2.3: the dict's length)."""
    from lib_optim.compile.blocks import torch_version

    monkeypatch.setattr(hosts.shared.opts, "data", {"lora_functional": False, "upcast_attn": False})
    root = nn.Sequential(hosts.UpcastAttention()).eval()
    compiler = RegionalCompiler(backend="eager")
    x = torch.randn(2, 8)
    counts = []
    for new_setting in (None, "some_extension_setting"):
        if new_setting:
            hosts.shared.opts.data[new_setting] = 1
        with torch.no_grad(), compiler.apply(root, ("UpcastAttention",), key="k", weights_token=lambda: 1) as app:
            root(x)
            root(x)
        counts.append(app.stats.compiles)
    if torch_version(torch.__version__) < (2, 5):
        assert counts == [1, 1] and app.stats.recompile_reasons, counts


def test_sdp_no_mem_patches_swap_nothing_when_the_host_lacks_those_forwards():
    """A host module without the no-mem forwards (an older or patched A1111) must not map classes that have no
    ``forward`` of their own onto the plain one."""
    partial_module = types.SimpleNamespace(
        scaled_dot_product_attention_forward=hosts.scaled_dot_product_attention_forward
    )
    mods = HostModules({"modules.sd_hijack_optimizations": partial_module})
    assert compile_regions.sdp_no_mem_patches(mods, nn.Sequential(hosts.CrossAttention(), nn.ReLU())) == []
