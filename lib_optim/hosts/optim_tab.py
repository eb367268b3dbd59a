"""Host glue for the in-WebUI benchmark (the "Optim" tab and ``POST /optim/v1/bench``).

Each candidate is one txt2img generation through the host's own processing, exactly as the host's API runs
one (its txt2img route, docs/hosts.md §1.10): a
``StableDiffusionProcessingTxt2Img`` with ``p.scripts = scripts_txt2img`` and ``p.script_args`` = the
txt2img scripts' default values with the Optim slot holding the candidate's settings as one dict, so our
script applies them in ``process`` and re-applies them before every sampling pass (Forge rebuilds
``forge_objects``), and restores them afterwards — the same path as every normal generation. The model is
loaded by ``process_images`` itself (A1111 ``reload_model_weights``, Forge ``manage_model_and_prompt_cache``).

Everything runs under the host's ``modules.call_queue.queue_lock`` (docs/hosts.md §1.8), which is a
non-reentrant FIFO lock: the functions here must be called from a thread that does not hold it (a gradio
handler that is not wrapped in ``wrap_gradio_gpu_call``, a FastAPI route). Images are not saved.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from lib_optim.attention import Attention
from lib_optim.bench import BenchCandidate, CandidateResult
from lib_optim.bench import generation as generation_bench
from lib_optim.host_specs import HostKind
from lib_optim.hosts.base import HostModules
from lib_optim.hosts.common import defaults_from_options, ensure_runtime, first_line, optim_script
from lib_optim.log import get_logger
from lib_optim.oom import is_out_of_memory
from lib_optim.runtime import get_runtime
from lib_optim.settings import FIELD_NAMES, GenerationSettings, SettingsError, from_dict
from lib_optim.telemetry import GenerationMeter, Telemetry

log = get_logger(__name__)

SAMPLER = "Euler"  # present in every host (modules/sd_samplers_kdiffusion.py)
OUTPUT_FOLDER = ("outputs", "optim-bench")

Progress = Callable[[float, str], None]


class BenchError(RuntimeError):
    """The benchmark cannot run here (no Optim script in txt2img, settings frozen, ...)."""


# --- running ------------------------------------------------------------------------------------------


def _optim_script(runner: Any) -> Any:
    script = optim_script(runner)
    if script is None or script.args_from is None:
        raise BenchError("[Optim] bench: the Optim script is not loaded in txt2img; restart the WebUI")
    return script


def script_args_for(runner: Any, settings: GenerationSettings) -> tuple[Any, ...]:
    """The txt2img scripts' arguments: every control's current default value (what the host's API does with
    ``init_default_script_args``, A1111 v1.10.1 docs/hosts.md §1.10), index 0 = no selectable script,
    and our slot = the candidate's settings as one dict (lib_optim.settings.from_script_args)."""
    script = _optim_script(runner)
    inputs = list(getattr(runner, "inputs", None) or [])
    if len(inputs) < script.args_to:
        raise BenchError("[Optim] bench: the txt2img scripts have no controls yet; open the WebUI once and retry")
    args = [getattr(component, "value", None) for component in inputs]
    args[0] = 0
    args[script.args_from] = settings.to_dict()
    return tuple(args)


def _device(mods: HostModules) -> str | None:
    devices = mods.loaded("modules.devices")
    device = getattr(devices, "device", None)
    return str(device) if device is not None else None


def _free_memory(mods: HostModules) -> None:
    gc = getattr(mods.loaded("modules.devices"), "torch_gc", None)
    if callable(gc):
        try:
            gc()
        except Exception:  # freeing memory is best effort
            log.debug("torch_gc failed", exc_info=True)


def _host_attention(rt: Any) -> str:
    """What the host runs when Optim leaves attention to it (the baseline's "attention used")."""
    try:
        if rt.adapter is None:
            return ""
        return rt.adapter.attention_label(str(rt.adapter.effective_state().attention or ""))
    except Exception:  # only a label
        log.debug("effective state unavailable", exc_info=True)
        return ""


@dataclass
class _Job:
    prompt: str
    width: int
    height: int
    steps: int
    seed: int


def _generate(mods: HostModules, job: _Job, candidate: BenchCandidate) -> CandidateResult:
    """One generation with ``candidate``'s settings; the caller holds the queue lock."""
    processing = mods.get("modules.processing")
    shared = mods.get("modules.shared")
    scripts = mods.get("modules.scripts")
    rt = get_runtime()
    settings = candidate.settings
    if rt.adapter is not None and settings.changes_anything:
        try:
            rt.adapter.validate(settings)
        except ValueError as exc:
            return CandidateResult(candidate.label, settings, error=str(exc))
    runner = scripts.scripts_txt2img
    p = _txt2img(processing, shared, shared.opts, job)
    before = list(rt.history)
    known = {id(r) for r in before}
    meter = GenerationMeter(_device(mods), reset_peak_stats=True)
    error, interrupted, telemetry = _process(processing, shared, rt, p, runner, candidate, meter)
    record = next((r for r in reversed(rt.history) if id(r) not in known), None)
    del before
    return _candidate_result(mods, rt, candidate, record, telemetry, error, interrupted)


def _txt2img(processing: Any, shared: Any, opts: Any, job: _Job) -> Any:
    """The host's txt2img processing object for ``job`` (no images saved)."""
    return processing.StableDiffusionProcessingTxt2Img(
        sd_model=shared.sd_model,
        outpath_samples=getattr(opts, "outdir_samples", "") or getattr(opts, "outdir_txt2img_samples", None),
        outpath_grids=getattr(opts, "outdir_grids", "") or getattr(opts, "outdir_txt2img_grids", None),
        prompt=job.prompt,
        negative_prompt="",
        seed=job.seed,
        sampler_name=SAMPLER,
        batch_size=1,
        n_iter=1,
        steps=job.steps,
        width=job.width,
        height=job.height,
        do_not_save_samples=True,
        do_not_save_grid=True,
    )


def _process(
    processing: Any,
    shared: Any,
    rt: Any,
    p: Any,
    runner: Any,
    candidate: BenchCandidate,
    meter: GenerationMeter,
) -> tuple[BaseException | None, bool, Telemetry]:
    """Run ``p`` through the host's processing with the candidate's settings in our script's slot, metered:
    ``(the error it raised, whether the user interrupted it, the meter's reading)``."""
    error: BaseException | None = None
    interrupted = False
    with closing(p):  # p.close() restores Optim's changes whatever happens (docs/hosts.md §1.6)
        # As the host's API does (docs/hosts.md §1.5, §1.10): the built-in UI scripts (Sampler, Seed, Refiner) skip
        # their setup() for an API request; without this the Sampler script would put its UI defaults (20
        # steps, its first sampler) over ours.
        p.is_api = True
        p.scripts = runner
        p.script_args = script_args_for(runner, candidate.settings)
        # a benchmark measures the settings given: no out-of-memory retry with other ones (hosts/webui.py)
        rt.forbid_retry(p)
        state = shared.state
        state.begin(job="optim_bench")
        meter.start()
        try:
            processing.process_images(p)
        except Exception as exc:  # a failed candidate is a result, the benchmark goes on
            log.warning("bench %s failed: %s", candidate.label, first_line(exc), exc_info=True)
            error = exc
        finally:
            telemetry = meter.stop()
            interrupted = bool(getattr(state, "interrupted", False))
            state.end()
            rt.forget_retry(p)
            total_tqdm = getattr(shared, "total_tqdm", None)
            if total_tqdm is not None:
                total_tqdm.clear()
    return error, interrupted, telemetry


def _candidate_result(
    mods: HostModules,
    rt: Any,
    candidate: BenchCandidate,
    record: Any,
    telemetry: Telemetry,
    error: BaseException | None,
    interrupted: bool,
) -> CandidateResult:
    """The candidate's result from what the generation raised and what our script recorded (``record``)."""
    settings = candidate.settings
    inner = (record.telemetry or {}) if record is not None else {}
    common: dict[str, Any] = {
        "peak_vram_mb": inner.get("peak_allocated_mb") or telemetry.peak_allocated_mb,
        "peak_ram_mb": telemetry.process_peak_rss_mb,
        "attention_used": (record.attention_used if record is not None else "") or _host_attention(rt),
    }
    if error is not None:
        oom = is_out_of_memory(error)
        if oom:
            _free_memory(mods)
        text = ("out of memory: " if oom else "") + first_line(error)
        return CandidateResult(candidate.label, settings, seconds=None, error=text, out_of_memory=oom, **common)
    if interrupted:
        return CandidateResult(candidate.label, settings, error="interrupted", **common)
    if record is None:
        return CandidateResult(
            candidate.label,
            settings,
            error="the Optim script did not run for this generation (see the console)",
            **common,
        )
    if record.settings != settings.non_default():
        return CandidateResult(candidate.label, settings, error="Optim did not apply these settings (see the console)")
    if record.fallback:
        return CandidateResult(candidate.label, settings, error=f"needed an out-of-memory retry ({record.fallback})")
    compiled = inner.get("compile") or {}
    return CandidateResult(
        candidate.label,
        settings,
        seconds=round(telemetry.seconds, 4),
        it_per_s=inner.get("it_per_s"),
        steps=inner.get("steps"),
        compile_seconds=compiled.get("compile_seconds") if compiled.get("compiles") else None,
        **common,
    )


def run_benchmark(
    candidates: Sequence[BenchCandidate],
    *,
    prompt: str,
    width: int,
    height: int,
    steps: int,
    seed: int = 1,
    repeats: int = 1,
    progress: Progress | None = None,
    warmup: bool = True,
    host_modules: HostModules | None = None,
) -> list[CandidateResult]:
    """One warm-up generation (baseline settings, not counted), then ``repeats`` rounds of one timed
    generation per candidate; each round starts one candidate later, so a slow phase of the machine does not
    land on the same candidate every time, and a candidate's result is its median
    (:func:`lib_optim.bench.generation.combine_runs`).

    Takes the host's queue lock for the whole run, so no other generation interleaves; must not be called
    while holding it (it is not reentrant). An error in one candidate (out of memory included) becomes that
    candidate's failed result and it is not run again; an interrupt (the WebUI's Interrupt button) ends the
    run: candidates that finished a run keep their result, the others are marked interrupted.
    """
    mods = host_modules or HostModules()
    call_queue = mods.get("modules.call_queue")
    if call_queue is None:
        raise BenchError("[Optim] bench: not running inside a WebUI")
    job = _Job(prompt, width, height, steps, seed)
    compiling = [i for i, c in enumerate(candidates) if c.settings.compile.value != "off"]
    total = len(candidates) * repeats + (1 if warmup else 0) + len(compiling)
    report = _reporter(progress, total)
    if not candidates:
        return []
    run = _BenchRun(mods, job, candidates, report, [[] for _ in candidates])
    report(0, "waiting for the current generation to finish")
    with call_queue.queue_lock:
        if warmup and not run.warm_up():
            return [CandidateResult(c.label, c.settings, error="interrupted") for c in candidates]
        compile_seconds = run.compile_first(compiling)
        if compile_seconds is None:
            return [CandidateResult(c.label, c.settings, error="interrupted") for c in candidates]
        for round_index in range(repeats):
            if not run.one_round(round_index, repeats):
                break
    report(total, "done")
    results = [
        generation_bench.combine_runs(done_runs)
        if done_runs
        else CandidateResult(c.label, c.settings, error="interrupted")
        for c, done_runs in zip(candidates, run.runs, strict=True)
    ]
    return [
        replace(r, compile_seconds=compile_seconds[i]) if i in compile_seconds and r.ok else r
        for i, r in enumerate(results)
    ]


def _reporter(progress: Progress | None, total: int) -> Callable[[int, str], None]:
    """``report(done, text)``: ``progress`` told the share of the ``total`` generations done."""

    def report(done: int, text: str) -> None:
        if progress is not None:
            try:
                progress(done / total if total else 1.0, text)
            except Exception:  # a broken progress display must not stop the benchmark
                log.debug("progress callback failed", exc_info=True)

    return report


@dataclass
class _BenchRun:
    """The generations of one :func:`run_benchmark`, under the queue lock: ``runs[i]`` holds candidate ``i``'s
    results so far, ``done`` counts the generations for the progress report."""

    mods: HostModules
    job: _Job
    candidates: Sequence[BenchCandidate]
    report: Callable[[int, str], None]
    runs: list[list[CandidateResult]]
    done: int = 0

    def warm_up(self) -> bool:
        """One generation with the first candidate's settings, not counted; False when it was interrupted."""
        self.report(0, "warm-up (loads the model; not counted)")
        first = _generate(self.mods, self.job, BenchCandidate("warm-up", self.candidates[0].settings))
        if first.error is not None:
            log.warning("bench warm-up failed: %s", first.error)
            if first.error == "interrupted":
                return False
        self.done = 1
        return True

    def compile_first(self, compiling: Sequence[int]) -> dict[int, float | None] | None:
        """The compiled candidates' first run, not counted: their compile times, or None when interrupted.

        A compiled candidate first compiles (seconds to minutes): that run is its own warm-up, so the timed runs
        are the steady state; its compile time is reported beside them."""
        compile_seconds: dict[int, float | None] = {}
        for index in compiling:
            self.report(self.done, f"compiling for {self.candidates[index].label} (first run only; not counted)")
            first = _generate(self.mods, self.job, self.candidates[index])
            self.done += 1
            if first.error is not None:
                self.runs[index].append(first)  # a candidate that cannot even compile-and-run is not timed
                if first.error == "interrupted":
                    return None
            compile_seconds[index] = first.compile_seconds
        return compile_seconds

    def one_round(self, round_index: int, repeats: int) -> bool:
        """One timed generation per candidate, starting one candidate later each round; False when interrupted."""
        count = len(self.candidates)
        order = [(round_index + i) % count for i in range(count)]
        for index in order:
            candidate = self.candidates[index]
            runs = self.runs[index]
            if runs and not runs[-1].ok:
                self.done += 1  # failed already: running it again would only fail again
                continue
            where = f"round {round_index + 1}/{repeats}, " if repeats > 1 else ""
            self.report(self.done, f"{where}{order.index(index) + 1}/{count}: {candidate.label}")
            result = _generate(self.mods, self.job, candidate)
            self.done += 1
            log.info(
                "bench %s: %s",
                candidate.label,
                result.error or f"{result.seconds:.2f} s, {result.it_per_s or 0:.2f} it/s",
            )
            if result.error == "interrupted":
                if not runs:  # one that finished an earlier round keeps that
                    runs.append(result)
                return False
            runs.append(result)
        return True


# --- where results go, and "make the winner my default" -----------------------------------------------


def bench_directory(host_modules: HostModules | None = None) -> Path:
    """``<data dir>/outputs/optim-bench`` (``--data-dir``; the checkout by default, modules/paths_internal.py)."""
    mods = host_modules or HostModules()
    data = getattr(mods.get("modules.paths_internal"), "data_path", None)
    if not data:
        data = getattr(getattr(mods.loaded("modules.shared"), "cmd_opts", None), "data_dir", None)
    return Path(data or ".").joinpath(*OUTPUT_FOLDER)


def make_default(settings: GenerationSettings, host_modules: HostModules | None = None) -> dict[str, Any]:
    """Store ``settings`` as the Settings → Optim defaults and save the config.

    ``opts.set(..., run_callbacks=False)``: no onchange callback runs (some take the queue lock), and ours
    have no effect to apply — the defaults are read at every generation. Options this host does not have
    (inference memory on A1111) are skipped. Returns what was stored.
    """
    mods = host_modules or HostModules()
    shared = mods.get("modules.shared")
    if shared is None:
        raise BenchError("[Optim] bench: not running inside a WebUI")
    opts = shared.opts
    labels = getattr(opts, "data_labels", {})
    stored: dict[str, Any] = {}
    for key, value in settings.to_options().items():
        if key not in labels:
            continue
        try:
            opts.set(key, value, run_callbacks=False)
        except (AssertionError, RuntimeError) as exc:  # --freeze-settings and friends
            raise BenchError(f"[Optim] cannot change {key}: {exc}") from None
        if getattr(opts, key, value) != value:
            raise BenchError(f"[Optim] {key} was not changed (settings are frozen or restricted here)")
        stored[key] = value
    opts.save(shared.config_filename)
    log.info("Settings → Optim defaults set from the benchmark: %s", stored)
    return stored


# --- what the tab and the API call ---------------------------------------------------------------------


@dataclass(frozen=True)
class TabContext:
    """The running host as the benchmark sees it: its backends, the fields it can apply, what it does now
    (by field), and the current defaults (the baseline)."""

    host: HostKind | None
    base: GenerationSettings
    available: tuple[Attention, ...]
    supported_fields: tuple[str, ...]
    current: dict[str, Any]
    validate: Callable[[GenerationSettings], None] | None = None


def _context() -> TabContext:
    rt = ensure_runtime()
    adapter = rt.adapter
    if adapter is None:
        raise BenchError("[Optim] bench: no host adapter")
    backends = adapter.attention_backends()
    current: dict[str, Any] = {}
    try:
        state = adapter.effective_state()
        current.update(state.current)  # what the host does now, by field (FieldSpec.state)
        running = str(current.get("attention") or "").lower()
        current["attention"] = next(
            (
                b.attention
                for b in backends
                if b.attention not in (Attention.HOST, Attention.AUTO)
                and running
                and running in (b.host_name.lower(), b.attention.value)
            ),
            None,
        )
    except Exception:  # the candidates only get less precise without it
        log.debug("effective state unavailable for the bench", exc_info=True)
    return TabContext(
        host=rt.host,
        base=defaults_from_options(),
        available=tuple(b.attention for b in backends if b.available),
        supported_fields=adapter.meaningful_fields(),
        current=current,
        validate=adapter.validate,
    )


def plan(request: generation_bench.BenchRequest, ctx: TabContext) -> list[BenchCandidate]:
    if request.candidates is not None:
        return generation_bench.explicit_candidates(request.candidates, ctx.base)
    return generation_bench.candidates(
        ctx.base, ctx.available, ctx.supported_fields, kinds=request.kinds, current=ctx.current
    )


def bench(payload: Mapping[str, Any], progress: Progress | None = None) -> dict[str, Any]:
    """Validate, run, save; raises :class:`SettingsError` for a bad request."""
    ctx = _context()
    request = generation_bench.parse_request(payload, host=ctx.host, base=ctx.base, validate=ctx.validate)
    candidates = plan(request, ctx)
    results = run_benchmark(
        candidates,
        prompt=request.prompt,
        width=request.width,
        height=request.height,
        steps=request.steps,
        seed=request.seed,
        repeats=request.repeats,
        progress=progress,
    )
    meta = {
        "host": ctx.host.value if ctx.host else None,
        "prompt": request.prompt,
        "width": request.width,
        "height": request.height,
        "steps": request.steps,
        "seed": request.seed,
        "repeats": request.repeats,
        "sampler": SAMPLER,
        "baseline": replace(ctx.base, enabled=True).to_dict(),
    }
    json_path, csv_path = generation_bench.write_results(results, bench_directory(), meta=meta)
    decided = generation_bench.verdict(results)
    best = decided.winner
    get_runtime().last_bench_winner = best
    return {
        "rows": generation_bench.summarize(results),
        "winner": None if best is None else {"label": best.label, "settings": best.settings.to_dict()},
        "winner_note": decided.note,
        "files": {"json": str(json_path), "csv": str(csv_path)},
        "meta": meta,
        "results": results,
    }


def _http_error(message: str, status: int = 422) -> Exception:
    from fastapi import HTTPException

    return HTTPException(status_code=status, detail=message)


def api_run(payload: dict[str, Any]) -> dict[str, Any]:
    """``POST /optim/v1/bench``: 422 naming field, value and allowed values for a bad request."""
    try:
        out = bench(payload)
    except SettingsError as exc:
        raise _http_error(str(exc)) from None
    except BenchError as exc:
        raise _http_error(str(exc), 409) from None
    out.pop("results")
    return out


def api_make_default(payload: dict[str, Any]) -> dict[str, Any]:
    """``POST /optim/v1/bench/default``: ``{"settings": {...}}``, or ``{}`` for the latest run's winner."""
    if not isinstance(payload, dict):
        raise _http_error(str(SettingsError("request", payload, 'a JSON object: {"settings": {...}} or {}')))
    unknown = [k for k in payload if k != "settings"]
    if unknown:
        raise _http_error(str(SettingsError("request", unknown[0], "the key settings")))
    try:
        if "settings" in payload:
            ctx = _context()
            settings = from_dict(payload["settings"], ctx.host)
            if ctx.validate is not None:
                ctx.validate(settings)
        elif (last := get_runtime().last_bench_winner) is not None:
            settings = last.settings
        else:
            raise SettingsError("settings", None, "a settings object, or run POST /optim/v1/bench first")
        stored = make_default(settings)
    except SettingsError as exc:
        raise _http_error(str(exc)) from None
    except BenchError as exc:
        raise _http_error(str(exc), 409) from None
    except ValueError as exc:  # NotSupportedHere
        raise _http_error(str(exc)) from None
    return {"stored": stored, "settings": {k: v for k, v in settings.to_dict().items() if k in FIELD_NAMES}}


def ui_run(
    prompt: str,
    width: Any,
    height: Any,
    steps: Any,
    kinds: Sequence[str],
    repeats: Any = 1,
    progress: Progress | None = None,
) -> tuple[str, dict[str, Any] | None]:
    """The tab's Run button: (report HTML, the winner's settings dict or None)."""
    payload = {
        "prompt": prompt or generation_bench.DEFAULT_PROMPT,
        "width": width,
        "height": height,
        "steps": steps,
        "repeats": repeats,
    }
    payload["kinds"] = list(kinds or [])
    if not payload["kinds"]:
        return generation_bench.error_html("Choose at least one kind of candidate."), None
    try:
        out = bench(payload, progress)
    except (SettingsError, BenchError) as exc:
        return generation_bench.error_html(str(exc)), None
    except Exception as exc:  # the tab shows it instead of a generic gradio "Error"
        log.exception("the benchmark failed")
        return generation_bench.error_html(f"[Optim] bench failed: {first_line(exc)}"), None
    files = [out["files"]["json"], out["files"]["csv"]]
    return generation_bench.report_html(out["results"], files), (out["winner"] or {}).get("settings")


def ui_make_default(winner_settings: Mapping[str, Any] | None) -> str:
    """The tab's "Make the winner my default" button: a message."""
    if not winner_settings:
        return generation_bench.error_html("Run the benchmark first.")
    try:
        settings = from_dict(winner_settings, get_runtime().host)
        stored = make_default(settings)
    except (SettingsError, BenchError) as exc:
        return generation_bench.error_html(str(exc))
    text = ", ".join(f"{k.removeprefix('optim_default_')} = {v}" for k, v in stored.items())
    return (
        f"<p>Saved as Settings → Optim defaults: {html.escape(text)}. "
        "The Optim accordion applies them when it is on (the API: when a key is left out).</p>"
    )


def ui_tab() -> list[tuple[Any, str, str]]:
    """For ``script_callbacks.on_ui_tabs``."""
    from lib_optim import ui

    ctx = _context()
    kinds = [k for k in generation_bench.KINDS if k in ctx.supported_fields]
    return [ui.build_bench_tab(run=ui_run, make_default=ui_make_default, kinds=kinds)]


def api_routes() -> list[tuple[str, Callable[..., Any], list[str]]]:
    """The benchmark's routes under ``/optim/v1`` (registered with the others by lib_optim.hosts.webui)."""
    return [("/bench", api_run, ["POST"]), ("/bench/default", api_make_default, ["POST"])]
