"""Tests for lib_optim.telemetry: a real CPU workload, fake NVML, faked torch.cuda counters."""

from __future__ import annotations

import dataclasses
import json
import sys
import threading
import time
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from fake_nvml import FakeMemory, FakeNVMLError, fake_pynvml, names, names_missing_from

from lib_optim.telemetry import GenerationMeter, Telemetry, format_status

MB = 1024 * 1024


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "optim-meter" and t.is_alive()]


@pytest.fixture(autouse=True)
def no_thread_left() -> Iterator[None]:
    yield
    assert sampler_threads() == []


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# ----------------------------------------------------------------------------------------------- fakes


def make_fake_pynvml(
    used_mb: Callable[[int], int] = lambda call: 1000,
    *,
    fail: dict[str, Exception] | None = None,
) -> tuple[types.ModuleType, list[tuple[str, tuple[Any, ...]]]]:
    """A module imitating nvidia-ml-py's pynvml; ``used_mb(n)`` is the used memory at the n-th memory query."""
    lock = threading.Lock()
    memory_queries = [0]

    def memory(handle: Any) -> FakeMemory:
        with lock:
            n = memory_queries[0]
            memory_queries[0] += 1
        return FakeMemory(8192 * MB, used_mb(n) * MB)

    api: dict[str, Callable[..., Any]] = {
        "nvmlDeviceGetHandleByIndex": lambda index: ("handle", index),
        "nvmlDeviceGetHandleByUUID": lambda uuid: ("handle", uuid),
        "nvmlDeviceGetMemoryInfo": memory,
    }
    return fake_pynvml(api, fail=fail)


def test_fake_pynvml_matches_real_api() -> None:
    """The fake must only use names the installed nvidia-ml-py really has."""
    real = pytest.importorskip("pynvml")
    fake, _ = make_fake_pynvml()
    assert names_missing_from(real, fake) == []


def fake_cuda(
    monkeypatch: pytest.MonkeyPatch,
    *,
    allocated_mb: int = 2150,
    peak_allocated_mb: int = 5325,
    peak_reserved_mb: int = 6000,
) -> list[tuple[str, Any]]:
    """Make the CPU torch's torch.cuda report one initialised device with the given counters."""
    calls: list[tuple[str, Any]] = []

    def logged(name: str, value: Any) -> Callable[..., Any]:
        def call(device: Any = None) -> Any:
            calls.append((name, device))
            return value

        return call

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "memory_allocated", logged("memory_allocated", allocated_mb * MB))
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", logged("max_memory_allocated", peak_allocated_mb * MB))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", logged("max_memory_reserved", peak_reserved_mb * MB))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", logged("reset_peak_memory_stats", None))
    return calls


# ------------------------------------------------------------------------------------------ real CPU


def test_cpu_workload_shows_its_peak_rss_and_rate() -> None:
    meter = GenerationMeter(sample_interval_s=0.01).start("cpu")
    block = torch.ones(200 * MB // 4, dtype=torch.float32)  # 200 MB, every page touched
    for _ in range(6):
        block.add_(1.0)
        time.sleep(0.02)
        meter.step()
    del block
    t = meter.stop()

    assert t.device == "cpu"
    assert t.steps == 6
    assert t.it_per_s is not None and 2 < t.it_per_s < 60
    assert t.samples > 0
    assert t.process_start_rss_mb is not None and t.process_peak_rss_mb is not None
    assert 150 <= t.process_peak_rss_mb - t.process_start_rss_mb <= 450
    # No GPU numbers on the CPU, and no pretending otherwise.
    assert t.peak_allocated_mb is None and t.weights_mb is None and t.nvml_peak_used_mb is None
    assert format_status(t).endswith("GB") and "peak RSS" in format_status(t)
    json.dumps(t.to_dict())


def test_context_manager_stops_and_keeps_the_result() -> None:
    with GenerationMeter("cpu", sample_interval_s=0.01) as meter:
        assert meter.running and sampler_threads()
        meter.step()
        meter.step()
    assert not meter.running
    assert meter.result is not None and meter.result.steps == 2
    assert meter.stop() is meter.result  # a second stop returns the same measurement


def test_context_manager_lets_the_error_through_and_still_stops() -> None:
    meter = GenerationMeter("cpu", sample_interval_s=0.01)
    with pytest.raises(ValueError, match="boom"), meter:
        raise ValueError("boom")
    assert meter.result is not None and not meter.running


def test_step_is_thread_safe() -> None:
    meter = GenerationMeter(use_nvml=False).start("cpu")
    workers = [threading.Thread(target=lambda: [meter.step() for _ in range(2000)]) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert meter.stop().steps == 8000


def test_rate_counts_the_sampling_loop_only() -> None:
    clock = FakeClock()
    meter = GenerationMeter(clock=clock, use_nvml=False).start("cpu")
    clock.now = 10.0  # model loading and text encoding before the first step
    meter.step()
    for _ in range(4):
        clock.now += 0.5
        meter.step()
    clock.now += 3.0  # VAE decode after the last step
    t = meter.stop()
    assert t.steps == 5
    assert t.it_per_s == pytest.approx(2.0)
    assert t.seconds == pytest.approx(15.0)


def test_one_step_gives_no_rate_with_a_note() -> None:
    meter = GenerationMeter(use_nvml=False).start("cpu")
    meter.step()
    t = meter.stop()
    assert t.it_per_s is None
    assert "one step only: no rate" in t.notes
    assert format_status(t).startswith(f"{t.seconds:.1f} s")


def test_steps_after_stop_are_ignored_and_restart_begins_afresh() -> None:
    meter = GenerationMeter(use_nvml=False).start("cpu")
    meter.step()
    first = meter.stop()
    meter.step()
    assert first.steps == 1
    meter.start("cpu")
    assert meter.stop().steps == 0


def test_stop_without_start_does_not_crash() -> None:
    t = GenerationMeter().stop()
    assert t.steps == 0 and "meter was never started" in t.notes


# -------------------------------------------------------------------------------------- torch counters


def test_fake_cuda_counters_without_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_cuda(monkeypatch)
    t = GenerationMeter(use_nvml=False).start("cuda").stop()
    assert t.device == "cuda:0"
    assert t.weights_mb == 2150.0
    assert t.peak_allocated_mb == 5325.0
    assert t.peak_reserved_mb == 6000.0
    assert t.working_mb == 5325.0 - 2150.0
    assert t.peak_reset is False
    # The host's own peak report (A1111 memmon) is left alone by default.
    assert "reset_peak_memory_stats" not in [name for name, _ in calls]
    assert any("since the host's last reset" in note for note in t.notes)


def test_fake_cuda_counters_with_reset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_cuda(monkeypatch, allocated_mb=2150, peak_allocated_mb=5325)
    meter = GenerationMeter(reset_peak_stats=True, use_nvml=False).start("cuda:0")
    for _ in range(3):
        meter.step()
    t = meter.stop()
    assert ("reset_peak_memory_stats", 0) in calls
    assert calls.index(("memory_allocated", 0)) < calls.index(("reset_peak_memory_stats", 0))
    assert t.peak_reset is True
    assert not any("since the host's last reset" in note for note in t.notes)
    assert format_status(dataclasses.replace(t, it_per_s=1.94)) == (
        "1.9 it/s · peak 5.2 GB (weights 2.1 + working 3.1)"
    )


def test_cuda_counters_failing_become_none_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_cuda(monkeypatch)

    def broken(device: Any = None) -> int:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "memory_allocated", broken)
    t = GenerationMeter(use_nvml=False).start("cuda:0").stop()
    assert t.weights_mb is None and t.peak_allocated_mb is None and t.working_mb is None
    assert any("illegal memory access" in note for note in t.notes)


def test_cuda_not_initialised_is_not_initialised_by_the_meter(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = fake_cuda(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    t = GenerationMeter(reset_peak_stats=True, use_nvml=False).start("cuda:0").stop()
    assert calls == []
    assert t.peak_allocated_mb is None
    assert any("not initialised" in note for note in t.notes)


def test_cuda_unavailable_on_this_torch() -> None:
    t = GenerationMeter(use_nvml=False).start("cuda:0").stop()
    assert t.peak_allocated_mb is None
    assert "torch.cuda not available: no allocator counters" in t.notes


# ----------------------------------------------------------------------------------------------- NVML


def test_nvml_peak_is_sampled_and_the_thread_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    # Rises by 100 MB per query up to 3000 MB, then falls back: the peak is the top, not the last value.
    def used(n: int) -> int:
        return 1000 + 100 * n if n <= 20 else 1500

    fake, calls = make_fake_pynvml(used)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = GenerationMeter(sample_interval_s=0.002).start("cuda:0")
    assert sampler_threads()
    deadline = time.monotonic() + 5
    while names(calls).count("nvmlDeviceGetMemoryInfo") < 30 and time.monotonic() < deadline:
        time.sleep(0.01)
    t = meter.stop()

    assert t.nvml_start_used_mb == 1000.0
    assert t.nvml_peak_used_mb == 3000.0
    assert t.samples >= 20
    assert sampler_threads() == []
    assert names(calls)[0] == "nvmlInit" and names(calls)[-1] == "nvmlShutdown"
    assert names(calls).count("nvmlShutdown") == 1
    queries = names(calls).count("nvmlDeviceGetMemoryInfo")
    time.sleep(0.05)
    assert names(calls).count("nvmlDeviceGetMemoryInfo") == queries  # nothing samples after stop
    assert "NVML device 0 assumed to be torch's cuda:0" in t.notes
    assert format_status(t).endswith("peak 2.9 GB (whole GPU, NVML)")


def test_nvml_device_found_by_uuid(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = make_fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    fake_cuda(monkeypatch)
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda index: types.SimpleNamespace(uuid="5e1f0a2b-0000-1111")
    )
    t = GenerationMeter(sample_interval_s=0.01).start("cuda:0").stop()
    assert ("nvmlDeviceGetHandleByUUID", ("GPU-5e1f0a2b-0000-1111",)) in calls
    assert not any("assumed" in note for note in t.notes)
    assert t.nvml_peak_used_mb == 1000.0


def test_nvml_device_found_through_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = make_fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    GenerationMeter(sample_interval_s=0.01).start("cuda:1").stop()
    assert ("nvmlDeviceGetHandleByIndex", (3,)) in calls


def test_nvml_absent_is_none_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml now raises ImportError
    t = GenerationMeter().start("cuda:0").stop()
    assert t.nvml_peak_used_mb is None and t.nvml_start_used_mb is None
    assert any(note.startswith("NVML unavailable: pynvml not importable") for note in t.notes)


def test_nvml_without_driver_is_none_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = make_fake_pynvml(fail={"nvmlInit": FakeNVMLError("Driver Not Loaded")})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    t = GenerationMeter().start("cuda:0").stop()
    assert t.nvml_peak_used_mb is None
    assert "NVML unavailable: Driver Not Loaded" in t.notes
    assert names(calls) == ["nvmlInit"]  # nothing to shut down after a failed init


def test_nvml_failing_mid_generation_stops_sampling_and_shuts_down(monkeypatch: pytest.MonkeyPatch) -> None:
    def used(n: int) -> int:
        if n >= 3:
            raise FakeNVMLError("GPU is lost")
        return 1000 + n

    fake, calls = make_fake_pynvml(used)
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    meter = GenerationMeter(sample_interval_s=0.002).start("cuda:0")
    time.sleep(0.05)
    t = meter.stop()
    assert t.nvml_peak_used_mb == 1002.0
    assert "NVML sampling stopped: GPU is lost" in t.notes
    assert names(calls).count("nvmlShutdown") == 1


def test_nvml_not_used_for_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = make_fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    t = GenerationMeter().start("cpu").stop()
    assert calls == [] and t.nvml_peak_used_mb is None


# ------------------------------------------------------------------------------------------ formatting


def telemetry(**changes: Any) -> Telemetry:
    base = Telemetry(
        device="cuda:0",
        seconds=12.0,
        steps=20,
        it_per_s=1.9,
        weights_mb=2150.0,
        peak_allocated_mb=5325.0,
        peak_reserved_mb=6000.0,
        working_mb=3175.0,
        peak_reset=True,
        nvml_start_used_mb=3000.0,
        nvml_peak_used_mb=7000.0,
        process_start_rss_mb=3000.0,
        process_peak_rss_mb=4000.0,
        samples=240,
    )
    return dataclasses.replace(base, **changes)


def test_format_status() -> None:
    assert format_status(telemetry()) == "1.9 it/s · peak 5.2 GB (weights 2.1 + working 3.1)"
    cpu = telemetry(
        device="cpu",
        it_per_s=0.6,
        weights_mb=None,
        peak_allocated_mb=None,
        peak_reserved_mb=None,
        working_mb=None,
        nvml_start_used_mb=None,
        nvml_peak_used_mb=None,
        process_peak_rss_mb=6860.8,
    )
    assert format_status(cpu) == "0.6 it/s · peak RSS 6.7 GB"
    assert format_status(telemetry(peak_allocated_mb=None)) == "1.9 it/s · peak 6.8 GB (whole GPU, NVML)"
    assert format_status(dataclasses.replace(cpu, it_per_s=0.04)) == "0.04 it/s · peak RSS 6.7 GB"
    assert format_status(dataclasses.replace(cpu, it_per_s=None, process_peak_rss_mb=None)) == "12.0 s"


def test_to_dict_is_json() -> None:
    data = telemetry(notes=("a", "b")).to_dict()
    assert data["notes"] == ["a", "b"]
    assert json.loads(json.dumps(data)) == data
