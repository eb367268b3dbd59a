"""Glue between the WebUI's script machinery and lib_optim, shared by every host.

scripts/optim.py stays a thin class; everything it does lives here so it can be read and tested in one
place. It registers everything of ours with the host: the script's hooks, the Settings → Optim page, the
X/Y/Z axes, the API routes (the benchmark's included) and the Optim tab. Host modules are imported inside
functions: this module is imported at script load, after ``modules.shared`` exists.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from lib_optim.adapter import NotSupportedHere
from lib_optim.host_specs import HostKind, host_spec
from lib_optim.hosts import common, optim_tab, warmup
from lib_optim.hosts.common import SECTION, SETTINGS_CATEGORY, defaults_from_options, ensure_runtime, optim_script
from lib_optim.log import get_logger, setup_console_logging
from lib_optim.oom import infotext_note
from lib_optim.runtime import Runtime, compile_summary, compiled_text, get_runtime, vae_tiling_summary
from lib_optim.settings import (
    FIELDS_BY_NAME,
    INFOTEXT_KEY,
    SETTING_FIELDS,
    Attention,
    GenerationSettings,
    SettingsError,
    format_infotext,
    from_dict,
    from_script_args,
)
from lib_optim.telemetry import format_status

log = get_logger(__name__)


def apply_console_level() -> None:
    level = str(getattr(common.opts(), "optim_console_level", "INFO") or "INFO")
    setup_console_logging(level)


def register_settings() -> None:
    from modules import shared

    from lib_optim import ui

    rt = ensure_runtime()
    assert rt.adapter is not None
    backends = rt.adapter.attention_backends()
    for key, spec in ui.settings_section_options(rt.host or HostKind.A1111, backends, rt.adapter.supported_fields()):
        onchange = apply_console_level if key == "optim_console_level" else None
        info = shared.OptionInfo(
            spec["default"],
            spec["label"],
            spec["component"],
            spec["component_args"],
            onchange=onchange,
            section=SECTION,
            category_id=SETTINGS_CATEGORY,
        )
        shared.opts.add_option(key, info)


# --- the script's hooks --------------------------------------------------------------------------------


def status_text(rt: Runtime) -> str:
    """The accordion's status line: the host, the attention it runs, the last Optim generation, the compile
    warm-up."""
    from lib_optim import ui

    summary = rt.findings_summary()
    problems = [f"[{f.severity.value}] {f.subject}: {f.message}" for f in rt.startup_findings]
    adapter = rt.adapter
    try:
        state = adapter.effective_state() if adapter is not None else None
        running = adapter.attention_label(state.attention) if adapter is not None and state else "unknown"
        attention = (running if state.model_loaded else "chosen when a model loads") if state else "unknown"
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
    warm = rt.warmup.snapshot()
    if warm.text():
        text += f" · {warm.text()}"
    unavailable = ui.unavailable_note(adapter.attention_backends()) if adapter is not None else ""
    return ui.status_html(text, summary, problems, unavailable, warmup_state=warm.state)


def build_ui(script: Any, is_img2img: bool) -> list[Any]:
    from modules.ui_components import InputAccordion

    from lib_optim import ui

    rt = ensure_runtime()
    adapter = rt.adapter
    assert adapter is not None
    parts = ui.build(
        host=rt.host or HostKind.A1111,
        backends=adapter.attention_backends(),
        defaults=defaults_from_options(),
        elem_id=script.elem_id,
        input_accordion=InputAccordion,
        status=lambda: status_text(rt),
        total_vram_mb=adapter.total_memory_mb(),
        supported_fields=adapter.meaningful_fields(),
    )
    script.infotext_fields = parts.infotext_fields
    script.paste_field_names = parts.paste_field_names
    return parts.components


def settings_for(args: Sequence[Any]) -> GenerationSettings:
    rt = get_runtime()
    if args and isinstance(args[0], dict):
        return from_dict(args[0], rt.host, base=defaults_from_options())
    return from_script_args(args, rt.host)


def process(p: Any, args: Sequence[Any]) -> None:
    rt = ensure_runtime()
    # A generation that ended without postprocess and without p.close() (an X/Y/Z cell that raised)
    # is restored here at the latest; generations are serialised by the queue lock (docs/hosts.md §1.8).
    rt.end_others(p)
    settings: GenerationSettings | None = None
    try:
        settings = settings_for(args)
    except SettingsError as exc:
        log.error("%s — this generation runs without Optim changes", exc)
    # every generation, Optim on or off: the compile warm-up keeps off the model until it ends
    warmup.before_generation(rt, p, settings)
    _wrap_close(p, rt)
    if settings is None or not settings.enabled:
        return  # off: nothing changed, nothing measured
    try:
        session = rt.begin(p, settings, device=common.generation_device())  # validates once, in the adapter
    except (NotSupportedHere, SettingsError) as exc:
        log.error("%s — this generation runs without Optim changes", exc)
        return
    if session is None:
        return
    text = format_infotext(settings)
    if text:
        p.extra_generation_params[INFOTEXT_KEY] = text
    if settings.attention is Attention.AUTO and session.attention_used:
        p.extra_generation_params["Optim auto attention"] = session.attention_used
    if settings.compile.value != "off":
        # known after sampling: written when the image's infotext is (docs/hosts.md §7.5)
        def compile_text() -> str | None:
            summary = compile_summary(session)
            return compiled_text(summary) if summary is not None else None

        add_late_infotext(p, "Optim compile", compile_text, rt.host)
    if settings.vae_tiling.value in ("on", "auto"):
        # which decodes were tiled is known after decoding (auto decides per call)
        def tiling_text() -> str | None:
            summary = vae_tiling_summary(session)
            return str(summary["text"]).removeprefix("VAE ") if summary is not None else None

        add_late_infotext(p, "Optim VAE tiling", tiling_text, rt.host)
    if getattr(common.opts(), "optim_telemetry_infotext", False):

        def telemetry_text() -> str | None:
            now = rt.telemetry_now(p)
            return format_status(now) if now is not None else None

        add_late_infotext(p, "Optim telemetry", telemetry_text, rt.host)


_LATE_INFOTEXT = "_optim_late_infotext"


def add_late_infotext(p: Any, key: str, compute: Callable[[], str | None], host: HostKind | None) -> None:
    """An infotext entry known only after sampling. A1111, Forge f2 and reForge call a callable in
    ``extra_generation_params`` when each image's infotext is written; Forge previous does not and fails every API
    request with one there (docs/hosts.md §7.5), so there the text is written by :func:`after_batch`
    (``postprocess_batch``: after decoding, before the batch's infotexts)."""
    if host is not None and not host_spec(host).infotext_callables:
        pending = getattr(p, _LATE_INFOTEXT, None)
        if pending is None:
            pending = {}
            setattr(p, _LATE_INFOTEXT, pending)
        pending[key] = compute
        return

    def call(**_kwargs: Any) -> str | None:
        return compute()

    p.extra_generation_params[key] = call


def after_batch(p: Any) -> None:
    """From ``postprocess_batch``: the late infotext entries of :func:`add_late_infotext`, as text so far."""
    for key, compute in (getattr(p, _LATE_INFOTEXT, None) or {}).items():
        text = compute()
        if text is not None:
            p.extra_generation_params[key] = text


def announce_compile(message: str) -> None:
    """The first compile of a model says so in the console and in the WebUI's progress text (docs/hosts.md
    §1.8: ``shared.state.textinfo`` is what the progress bar shows under the image)."""
    log.info("%s", message.removeprefix("[Optim] "))
    import sys

    state = getattr(sys.modules.get("modules.shared"), "state", None)
    if state is not None:
        state.textinfo = message


def install_compile_announcer() -> None:
    from lib_optim.compile import get_compiler

    get_compiler().on_compile = announce_compile


def on_step() -> None:
    get_runtime().step()


def on_model_loaded(sd_model: Any) -> None:
    """``script_callbacks.on_model_loaded``: the compile warm-up (:mod:`lib_optim.hosts.warmup`)."""
    warmup.on_model_loaded(sd_model)


def _wrap_close(p: Any, rt: Runtime) -> None:
    """Restore from ``p.close()`` too: the host always calls it, even when a generation raises (docs/hosts.md §1.6)."""
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
    every call (docs/hosts.md §7.1), so the wrapper sits between them. It does nothing unless Optim is on
    for that generation."""
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
    import sys

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
    log.warning("%s (the error: %s)", step.reason, common.first_line(exc, 200))
    rt.end(p, error=exc)  # restore everything before the retry applies the frugal settings
    common.free_memory()
    _set_script_args(p, step.settings.to_positional())
    p.extra_generation_params["Optim fallback"] = infotext_note(step)
    return step


def _set_script_args(p: Any, values: Sequence[Any]) -> None:
    script = optim_script(getattr(p, "scripts", None))
    if script is None:
        raise RuntimeError("[Optim] the Optim script is not active for this generation")
    args = list(p.script_args)
    args[script.args_from : script.args_from + len(values)] = list(values)
    p.script_args = tuple(args) if isinstance(p.script_args, tuple) else args


# --- X/Y/Z plot -------------------------------------------------------------------------------------


def _set_script_arg(p: Any, name: str, value: Any) -> None:
    """Change our control ``name`` in ``p.script_args`` (and switch Optim on) for one X/Y/Z cell."""
    script = optim_script(getattr(p, "scripts", None))
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
    settings[list(FIELDS_BY_NAME).index(name)] = value
    _set_script_args(p, settings)


def register_xyz_axes() -> None:
    """One X/Y/Z axis per field this host supports (``[Optim] <label>``), values checked before the grid."""
    from modules import scripts

    xyz = next(
        (d.module for d in scripts.scripts_data if d.script_class.__module__ in ("xyz_grid.py", "xyz_grid")),
        None,
    )
    if xyz is None:
        log.debug("X/Y/Z plot script not found; no axes added")
        return
    rt = ensure_runtime()
    if rt.adapter is None:
        return
    supported = rt.adapter.supported_fields()
    available = {"attention": [a.value for a in rt.adapter.available_attention()]}

    def setter(field: str) -> Any:
        def apply(p: Any, x: Any, xs: Any) -> None:
            _set_script_arg(p, field, x)

        return apply

    def confirm(field: str) -> Any:
        spec = FIELDS_BY_NAME[field]

        def check(p: Any, xs: Sequence[Any]) -> None:
            for x in xs:
                try:
                    spec.parse(x, rt.host, available.get(field))
                except SettingsError as exc:
                    raise RuntimeError(str(exc)) from None

        return check

    axes = []
    for spec in SETTING_FIELDS:
        if spec.name not in supported:
            continue
        choices = spec.kind.choices(rt.host, available.get(spec.name))
        axes.append(
            xyz.AxisOption(
                f"[Optim] {spec.label}",
                str if choices is not None else int,
                setter(spec.name),
                confirm=confirm(spec.name),
                **({"choices": lambda c=choices: c} if choices is not None else {}),
            )
        )
    existing = {a.label for a in xyz.axis_options}
    xyz.axis_options.extend(a for a in axes if a.label not in existing)


# --- API and the Optim tab -----------------------------------------------------------------------------------


def register_api(app: Any) -> None:
    from modules import shared

    from lib_optim.api import register_routes

    rt = ensure_runtime()

    def validate(settings: GenerationSettings) -> None:
        if rt.adapter is not None:
            rt.adapter.validate(settings)

    def system() -> dict[str, Any]:
        from lib_optim.gpu import probe_system

        return probe_system(allow_cuda_init=False).to_dict()

    register_routes(
        app,
        host=rt.host,
        status=lambda: rt.status(system),
        api_auth=getattr(shared.cmd_opts, "api_auth", None),
        validate=validate,
        available=lambda: {"attention": [a.value for a in rt.adapter.available_attention()]} if rt.adapter else {},
        extra_routes=optim_tab.api_routes(),
    )
    log.debug("API routes registered")


def ui_tabs() -> list[tuple[Any, str, str]]:
    """For ``script_callbacks.on_ui_tabs``: the Optim tab."""
    return optim_tab.ui_tab()
