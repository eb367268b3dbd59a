"""Regional torch.compile: reuse, dynamic sizes, exact restore, attention switch, fresh weights, fallback.

Real torch and real dynamo throughout. Most tests compile with the ``eager``/``aot_eager`` backends (dynamo
traces for real, no code generation) to stay fast; one compiles with inductor on the CPU. The models come
from :mod:`lib_optim.bench.compile`, our re-creation of the ldm/Forge UNet block structure. No test depends
on timing: the compile-seconds accounting runs on an injected clock.
"""

from __future__ import annotations

import gc
import logging
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from lib_optim.bench import compile as cb
from lib_optim.compile import availability, blocks, dynamo
from lib_optim.compile import regional as rc
from lib_optim.compile.availability import compile_availability, describe_compile_error
from lib_optim.compile.regional import CompileStats, RegionalCompiler
from lib_optim.compile.sharing import SharedGraphBackend

SD_BLOCKS = blocks.default_block_names("sd")


class Stack(nn.Module):
    """One UNet level: ResBlock/SpatialTransformer pairs at one width, called the way the UNet calls them."""

    def __init__(self, pairs: int = 1, channels: int = 8, context_dim: int = 16):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(pairs):
            self.blocks.append(cb.ResBlock(channels, 16, channels, groups=4))
            self.blocks.append(cb.SpatialTransformer(channels, context_dim, heads=2, groups=4))

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        options: dict[str, Any] = {}
        for index, block in enumerate(self.blocks):
            options["block"] = ("input", index)
            x = block(x, emb) if isinstance(block, cb.ResBlock) else block(x, context, options)
        return x


def inputs(batch: int = 2, size: int = 8, channels: int = 8, tokens: int = 5) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1234 + batch * 100 + size)
    return (
        torch.randn(batch, channels, size, size, generator=gen),
        torch.randn(batch, 16, generator=gen),
        torch.randn(batch, tokens, 16, generator=gen),
    )


def make_stack(pairs: int = 1) -> Stack:
    torch.manual_seed(0)
    return Stack(pairs).eval()


def generation(
    compiler: RegionalCompiler, model: nn.Module, args: tuple[torch.Tensor, ...], *, key: Any = "sdpa", **kw: Any
) -> tuple[torch.Tensor, CompileStats]:
    """One compiled "generation": two UNet calls (the first of each block runs eagerly by design)."""
    with torch.no_grad(), compiler.apply(model, SD_BLOCKS, key=key, **kw) as app:
        model(*args)
        out = model(*args)
    return out, app.stats


def eager(model: nn.Module, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.no_grad():
        return model(*args)


class FakeClock:
    """Advances one second per reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def messages() -> Iterator[list[str]]:
    """Log lines of lib_optim.compile.regional at INFO and above."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger("lib_optim.compile.regional")
    handler = Keep(level=logging.INFO)
    old_level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def dynamo_limits() -> dict[str, int]:
    from torch._dynamo import config

    names = [n for n in dynamo._limit_names() if n is not None]
    return {n: int(getattr(config, n)) for n in names}


# ----------------------------------------------------------------------------- choosing blocks, values


def test_default_block_names_per_family():
    assert blocks.default_block_names("sd") == ("ResBlock", "SpatialTransformer")
    assert blocks.default_block_names("SDXL") == blocks.default_block_names("sd15") == blocks.default_block_names("sd")
    assert blocks.default_block_names("chroma") == ("DoubleStreamBlock", "SingleStreamBlock")
    with pytest.raises(ValueError, match=r"family='kandinsky'.*allowed: .*flux"):
        blocks.default_block_names("kandinsky")


def test_select_blocks_keeps_the_outermost_matches_in_module_order():
    unet = cb.TinyUNet()
    chosen = blocks.select_blocks(unet, ["SpatialTransformer", "BasicTransformerBlock", "ResBlock"])
    names = [type(m).__name__ for m in chosen]
    assert "BasicTransformerBlock" not in names  # inside a SpatialTransformer: covered by it
    assert names.count("ResBlock") == 8 and names.count("SpatialTransformer") == 7
    assert chosen == [m for m in unet.modules() if type(m).__name__ in ("ResBlock", "SpatialTransformer")]
    # explicit module lists are reduced the same way
    st = chosen[1]
    app = RegionalCompiler(backend="eager").apply(unet, [st, st.transformer_blocks[0]])
    assert app.blocks == [st]


def test_modes_and_inductor_mode_never_use_cuda_graphs():
    assert blocks.MODES == ("off", "on", "max-autotune")
    assert blocks.inductor_mode("on") is None
    assert blocks.inductor_mode("max-autotune") == "max-autotune-no-cudagraphs"
    with pytest.raises(ValueError, match=r"mode='reduce-overhead' is not allowed; allowed: off, on, max-autotune"):
        RegionalCompiler(backend="eager").apply(make_stack(), SD_BLOCKS, mode="reduce-overhead")


def test_max_autotune_passes_the_no_cudagraphs_mode_to_torch_compile(monkeypatch):
    seen: list[dict[str, Any]] = []

    def recording_compile(fn, **kwargs):
        seen.append(kwargs)
        return fn  # run the trampoline eagerly: only the arguments matter here

    monkeypatch.setattr(torch, "compile", recording_compile)
    model = make_stack()
    out, _ = generation(RegionalCompiler(backend="inductor"), model, inputs(), mode="max-autotune")
    assert seen
    for kwargs in seen:
        backend = kwargs["backend"]
        if isinstance(backend, SharedGraphBackend):  # torch < 2.5: inductor, in that mode, behind the sharing backend
            config = backend.inner.config
            assert "mode" not in kwargs and config.get("max_autotune") and not config.get("triton.cudagraphs")
        else:
            assert kwargs["mode"] == "max-autotune-no-cudagraphs" and backend == "inductor"
    assert torch.equal(out, eager(model, inputs()))


def test_off_changes_nothing():
    model = make_stack()
    with RegionalCompiler(backend="eager").apply(model, SD_BLOCKS, mode="off") as app:
        assert all("forward" not in vars(b) for b in model.blocks)
        assert not app.active
    assert app.stats.to_dict()["mode"] == "off" and app.stats.compiles == 0


# ------------------------------------------------------------------------------------------- restore


def test_restore_is_exact_and_applying_twice_replaces_the_first_application():
    model = make_stack(pairs=2)
    res, st = model.blocks[0], model.blocks[1]

    def own_forward(*args: Any, **kwargs: Any) -> Any:  # someone else's instance-level forward
        return type(res).forward(res, *args, **kwargs)

    res.forward = own_forward
    compiler = RegionalCompiler(backend="eager")
    first = compiler.apply(model, SD_BLOCKS, key="a")
    first.__enter__()
    assert res.forward is not own_forward and "forward" in vars(st)
    with compiler.apply(model, SD_BLOCKS, key="b") as second:
        assert first.closed  # the first application was removed before the second was put in place
        assert second.active and vars(res)["forward"] is not own_forward
    assert vars(res)["forward"] is own_forward  # the exact object is back
    assert all("forward" not in vars(b) for b in model.blocks[1:])  # no instance attribute where none was
    first.__exit__(None, None, None)  # closing the replaced one again changes nothing
    assert vars(res)["forward"] is own_forward and "forward" not in vars(st)


def test_restore_happens_when_the_generation_raises():
    model = make_stack()
    compiler = RegionalCompiler(backend="eager")
    with pytest.raises(KeyError), compiler.apply(model, SD_BLOCKS):
        raise KeyError("sampler failed")
    assert all("forward" not in vars(b) for b in model.blocks)


def test_an_application_is_entered_once():
    app = RegionalCompiler(backend="eager").apply(make_stack(), SD_BLOCKS)
    with app:
        pass
    with pytest.raises(RuntimeError, match="entered once"), app:
        pass


# --------------------------------------------------------------------------------- compile once, reuse


def test_second_generation_reuses_the_compiled_blocks(messages):
    model = make_stack()
    args = inputs()
    compiler = RegionalCompiler(backend="eager")
    out1, first = generation(compiler, model, args)
    out2, second = generation(compiler, model, args)
    reference = eager(model, args)
    assert torch.allclose(out1, reference, atol=1e-5) and torch.allclose(out2, reference, atol=1e-5)
    assert first.compiles >= 2 and first.graphs == 2  # one graph per block: ResBlock and SpatialTransformer
    assert second.compiles == 0 and second.graphs == 0
    assert second.calls == 2 and second.eager_calls == 2  # the first call of each block ran eagerly
    assert second.process_compiles == first.compiles == compiler.total_compiles
    assert sum("first run only" in m for m in messages) == 1  # announced once per model and key
    assert all(m.startswith("[Optim]") for m in messages)


def test_size_and_batch_changes_recompile_once_then_reuse():
    model = make_stack()
    compiler = RegionalCompiler(backend="eager")
    graphs = []
    for size in (8, 12, 16, 8):
        out, stats = generation(compiler, model, inputs(size=size))
        assert torch.allclose(out, eager(model, inputs(size=size)), atol=1e-5)
        graphs.append(stats.graphs)
    assert graphs[0] == 2
    assert graphs[1] <= 2  # the first size change: at most one recompile per distinct block setting
    assert graphs[2:] == [0, 0]  # later sizes, and the first one again, reuse what is compiled
    per_batch = []
    for batch in (3, 4):
        out, stats = generation(compiler, model, inputs(batch=batch, size=16))
        assert torch.allclose(out, eager(model, inputs(batch=batch, size=16)), atol=1e-5)
        per_batch.append(stats.graphs)
    assert per_batch[0] <= 2 and per_batch[1] == 0


def test_switching_attention_compiles_its_variant_once_and_keeps_both(monkeypatch):
    model = make_stack()
    args = inputs()
    compiler = RegionalCompiler(backend="eager")
    sdpa = cb.sdpa_attention
    naive = cb.naive_attention
    # the two implementations really differ in the last bits, so a stale one would show
    runs = []
    for attention in (sdpa, naive, sdpa, naive):
        monkeypatch.setattr(cb, "attention_function", attention)
        out, stats = generation(compiler, model, args, key=attention)
        assert torch.allclose(out, eager(model, args), atol=1e-5)
        runs.append(stats.graphs)
    assert runs[0] == 2 and runs[1] >= 1  # the new attention compiled its own variant...
    assert runs[2:] == [0, 0]  # ...and both stayed cached


def test_attention_key_separates_implementations_dynamo_would_confuse(monkeypatch):
    """Swapping a class attribute (A1111's attention switch) is invisible to dynamo's guards; the key is not."""
    model = make_stack()
    args = inputs()
    compiler = RegionalCompiler(backend="eager")
    generation(compiler, model, args, key="sdpa")

    def doubled_forward(self: cb.CrossAttention, x: torch.Tensor, context: torch.Tensor | None = None):
        context = x if context is None else context
        return 2 * self.to_out(cb.attention_function(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))

    monkeypatch.setattr(cb.CrossAttention, "forward", doubled_forward)
    out, stats = generation(compiler, model, args, key="doubled")
    assert stats.graphs >= 1
    assert torch.allclose(out, eager(model, args), atol=1e-5)


# ------------------------------------------------------------------------------------------- weights


def test_weights_changed_in_place_or_replaced_are_used(monkeypatch):
    model = make_stack()
    args = inputs()
    compiler = RegionalCompiler(backend="aot_eager")  # aot captures parameters: where staleness would show
    out, _ = generation(compiler, model, args)
    assert torch.allclose(out, eager(model, args), atol=1e-5)
    res, st = model.blocks[0], model.blocks[1]
    linear = st.transformer_blocks[0].attn1.to_q
    with torch.no_grad():
        res.in_layers[2].weight.mul_(1.5)  # in place, like A1111's LoRA copy_ into the weight
        linear.weight.copy_(torch.randn_like(linear.weight))
    out, _ = generation(compiler, model, args)
    assert torch.allclose(out, eager(model, args), atol=1e-5)
    # new Parameter objects, like Forge's patcher (backend/utils.py:57 set_attr_raw of a new Parameter)
    res.out_layers[2].weight = nn.Parameter(torch.randn_like(res.out_layers[2].weight), requires_grad=False)
    linear.weight = nn.Parameter(linear.weight * -1, requires_grad=False)
    out, stats = generation(compiler, model, args)
    assert torch.allclose(out, eager(model, args), atol=1e-5)
    if not stats.shared:  # torch < 2.5 captures parameters: the two changed blocks were rebuilt
        assert stats.rebuilt_for_weights == 2
    # .data swapped on the same Parameter object
    linear.weight.data = torch.randn_like(linear.weight)
    out, stats = generation(compiler, model, args)
    assert torch.allclose(out, eager(model, args), atol=1e-5)
    assert stats.rebuilt_for_weights == 0


def test_a_plain_value_a_block_holds_is_never_stale():
    """Before torch 2.5 dynamo guards no attribute of a module (plain ``torch.compile`` keeps the old value too):
    the fingerprint sees the change and that block compiles again; from 2.5 dynamo's own guards do."""
    model = make_stack()
    args = inputs()
    compiler = RegionalCompiler(backend="aot_eager")
    generation(compiler, model, args)
    attn = model.blocks[1].transformer_blocks[0].attn1
    before = eager(model, args)
    attn.heads = 4  # what an extension changing a block's setting between generations does
    expected = eager(model, args)
    assert not torch.allclose(expected, before, atol=1e-4)  # the change matters, or this test proves nothing
    out, stats = generation(compiler, model, args)
    assert torch.allclose(out, expected, atol=1e-5)
    if not stats.shared:
        assert stats.rebuilt_for_weights == 1
    out, stats = generation(compiler, model, args)
    assert stats.compiles == 0 and stats.rebuilt_for_weights == 0  # unchanged since: reused


class LazyLoraLinear(nn.Linear):
    """A1111's LoRA applies the selected networks in place on the first forward after the selection changed
    (extensions-builtin/Lora/networks.py:578-590 → network_apply_weights, 411-498)."""

    wanted = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        current = getattr(self, "current", 0.0)
        if current != self.wanted:
            with torch.no_grad():
                self.weight.add_(self.wanted - current)
            self.current = self.wanted
        return super().forward(x)


def test_lazy_first_forward_weight_edits_run_eagerly_and_are_not_replayed():
    model = make_stack()
    attn = model.blocks[1].transformer_blocks[0].attn1
    lazy = LazyLoraLinear(8, 8, bias=False)
    lazy.weight = attn.to_q.weight
    attn.to_q = lazy
    args = inputs()
    compiler = RegionalCompiler(backend="aot_eager")
    for wanted in (0.25, 0.25, -0.5):
        LazyLoraLinear.wanted = wanted
        out, _ = generation(compiler, model, args)
        assert getattr(lazy, "current", 0.0) == wanted
        assert torch.allclose(out, eager(model, args), atol=1e-5)  # the edit happened once, not per call


# ------------------------------------------------------------------------------------------ failures


def failing_backend(gm: Any, example_inputs: Any) -> Any:
    failing_backend.calls += 1  # type: ignore[attr-defined]
    raise RuntimeError("C++ compile error: g++: command not found")


failing_backend.calls = 0  # type: ignore[attr-defined]


def test_compile_error_falls_back_to_eager_once_and_is_remembered(messages):
    model = make_stack()
    args = inputs()
    failing_backend.calls = 0  # type: ignore[attr-defined]
    compiler = RegionalCompiler(backend=failing_backend)
    with torch.no_grad(), compiler.apply(model, SD_BLOCKS, key="sdpa") as app:
        model(*args)  # eager first calls
        out = model(*args)  # the first compiled call fails → eager rerun
        assert all("forward" not in vars(b) for b in model.blocks)  # eager forwards restored at once
        assert not app.active
        again = model(*args)
    reference = eager(model, args)
    assert torch.equal(out, reference) and torch.equal(again, reference)
    assert app.stats.fell_back and "C++ compiler" in app.stats.fallback_reason
    warnings = [m for m in messages if "failed" in m]
    assert len(warnings) == 1 and warnings[0].startswith("[Optim]") and "C++ compiler" in warnings[0]
    calls = failing_backend.calls  # type: ignore[attr-defined]
    out, stats = generation(compiler, model, args, key="sdpa")
    assert failing_backend.calls == calls  # type: ignore[attr-defined]  # not retried for this model and key
    assert stats.fell_back and stats.fallback_reason.startswith("failed before")
    assert compiler.failure(model, "sdpa") is not None and compiler.failure(model, "other") is None
    assert torch.equal(out, reference)
    assert len([m for m in messages if "failed" in m]) == 1  # still one line


class Exploding(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 2:
            raise ValueError("batch too large for this block")
        return x * 2


class Holder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = Exploding()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


def test_an_error_the_eager_block_raises_too_propagates_and_is_not_remembered():
    model = Holder()
    compiler = RegionalCompiler(backend="eager")
    with compiler.apply(model, ["Exploding"], key="k") as app:
        model(torch.ones(1, 3))
        with pytest.raises(ValueError, match="batch too large"):
            model(torch.ones(4, 3))
    assert compiler.failure(model, "k") is None
    assert "failed eagerly too" in app.stats.fallback_reason


def oom_at_run_backend(gm: Any, example_inputs: Any) -> Any:
    def run(*args: Any) -> Any:
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    return run


def oom_at_compile_backend(gm: Any, example_inputs: Any) -> Any:
    raise torch.cuda.OutOfMemoryError("CUDA out of memory while autotuning")


@pytest.mark.parametrize("backend", [oom_at_run_backend, oom_at_compile_backend])
def test_out_of_memory_is_not_a_compile_error(backend):
    model = make_stack()
    args = inputs()
    compiler = RegionalCompiler(backend=backend)
    # the host's OOM type varies (torch.OutOfMemoryError, RuntimeError): what counts is that it is an OOM
    with (
        pytest.raises(Exception, match="out of memory") as caught,
        torch.no_grad(),
        compiler.apply(model, SD_BLOCKS, key="k") as app,
    ):
        model(*args)
        model(*args)
    assert rc.is_out_of_memory(caught.value)
    assert not app.stats.fell_back and compiler.failure(model, "k") is None  # the OOM retry may compile again
    assert all("forward" not in vars(b) for b in model.blocks)


class Interrupted(BaseException):
    """Like A1111's sd_samplers_common.InterruptedException, a BaseException."""


def test_interrupts_propagate_untouched():
    def interrupting_backend(gm: Any, example_inputs: Any) -> Any:
        raise Interrupted

    model = make_stack()
    compiler = RegionalCompiler(backend=interrupting_backend)
    with pytest.raises(Interrupted), torch.no_grad(), compiler.apply(model, SD_BLOCKS, key="k") as app:
        model(*inputs())
        model(*inputs())
    assert not app.stats.fell_back and compiler.failure(model, "k") is None


# ------------------------------------------------------------------------------- cache size limit


class Positional(nn.Module):
    """A cheap block that, like Forge's BasicTransformerBlock, looks its position up in a patch table: dynamo
    guards on the position, so every instance adds one entry to a shared compiled function."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, options: dict[str, Any]) -> torch.Tensor:
        position = options["block"]
        patches = options.get("patches_replace", {})
        return patches[position](x) if position in patches else x + self.proj(x)


class PositionalStack(nn.Module):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Positional() for _ in range(count)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        options: dict[str, Any] = {}
        for index, block in enumerate(self.blocks):
            options["block"] = ("input", index)
            x = block(x, options)
        return x


def test_more_blocks_than_dynamo_default_limit_all_stay_compiled():
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list

    torch.manual_seed(0)
    model = PositionalStack(12).eval()
    x = torch.randn(2, 4)
    before = dynamo_limits()
    compiler = RegionalCompiler(backend="eager")
    with torch.no_grad(), compiler.apply(model, ["Positional"], key="k") as app:
        model(x)
        out = model(x)
        during = dynamo_limits()
        functions = {id(slot.compiled): slot.compiled for slot in app._slots}
    assert torch.allclose(out, eager(model, (x,)), atol=1e-6)
    assert app.stats.calls == 12 and app.stats.limit_hits == 0 and app.stats.eager_frames == 0
    entries = [len(_debug_get_cache_entry_list(f.code)) for f in functions.values()]
    if app.stats.shared:
        # one function for all 12: past the default limit of 8, which was raised for the generation
        assert entries == [12] and all(value >= 4 * 12 for value in during.values())
    else:
        assert entries == [1] * 12  # torch < 2.5: one function per block
    assert dynamo_limits() == before  # restored exactly
    with torch.no_grad(), compiler.apply(model, ["Positional"], key="k") as again:
        model(x)
        model(x)
    assert again.stats.compiles == 0 and again.stats.calls == 12


def test_a_unet_with_many_blocks_matches_eager():
    torch.manual_seed(0)
    unet = cb.TinyUNet(channel_mult=(1, 1, 1), num_res_blocks=1, attention_levels=()).eval()
    args = (torch.randn(2, 4, 8, 8), torch.full((2,), 10.0), torch.randn(2, 5, 16))
    compiler = RegionalCompiler(backend="eager")
    out, stats = generation(compiler, unet, args)
    assert stats.blocks == 12 and stats.calls == 12 and stats.limit_hits == 0
    assert torch.allclose(out, eager(unet, args), atol=1e-5)
    assert all("forward" not in vars(m) for m in unet.modules())


@pytest.fixture
def dynamo_limit_of_one() -> Iterator[str]:
    """dynamo's per-function limit set to 1 for the test (monkeypatch would delete torch's config entry)."""
    from torch._dynamo import config

    name = next(n for n in dynamo._limit_names() if n is not None)
    old = getattr(config, name)
    setattr(config, name, 1)
    try:
        yield name
    finally:
        setattr(config, name, old)


def test_hitting_the_limit_anyway_is_detected_and_the_block_goes_eager(dynamo_limit_of_one, messages):
    from torch._dynamo import config

    model = make_stack()
    compiler = RegionalCompiler(backend="eager", entries_per_block=1)
    stats = []
    for size in (8, 9, 10):
        out, s = generation(compiler, model, inputs(size=size), dynamic=False)  # every size a new entry
        assert torch.allclose(out, eager(model, inputs(size=size)), atol=1e-5)
        stats.append(s)
    assert stats[0].limit_hits == 0 and stats[1].limit_hits >= 1
    assert sum("recompile limit" in m for m in messages) >= 1
    assert getattr(config, dynamo_limit_of_one) == 1  # our raise was undone


# ------------------------------------------------------------------------------ stats and lifetime


def test_compile_and_run_seconds_come_from_the_injected_clock():
    model = make_stack()
    clock = FakeClock()
    compiler = RegionalCompiler(backend="eager", clock=clock)
    with torch.no_grad(), compiler.apply(model, SD_BLOCKS, key="k") as app:
        model(*inputs())  # eager first calls: not timed
        model(*inputs())  # compiles: 2 calls × 1 s
        model(*inputs())  # runs: 2 calls × 1 s
        model(*inputs())
    assert app.stats.compile_seconds == 2.0 and app.stats.run_seconds == 4.0
    assert compiler.total_compile_seconds == 2.0
    data = app.stats.to_dict()
    assert data["compile_seconds"] == 2.0 and data["calls"] == 6 and data["blocks"] == 2 and data["key"] == "k"


def test_on_compile_callback_once_per_model_and_key():
    said: list[str] = []
    compiler = RegionalCompiler(backend="eager", on_compile=said.append)
    model = make_stack()
    generation(compiler, model, inputs(), key="a")
    generation(compiler, model, inputs(), key="a")
    assert len(said) == 1 and "first run only" in said[0]
    generation(compiler, model, inputs(), key="b")
    assert len(said) == 2


def test_the_cache_does_not_keep_the_model_alive():
    model = make_stack()
    compiler = RegionalCompiler(backend="aot_eager")
    generation(compiler, model, inputs())
    ref = weakref.ref(model)
    block_ref = weakref.ref(model.blocks[1])
    del model
    gc.collect()
    assert ref() is None and block_ref() is None


def test_forget_drops_compiled_code_and_failures():
    model = make_stack()
    compiler = RegionalCompiler(backend="eager")
    generation(compiler, model, inputs())
    compiler.forget(model)
    _, stats = generation(compiler, model, inputs())
    assert stats.graphs == 2  # compiled anew


# ---------------------------------------------------------------------------------- availability


def test_availability_names_the_fix():
    ok, reason = compile_availability("cpu", which=lambda name: None, environ={}, platform="linux")
    assert not ok and reason == "install a C++ compiler (gcc/clang) or set CXX"
    ok, reason = compile_availability("cpu", which=lambda name: f"/usr/bin/{name}", environ={}, platform="linux")
    assert ok and reason == ""
    ok, reason = compile_availability("cpu", which=lambda name: None, environ={"CXX": "/nope/g++"}, platform="linux")
    assert not ok and "set CXX" in reason
    ok, reason = compile_availability("mps")
    assert not ok and "DirectML/MPS" in reason
    ok, _ = compile_availability("mps", backend="aot_eager")
    assert ok


def test_availability_without_triton(monkeypatch):
    monkeypatch.setattr(availability.importlib.util, "find_spec", lambda name: None)
    ok, reason = compile_availability("cuda", platform="linux")
    assert not ok and reason.startswith("install triton (pip install triton)")
    ok, reason = compile_availability("cuda", platform="win32")
    assert not ok and "triton-windows" in reason


def test_availability_on_old_torch(monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.0.1")
    ok, reason = compile_availability("cpu")
    assert not ok and reason.startswith("torch >= 2.1 needed") and "2.0.1" in reason


def test_describe_compile_error_names_the_fix():
    class InvalidCxxCompiler(RuntimeError):
        pass

    class BackendCompilerFailed(RuntimeError):
        pass

    wrapped = BackendCompilerFailed("backend='inductor' raised")
    wrapped.__cause__ = InvalidCxxCompiler("No working C++ compiler found in cpp_builder")
    assert "install a C++ compiler" in describe_compile_error(wrapped)
    assert "python3-dev" in describe_compile_error(RuntimeError("fatal error: Python.h: No such file"))
    triton = RuntimeError("Cannot find a working triton installation. More information on installing Triton")
    assert describe_compile_error(triton).startswith("install triton")
    assert describe_compile_error(ValueError("odd\nmore")) == "ValueError: odd"


# -------------------------------------------------------------------------------- inductor on CPU


@pytest.mark.skipif(not compile_availability("cpu")[0], reason="no C++ compiler for inductor's CPU backend")
def test_inductor_on_cpu_matches_eager_and_compiles_once(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "compile_threads", 1)  # no worker pool to start in a unit test
    model = make_stack()
    args = inputs()
    compiler = RegionalCompiler(backend="inductor")
    out, first = generation(compiler, model, args)
    assert not first.fell_back, first.fallback_reason
    assert first.graphs == 2
    assert torch.allclose(out, eager(model, args), atol=1e-4, rtol=1e-4)
    out, second = generation(compiler, model, args)
    assert second.compiles == 0 and second.graphs == 0
    assert torch.allclose(out, eager(model, args), atol=1e-4, rtol=1e-4)


def test_a_recompile_says_which_guard_failed():
    model = make_stack()
    compiler = RegionalCompiler(backend="eager")
    _, stats = generation(compiler, model, inputs(size=8))
    assert stats.recompile_reasons == []  # a first compile is not a recompile
    _, stats = generation(compiler, model, inputs(size=12))
    assert stats.compiles > 0 and stats.recompile_reasons, stats
    assert all("size" in reason or "stride" in reason for reason in stats.recompile_reasons), stats.recompile_reasons
    assert len(stats.recompile_reasons) <= rc.MAX_RECOMPILE_REASONS
    _, stats = generation(compiler, model, inputs(size=12))
    assert stats.compiles == 0 and stats.recompile_reasons == []
