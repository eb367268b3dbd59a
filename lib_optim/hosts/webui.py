"""Glue between the WebUI's script machinery and lib_optim, shared by A1111 and Forge.

scripts/optim.py stays a thin class; everything it does lives here so it can be read and tested in one
place. Host modules are imported inside functions: this module is imported at script load, after
``modules.shared`` exists.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lib_optim.fallback import infotext_note
from lib_optim.hostkinds import HostKind
from lib_optim.hosts import create_adapter, detect_running_host
from lib_optim.hosts.base import NotSupportedHere
from lib_optim.log import get_logger, setup_console_logging
from lib_optim.runtime import Runtime, get_runtime
from lib_optim.settings import (
    FIELD_NAMES,
    INFOTEXT_KEY,
    Attention,
    GenerationSettings,
    SettingsError,
    Tri,
    format_infotext,
    from_dict,
    from_script_args,
    parse_attention,
    parse_megabytes,
    parse_tri,
)
from lib_optim.telemetry import format_status

log = get_logger(__name__)

SCRIPT_TITLE = "Optim"
SECTION = ("optim", "Optim")


def ensure_runtime() -> Runtime:
    """Detect the host and create its adapter once per process (preload may have done it already)."""
    rt = get_runtime()
    if rt.adapter is None:
        checkout = detect_running_host()
        kind = checkout.kind if checkout else HostKind.A1111
        rt.host = kind
        rt.adapter = create_adapter(kind)
        try:
            rt.host_version = rt.adapter.version()
        except Exception:  # a missing version string must not stop the extension
            log.debug("host version unknown", exc_info=True)
    return rt


# --- options ---------------------------------------------------------------------------------------------


def _opts() -> Any:
    from modules import shared

    return shared.opts


def defaults_from_options() -> GenerationSettings:
    """Settings → Optim defaults, then the start-up profile's (``--optim-profile``) for fields left at their
    default there; a bad saved value is reported and ignored (never breaks the UI)."""
    opts = _opts()
    rt = get_runtime()
    try:
        saved = GenerationSettings(
            enabled=False,
            attention=parse_attention(getattr(opts, "optim_default_attention", "host"), rt.host),
            channels_last=parse_tri("channels_last", getattr(opts, "optim_default_channels_last", "inherit")),
            vae_on_cpu=parse_tri("vae_on_cpu", getattr(opts, "optim_default_vae_on_cpu", "inherit")),
            inference_memory_mb=parse_megabytes(
                "inference_memory_mb", getattr(opts, "optim_default_inference_memory_mb", 0)
            ),
        )
    except SettingsError as exc:
        log.warning("Settings → Optim has a value that is not allowed, using defaults: %s", exc)
        saved = GenerationSettings()
    return replace(saved.with_defaults_from(rt.defaults), enabled=False)


def apply_console_level() -> None:
    level = str(getattr(_opts(), "optim_console_level", "INFO") or "INFO")
    setup_console_logging(level)


def register_settings() -> None:
    from modules import shared

    from lib_optim import ui

    rt = ensure_runtime()
    names = [b.attention.value for b in rt.adapter.attention_backends()] if rt.adapter else ["host"]
    for key, spec in ui.settings_section_options(rt.host or HostKind.A1111, names).items():
        hosts = spec.pop("hosts", None)
        if hosts is not None and rt.host not in hosts:
            continue
        onchange = apply_console_level if key == "optim_console_level" else None
        info = shared.OptionInfo(
            spec["default"],
            spec["label"],
            spec["component"],
            spec["component_args"],
            onchange=onchange,
            section=SECTION,
        )
        shared.opts.add_option(key, info)


# --- the script's hooks --------------------------------------------------------------------------------


def build_ui(script: Any, is_img2img: bool) -> list[Any]:
    from modules.ui_components import InputAccordion

    from lib_optim import ui

    rt = ensure_runtime()
    adapter = rt.adapter
    assert adapter is not None
    backends = adapter.attention_backends()

    def status() -> str:
        summary = rt.findings_summary()
        problems = [f"[{f.severity.value}] {f.subject}: {f.message}" for f in rt.startup_findings]
        try:
            state = adapter.effective_state()
            attention = state.attention if state.model_loaded else "chosen when a model loads"
            text = f"{rt.host.display_name if rt.host else 'host'} · attention: {attention or 'unknown'}"
        except Exception as exc:  # before the first model load some hosts have no state to read
            log.debug("effective state unavailable", exc_info=True)
            text = f"state unavailable: {type(exc).__name__}"
        last = rt.history[-1] if rt.history else None
        if last is not None:
            text += f" · last Optim generation: {last.attention_used or 'host attention'}"
            text += " (restored)" if last.restored else " (running)" if last.finished is None else " (NOT restored)"
            if last.telemetry_text:
                text += f" · {last.telemetry_text}"
            if last.fallback:
                text += f" · out-of-memory retry: {last.fallback}"
        return ui.status_html(text, summary, problems)

    parts = ui.build(
        host=rt.host or HostKind.A1111,
        backends=backends,
        defaults=defaults_from_options(),
        elem_id=script.elem_id,
        input_accordion=InputAccordion,
        status=status,
        total_vram_mb=_total_vram_mb(),
        supported_fields=adapter.supported_fields(),
    )
    script.infotext_fields = parts.infotext_fields
    script.paste_field_names = parts.paste_field_names
    return parts.components


def _total_vram_mb() -> int | None:
    memory_management = sys.modules.get("backend.memory_management")
    if memory_management is None:  # A1111 has no backend package; the slider is hidden there anyway
        return None
    return int(getattr(memory_management, "total_vram", 0)) or None


def settings_for(args: Sequence[Any]) -> GenerationSettings:
    rt = get_runtime()
    if args and isinstance(args[0], dict):
        return from_dict(args[0], rt.host, base=defaults_from_options())
    return from_script_args(args, rt.host)


def process(p: Any, args: Sequence[Any]) -> None:
    rt = ensure_runtime()
    # A generation that ended without postprocess and without p.close() (an X/Y/Z cell that raised)
    # is restored here at the latest; generations are serialised by the queue lock (HOSTS.md §8.5).
    rt.end_others(p)
    try:
        settings = settings_for(args)
    except SettingsError as exc:
        log.error("%s — this generation runs without Optim changes", exc)
        return
    if not settings.enabled:
        return  # off: nothing changed, nothing measured
    assert rt.adapter is not None
    try:
        if settings.changes_anything:
            rt.adapter.validate(settings)
        session = rt.begin(p, settings, device=_generation_device())
    except (NotSupportedHere, SettingsError) as exc:
        log.error("%s — this generation runs without Optim changes", exc)
        return
    if session is None:
        return
    _wrap_close(p, rt)
    text = format_infotext(settings)
    if text:
        p.extra_generation_params[INFOTEXT_KEY] = text
    if settings.attention is Attention.AUTO and session.attention_used:
        p.extra_generation_params["Optim auto attention"] = session.attention_used
    if getattr(_opts(), "optim_telemetry_infotext", False):
        # a callable: the host calls it when it writes each image's infotext (A1111 processing.py:721-816)
        def telemetry_text(**_kwargs: Any) -> str | None:
            now = rt.telemetry_now(p)
            return format_status(now) if now is not None else None

        p.extra_generation_params["Optim telemetry"] = telemetry_text


def _generation_device() -> str | None:
    devices = sys.modules.get("modules.devices")
    device = getattr(devices, "device", None)
    return str(device) if device is not None else None


def on_step() -> None:
    get_runtime().step()


def _wrap_close(p: Any, rt: Runtime) -> None:
    """Restore from ``p.close()`` too: the host always calls it, even when a generation raises (§7.3)."""
    original = p.close
    if getattr(original, "_optim_wrapped", False):
        return

    def close(*a: Any, **kw: Any) -> Any:
        try:
            rt.end(p)
        finally:
            result = original(*a, **kw)
        return result

    close._optim_wrapped = True  # type: ignore[attr-defined]
    p.close = close


def before_sampling(p: Any) -> None:
    get_runtime().before_sampling(p)


def postprocess(p: Any) -> None:
    get_runtime().end(p)


def on_script_unloaded() -> None:
    """Reload UI re-executes scripts: nothing of ours may stay applied, and the wrapper goes too."""
    get_runtime().end_all()
    uninstall_fallback()


# --- out-of-memory fallback ---------------------------------------------------------------------------

_WRAPPED_MARK = "_optim_fallback_original"


def install_fallback() -> None:
    """Wrap ``modules.processing.process_images_inner`` so an out-of-memory error in sampling or VAE
    decode is retried once with more frugal settings. ``process_images`` looks the function up by name on
    every call (A1111 v1.10.1 modules/processing.py:845; Forge f2 :842), so the wrapper sits between them.
    It does nothing unless Optim is on for that generation."""
    from modules import processing

    current = processing.process_images_inner
    if getattr(current, _WRAPPED_MARK, None) is not None:
        return
    original = current

    def process_images_inner(p: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(p, *args, **kwargs)
        except BaseException as exc:
            step = retry_plan(p, exc)
            if step is None:
                raise
        try:
            return original(p, *args, **kwargs)
        finally:
            get_runtime().forget_retry(p)

    setattr(process_images_inner, _WRAPPED_MARK, original)
    processing.process_images_inner = process_images_inner


def uninstall_fallback() -> None:
    processing = sys.modules.get("modules.processing")
    current = getattr(processing, "process_images_inner", None)
    original = getattr(current, _WRAPPED_MARK, None)
    if processing is not None and original is not None:
        setattr(processing, "process_images_inner", original)  # noqa: B010 - the module may be a stand-in


def retry_plan(p: Any, exc: BaseException) -> Any:
    """Prepare ``p`` for its one retry after out of memory, or return None (then the error propagates)."""
    rt = get_runtime()
    step = rt.fallback_for(p, exc)
    if step is None:
        return None
    first_line = (str(exc).strip().splitlines() or [""])[0][:200]
    log.warning("%s (the error: %s: %s)", step.reason, type(exc).__name__, first_line)
    rt.end(p, error=exc)  # restore everything before the retry applies the frugal settings
    _free_memory()
    _set_script_args(p, step.settings.to_positional())
    p.extra_generation_params["Optim fallback"] = infotext_note(step)
    return step


def _free_memory() -> None:
    devices = sys.modules.get("modules.devices")
    gc = getattr(devices, "torch_gc", None)
    if callable(gc):
        gc()


def _set_script_args(p: Any, values: Sequence[Any]) -> None:
    runner = getattr(p, "scripts", None)
    script = next((s for s in getattr(runner, "alwayson_scripts", []) if s.title() == SCRIPT_TITLE), None)
    if script is None:
        raise RuntimeError("[Optim] the Optim script is not active for this generation")
    args = list(p.script_args)
    args[script.args_from : script.args_from + len(values)] = list(values)
    p.script_args = tuple(args) if isinstance(p.script_args, tuple) else args


# --- X/Y/Z plot -------------------------------------------------------------------------------------


def _set_script_arg(p: Any, name: str, value: Any) -> None:
    """Change our control ``name`` in ``p.script_args`` (and switch Optim on) for one X/Y/Z cell."""
    runner = getattr(p, "scripts", None)
    script = next((s for s in getattr(runner, "alwayson_scripts", []) if s.title() == SCRIPT_TITLE), None)
    if script is None:
        raise RuntimeError("[Optim] X/Y/Z: the Optim script is not active in this tab")
    args = list(p.script_args)
    current = args[script.args_from : script.args_to]
    if current and isinstance(current[0], dict):
        settings = from_dict(current[0], get_runtime().host).to_positional()
    else:
        settings = GenerationSettings().to_positional()
        settings[: len(current)] = current
    settings[0] = True
    settings[FIELD_NAMES.index(name)] = value
    _set_script_args(p, settings)


def register_xyz_axes() -> None:
    from modules import scripts

    xyz = next(
        (d.module for d in scripts.scripts_data if d.script_class.__module__ in ("xyz_grid.py", "xyz_grid")),
        None,
    )
    if xyz is None:
        log.debug("X/Y/Z plot script not found; no axes added")
        return
    rt = ensure_runtime()
    names = [b.attention.value for b in rt.adapter.attention_backends() if b.available] if rt.adapter else []
    tri = [t.value for t in Tri]

    def setter(field: str) -> Any:
        def apply(p: Any, x: Any, xs: Any) -> None:
            _set_script_arg(p, field, x)

        return apply

    def confirm_choices(field: str, allowed: Sequence[str]) -> Any:
        def confirm(p: Any, xs: Sequence[Any]) -> None:
            bad = [x for x in xs if x not in allowed]
            if bad:
                raise RuntimeError(f"[Optim] {field}: {bad[0]!r} is not allowed; allowed: {', '.join(allowed)}")

        return confirm

    def confirm_memory(p: Any, xs: Sequence[Any]) -> None:
        for x in xs:
            parse_megabytes("inference_memory_mb", x)

    axes = [
        xyz.AxisOption(
            f"[Optim] {label}", str, setter(field), confirm=confirm_choices(field, values), choices=lambda v=values: v
        )
        for label, field, values in (
            ("Attention", "attention", names),
            ("Channels-last", "channels_last", tri),
            ("VAE on CPU", "vae_on_cpu", tri),
        )
    ]
    if rt.adapter is not None and "inference_memory_mb" in rt.adapter.supported_fields():
        axes.append(
            xyz.AxisOption("[Optim] Inference memory (MB)", int, setter("inference_memory_mb"), confirm=confirm_memory)
        )
    existing = {a.label for a in xyz.axis_options}
    xyz.axis_options.extend(a for a in axes if a.label not in existing)


# --- API ---------------------------------------------------------------------------------------------


def register_api(app: Any) -> None:
    from modules import shared

    from lib_optim.api import register_routes

    rt = ensure_runtime()

    def validate(settings: GenerationSettings) -> None:
        if rt.adapter is not None:
            rt.adapter.validate(settings)

    def system() -> dict[str, Any]:
        from lib_optim.probe import probe_system

        return probe_system(allow_cuda_init=False).to_dict()

    from lib_optim.hosts import bench

    register_routes(
        app,
        host=rt.host,
        status=lambda: rt.status(system),
        api_auth=getattr(shared.cmd_opts, "api_auth", None),
        validate=validate,
        extra_routes=[
            ("/bench", bench.api_run, ["POST"]),
            ("/bench/default", bench.api_make_default, ["POST"]),
        ],
    )
    log.debug("API routes registered")


def log_level_name() -> str:
    return logging.getLevelName(logging.getLogger("lib_optim").getEffectiveLevel())
