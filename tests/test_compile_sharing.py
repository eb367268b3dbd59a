"""Shared graphs before torch 2.5 (lib_optim.compile.sharing): identical blocks compile once, each runs with its own
parameters, and the cache keeps no block's weights alive.

Before torch 2.5 dynamo traces every module instance on its own and AOTAutograd keeps the instance's parameters in
the closure of the ``forward`` it returns; the backend reuses that function with another instance's parameters. From
2.5 on (the CI's torch) dynamo inlines modules and AOTAutograd's ``forward`` is built differently: the backend then
never reuses (checked here on every torch), and the sharing itself is tested only where it runs, torch < 2.5
(A1111 v1.10.1's 2.1.2, Forge f2's 2.3.1: run this file with their Pythons). ``inline_inbuilt_nn_modules=False``
cannot bring the old behaviour back on the CI's torch: from 2.8 the setting is deprecated and does nothing.
"""

from __future__ import annotations

import gc
import types
import weakref
from typing import Any

import pytest
import torch
from test_compile_region import Stack  # the same UNet level (one place for it)
from torch import nn

from lib_optim.compile.blocks import torch_version
from lib_optim.compile.regional import RegionalCompiler
from lib_optim.compile.sharing import SharedGraphBackend, graph_key

captured_parameters = pytest.mark.skipif(
    torch_version(str(torch.__version__)) >= (2, 5),
    reason="torch >= 2.5 passes parameters as graph inputs: nothing to share (run with torch 2.1.2/2.3.1)",
)


class Block(nn.Module):
    def __init__(self, width: int = 4) -> None:
        super().__init__()
        self.proj = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.register_buffer("scale", torch.linspace(1.0, 2.0, width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)).relu() * self.scale


def traced(module: nn.Module) -> torch.fx.GraphModule:
    """``module`` as a graph module holding its parameters, returning a tuple (as dynamo's graphs before 2.5)."""
    gm = torch.fx.symbolic_trace(module)
    output = next(node for node in gm.graph.nodes if node.op == "output")
    output.args = ((output.args[0],),)
    gm.recompile()
    return gm


def blocks(count: int = 2, width: int = 4) -> list[Block]:
    torch.manual_seed(0)
    return [Block(width).eval() for _ in range(count)]  # same shapes, different weights


def test_graph_key_is_equal_only_for_graphs_that_compile_alike(monkeypatch):
    a, b = blocks()
    x = torch.randn(2, 4)
    key = graph_key(traced(a), [x])
    assert key is not None and key == graph_key(traced(b), [x])  # different weights, same graph
    assert graph_key(traced(Block(8)), [torch.randn(2, 8)]) != key  # other parameter shapes
    assert graph_key(traced(a), [torch.randn(3, 4)]) != key  # other input shapes
    assert graph_key(traced(a), [x.t().contiguous().t()]) != key  # other strides
    with torch.no_grad():
        assert graph_key(traced(a), [x]) != key  # grad mode is compiled in
    assert graph_key(traced(blocks()[0].double()), [x.double()]) != key
    import torch._inductor.config as inductor_config

    # torch's own config patch (monkeypatch's undo breaks torch 2.13's config module: the option disappears)
    with inductor_config.patch(freezing=True):  # parameters baked into the code: never shared
        assert graph_key(traced(a), [x]) is None
    assert inductor_config.freezing is False


class WithConstant(Block):
    def __init__(self) -> None:
        super().__init__()
        self.offset = torch.ones(4)  # a plain tensor attribute: a constant of the graph, not a parameter or buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.offset


def test_a_graph_with_tensor_constants_is_never_shared():
    gm = traced(WithConstant())
    x = torch.randn(2, 4)
    assert graph_key(gm, [x]) is not None  # symbolic_trace made the constant a buffer: an input of AOT's function
    constant = gm.offset
    del gm._buffers["offset"]
    gm.offset = constant  # a plain attribute, as in dynamo's graphs (GraphModule built from a dict of attributes)
    assert "offset" not in dict(gm.named_buffers())
    assert graph_key(gm, [x]) is None


def test_without_an_aot_forward_every_graph_compiles():
    """An inner backend whose result is not AOTAutograd's ``forward`` (and AOTAutograd itself from torch 2.5 on): the
    backend cannot rebind it, so it compiles every graph and each block keeps its own parameters."""
    inner_calls: list[Any] = []

    def inner(gm: Any, example_inputs: Any) -> Any:
        inner_calls.append(gm)
        return gm.forward

    a, b = blocks()
    x = torch.randn(2, 4)
    for backend in (SharedGraphBackend(inner=inner), SharedGraphBackend(inner="aot_eager")):
        fa, fb = backend(traced(a), [x]), backend(traced(b), [x])
        with torch.no_grad():
            assert torch.allclose(fa(x)[0], a(x)) and torch.allclose(fb(x)[0], b(x))
        if backend.reused == 0:
            assert backend.compiles == 2 and backend.compiled == {}
    assert len(inner_calls) == 2


@captured_parameters
def test_identical_graphs_compile_once_and_run_with_each_blocks_parameters():
    a, b = blocks()
    x = torch.randn(2, 4)
    backend = SharedGraphBackend(inner="aot_eager")
    fa, fb = backend(traced(a), [x]), backend(traced(b), [x])
    assert backend.compiles == 1 and backend.reused == 1
    with torch.no_grad():
        assert torch.allclose(fa(x)[0], a(x)) and torch.allclose(fb(x)[0], b(x))
        assert not torch.allclose(fa(x)[0], fb(x)[0])  # not the first block's weights
        b.proj.weight.mul_(-1)  # changed in place: the live tensor is read
        assert torch.allclose(fb(x)[0], b(x))
    (wide,) = blocks(1, width=8)
    backend(traced(wide), [torch.randn(2, 8)])
    assert backend.compiles == 2 and backend.reused == 1  # another shape compiles


@captured_parameters
def test_the_cache_keeps_no_blocks_parameters_alive():
    a, b = blocks()
    x = torch.randn(2, 4)
    backend = SharedGraphBackend(inner="aot_eager")
    gm = traced(a)
    fa = backend(gm, [x])
    (template,) = backend.compiled.values()
    cells = dict(zip(template.__code__.co_freevars, template.__closure__ or (), strict=True))
    assert cells["params_flat"].cell_contents == [None] * 5  # proj weight and bias, norm weight and bias, scale
    weight = weakref.ref(a.proj.weight)
    del a, gm, fa
    gc.collect()
    assert weight() is None
    fb = backend(traced(b), [x])  # still reusable without them
    assert backend.reused == 1
    with torch.no_grad():
        assert torch.allclose(fb(x)[0], b(x))


@captured_parameters
def test_dynamo_in_front_shares_graphs_between_instances():
    a, b = blocks()
    x = torch.randn(2, 4)
    backend = SharedGraphBackend(inner="aot_eager")
    with torch.no_grad():
        out_a = torch.compile(a, backend=backend)(x)
        out_b = torch.compile(b, backend=backend)(x)
        assert torch.allclose(out_a, a(x)) and torch.allclose(out_b, b(x))
    assert backend.compiles == 1 and backend.reused == 1


def stack_generation(compiler: RegionalCompiler, model: nn.Module, args: tuple[torch.Tensor, ...]) -> Any:
    with torch.no_grad(), compiler.apply(model, ["ResBlock", "SpatialTransformer"], key="k") as app:
        model(*args)
        out = model(*args)
    with torch.no_grad():
        assert torch.allclose(out, model(*args), atol=1e-5)
    return app.stats


@captured_parameters
def test_regional_compile_per_instance_shares_the_graphs_of_identical_blocks():
    torch.manual_seed(0)
    model = Stack(pairs=3).eval()
    gen = torch.Generator().manual_seed(1)
    args = (torch.randn(2, 8, 8, 8, generator=gen), torch.randn(2, 16, generator=gen), torch.randn(2, 5, 16))
    compiler = RegionalCompiler(backend="aot_eager")
    stats = stack_generation(compiler, model, args)
    assert not stats.shared and stats.graphs == 6  # dynamo traces each of the 6 blocks...
    (backend,) = compiler._sharing.values()
    # ...AOT compiles fewer: the first pair sees inputs of another layout (strides) than the later ones, which share
    assert backend.compiles + backend.reused == 6 and backend.reused >= 2
    compiles = backend.compiles
    assert stack_generation(compiler, model, args).compiles == 0
    block = model.blocks[4]  # a new Parameter (Forge's LoRA patcher): that block is traced again and shares again
    block.out_layers[2].weight = nn.Parameter(torch.randn_like(block.out_layers[2].weight))
    stats = stack_generation(compiler, model, args)
    assert stats.rebuilt_for_weights == 1 and backend.compiles == compiles and backend.reused == 7 - compiles


@captured_parameters
@pytest.mark.skipif(torch_version(str(torch.__version__)) < (2, 2), reason="torch 2.1's dynamo keeps them itself")
def test_regional_compile_lets_an_unloaded_models_weights_go():
    torch.manual_seed(0)
    model = Stack(pairs=2).eval()
    args = (torch.randn(2, 8, 8, 8), torch.randn(2, 16), torch.randn(2, 5, 16))
    compiler = RegionalCompiler(backend="aot_eager")
    stack_generation(compiler, model, args)
    assert compiler._sharing
    weights = [weakref.ref(p) for p in model.parameters()]
    del model
    for _ in range(3):  # dynamo's graphs hold cycles that take more than one pass
        gc.collect()
    assert all(w() is None for w in weights)


def test_rebinding_needs_the_aot_closure():
    """What rebind refuses: a function without AOTAutograd's cells, or one with another parameter count."""
    from lib_optim.compile.sharing import rebind

    assert rebind(lambda *args: args, traced(Block())) is None

    def forward(*runtime_args: Any) -> Any:
        return compiled_fn([*params_flat, *runtime_args])

    params_flat: list[Any] = [None]
    compiled_fn = types.SimpleNamespace  # stands in for AOTAutograd's compiled function
    assert rebind(forward, traced(Block())) is None  # five parameters and buffers, not one
