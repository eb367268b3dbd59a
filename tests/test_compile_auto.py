"""``compile=auto`` (lib_optim.compile.auto): the decision, the remembered figures, and one generation measured
end to end over real torch — a real regional compiler (dynamo's eager backend) and injected clocks, so nothing
depends on this machine's speed."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch

from lib_optim.adapter import HostAdapter, Session
from lib_optim.compile import (
    AUTO_DATA_KEY,
    AutoJob,
    AutoKey,
    AutoMemory,
    AutoPlanner,
    AutoRecord,
    RegionalCompiler,
    compile_blocks,
    decide,
    make_job,
)
from lib_optim.compile import auto as auto_module
from lib_optim.host_specs.kinds import HostKind
from lib_optim.patching import Restorer
from lib_optim.runtime import Runtime, compile_summary, compiled_text
from lib_optim.settings import Compile, GenerationSettings


def key(**changes: str) -> AutoKey:
    values = {
        "torch": "2.13.0",
        "device": "cpu x86_64 (8 threads)",
        "model": "sd15:abc",
        "size": "512px",
        "dtype": "float32",
        "attention": "sdp",
        "mode": "on",
    }
    values.update(changes)
    return AutoKey(**values)


def job(images: int = 1, steps: float = 20, **changes: Any) -> AutoJob:
    values: dict[str, Any] = {
        "key": key(),
        "device_type": "cpu",
        "family": "sd15",
        "batch_size": 1,
        "steps": steps,
        "images": images,
    }
    values.update(changes)
    return AutoJob(**values)


# --- the decision -------------------------------------------------------------------------------------------


def test_one_image_with_a_cold_cache_runs_eagerly_and_twenty_images_compile() -> None:
    """The issue's case on a CPU with torch >= 2.5 and nothing measured yet: 120 s of cold compile against
    4 s/step × (1 − 1/1.10) ≈ 0.36 s saved per image-step."""
    one = decide(job(images=1), AutoRecord())
    assert not one.compile and one.cost == "cold" and one.cost_s == pytest.approx(120.0)
    assert one.saving_step_s == pytest.approx(4.0 * (1 - 1 / 1.10))
    assert one.text() == "auto→eager (compile ≈ 120 s cold, estimated; saves ≈ 0.36 s/step × 20 steps = 7 s, estimated)"
    twenty = decide(job(images=20), AutoRecord())
    assert twenty.compile and twenty.saving_s == pytest.approx(400 * 4.0 * (1 - 1 / 1.10))
    assert twenty.text() == (
        "auto→compile (compile ≈ 120 s cold, estimated; saves ≈ 0.36 s/step × 400 steps (20 images) = 145 s, estimated)"
    )


def test_already_compiled_in_this_process_costs_nothing() -> None:
    decision = decide(job(images=1, steps=2), AutoRecord(), compiled_here=True)
    assert decision.compile and decision.cost == "compiled" and decision.cost_s == 0
    assert decision.text().startswith("auto→compile (already compiled; saves ≈ 0.36 s/step × 2 steps")
    # ... unless it saves nothing here (measured slower compiled than eager)
    slower = AutoRecord(eager_step_s=1.0, eager_step_n=1, compiled_step_s=1.1, compiled_step_n=1)
    assert not decide(job(), slower, compiled_here=True).compile


def test_a_warm_disk_cache_is_charged_its_own_figure() -> None:
    estimated = decide(job(images=5), AutoRecord(), disk_cached=True)
    assert estimated.cost == "warm" and estimated.cost_s == pytest.approx(120.0 * auto_module.WARM_COMPILE_FRACTION)
    assert estimated.compile  # 100 image-steps × 0.36 s = 36 s > 30 s
    assert not decide(job(images=4), AutoRecord(), disk_cached=True).compile  # 29 s < 30 s
    measured = AutoRecord(cold_compile_s=200.0, cold_compile_n=1, warm_compile_s=5.0, warm_compile_n=1)
    decision = decide(job(images=1), measured, disk_cached=True)
    assert decision.cost_s == 5.0 and decision.cost_measured and decision.compile
    assert decide(job(images=1), measured).cost_s == 200.0  # no disk cache: the measured cold figure


def test_measured_figures_replace_the_estimates() -> None:
    record = AutoRecord(eager_step_s=2.0, eager_step_n=3, compiled_step_s=1.5, compiled_step_n=2)
    decision = decide(job(images=1, steps=300), record)
    assert decision.saving_measured and decision.saving_step_s == pytest.approx(0.5)
    assert decision.compile  # 150 s saved > 120 s of compile
    only_eager = decide(job(), AutoRecord(eager_step_s=2.0, eager_step_n=1))
    assert not only_eager.saving_measured and only_eager.saving_step_s == pytest.approx(2.0 * (1 - 1 / 1.10))


def test_before_torch_2_5_a_cpu_compile_is_estimated_from_the_hosts_own_torch() -> None:
    """×1.10–1.38 measured in the hosts with torch 2.1.2/2.3.1 (docs/figures.md): a 100-image job compiles, one
    image does not; a measured ratio replaces the estimate (here: compiled slower, so eager)."""
    old = job(images=100, key=key(torch="2.1.2"))
    decision = decide(old, AutoRecord())
    assert decision.compile and decision.saving_step_s == pytest.approx(4.0 * (1 - 1 / 1.10))
    assert not decide(job(images=1, key=key(torch="2.1.2")), AutoRecord()).compile
    slower = AutoRecord(eager_step_s=2.0, eager_step_n=1, compiled_step_s=2.5, compiled_step_n=1)
    assert not decide(old, slower).compile


def test_cuda_estimates_scale_with_size_and_family() -> None:
    small = decide(job(device_type="cuda", key=key(size="512px")), AutoRecord())
    large = decide(job(device_type="cuda", family="sdxl", key=key(size="1024px")), AutoRecord())
    assert small.saving_step_s == pytest.approx(0.05 * (1 - 1 / 1.2))
    assert large.saving_step_s == pytest.approx(small.saving_step_s * 4 * 1.3)
    assert small.cost_s == 40.0
    assert decide(job(device_type="cuda", key=key(mode="max-autotune")), AutoRecord()).cost_s == 120.0


def test_compile_memory_not_fitting_runs_eagerly_and_says_why() -> None:
    """Compile's extra memory (the seed: 0.5 GB for SD1.5 in mode on) beside the generation's working memory."""
    tight = job(images=100, free_mb=1000.0, working_mb=600.0)
    decision = decide(tight, AutoRecord(), compiled_here=True)
    assert not decision.compile and not decision.memory_fits
    assert decision.text() == (
        "auto→eager (compile's extra ≈ 0.5 GB + the generation's ≈ 0.6 GB do not fit in 1.0 GB free)"
    )
    assert decide(job(images=100, free_mb=1200.0, working_mb=600.0), AutoRecord()).compile
    assert decide(job(images=100, free_mb=None), AutoRecord()).memory_note == "free memory unknown"


def test_make_job_keys_by_what_the_figures_depend_on() -> None:
    request = {"width": 768, "height": 512, "batch": 2, "family": "sd15", "device": "cpu", "dtype_bytes": 4,
               "free_mb": 4000, "budget_mb": None}  # fmt: skip
    made = make_job(request, device="cpu", steps=30, images=6, model="abc123", attention="sdp", dtype="float32")
    assert made.key.size == "640px" and made.key.model == "sd15:abc123" and made.key.mode == "on"
    assert made.key.torch == str(torch.__version__) and made.key.device.startswith("cpu ")
    assert (made.steps, made.images, made.batch_size, made.free_mb, made.timed) == (30.0, 6, 2, 4000.0, True)
    assert made.working_mb > 0  # SDP's largest attention call at 768×512, batch 2 with CFG
    hires = make_job(
        {**request, "width": 1024, "height": 1024},
        device="cpu",
        steps=10,
        images=1,
        model="",
        attention="split",
        first_pass=(512, 512, 20),
    )
    assert hires.steps == pytest.approx(10 + 20 / 4) and not hires.timed and hires.key.model == "sd15:unknown"


# --- the remembered figures ---------------------------------------------------------------------------------


def test_memory_round_trips_and_keeps_keys_apart(tmp_path: Path) -> None:
    path = tmp_path / "auto" / "compile-auto.json"
    memory = AutoMemory(path)
    assert memory.get(key()) == AutoRecord()
    memory.record(key(), cold_compile_s=100.0, eager_step_s=2.0)
    memory.record(key(), cold_compile_s=50.0)
    again = AutoMemory(path).get(key())  # another process reads the file
    assert again.cold_compile_s == pytest.approx(75.0) and again.cold_compile_n == 2
    assert again.eager_step_s == 2.0 and again.compiled_step_s is None
    for other in (key(attention="split"), key(size="1024px"), key(torch="2.1.2"), key(mode="max-autotune")):
        assert AutoMemory(path).get(other) == AutoRecord()
    data = json.loads(path.read_text())
    assert data["version"] == 1 and data["entries"][key().text()]["key"]["attention"] == "sdp"


def test_the_mean_forgets_old_measurements(tmp_path: Path) -> None:
    memory = AutoMemory(tmp_path / "m.json")
    for _ in range(20):
        memory.record(key(), eager_step_s=1.0)
    record = memory.record(key(), eager_step_s=6.0)
    assert record.eager_step_s == pytest.approx(2.0)  # weight 1/5, not 1/21


@pytest.mark.parametrize("content", ["{not json", '{"version": 99, "entries": {}}', "[1, 2]"])
def test_an_unreadable_file_is_an_empty_memory_with_one_warning(
    tmp_path: Path, content: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "compile-auto.json"
    path.write_text(content)
    monkeypatch.setattr(logging.getLogger("lib_optim"), "propagate", True)
    memory = AutoMemory(path)
    with caplog.at_level(logging.WARNING, logger="lib_optim"):
        assert memory.get(key()) == AutoRecord()
        assert [r for r in caplog.records if "[Optim] compile auto" in r.getMessage()]
        caplog.clear()
        assert memory.get(key()) == AutoRecord()
        assert not caplog.records  # said once
    memory.record(key(), eager_step_s=1.0)  # a measurement replaces it with a good file
    assert AutoMemory(path).get(key()).eager_step_s == 1.0


def test_malformed_figures_are_left_unmeasured() -> None:
    record = AutoRecord.from_dict({"cold_compile_s": "fast", "eager_step_s": -1.0, "warm_compile_s": True,
                                   "compiled_step_s": 0.5, "compiled_step_n": 2.5})  # fmt: skip
    assert record == AutoRecord(compiled_step_s=0.5)


def test_the_default_file_is_beside_the_compile_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The figures describe the kernels in the compile cache: they live in its root (``OPTIM_COMPILE_CACHE``, the
    WebUI's data folder, else the user's cache folder), never in the temp folder."""
    from lib_optim.compile import persist

    monkeypatch.undo()  # the conftest points it at a temporary file
    monkeypatch.setenv("OPTIM_COMPILE_CACHE", str(tmp_path / "kept"))
    monkeypatch.setattr(persist, "_DONE", {})
    assert auto_module.default_auto_memory_path() == tmp_path / "kept" / "compile-auto.json"


def test_warm_means_an_earlier_process_compiled_into_the_kept_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A key compiled by an earlier process is "warm" only when inductor's folder is the one kept across restarts
    (set up at start-up); with torch's temp folder, or never compiled, it is cold."""
    from lib_optim.compile import persist

    key = job().key
    compiled_before = AutoRecord(cold_compile_s=90.0, cold_compile_n=1)
    monkeypatch.setattr(persist, "_DONE", {})
    assert not auto_module._inductor_cache_has(key, compiled_before)  # nothing set up: the temp folder
    setup = persist._setup({"OPTIM_COMPILE_CACHE": str(tmp_path)}, None, "2.1.2+cu121", (3, 10))
    monkeypatch.setattr(persist, "_DONE", {"setup": setup})
    assert auto_module._inductor_cache_has(key, compiled_before)
    assert not auto_module._inductor_cache_has(key, AutoRecord())


# --- one generation, end to end -----------------------------------------------------------------------------


class Clock:
    """Seconds that move only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class ResBlock(torch.nn.Module):
    """Named like the UNet block regional compile selects (stablediffusion openaimodel.ResBlock)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x)


class CompilingAdapter(HostAdapter):
    """A host whose ``apply_compile`` is the adapters' call of :func:`compile_blocks`, with the job given."""

    kind = HostKind.A1111

    def __init__(self, unet: torch.nn.Module, compiler: RegionalCompiler, planner: AutoPlanner) -> None:
        self.unet, self.compiler, self.planner = unet, compiler, planner
        self.job: AutoJob = job()

    def version(self) -> str:
        return "test"

    def attention_backends(self) -> list[Any]:
        return []

    def effective_state(self) -> Any:
        raise NotImplementedError

    def current_attention_name(self) -> str:
        return "sdp"

    def apply_compile(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        compile_blocks(
            session, self.unet, key="sdp", device="cpu", compiler=self.compiler, job=self.job, planner=self.planner
        )


class World:
    """A two-block UNet, a real regional compiler whose backend (dynamo hands it each graph to compile) moves the
    clock by ``compile_s``, and a planner remembering in a temporary file, on one clock."""

    def __init__(self, path: Path) -> None:
        self.clock = Clock()
        self.compile_s = 0.0
        self.unet = torch.nn.Sequential(ResBlock(), ResBlock())

        def backend(graph: Any, example_inputs: Any) -> Any:
            self.clock.now += self.compile_s
            return graph.forward

        compiler = RegionalCompiler(backend=backend, clock=self.clock)
        self.planner = AutoPlanner(AutoMemory(path), clock=self.clock, disk_cached=lambda k, r: False)
        self.adapter = CompilingAdapter(self.unet, compiler, self.planner)


@pytest.fixture
def world(tmp_path: Path) -> World:
    return World(tmp_path / "compile-auto.json")


def generate(rt: Runtime, world: World, *, steps: int, step_s: float, compile_s: float = 0.0) -> Session:
    """One generation through the runtime: each step runs the UNet and then the host's step callback; the clock
    moves ``step_s`` per step, and ``compile_s`` per graph compiled."""
    world.compile_s = compile_s
    p = object()
    session = rt.begin(p, GenerationSettings(enabled=True, compile=Compile.AUTO), device="cpu")
    assert session is not None
    x = torch.zeros(1, 4, 8, 8)
    for _ in range(steps):
        world.unet(x)
        world.clock.now += step_s
        rt.step()
    rt.end(p)
    return session


def test_auto_decides_runs_measures_and_remembers(world: World) -> None:
    """First image: eager, and its seconds per step are remembered; a 20-image job then compiles (its compile and
    compiled step remembered); the next one-image job finds it already compiled."""
    rt = Runtime(host=HostKind.A1111, adapter=world.adapter)
    first = generate(rt, world, steps=6, step_s=4.0)
    assert "compile" not in first.data and not first.data[AUTO_DATA_KEY].decision.compile
    summary = compile_summary(first)
    assert summary is not None and summary["auto"]["compile"] is False
    assert summary["auto"]["key"] == world.adapter.job.key.text()  # the entry of compile-auto.json it read
    assert compiled_text(summary).startswith("auto→eager (compile ≈ 120 s cold, estimated; saves ≈ 0.36 s/step")
    assert compiled_text(summary) in rt.history[-1].telemetry_text  # the status line
    memory = world.planner.memory
    assert memory.get(world.adapter.job.key).eager_step_s == pytest.approx(4.0)

    world.adapter.job = job(images=20)
    second = generate(rt, world, steps=6, step_s=3.0, compile_s=90.0)
    application = second.data["compile"]
    assert application.stats.compiles > 0 and second.data[AUTO_DATA_KEY].decision.compile
    text = compiled_text(compile_summary(second) or {})
    assert text.startswith("auto→compile (compile ≈ 120 s cold, estimated; saves ≈ 0.36 s/step × 400 steps")
    assert " · compiled: " in text
    record = memory.get(world.adapter.job.key)
    assert record.cold_compile_s == pytest.approx(application.stats.compile_seconds)
    assert record.cold_compile_s >= 90.0
    assert record.compiled_step_s == pytest.approx(3.0)  # the median interval: the compiling step is an outlier

    world.adapter.job = job(images=1)
    third = generate(rt, world, steps=6, step_s=3.0)
    decision = third.data[AUTO_DATA_KEY].decision
    assert decision.compile and decision.cost == "compiled" and decision.saving_measured
    assert decision.saving_step_s == pytest.approx(1.0)
    assert third.data["compile"].stats.compiles == 0


def test_a_job_unknown_or_compile_unavailable_runs_eagerly(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = GenerationSettings(enabled=True, compile=Compile.AUTO)
    session = Session(settings, Restorer("t"))
    compile_blocks(session, world.unet, key="k", device="cpu", compiler=world.adapter.compiler, job=None)
    assert "compile" not in session.data
    assert compiled_text(compile_summary(session) or {}) == "auto→eager (the job's size is unknown)"

    real = RegionalCompiler()  # the real backend, told there is no C++ compiler on this "machine"
    monkeypatch.setattr(real, "availability", lambda device, mode="on": (False, "install a C++ compiler"))
    session = Session(settings, Restorer("t"))
    compile_blocks(
        session, world.unet, key="k", device="cpu", compiler=real, job=job(images=100), planner=world.planner
    )
    assert "compile" not in session.data and "compile_unavailable" in session.data
    assert (
        compiled_text(compile_summary(session) or {})
        == "auto→eager (compile not available here: install a C++ compiler)"
    )


def test_compile_on_is_measured_for_auto_but_says_nothing_of_it(world: World) -> None:
    """``on`` compiles whatever auto would decide; its compile seconds still teach auto this key's cold cost."""
    world.adapter.job = job(images=1)
    rt = Runtime(host=HostKind.A1111, adapter=world.adapter)
    p = object()
    session = rt.begin(p, GenerationSettings(enabled=True, compile=Compile.ON), device="cpu")
    assert session is not None and "compile" in session.data
    world.compile_s = 50.0
    world.unet(torch.zeros(1, 4, 8, 8))
    world.unet(torch.zeros(1, 4, 8, 8))  # the first call of each block is eager: this one compiles
    rt.end(p)
    summary = compile_summary(session) or {}
    assert "auto" not in summary and compiled_text(summary).startswith("compiled: ")
    assert (
        world.planner.memory.get(world.adapter.job.key).cold_compile_s == session.data["compile"].stats.compile_seconds
    )
    assert session.data["compile"].stats.compile_seconds >= 50.0
