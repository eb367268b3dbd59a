"""Runtime (the one place holding state) and the host glue's generation path, against a fake adapter and
fake host modules. The imitated host behaviour is cited at each fake."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest
import torch
from fake_adapter import FakeAdapter

from lib_optim.host_specs.kinds import HostKind
from lib_optim.hosts import webui
from lib_optim.runtime import Runtime, get_runtime
from lib_optim.settings import Attention, GenerationSettings, Tri


@pytest.fixture
def rt(monkeypatch):
    runtime = Runtime(host=HostKind.A1111, adapter=FakeAdapter())
    monkeypatch.setattr("lib_optim.runtime._runtime", runtime)
    assert get_runtime() is runtime
    yield runtime
    runtime.end_all()  # stops every meter's sampling thread too


class P:
    """The parts of StableDiffusionProcessing the glue touches (A1111 v1.10.1 modules/processing.py)."""

    def __init__(self, args: list[Any], runner: Any = None) -> None:
        self.script_args = tuple([0, *args])
        self.scripts = runner
        self.extra_generation_params: dict[str, Any] = {}
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_off_changes_and_measures_nothing(rt):
    assert rt.begin(P([]), GenerationSettings()) is None
    assert not rt.history
    assert rt.adapter.begun == []


def test_on_without_changes_is_measured_but_not_applied(rt):
    p = P([])
    session = rt.begin(p, GenerationSettings(enabled=True), device="cpu")
    assert session is not None and rt.adapter.begun == []
    for _ in range(3):
        rt.step()
    assert rt.end(p)
    record = rt.history[-1]
    assert record.restored and record.telemetry["steps"] == 3
    assert record.telemetry_text


def test_begin_end_restores_once_and_reapply_restores_first(rt):
    p = P([])
    rt.begin(p, GenerationSettings(True, Attention.SDP), device="cpu")
    assert rt.adapter.current == "sdp"
    rt.begin(p, GenerationSettings(True, Attention.SPLIT), device="cpu")  # applying twice: earlier one undone
    assert rt.adapter.current == "split"
    assert rt.end(p) is True
    assert rt.adapter.current == "Doggettx"
    assert rt.end(p) is False


def test_end_others_restores_generations_left_open(rt):
    stale, current = P([]), P([])
    rt.begin(stale, GenerationSettings(True, Attention.SDP), device="cpu")
    assert rt.end_others(current) == 1
    assert rt.adapter.current == "Doggettx"
    assert rt.active_sessions() == 0


def test_fallback_only_for_out_of_memory_once(rt):
    p = P([])
    rt.begin(p, GenerationSettings(True, Attention.SDP), device="cpu")
    assert rt.fallback_for(p, ValueError("bad prompt")) is None
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    step = rt.fallback_for(p, RuntimeError("sampling failed").with_traceback(None))
    assert step is None
    try:
        raise RuntimeError("wrapped") from oom
    except RuntimeError as wrapped:
        step = rt.fallback_for(p, wrapped)
    assert step is not None
    assert step.settings.attention is Attention.SUB_QUAD and step.settings.vae_on_cpu is Tri.ON
    assert rt.fallback_for(p, oom) is None  # never twice for one generation
    assert rt.history[-1].fallback


def test_status_reports_everything_json_ready(rt):
    import json

    p = P([])
    rt.begin(p, GenerationSettings(True, Attention.SPLIT), device="cpu")
    rt.end(p)
    status = rt.status()
    json.dumps(status)
    assert status["host"] == "a1111"
    assert status["effective"]["attention"] == "Doggettx"
    assert status["last_generations"][-1]["settings"] == {"attention": "split"}


# --- the glue's generation path with fake host modules ----------------------------------------------


class FakeScript:
    """An AlwaysVisible script's argument slice (A1111 v1.10.1 modules/scripts.py:634-687)."""

    args_from, args_to = 1, 6

    def title(self) -> str:
        return "Optim"


@pytest.fixture
def host(monkeypatch, rt):
    """Fake ``modules.processing``/``modules.shared``/``modules.devices`` as the glue uses them."""
    calls: list[str] = []
    processing = types.ModuleType("modules.processing")

    def process_images_inner(p):
        # the host runs the scripts' process() hooks inside process_images_inner (A1111 processing.py:914-921)
        webui.process(p, p.script_args[1:6])
        calls.append(rt.adapter.current)
        if p.fail(rt.adapter.current):
            raise RuntimeError("sampling failed") from torch.OutOfMemoryError("CUDA out of memory")
        return "processed"

    processing.process_images_inner = process_images_inner
    shared = types.ModuleType("modules.shared")
    shared.opts = types.SimpleNamespace()
    devices = types.ModuleType("modules.devices")
    devices.device = "cpu"
    devices.torch_gc = lambda: calls.append("gc")
    modules = types.ModuleType("modules")
    modules.processing, modules.shared, modules.devices = processing, shared, devices
    for name, module in {
        "modules": modules,
        "modules.processing": processing,
        "modules.shared": shared,
        "modules.devices": devices,
    }.items():
        monkeypatch.setitem(sys.modules, name, module)
    webui.install_fallback()
    webui.install_fallback()  # idempotent: a UI reload runs the script again
    yield processing, calls
    webui.uninstall_fallback()
    assert processing.process_images_inner is process_images_inner


def make_p(args, fail):
    p = P(args, types.SimpleNamespace(alwayson_scripts=[FakeScript()]))
    p.fail = fail
    return p


def test_oom_is_retried_once_with_frugal_settings_and_restored(host, rt):
    processing, calls = host
    p = make_p([True, "sdp", "inherit", "inherit", 0], fail=lambda attention: attention == "sdp")
    assert processing.process_images_inner(p) == "processed"
    assert calls == ["sdp", "gc", "sub-quad"]
    assert p.extra_generation_params["Optim fallback"].startswith("retried after out of memory")
    assert "attention=sub-quad" in p.extra_generation_params["Optim"]
    assert p.script_args[1:3] == (True, "sub-quad")
    p.close()  # the host always closes p (txt2img.py:105): the retried settings are restored
    assert rt.adapter.current == "Doggettx"
    first, second = list(rt.history)[-2:]
    assert first.restored and first.fallback and second.restored


def test_oom_retry_never_loops(host, rt):
    processing, calls = host
    p = make_p([True, "sdp"], fail=lambda attention: True)
    with pytest.raises(RuntimeError, match="sampling failed"):
        processing.process_images_inner(p)
    assert calls.count("gc") == 1 and len([c for c in calls if c != "gc"]) == 2
    p.close()
    assert rt.adapter.current == "Doggettx"


def test_no_retry_when_optim_is_off(host, rt):
    processing, calls = host
    p = make_p([False, "sdp"], fail=lambda attention: True)
    with pytest.raises(RuntimeError):
        processing.process_images_inner(p)
    assert calls == ["Doggettx"]


def test_bad_args_are_logged_and_change_nothing(host, rt, capsys):
    from lib_optim.log import setup_console_logging

    setup_console_logging("INFO")
    processing, calls = host
    p = make_p([True, "warp-drive"], fail=lambda attention: False)
    assert processing.process_images_inner(p) == "processed"
    assert "[Optim] attention: 'warp-drive' is not allowed" in capsys.readouterr().err
    assert calls == ["Doggettx"] and "Optim" not in p.extra_generation_params


def test_close_wrapper_restores_after_an_error_without_postprocess(host, rt):
    p = make_p([True, "split"], fail=lambda attention: False)
    webui.process(p, p.script_args[1:6])
    assert rt.adapter.current == "split"
    p.close()  # postprocess was skipped (an exception); p.close() still restores (docs/hosts.md §1.6)
    assert rt.adapter.current == "Doggettx"
    assert p.closed == 1


@pytest.mark.parametrize("kind", [HostKind.A1111, HostKind.FORGE_PREVIOUS])
def test_telemetry_infotext_is_json_safe_on_every_host(host, rt, kind):
    """Forge previous quotes infotext values as they are and serialises extra_generation_params with a plain
    json.dumps (modules/processing.py:606, :616, :717): a callable there fails the API request, so it gets the text
    from postprocess_batch (:950, before the batch's infotexts :959-1021). A1111 calls callables (:722-812)."""
    import json

    rt.host = kind
    sys.modules["modules.shared"].opts.optim_telemetry_infotext = True
    p = make_p([True, "split"], fail=lambda attention: False)
    webui.process(p, p.script_args[1:6])
    rt.step()
    if kind is HostKind.A1111:
        assert callable(p.extra_generation_params["Optim telemetry"])
    else:
        assert "Optim telemetry" not in p.extra_generation_params
        webui.after_batch(p)  # postprocess_batch
        assert "peak RSS" in p.extra_generation_params["Optim telemetry"]  # one step: no rate yet
        json.dumps(p.extra_generation_params)
    webui.after_batch(make_p([True], fail=lambda attention: False))  # another p: nothing to do
    p.close()
