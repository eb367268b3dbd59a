"""The in-WebUI benchmark: candidates, results, files and HTML (lib_optim.bench.generation), and the host glue's run
(lib_optim.hosts.optim_tab) against fake host modules. The imitated host code is cited at each fake."""

from __future__ import annotations

import csv
import json
import sys
import threading
import types
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_adapter import FakeAdapter

from lib_optim.bench import generation as generation_bench
from lib_optim.bench.generation import BASELINE, BenchCandidate, CandidateResult
from lib_optim.host_specs.kinds import HostKind
from lib_optim.hosts import optim_tab, webui
from lib_optim.hosts.base import HostModules
from lib_optim.runtime import Runtime, get_runtime
from lib_optim.settings import Attention, GenerationSettings, SettingsError, Tri

AVAILABLE = [Attention.HOST, Attention.AUTO, Attention.SDP, Attention.SPLIT, Attention.SUB_QUAD, Attention.NONE]


# --- candidates ------------------------------------------------------------------------------------------

A1111_FIELDS = ("enabled", "attention", "channels_last", "vae_on_cpu")


def _changed_fields(base: GenerationSettings, other: GenerationSettings) -> list[str]:
    return [k for k, v in other.to_dict().items() if v != base.to_dict()[k]]


def test_baseline_first_then_one_change_at_a_time_without_duplicates():
    base = GenerationSettings()
    cands = generation_bench.candidates(base, AVAILABLE, A1111_FIELDS, current={"attention": Attention.SDP})
    assert cands[0].label == BASELINE
    assert cands[0].settings == replace(base, enabled=True)
    baseline = cands[0].settings
    for c in cands[1:]:
        assert len(_changed_fields(baseline, c.settings)) == 1, c
        assert c.settings.enabled
    assert len({c.settings for c in cands}) == len(cands)
    labels = [c.label for c in cands]
    # sdp runs already (the host's choice): not offered again; host/auto/none never are
    # labels in the controls' words (on/off), not the API's true/false
    assert labels == [BASELINE, "attention=split", "attention=sub-quad", "channels_last=on", "vae_on_cpu=on"]


def test_explicit_settings_are_flipped_and_inherit_flips_the_hosts_state():
    base = GenerationSettings(attention=Attention.SPLIT, channels_last=Tri.ON, vae_on_cpu=Tri.INHERIT)
    current = {"vae_on_cpu": True, "attention": Attention.SDP}
    cands = generation_bench.candidates(base, AVAILABLE, A1111_FIELDS, current=current)
    by_label = {c.label: c.settings for c in cands}
    assert "attention=split" not in by_label  # the baseline's own backend
    assert by_label["attention=sdp"].attention is Attention.SDP  # base sets split, so sdp is a change
    assert by_label["channels_last=off"].channels_last is Tri.OFF
    assert by_label["vae_on_cpu=off"].vae_on_cpu is Tri.OFF  # the host has it on: off is the change


def test_inference_memory_only_where_supported_and_kinds_filter():
    base = GenerationSettings()
    forge_fields = (*A1111_FIELDS, "inference_memory_mb")
    forge = generation_bench.candidates(
        base, AVAILABLE, forge_fields, kinds=["inference_memory"], current={"inference_memory_mb": 1024}
    )
    assert [c.settings.inference_memory_mb for c in forge] == [None, 512, 2048]
    a1111 = generation_bench.candidates(
        replace(base, inference_memory_mb=2048), AVAILABLE, A1111_FIELDS, kinds=["inference_memory_mb", "vae_on_cpu"]
    )
    assert [c.label for c in a1111] == [BASELINE, "vae_on_cpu=on"]
    assert a1111[0].settings.inference_memory_mb is None
    with pytest.raises(SettingsError, match="kinds"):
        generation_bench.candidates(base, AVAILABLE, A1111_FIELDS, kinds=["warp"])


# --- results ---------------------------------------------------------------------------------------------


def _results() -> list[CandidateResult]:
    s = GenerationSettings(enabled=True)
    return [
        CandidateResult(BASELINE, s, seconds=2.0, it_per_s=5.0, peak_vram_mb=3000.0, peak_ram_mb=900.0),
        CandidateResult("attention=sdp", replace(s, attention=Attention.SDP), seconds=1.0, it_per_s=10.0),
        CandidateResult(
            "attention=<b>x</b>",
            replace(s, attention=Attention.SPLIT),
            seconds=None,
            error="out of memory: OutOfMemoryError: <CUDA> & co",
            out_of_memory=True,
        ),
        CandidateResult("vae_on_cpu=True", replace(s, vae_on_cpu=Tri.ON), seconds=4.0, it_per_s=5.1),
    ]


def test_summarize_gives_the_ratio_to_the_best():
    rows = generation_bench.summarize(_results())
    assert [r["ratio"] for r in rows] == [2.0, 1.0, None, 4.0]
    assert [r["winner"] for r in rows] == [False, True, False, False]
    assert rows[2]["error"].startswith("out of memory")
    assert rows[1]["attention"] == "sdp"


def test_winner_skips_failures_and_prefers_the_earlier_on_a_tie():
    s = GenerationSettings(enabled=True)
    failed_fast = CandidateResult("a", s, seconds=0.1, error="boom")
    slow = CandidateResult("b", s, seconds=3.0)
    assert generation_bench.winner([failed_fast, slow]) is slow
    tie = [CandidateResult(BASELINE, s, seconds=1.0), CandidateResult("c", s, seconds=1.0)]
    assert generation_bench.winner(tie).label == BASELINE
    assert generation_bench.winner([failed_fast]) is None
    assert generation_bench.winner([]) is None


def _timed(label: str, *seconds: float) -> CandidateResult:
    """One candidate's result from runs of these times, as run_benchmark combines them."""
    s = GenerationSettings(enabled=True)
    return generation_bench.combine_runs([CandidateResult(label, s, seconds=t) for t in seconds])


def test_a_lead_within_the_noise_keeps_the_baseline():
    """A 1.08x 'winner' from one run each was luck (two reruns picked others): the baseline stays."""
    one_run = [_timed(BASELINE, 2.16), _timed("attention=sdp", 2.0)]
    decided = generation_bench.verdict(one_run)
    assert decided.winner is one_run[0] and "within what one run per candidate can tell" in decided.note
    assert generation_bench.fastest(one_run) is one_run[1]
    assert "Keep your current settings." in generation_bench.report_html(one_run)
    # with repeats, the spread between runs is the noise: a lead larger than it wins ...
    clear = [_timed(BASELINE, 2.2, 2.3, 2.25), _timed("attention=sdp", 2.0, 2.05, 2.02)]
    assert generation_bench.winner(clear) is clear[1] and generation_bench.verdict(clear).note == ""
    # ... one inside it does not
    noisy = [_timed(BASELINE, 2.0, 2.6, 2.3), _timed("attention=sdp", 1.9, 2.4, 2.2)]
    decided = generation_bench.verdict(noisy)
    assert decided.winner is noisy[0] and "spread between its runs" in decided.note
    rows = generation_bench.summarize(noisy)
    assert [r["winner"] for r in rows] == [True, False] and rows[1]["ratio"] == 1.0  # ratios: to the fastest
    # a big lead from single runs still counts
    assert generation_bench.winner([_timed(BASELINE, 4.0), _timed("attention=sdp", 2.0)]).label == "attention=sdp"


def test_json_and_csv_round_trip(tmp_path):
    results = _results()
    when = datetime(2025, 1, 2, 3, 4, 5)
    json_path, csv_path = generation_bench.write_results(results, tmp_path / "out", meta={"steps": 2}, now=when)
    assert json_path.name == "optim-bench-20250102-030405.json"
    assert csv_path.name == "optim-bench-20250102-030405.csv"
    again = generation_bench.write_results(results, tmp_path / "out", now=when)
    assert again[0].name == "optim-bench-20250102-030405-2.json"  # never overwrites

    assert generation_bench.load_results(json_path) == results
    document = json.loads(json_path.read_text(encoding="utf-8"))
    assert document["winner"] == "attention=sdp"
    assert document["winner_settings"]["attention"] == "sdp"
    assert document["meta"] == {"steps": 2}
    assert document["rows"] == generation_bench.summarize(results)

    with csv_path.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == [r.label for r in results]
    assert rows[1]["seconds"] == "1.0" and rows[1]["winner"] == "True" and rows[1]["ratio"] == "1.0"
    assert rows[2]["seconds"] == "" and rows[2]["error"].startswith("out of memory")
    assert list(rows[0]) == list(generation_bench.CSV_COLUMNS)


def test_html_escapes_text():
    results = _results()
    for text in (
        generation_bench.bars_html(results),
        generation_bench.table_html(results),
        generation_bench.report_html(results, ["<p>"]),
    ):
        assert "<b>x</b>" not in text and "&lt;b&gt;x&lt;/b&gt;" in text
        assert "<CUDA>" not in text and "&lt;CUDA&gt; &amp; co" in text
    bars = generation_bench.bars_html(results)
    # bar length = seconds / the longest successful time (4 s): baseline 50 %, sdp 25 %, vae 100 %
    assert "width:50.0%" in bars and "width:25.0%" in bars and "width:100.0%" in bars
    assert "fastest" in bars and "out of memory" in bars
    assert "No results" in generation_bench.bars_html([])
    assert "&lt;script&gt;" in generation_bench.error_html("<script>")


# --- request validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "field", "allowed"),
    [
        ({"prompt": 3}, "prompt", "a string"),
        ({"width": 100}, "width", "a multiple of 8"),
        ({"width": 4096}, "width", "from 64 to 2048"),
        ({"height": 32}, "height", "from 64 to 2048"),
        ({"height": True}, "height", "whole number"),
        ({"steps": 0}, "steps", "from 1 to 50"),
        ({"steps": 51}, "steps", "from 1 to 50"),
        ({"steps": 2.5}, "steps", "whole number"),
        ({"kinds": ["warp"]}, "kinds", "attention, channels_last"),
        ({"candidates": []}, "candidates", "non-empty list"),
        ({"candidates": [{"attention": "warp"}]}, "candidates[0].attention", "sdp"),
        ({"candidates": [{}, {"vae_on_cpu": "maybe"}]}, "candidates[1].vae_on_cpu", "inherit"),
        ({"speed": "max"}, "request", "keys prompt, width"),
        ({"repeats": 0}, "repeats", "from 1 to 5"),
        ({"repeats": 6}, "repeats", "from 1 to 5"),
    ],
)
def test_bad_requests_name_field_value_and_allowed(payload, field, allowed):
    with pytest.raises(SettingsError) as info:
        generation_bench.parse_request(payload, host=HostKind.A1111)
    assert info.value.field == field
    assert allowed in info.value.allowed
    assert f"[Optim] {field}:" in str(info.value)


def test_a_good_request_and_explicit_candidates():
    base = GenerationSettings(vae_on_cpu=Tri.ON)
    request = generation_bench.parse_request(
        {"prompt": "x", "width": 64, "height": "128", "steps": 2, "candidates": [{}, {"attention": "sdp"}, {}]},
        host=HostKind.A1111,
        base=base,
    )
    assert (request.width, request.height, request.steps, request.seed) == (64, 128, 2, 1)
    assert request.candidates is not None and len(request.candidates) == 2  # duplicates dropped
    cands = generation_bench.explicit_candidates(request.candidates, base)
    assert [c.label for c in cands] == [BASELINE, "attention=sdp"]
    assert cands[1].settings.vae_on_cpu is Tri.ON  # completed from the defaults

    def refuse(settings):
        if settings.attention is Attention.SDP:
            raise ValueError("[Optim] attention: 'sdp' is not available here")

    with pytest.raises(SettingsError, match=r"candidates\[1\]"):
        generation_bench.parse_request({"candidates": [{}, {"attention": "sdp"}]}, base=base, validate=refuse)


# --- the host glue's run, with fake host modules -----------------------------------------------------------


class FIFOLock:
    """A1111 v1.10.1 modules/fifo_lock.py:6-37 (Forge f2 identical): a FIFO wrapper around a plain,
    non-reentrant threading.Lock — ``modules.call_queue.queue_lock`` (call_queue.py:8)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = True) -> bool:
        return self._lock.acquire(blocking)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    __enter__ = acquire

    def __exit__(self, *exc: object) -> None:
        self.release()


class Component:
    def __init__(self, value: Any) -> None:
        self.value = value


class OptimScript:
    """scripts/optim.py as the runner sees it: an AlwaysVisible script with its argument slice
    (A1111 v1.10.1 modules/scripts.py:634-687: args_from/args_to set when its ui() is built)."""

    args_from, args_to = 2, 7

    def title(self) -> str:
        return "Optim"

    def process(self, p: Any, *args: Any) -> None:
        webui.process(p, args)

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        webui.postprocess(p)


class OtherScript:
    args_from, args_to = 1, 2

    def title(self) -> str:
        return "Other"

    def process(self, p: Any, *args: Any) -> None:
        p.other_args = args

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        pass


class SamplerScript:
    """The built-in "Sampler" script (A1111 v1.10.1 modules/processing_scripts/sampler.py:8-45; Forge f2 the
    same file): a ScriptBuiltinUI, so ``setup_for_ui_only`` (scripts.py:352), whose ``setup`` overwrites
    ``p.steps`` and ``p.sampler_name`` with its controls' values (UI default: 20 steps)."""

    args_from, args_to = 7, 9
    setup_for_ui_only = True

    def title(self) -> str:
        return "Sampler"

    def setup(self, p: Any, steps: int, sampler_name: str) -> None:
        p.steps = steps
        p.sampler_name = sampler_name

    def process(self, p: Any, *args: Any) -> None:
        pass

    def postprocess(self, p: Any, processed: Any, *args: Any) -> None:
        pass


class ScriptRunner:
    """modules.scripts.ScriptRunner: ``inputs`` = [selectable-script dropdown, *every script's controls]
    (A1111 v1.10.1 modules/scripts.py:551, 634-716); hooks get ``p.script_args[args_from:args_to]`` (820-930)."""

    def __init__(self) -> None:
        self.alwayson_scripts = [OtherScript(), OptimScript(), SamplerScript()]
        self.inputs = (
            [Component("None"), Component("other-default")]
            + [Component(v) for v in GenerationSettings().to_positional()]
            + [Component(20), Component("DPM++ 2M")]
        )

    def setup_scrips(self, p: Any, *, is_ui: bool = True) -> None:
        # A1111 v1.10.1 modules/scripts.py:987-996: a UI-only setup is skipped when the request is an API one
        for s in self.alwayson_scripts:
            if hasattr(s, "setup") and (is_ui or not s.setup_for_ui_only):
                s.setup(p, *p.script_args[s.args_from : s.args_to])

    def process(self, p: Any) -> None:
        for s in self.alwayson_scripts:
            s.process(p, *p.script_args[s.args_from : s.args_to])

    def postprocess(self, p: Any, processed: Any) -> None:
        for s in self.alwayson_scripts:
            s.postprocess(p, processed, *p.script_args[s.args_from : s.args_to])


class State:
    """modules.shared.state (A1111 v1.10.1 modules/shared_state.py): begin() resets ``interrupted``."""

    def __init__(self) -> None:
        self.interrupted = False
        self.begun = 0
        self.ended = 0
        self.interrupt_on: str | None = None

    def begin(self, job: str = "(unknown)") -> None:
        self.begun += 1
        self.interrupted = False

    def end(self) -> None:
        self.ended += 1


class Options:
    """modules.options.Options.set/save (A1111 v1.10.1 modules/options.py:143-175; Forge f2 :144-182)."""

    def __init__(self, keys: list[str]) -> None:
        self.data: dict[str, Any] = {}
        self.data_labels = dict.fromkeys(keys, object())
        self.calls: list[tuple[str, Any, bool]] = []
        self.saved: list[str] = []

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        _ = self.data_labels[key]  # KeyError for an unknown key, like the host
        self.calls.append((key, value, run_callbacks))
        self.data[key] = value
        return True

    def save(self, filename: str) -> None:
        self.saved.append(filename)

    def __getattr__(self, name: str) -> Any:
        if name in self.__dict__.get("data", {}):
            return self.data[name]
        raise AttributeError(name)


@pytest.fixture
def host(monkeypatch, tmp_path):
    """Fake ``modules.*`` as the bench uses them; the real Optim glue (webui.process/postprocess/close)."""
    rt = Runtime(host=HostKind.A1111, adapter=FakeAdapter(device="cuda:0", dtype="float16"))
    monkeypatch.setattr("lib_optim.runtime._runtime", rt)
    assert get_runtime() is rt
    lock = FIFOLock()
    seen: list[dict[str, Any]] = []
    oom_for: set[str] = set()

    class P:
        """StableDiffusionProcessingTxt2Img (A1111 v1.10.1 modules/processing.py:137, 1166): keyword fields,
        ``close()`` called by the host's ``closing(p)`` (txt2img.py:105; api.py:468)."""

        def __init__(self, **kwargs: Any) -> None:
            self.__dict__.update(kwargs)
            self.extra_generation_params: dict[str, Any] = {}
            self.scripts: ScriptRunner | None = None
            self._script_args: tuple[Any, ...] = ()
            self.is_api = False
            self.closed = False

        # processing.py:280-294: setting script_args once scripts are set runs the scripts' setup(), the
        # UI-only ones unless p.is_api
        @property
        def script_args(self) -> tuple[Any, ...]:
            return self._script_args

        @script_args.setter
        def script_args(self, value: tuple[Any, ...]) -> None:
            self._script_args = value
            if self.scripts is not None and value:
                self.scripts.setup_scrips(self, is_ui=not self.is_api)

        def close(self) -> None:
            self.closed = True

    def process_images(p: P) -> str:
        # A1111 v1.10.1 modules/processing.py:818-858 → process_images_inner: scripts' process() (914-921),
        # one cfg callback per step (on_cfg_after_cfg → webui.on_step), postprocess() last (1147-1148).
        # An exception skips postprocess; p.close() restores (docs/hosts.md §1.6).
        assert lock.locked(), "generations run under the queue lock"
        assert p.do_not_save_samples and p.do_not_save_grid
        p.scripts.process(p)
        attention = rt.adapter.current
        seen.append({"attention": attention, "kwargs": dict(p.__dict__), "other": p.other_args})
        if attention in oom_for:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        for _ in range(p.steps):
            webui.on_step()
        if shared.state.interrupt_on == attention:
            shared.state.interrupted = True
        p.scripts.postprocess(p, "processed")
        return "processed"

    processing = types.ModuleType("modules.processing")
    processing.StableDiffusionProcessingTxt2Img = P
    processing.process_images = process_images
    shared = types.ModuleType("modules.shared")
    shared.opts = Options(
        ["optim_default_attention", "optim_default_channels_last", "optim_default_vae_on_cpu", "outdir_samples"]
    )
    shared.state = State()
    shared.sd_model = "model"
    shared.config_filename = str(tmp_path / "config.json")
    scripts = types.ModuleType("modules.scripts")
    scripts.scripts_txt2img = ScriptRunner()
    call_queue = types.ModuleType("modules.call_queue")
    call_queue.queue_lock = lock
    devices = types.ModuleType("modules.devices")
    devices.device = "cpu"
    devices.gc_calls = 0

    def torch_gc() -> None:
        devices.gc_calls += 1

    devices.torch_gc = torch_gc
    paths_internal = types.ModuleType("modules.paths_internal")
    paths_internal.data_path = str(tmp_path / "data")
    modules = types.ModuleType("modules")
    named = {
        "modules.processing": processing,
        "modules.shared": shared,
        "modules.scripts": scripts,
        "modules.call_queue": call_queue,
        "modules.devices": devices,
        "modules.paths_internal": paths_internal,
    }
    for name, module in named.items():
        setattr(modules, name.split(".")[1], module)
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "modules", modules)
    yield types.SimpleNamespace(
        rt=rt, seen=seen, oom_for=oom_for, shared=shared, devices=devices, modules=HostModules(named), lock=lock
    )
    rt.end_all()


def _cands(*attentions: str) -> list[BenchCandidate]:
    base = GenerationSettings(enabled=True)
    return [
        BenchCandidate(BASELINE if a == "host" else f"attention={a}", replace(base, attention=Attention(a)))
        for a in attentions
    ]


def test_run_benchmark_times_each_candidate_after_a_warm_up(host):
    progress: list[tuple[float, str]] = []
    results = optim_tab.run_benchmark(
        _cands("host", "sdp", "sub-quad"),
        prompt="a cat",
        width=64,
        height=64,
        steps=3,
        seed=7,
        progress=lambda f, t: progress.append((f, t)),
    )
    assert [r.label for r in results] == [BASELINE, "attention=sdp", "attention=sub-quad"]
    assert all(r.ok for r in results), results
    # warm-up (baseline) + one per candidate, each with the candidate's settings applied by the Optim script
    assert [s["attention"] for s in host.seen] == ["Doggettx", "Doggettx", "sdp", "sub-quad"]
    # what ran, in our names: the host's "Doggettx" is split
    assert [r.attention_used for r in results] == ["split", "sdp", "sub-quad"]
    assert host.rt.adapter.current == "Doggettx"  # restored after every generation
    assert host.rt.active_sessions() == 0
    first = host.seen[1]["kwargs"]
    assert (first["width"], first["height"], first["steps"], first["seed"], first["prompt"]) == (64, 64, 3, 7, "a cat")
    assert first["sampler_name"] == optim_tab.SAMPLER  # not the Sampler script's UI default
    assert first["closed"] is False and first["sd_model"] == "model"
    assert host.seen[1]["other"] == ("other-default",)  # the other scripts get their UI defaults
    assert all(r.it_per_s and r.it_per_s > 0 for r in results)
    assert [r.steps for r in results] == [3, 3, 3]  # the steps asked for, counted as they ran
    assert host.shared.state.begun == host.shared.state.ended == 4
    assert not host.lock.locked()
    assert progress[0][0] == 0.0 and progress[-1] == (1.0, "done")
    assert [f for f, _ in progress] == sorted(f for f, _ in progress)


def test_out_of_memory_in_one_candidate_is_a_failed_result(host):
    host.oom_for.add("sdp")
    results = optim_tab.run_benchmark(_cands("host", "sdp", "split"), prompt="x", width=64, height=64, steps=1)
    baseline, sdp, split = results
    assert baseline.ok and split.ok
    assert not sdp.ok and sdp.out_of_memory and sdp.seconds is None
    assert sdp.error.startswith("out of memory: OutOfMemoryError: CUDA out of memory")
    assert host.devices.gc_calls == 1
    # no out-of-memory retry with other settings inside a benchmark, and everything restored
    assert [s["attention"] for s in host.seen] == ["Doggettx", "Doggettx", "sdp", "split"]
    assert host.rt.adapter.current == "Doggettx" and host.rt.active_sessions() == 0
    assert generation_bench.winner(results) in (baseline, split)


def test_an_unavailable_candidate_fails_without_generating(host):
    base = GenerationSettings(enabled=True)
    cands = [
        BenchCandidate(BASELINE, base),
        BenchCandidate("attention=xformers", replace(base, attention=Attention.XFORMERS)),
    ]
    results = optim_tab.run_benchmark(cands, prompt="x", width=64, height=64, steps=1, warmup=False)
    assert results[0].ok
    assert "xformers" in results[1].error and "not available" in results[1].error
    assert len(host.seen) == 1


def test_an_interrupt_ends_the_run(host):
    host.shared.state.interrupt_on = "sdp"
    results = optim_tab.run_benchmark(_cands("host", "sdp", "split"), prompt="x", width=64, height=64, steps=1)
    assert [r.error for r in results] == [None, "interrupted", "interrupted"]
    assert [s["attention"] for s in host.seen] == ["Doggettx", "Doggettx", "sdp"]


def test_repeats_rotate_the_order_and_the_median_counts(host):
    results = optim_tab.run_benchmark(
        _cands("host", "sdp", "split"), prompt="x", width=64, height=64, steps=2, repeats=3
    )
    # warm-up, then 3 rounds, each starting one candidate later
    assert [s["attention"] for s in host.seen] == [
        "Doggettx",
        *("Doggettx", "sdp", "split"),
        *("sdp", "split", "Doggettx"),
        *("split", "Doggettx", "sdp"),
    ]
    assert [r.runs for r in results] == [3, 3, 3] and all(r.ok for r in results)
    assert host.rt.adapter.current == "Doggettx" and host.rt.active_sessions() == 0


def test_a_failed_candidate_is_not_run_again(host):
    host.oom_for.add("sdp")
    results = optim_tab.run_benchmark(_cands("host", "sdp"), prompt="x", width=64, height=64, steps=1, repeats=2)
    assert [s["attention"] for s in host.seen] == ["Doggettx", "Doggettx", "sdp", "Doggettx"]
    assert results[1].out_of_memory and results[1].runs == 1 and results[0].runs == 2


def test_an_interrupt_in_a_later_round_keeps_finished_runs(host):
    results = optim_tab.run_benchmark(
        _cands("host", "sdp", "split"), prompt="x", width=64, height=64, steps=1, repeats=2
    )
    assert all(r.runs == 2 for r in results)
    host.seen.clear()
    host.shared.state.interrupt_on = "split"
    results = optim_tab.run_benchmark(
        _cands("host", "sdp", "split"), prompt="x", width=64, height=64, steps=1, repeats=2
    )
    # round 1: host, sdp, split (interrupted) — the run ends there
    assert [s["attention"] for s in host.seen] == ["Doggettx", "Doggettx", "sdp", "split"]
    assert [r.error for r in results] == [None, None, "interrupted"]


def test_combine_runs_takes_the_median_and_the_first_failure():
    s = GenerationSettings(enabled=True)
    runs = [
        CandidateResult(BASELINE, s, seconds=3.0, it_per_s=2.0, peak_ram_mb=900.0, steps=4),
        CandidateResult(BASELINE, s, seconds=1.0, it_per_s=6.0, peak_ram_mb=950.0, steps=4),
        CandidateResult(BASELINE, s, seconds=2.0, it_per_s=4.0, peak_ram_mb=920.0, steps=4),
    ]
    combined = generation_bench.combine_runs(runs)
    assert (combined.seconds, combined.it_per_s, combined.peak_ram_mb, combined.runs) == (2.0, 4.0, 950.0, 3)
    oom = CandidateResult(BASELINE, s, error="out of memory: CUDA", out_of_memory=True)
    failed = generation_bench.combine_runs([runs[0], oom])
    assert failed.error == oom.error and failed.out_of_memory and failed.runs == 2
    with pytest.raises(ValueError):
        generation_bench.combine_runs([])


def test_results_directory_and_make_default(host, tmp_path):
    assert optim_tab.bench_directory(host.modules) == tmp_path / "data" / "outputs" / "optim-bench"
    settings = GenerationSettings(True, Attention.SPLIT, Tri.ON, Tri.INHERIT, 2048)
    stored = optim_tab.make_default(settings, host.modules)
    # inference memory is skipped where the host has no such option (A1111)
    assert stored == {
        "optim_default_attention": "split",
        "optim_default_channels_last": "on",
        "optim_default_vae_on_cpu": "inherit",
    }
    assert all(run_callbacks is False for _, _, run_callbacks in host.shared.opts.calls)
    assert host.shared.opts.saved == [host.shared.config_filename]
    # the next generation's defaults (what a request that leaves a key out gets)
    assert webui.defaults_from_options().attention is Attention.SPLIT


def test_api_run_and_make_default(host, monkeypatch):
    from fastapi import HTTPException

    with pytest.raises(HTTPException) as info:
        optim_tab.api_run({"width": 65})
    assert info.value.status_code == 422 and "[Optim] width: 65 is not allowed" in info.value.detail

    out = optim_tab.api_run({"prompt": "a cat", "width": 64, "height": 64, "steps": 1, "kinds": ["attention"]})
    assert [r["label"] for r in out["rows"]] == [BASELINE, "attention=sdp", "attention=sub-quad"]
    assert out["winner"]["label"] in {r["label"] for r in out["rows"]}
    for path in out["files"].values():
        assert path.startswith(str(optim_tab.bench_directory()))
    assert json.loads(Path(out["files"]["json"]).read_text(encoding="utf-8"))["meta"]["steps"] == 1

    stored = optim_tab.api_make_default({})
    assert stored["stored"]["optim_default_attention"] == out["winner"]["settings"]["attention"]
    stored = optim_tab.api_make_default({"settings": {"attention": "split"}})
    assert stored["stored"]["optim_default_attention"] == "split"
    for bad, field in (({"settings": {"attention": "warp"}}, "attention"), ({"x": 1}, "request")):
        with pytest.raises(HTTPException) as info:
            optim_tab.api_make_default(bad)
        assert info.value.status_code == 422 and f"[Optim] {field}:" in info.value.detail
    with pytest.raises(HTTPException, match="not available"):
        optim_tab.api_make_default({"settings": {"attention": "xformers"}})


def test_ui_run_reports_html_and_the_winner(host):
    html_text, best = optim_tab.ui_run("", 64, 64, 1, ["vae_on_cpu"])
    assert "Saved:" in html_text and "optim-bench-" in html_text
    assert best is not None and best["enabled"] is True
    assert "Saved as Settings → Optim defaults" in optim_tab.ui_make_default(best)
    assert "Run the benchmark first" in optim_tab.ui_make_default(None)
    assert "at least one" in optim_tab.ui_run("", 64, 64, 1, [])[0]
    assert "width" in optim_tab.ui_run("", 65, 64, 1, ["attention"])[0]
