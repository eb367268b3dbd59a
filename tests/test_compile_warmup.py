"""The compile warm-up: a loaded model's blocks compiled in the background, exactly as a generation compiles them.

Real torch and real dynamo with the ``eager`` backend (dynamo traces for real, nothing waits for a C++ build), on
:mod:`lib_optim.bench.compile`'s re-creation of the ldm UNet. Threads are orchestrated with events; the clock is
injected; no test depends on speed.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from fake_adapter import FakeAdapter

from lib_optim.bench import compile as cb
from lib_optim.compile import CompileWarmup, WarmupPart, WarmupState, WarmupTarget, blocks
from lib_optim.compile.regional import RegionalCompiler
from lib_optim.hosts import warmup as host_warmup
from lib_optim.runtime import Runtime
from lib_optim.settings import Attention, Compile, GenerationSettings, Tri
from lib_optim.vae import model as vae_model

SD_BLOCKS = blocks.default_block_names("sd")
VAE_BLOCKS = blocks.default_block_names("vae")
TOKEN = "weights as loaded"  # the host's weights token (A1111: the LoRA selection), unchanged between the calls
DEADLINE = 60.0  # seconds a test waits for an event before it fails: never reached when the code is right


class Clock:
    """Advances one second per reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def unet() -> cb.TinyUNet:
    """The smallest ldm-shaped UNet: one level, one ResBlock and no attention there, the middle block (ResBlock,
    SpatialTransformer, ResBlock), two output ResBlocks: six blocks, four distinct shapes."""
    torch.manual_seed(0)
    return cb.TinyUNet(channel_mult=(1,), num_res_blocks=1, attention_levels=()).eval()


def unet_inputs(batch: int = 2, size: int = 8) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(7)
    return (
        torch.randn(batch, 4, size, size, generator=gen),
        torch.full((batch,), 500.0),
        torch.randn(batch, 5, 16, generator=gen),
    )


def target_for(
    compiler: RegionalCompiler,
    model: torch.nn.Module,
    *,
    forward: Callable[[], None] | None = None,
    busy: Callable[[], bool] = lambda: False,
    hold: Callable[[], Any] = contextlib.nullcontext,
    vae: TinyVae | None = None,
) -> WarmupTarget:
    """What a host hands the warm-up: the generation's compile applications (same compiler, key, blocks, mode,
    weights token) with the warm-up's check as their interrupt, one UNet call, and with ``vae`` its decode."""
    args = unet_inputs()

    def run() -> None:
        with torch.no_grad():
            model(*args)

    @contextlib.contextmanager
    def enter(interrupt: Callable[[], None]) -> Iterator[Any]:
        with compiler.apply(model, SD_BLOCKS, key="sdpa", weights_token=lambda: TOKEN, interrupt=interrupt) as app:
            if vae is None:
                yield [WarmupPart(app)]
                return
            with compiler.apply(vae, VAE_BLOCKS, key="vae", interrupt=interrupt, lazy_weights=False) as vae_app:
                yield [WarmupPart(app), WarmupPart(vae_app, within=vae.decoder)]

    def decode() -> None:
        assert vae is not None
        with torch.no_grad():
            vae(vae_input())

    return WarmupTarget(
        enter=enter,
        forward=forward or run,
        decode=decode if vae is not None else None,
        family="sd",
        width=64,
        height=64,
        busy=busy,
        hold=hold,
    )


class TinyVae(torch.nn.Module):
    """The VAE's block kinds as the hosts name them (``ResnetBlock``, ``AttnBlock``; lib_optim.vae.model re-creates
    ldm's) in an encoder and a decoder, as ldm's ``AutoencoderKL`` holds them; the decode runs the decoder only."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(vae_model.ResnetBlock(32, 32))
        self.decoder = torch.nn.Sequential(
            vae_model.ResnetBlock(32, 64), vae_model.ResnetBlock(64, 64), vae_model.AttnBlock(64)
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)  # type: ignore[no-any-return]


def tiny_vae() -> TinyVae:
    torch.manual_seed(1)
    return TinyVae().eval()


def vae_input() -> torch.Tensor:
    return torch.randn(1, 32, 8, 8, generator=torch.Generator().manual_seed(3))


def decoded(compiler: RegionalCompiler, vae: torch.nn.Module) -> Any:
    """A generation's decode with the VAE's blocks compiled (lib_optim.compile.compile_vae_blocks): its stats."""
    with torch.no_grad(), compiler.apply(vae, VAE_BLOCKS, key="vae", lazy_weights=False) as app:
        vae(vae_input())
    return app.stats


def generation(compiler: RegionalCompiler, model: torch.nn.Module, steps: int = 2) -> Any:
    """A compiled generation as the adapters apply it (lib_optim.compile.session): its application's stats."""
    args = unet_inputs()
    with torch.no_grad(), compiler.apply(model, SD_BLOCKS, key="sdpa", weights_token=lambda: TOKEN) as app:
        for _ in range(steps):
            model(*args)
    return app.stats


@pytest.fixture
def compiler() -> RegionalCompiler:
    return RegionalCompiler(backend="eager")


def warmup(**kw: Any) -> CompileWarmup:
    return CompileWarmup(clock=Clock(), **kw)


# --- the warm-up compiles what the generation then reuses -------------------------------------------------------


def test_after_the_warm_up_a_generation_compiles_nothing_and_runs_no_eager_step(compiler: RegionalCompiler) -> None:
    model = unet()
    w = warmup()
    end = w.run(target_for(compiler, model))
    assert end.state == "done" and end.reason == ""
    total = len(blocks.select_blocks(model, SD_BLOCKS))
    assert end.blocks_done == end.blocks_total == total > 0
    assert end.seconds is not None and end.seconds > 0  # the injected clock: one second per reading
    stats = generation(compiler, model)
    assert stats.compiles == 0 and stats.eager_calls == 0, stats
    assert stats.calls == 2 * total
    # without the warm-up the same generation compiles, and its first call of each block runs eagerly
    cold = generation(RegionalCompiler(backend="eager"), unet())
    assert cold.compiles > 0 and cold.eager_calls == total


def test_the_warm_up_decodes_once_so_the_first_generation_compiles_no_vae_block_either(
    compiler: RegionalCompiler,
) -> None:
    model, vae = unet(), tiny_vae()
    end = warmup().run(target_for(compiler, model, vae=vae))
    unet_total = len(blocks.select_blocks(model, SD_BLOCKS))
    vae_total = len(blocks.select_blocks(vae.decoder, VAE_BLOCKS))  # the encoder is not counted: no decode runs it
    assert end.state == "done" and end.blocks_done == end.blocks_total == unet_total + vae_total
    assert generation(compiler, model).compiles == 0
    warmed = decoded(compiler, vae)
    assert warmed.compiles == 0 and warmed.calls == vae_total, warmed
    assert decoded(RegionalCompiler(backend="eager"), tiny_vae()).compiles > 0  # without it, the decode compiles


def test_a_stop_between_the_vae_blocks_keeps_the_unet_and_the_vae_blocks_compiled_so_far(
    compiler: RegionalCompiler,
) -> None:
    model, vae = unet(), tiny_vae()
    unet_total = len(blocks.select_blocks(model, SD_BLOCKS))
    decoding = {"on": False, "checks": 0}

    def busy() -> bool:  # a WebUI job asks for the lock after the decode's first block compiled
        if decoding["on"]:
            decoding["checks"] += 1
        return decoding["checks"] > 2

    real = target_for(compiler, model, vae=vae, busy=busy)
    assert real.decode is not None

    def decode() -> None:
        decoding["on"] = True
        assert real.decode is not None
        real.decode()

    end = warmup().run(replace(real, decode=decode))
    assert end.state == "idle" and unet_total < end.blocks_done < end.blocks_total, end
    assert "a WebUI job is waiting" in end.reason
    assert all("forward" not in vars(b) for b in blocks.select_blocks(vae, VAE_BLOCKS))  # nothing left installed
    assert generation(compiler, model).compiles == 0
    assert 0 < decoded(compiler, vae).compiles < decoded(RegionalCompiler(backend="eager"), tiny_vae()).compiles


def test_progress_is_reported_between_blocks(compiler: RegionalCompiler) -> None:
    model = unet()
    w = warmup()
    seen: list[WarmupState] = []
    real = target_for(compiler, model)

    @contextlib.contextmanager
    def enter(interrupt: Callable[[], None]) -> Iterator[Any]:
        def watching() -> None:
            interrupt()
            seen.append(w.snapshot())

        with real.enter(watching) as app:
            yield app

    w.run(replace(real, enter=enter))
    running = [s for s in seen if s.state == "running"]
    assert running, seen
    done = [s.blocks_done for s in running]
    assert done == sorted(done) and done[0] == 0 and done[-1] == running[-1].blocks_total - 1
    assert {s.blocks_total for s in running} == {len(blocks.select_blocks(model, SD_BLOCKS))}
    assert running[0].text() == f"compile warm-up: running 0/{running[0].blocks_total} blocks"
    assert (running[0].family, running[0].width, running[0].height, running[0].batch) == ("sd", 64, 64, 1)


def test_a_waiting_host_job_stops_it_between_blocks_and_what_compiled_stays(compiler: RegionalCompiler) -> None:
    model = unet()
    w = warmup()
    checks = {"n": 0}

    def busy() -> bool:  # a WebUI job asks for the lock after the third block compiled
        checks["n"] += 1
        return checks["n"] > 4

    end = w.run(target_for(compiler, model, busy=busy))
    total = len(blocks.select_blocks(model, SD_BLOCKS))
    assert end.state == "idle" and 0 < end.blocks_done < total, end
    assert end.reason.startswith(f"stopped after {end.blocks_done}/{total} blocks (a WebUI job is waiting)")
    assert all("forward" not in vars(b) for b in blocks.select_blocks(model, SD_BLOCKS))  # nothing left installed
    partial = generation(compiler, model)
    cold = generation(RegionalCompiler(backend="eager"), unet())
    assert 0 < partial.compiles < cold.compiles  # the blocks the warm-up compiled are not compiled again


def test_a_compile_failure_is_failed_with_its_reason() -> None:
    def broken(gm: Any, example_inputs: Any) -> Any:
        raise RuntimeError("inductor: no working C++ compiler")

    compiler = RegionalCompiler(backend=broken)
    model = unet()
    end = warmup().run(target_for(compiler, model))
    assert end.state == "failed" and "no working C++ compiler" in end.reason
    assert end.text().startswith("compile warm-up: failed: ")
    assert "no working C++ compiler" in (compiler.failure(model, "sdpa") or "")  # a generation then runs eagerly


def test_a_target_that_cannot_compile_is_failed_with_its_reason() -> None:
    @contextlib.contextmanager
    def enter(interrupt: Callable[[], None]) -> Iterator[Any]:
        raise RuntimeError("reForge already compiles the model (--torch-compile)")
        yield

    end = warmup().run(WarmupTarget(enter=enter, forward=lambda: None))
    assert end == replace(
        end, state="failed", reason="RuntimeError: reForge already compiles the model (--torch-compile)"
    )


# --- a generation that starts meanwhile ------------------------------------------------------------------------


class Gate:
    """A UNet call that blocks until released, and counts who is inside the model."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.args = unet_inputs()
        self.inside = 0
        self.most_inside = 0
        self.entered = threading.Event()
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.calls = 0

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            yield
        finally:
            with self.lock:
                self.inside -= 1

    def forward(self) -> None:
        with self.using():
            self.calls += 1
            if self.calls == 1:
                self.entered.set()
                assert self.release.wait(DEADLINE)
            with torch.no_grad():
                self.model(*self.args)


def wait_until(condition: Callable[[], bool]) -> None:
    done = threading.Event()
    for _ in range(int(DEADLINE * 100)):
        if condition():
            return
        done.wait(0.01)
    pytest.fail("condition not reached")


def test_a_generation_that_compiles_waits_for_the_warm_up_then_compiles_nothing(compiler: RegionalCompiler) -> None:
    model = unet()
    gate = Gate(model)
    w = warmup(spawn=lambda run: threading.Thread(target=run, daemon=True).start())
    w.start(target_for(compiler, model, forward=gate.forward))
    assert gate.entered.wait(DEADLINE)
    reports: list[WarmupState] = []
    waiting = threading.Event()
    outcome: dict[str, Any] = {}

    def report(state: WarmupState) -> None:
        reports.append(state)
        waiting.set()

    def generate() -> None:
        outcome["how"] = w.generation_starts("p1", wait=True, report=report)
        with gate.using():
            outcome["state"] = w.snapshot()
            outcome["stats"] = generation(compiler, model)
        w.generation_ends("p1")

    worker = threading.Thread(target=generate)
    worker.start()
    assert waiting.wait(DEADLINE)  # it waits, and says so
    assert reports[0].state == "running"
    gate.release.set()
    worker.join(DEADLINE)
    assert outcome["how"] == "waited" and outcome["state"].state == "done"
    assert outcome["stats"].compiles == 0 and outcome["stats"].eager_calls == 0
    assert gate.most_inside == 1  # never both on the model


def test_a_generation_that_does_not_compile_stops_the_warm_up_and_runs_eager(compiler: RegionalCompiler) -> None:
    model = unet()
    gate = Gate(model)
    w = warmup(spawn=lambda run: threading.Thread(target=run, daemon=True).start())
    w.start(target_for(compiler, model, forward=gate.forward))
    assert gate.entered.wait(DEADLINE)
    outcome: dict[str, Any] = {}

    def generate() -> None:
        outcome["how"] = w.generation_starts("p1", wait=False)
        with gate.using(), torch.no_grad():
            outcome["state"] = w.snapshot()
            outcome["installed"] = [("forward" in vars(b)) for b in blocks.select_blocks(model, SD_BLOCKS)]
            model(*gate.args)  # eager: the host's own forwards
        w.generation_ends("p1")

    worker = threading.Thread(target=generate)
    worker.start()
    wait_until(lambda: w.stopping)
    gate.release.set()  # the warm-up goes on to its next block, where it sees the stop
    worker.join(DEADLINE)
    assert outcome["how"] == "stopped"
    assert outcome["state"].state == "idle" and "a generation started" in outcome["state"].reason
    assert not any(outcome["installed"])  # the warm-up's compiled forwards are gone before the generation runs
    assert gate.most_inside == 1


def test_no_warm_up_starts_while_a_generation_is_in_flight(compiler: RegionalCompiler) -> None:
    model = unet()
    started = threading.Event()
    holding = threading.Event()

    def forward() -> None:
        started.set()

    @contextlib.contextmanager
    def hold() -> Iterator[None]:
        holding.set()
        yield

    w = warmup(spawn=lambda run: threading.Thread(target=run, daemon=True).start())
    assert w.generation_starts("p1", wait=True) == ""  # none running: nothing to wait for
    w.start(target_for(compiler, model, forward=forward, hold=hold))
    assert holding.wait(DEADLINE)
    assert not started.wait(0.2)  # still held back by the generation
    assert w.snapshot().state == "idle" and "waiting" in w.snapshot().reason
    w.generation_ends("p1")
    assert started.wait(DEADLINE)


def test_a_host_job_waiting_for_the_lock_makes_a_held_back_warm_up_give_up(compiler: RegionalCompiler) -> None:
    # a generation whose end never came (it raised) must not keep the host's lock held by a waiting warm-up
    w = warmup()
    w.generation_starts("stale", wait=False)
    end = w.run(target_for(compiler, unet(), busy=lambda: True))
    assert end.state == "idle" and end.reason == "not run: a WebUI job came first"


def test_a_newer_model_load_supersedes_a_queued_warm_up(compiler: RegionalCompiler) -> None:
    queued: list[Callable[[], None]] = []
    w = warmup(spawn=queued.append)
    first, second = unet(), unet()
    w.start(target_for(compiler, first))
    w.start(target_for(compiler, second))
    queued[0]()  # the first one's thread runs only now: superseded, it compiles nothing
    assert w.snapshot().state == "idle"
    queued[1]()
    assert w.snapshot().state == "done"
    assert generation(compiler, second).compiles == 0
    assert generation(compiler, first).compiles > 0


# --- the state and the status --------------------------------------------------------------------------------


def test_state_words_and_dict() -> None:
    assert WarmupState().text() == ""
    assert WarmupState("running", 12, 38).text() == "compile warm-up: running 12/38 blocks"
    assert WarmupState("done", 38, 38, seconds=74.4).text() == "compile warm-up: done in 74 s"
    assert WarmupState("failed", reason="boom").text() == "compile warm-up: failed: boom"
    assert WarmupState(reason="not run: x").text() == "compile warm-up: not run: x"
    data = WarmupState("done", 38, 38, seconds=74.44, family="sdxl", width=1024, height=1024, batch=1).to_dict()
    assert data == {
        "state": "done",
        "blocks_done": 38,
        "blocks_total": 38,
        "seconds": 74.4,
        "reason": "",
        "family": "sdxl",
        "width": 1024,
        "height": 1024,
        "batch": 1,
    }


def test_status_has_compile_warmup_in_each_state(compiler: RegionalCompiler) -> None:
    rt = Runtime(adapter=FakeAdapter(), warmup=warmup())
    assert rt.status()["compile"]["warmup"]["state"] == "idle"
    seen: list[dict[str, Any]] = []
    real = target_for(compiler, unet())

    @contextlib.contextmanager
    def enter(interrupt: Callable[[], None]) -> Iterator[Any]:
        def watching() -> None:
            interrupt()
            seen.append(rt.status()["compile"]["warmup"])

        with real.enter(watching) as app:
            yield app

    rt.warmup.run(replace(real, enter=enter))
    assert seen[0]["state"] == "running" and seen[0]["blocks_total"] > 0
    done = rt.status()["compile"]
    assert done["warmup"]["state"] == "done" and done["warmup"]["blocks_done"] == done["warmup"]["blocks_total"]
    assert {"total_compiles", "total_compile_seconds"} <= set(done)
    rt.warmup.run(replace(real, enter=lambda interrupt: failing()))
    failed = rt.status()["compile"]["warmup"]
    assert failed["state"] == "failed" and failed["reason"] == "RuntimeError: nothing to compile"


@contextlib.contextmanager
def failing() -> Iterator[Any]:
    raise RuntimeError("nothing to compile")
    yield


def test_the_runtime_remembers_the_last_size_per_family() -> None:
    rt = Runtime(adapter=FakeAdapter(), warmup=warmup())
    assert rt.warmup_size("sd") == (512, 512, 1) and rt.warmup_size("sdxl") == (1024, 1024, 1)
    p = SimpleNamespace(width=768, height=512, batch_size=3)
    rt.generation_starts(p, None, family="sdxl")
    rt.end(p)
    assert rt.warmup_size("sdxl") == (768, 512, 3) and rt.warmup_size("sd") == (512, 512, 1)


def test_the_runtime_lets_only_compiling_generations_wait() -> None:
    calls: list[dict[str, Any]] = []

    class Recording(CompileWarmup):
        def generation_starts(self, key: Any, *, wait: bool, report: Any = None) -> str:
            calls.append({"key": key, "wait": wait})
            return ""

    rt = Runtime(adapter=FakeAdapter(), warmup=Recording())
    p = SimpleNamespace()
    for settings in (
        None,
        GenerationSettings(compile=Compile.ON),  # accordion off: nothing compiles
        GenerationSettings(enabled=True),
        GenerationSettings(enabled=True, compile=Compile.AUTO),
        GenerationSettings(enabled=True, compile=Compile.ON),
        GenerationSettings(enabled=True, compile=Compile.MAX_AUTOTUNE),
    ):
        rt.generation_starts(p, settings)
    assert [c["wait"] for c in calls] == [False, False, False, False, True, True]
    assert {c["key"] for c in calls} == {id(p)}


# --- the host side: when it starts, and what it hands the adapter -------------------------------------------------


class WarmingAdapter(FakeAdapter):
    """The fake adapter with a UNet: ``begin`` compiles it as the real adapters' ``apply_compile`` does (through
    :meth:`lib_optim.hosts.base.HostBase.compile_blocks`'s rule: the stand-in's check replaces Interrupt/Skip)."""

    def __init__(self, compiler: RegionalCompiler, model: torch.nn.Module, vae: TinyVae | None = None) -> None:
        super().__init__()
        self.compiler = compiler
        self.model = model
        self.vae = vae
        self.stand_ins: list[Any] = []
        self.forwards: list[tuple[int, int, int]] = []
        self.decodes: list[tuple[int, int, int]] = []

    def model_family(self, sd_model: Any) -> str | None:
        return "sd"

    def warmup_forward(self, sd_model: Any, width: int, height: int, batch: int) -> Callable[[], None]:
        self.forwards.append((width, height, batch))
        args = unet_inputs()

        def run() -> None:
            with torch.no_grad():
                self.model(*args)

        return run

    def warmup_decode(self, sd_model: Any, width: int, height: int, batch: int) -> Callable[[], None]:
        if self.vae is None:
            return super().warmup_decode(sd_model, width, height, batch)  # type: ignore[no-any-return]
        self.decodes.append((width, height, batch))
        vae = self.vae

        def run() -> None:
            with torch.no_grad():
                vae(vae_input())

        return run

    def begin(self, p: Any, settings: GenerationSettings) -> Any:
        session = super().begin(p, settings)
        self.stand_ins.append(p)
        interrupt = getattr(p, "optim_warmup_interrupt", None)
        app = session.restorer.enter(
            self.compiler.apply(
                self.model, SD_BLOCKS, key=self.current, weights_token=lambda: TOKEN, interrupt=interrupt
            )
        )
        session.data["compile"] = app
        if self.vae is not None:
            session.data["compile_vae"] = session.restorer.enter(
                self.compiler.apply(self.vae, VAE_BLOCKS, key="vae", interrupt=interrupt, lazy_weights=False)
            )
        return session


def defaults(**kw: Any) -> GenerationSettings:
    return GenerationSettings(**kw)


def test_it_starts_only_when_the_default_compile_warms_up(compiler: RegionalCompiler) -> None:
    spawned: list[Any] = []
    adapter = WarmingAdapter(compiler, unet())
    rt = Runtime(adapter=adapter, warmup=warmup(spawn=spawned.append))
    for value in (Compile.OFF, Compile.AUTO):
        assert not host_warmup.start(rt, object(), defaults(compile=value), device="cpu")
    assert spawned == [] and adapter.forwards == []
    assert rt.warmup.snapshot().text() == ""
    assert host_warmup.start(rt, object(), defaults(compile=Compile.MAX_AUTOTUNE), device="cpu")
    assert len(spawned) == 1


def test_it_does_not_start_where_compile_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    spawned: list[Any] = []
    compiler = RegionalCompiler()  # the real backend: availability is checked
    monkeypatch.setattr(host_warmup, "get_compiler", lambda: compiler)
    adapter = WarmingAdapter(compiler, unet())
    rt = Runtime(adapter=adapter, warmup=warmup(spawn=spawned.append))
    assert not host_warmup.start(rt, object(), defaults(compile=Compile.ON), device="mps")
    assert spawned == []
    assert rt.warmup.snapshot().reason.startswith("not run: compile is not available here (not supported on DirectML")


def test_it_does_not_start_for_a_model_it_cannot_run(compiler: RegionalCompiler) -> None:
    adapter = WarmingAdapter(compiler, unet())
    adapter.model_family = lambda sd_model: None  # type: ignore[method-assign]
    spawned: list[Any] = []
    rt = Runtime(adapter=adapter, warmup=warmup(spawn=spawned.append))
    assert not host_warmup.start(rt, object(), defaults(compile=Compile.ON), device="cpu")
    assert spawned == [] and "no SD1.x/SD2.x/SDXL UNet" in rt.warmup.snapshot().reason


def test_the_adapter_gets_a_generation_with_the_defaults_at_the_last_size(
    compiler: RegionalCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_warmup, "get_compiler", lambda: compiler)
    model = unet()
    adapter = WarmingAdapter(compiler, model)
    rt = Runtime(adapter=adapter, warmup=warmup(spawn=lambda run: run()))
    p = SimpleNamespace(width=640, height=448, batch_size=2)
    rt.generation_starts(p, None, family="sd")
    rt.end(p)
    sd_model = SimpleNamespace(sd_model_hash="abc123")
    chosen = defaults(compile=Compile.ON, attention=Attention.SDP, channels_last=Tri.ON, vae_on_cpu=Tri.ON)
    assert host_warmup.start(rt, sd_model, chosen, device="cpu")
    assert rt.warmup.snapshot().state == "done"
    assert adapter.forwards == [(640, 448, 2)]
    settings = adapter.begun[-1]
    # what shapes the compiled code, nothing else (no VAE change for a warm-up)
    assert settings == GenerationSettings(
        enabled=True, attention=Attention.SDP, channels_last=Tri.ON, compile=Compile.ON
    )
    [stand_in] = adapter.stand_ins
    assert (stand_in.sd_model, stand_in.width, stand_in.height, stand_in.batch_size) == (sd_model, 640, 448, 2)
    assert stand_in.sd_model_hash == "abc123" and not stand_in.enable_hr
    assert adapter.current == "Doggettx"  # the warm-up's attention was restored
    # the generation with the same defaults gets the same key: nothing compiles again
    session = adapter.begin(SimpleNamespace(), GenerationSettings(enabled=True, attention=Attention.SDP))
    with torch.no_grad():
        model(*unet_inputs())
    assert session.data["compile"].stats.compiles == 0
    session.restorer.close()


def test_the_adapter_decodes_the_size_when_it_can_and_the_vae_compiles_then(
    compiler: RegionalCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(host_warmup, "get_compiler", lambda: compiler)
    model, vae = unet(), tiny_vae()
    adapter = WarmingAdapter(compiler, model, vae)
    rt = Runtime(adapter=adapter, warmup=warmup(spawn=lambda run: run()))
    assert host_warmup.start(rt, object(), defaults(compile=Compile.ON), device="cpu")
    end = rt.warmup.snapshot()
    assert end.state == "done" and adapter.decodes == [(512, 512, 1)]
    assert end.blocks_total == len(blocks.select_blocks(model, SD_BLOCKS)) + len(
        blocks.select_blocks(vae.decoder, VAE_BLOCKS)
    )
    assert decoded(compiler, vae).compiles == 0
    # a host without a decode (the fake adapter's default) warms the UNet up alone: the VAE compiles later
    bare_vae = tiny_vae()
    bare = WarmingAdapter(compiler, unet(), bare_vae)
    bare.warmup_decode = FakeAdapter.warmup_decode.__get__(bare)  # type: ignore[method-assign]
    rt = Runtime(adapter=bare, warmup=warmup(spawn=lambda run: run()))
    assert host_warmup.start(rt, object(), defaults(compile=Compile.ON), device="cpu")
    assert rt.warmup.snapshot().state == "done"
    assert decoded(compiler, bare_vae).compiles > 0


def test_the_warm_up_check_replaces_interrupt_in_the_hosts_compile_blocks(
    compiler: RegionalCompiler, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lib_optim import compile as face
    from lib_optim.adapter import Session
    from lib_optim.hosts.base import HostBase
    from lib_optim.patching import Restorer

    monkeypatch.setattr(face, "get_compiler", lambda: compiler)
    host_check = lambda: None  # noqa: E731 - the host's Interrupt/Skip check
    ours = lambda: None  # noqa: E731
    model = unet()
    stand_in = host_warmup.WarmupProcessing(object(), 64, 64, 1, ours)
    session = Session(GenerationSettings(enabled=True, compile=Compile.ON), Restorer("test"))
    HostBase.compile_blocks(
        SimpleNamespace(_modules=None),  # type: ignore[arg-type]
        session,
        model,
        key="k",
        device="cpu",
        blocks=SD_BLOCKS,
        p=stand_in,
        region=face.CompileRegion(interrupt=host_check),
    )
    application = session.data["compile"]
    assert application.interrupt is ours
    assert "compile_auto" not in session.data  # no job measured for compile=auto's figures
    HostBase.compile_vae(
        SimpleNamespace(_modules=None),  # type: ignore[arg-type]
        session,
        tiny_vae(),
        key="k",
        p=stand_in,
        region=face.CompileRegion(interrupt=host_check),
    )
    assert session.data["compile_vae"].interrupt is ours  # the VAE's blocks stop for the warm-up's reasons too
    session.restorer.close()
