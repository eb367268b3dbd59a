"""The Optim accordion, the Settings → Optim page and the Optim tab: the only lib_optim module that imports gradio.

Works with gradio 3.41 (A1111) and 4.40 (Forge f2): only components, arguments and ``gr.update`` that both
accept (docs/hosts.md §1.12). Host pieces (``InputAccordion``, ``elem_id``) are passed in by the script, so this
module imports no host code. ``build`` has no side effects: the API calls ``ui()`` twice more per tab to
read default values (docs/hosts.md §1.10). Every control comes from :data:`lib_optim.settings.FIELDS`.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from lib_optim.adapter import BackendInfo
from lib_optim.host_specs import HostKind
from lib_optim.launch import PROFILES, ProfileError, resolve
from lib_optim.settings import (
    FIELDS,
    FIELDS_BY_NAME,
    INFOTEXT_KEY,
    SETTING_FIELDS,
    FieldSpec,
    GenerationSettings,
    MegabytesKind,
    SettingsError,
    parse_infotext,
    tooltips,
)

NO_PROFILE = "(keep)"
SLIDER_DEFAULT_MAX_MB = 24576  # the memory sliders' range when the host has no GPU size to offer


@dataclass
class UiParts:
    components: list[Any]  # in FIELDS order: what ui() returns, one script argument each
    infotext_fields: list[tuple[Any, Any]]
    paste_field_names: list[str]


def attention_choices(backends: Sequence[BackendInfo]) -> list[str]:
    return [b.attention.value for b in backends if b.available]


def unavailable_note(backends: Sequence[BackendInfo]) -> str:
    missing = [f"{b.attention.value}: {b.reason}" for b in backends if not b.available]
    return ("Not available here — " + "; ".join(missing)) if missing else ""


def status_html(
    text: str, findings_summary: str, problems: Sequence[str] = (), unavailable: str = "", *, warmup_state: str = ""
) -> str:
    """The status line; findings and what is unavailable fold away (``<details>``), so they take one line.
    ``warmup_state``: the compile warm-up's state, as ``data-warmup`` (javascript/optim.js refreshes the line while
    it is ``running``)."""
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    details = f"<details><summary>{html.escape(findings_summary)}</summary><ul>{items}</ul></details>" if items else ""
    missing = (
        f'<details class="optim-unavailable"><summary>not available here</summary>{html.escape(unavailable)}</details>'
        if unavailable
        else ""
    )
    return (
        f'<div class="optim-status" data-warmup="{html.escape(warmup_state, quote=True)}">'
        f'<span class="optim-status-text">{html.escape(text)}</span>'
        f'<span class="optim-status-findings">{html.escape(findings_summary)}</span>{details}{missing}</div>'
    )


def tips_html(tips: dict[str, str]) -> str:
    """The controls' tooltips (FieldSpec.tooltip by field name) as hidden data for javascript/optim.js, which sets
    each control's ``title`` from it."""
    return f'<span class="optim-tips" hidden data-tips="{html.escape(json.dumps(tips), quote=True)}"></span>'


def control_value(spec: FieldSpec, settings: GenerationSettings, choices: Sequence[str] | None = None) -> Any:
    """What ``spec``'s control shows for ``settings``: a value the control cannot offer falls back to its default."""
    value = spec.kind.to_ui(getattr(settings, spec.name))
    if choices is not None and value not in choices:
        return spec.kind.to_ui(spec.default)
    return value


def profile_values(name: str, host: HostKind, backends: Sequence[BackendInfo], current: Sequence[Any]) -> list[Any]:
    """The control values a profile puts in (attention it cannot do here falls back to ``host``)."""
    if name == NO_PROFILE or name not in PROFILES:
        return [gr.update() for _ in current]
    try:
        generation = resolve(PROFILES[name], host).generation
    except ProfileError:
        return [gr.update() for _ in current]
    available = attention_choices(backends)
    return [
        gr.update(value=control_value(spec, generation, available if spec.name == "attention" else None))
        for spec in SETTING_FIELDS
    ]


def _from_infotext(name: str, host: HostKind) -> Callable[[dict[str, Any]], Any]:
    def read(params: dict[str, Any]) -> Any:
        text = params.get(INFOTEXT_KEY)
        if not text:
            return None
        try:
            settings = parse_infotext(str(text), host)
        except SettingsError:
            return None  # pasting someone else's infotext must not break the paste of everything else
        return FIELDS_BY_NAME[name].kind.to_ui(getattr(settings, name))

    return read


def _control(
    spec: FieldSpec,
    host: HostKind,
    value: Any,
    elem_id: Callable[[str], str],
    visible: bool,
    attention: Sequence[str],
    total_vram_mb: int | None,
) -> Any:
    """One field's control, by the field's kind (lib_optim.settings)."""
    common = {"label": spec.label, "value": value, "elem_id": elem_id(spec.name), "visible": visible}
    control = spec.kind.control
    if control == "dropdown":
        choices = list(attention) if spec.name == "attention" else spec.kind.choices(host, None)
        return gr.Dropdown(choices=choices, **common)
    if control == "radio":
        return gr.Radio(choices=spec.kind.choices(host, None), **common)
    if control == "slider" and isinstance(spec.kind, MegabytesKind):
        top = max(total_vram_mb or SLIDER_DEFAULT_MAX_MB, 4096)
        return gr.Slider(minimum=0, maximum=top, step=spec.kind.low, info=spec.help, **common)
    if control == "checkbox":
        return gr.Checkbox(**common)
    return gr.Textbox(**common)


def build(
    *,
    host: HostKind,
    backends: Sequence[BackendInfo],
    defaults: GenerationSettings,
    elem_id: Callable[[str], str],
    input_accordion: Callable[..., Any],
    status: Callable[[], str],
    total_vram_mb: int | None = None,
    supported_fields: Sequence[str] = ("enabled", "attention", "channels_last", "vae_on_cpu"),
) -> UiParts:
    """The accordion: the on/off switch, then one control per field in :data:`FIELDS` order (the attention
    dropdown beside the profile picker, switches two to a row, sliders on their own); fields the host cannot
    use here are hidden (their value stays at the default)."""
    attention = attention_choices(backends)
    controls: list[Any] = []
    tips = tips_html(tooltips())

    def status_with_tips() -> str:
        return status() + tips

    with input_accordion(False, label=FIELDS[0].label, elem_id=elem_id(FIELDS[0].name)) as enabled:
        row: list[FieldSpec] = []
        profile = None

        def emit(specs: Sequence[FieldSpec]) -> None:
            with gr.Row(elem_classes=["optim-row"]):
                for spec in specs:
                    choices = attention if spec.name == "attention" else spec.kind.choices(host, None)
                    value = control_value(spec, defaults, choices)
                    visible = spec.name in supported_fields
                    controls.append(_control(spec, host, value, elem_id, visible, attention, total_vram_mb))

        for spec in SETTING_FIELDS:
            if spec.name == "attention":
                with gr.Row(elem_classes=["optim-row"]):
                    value = control_value(spec, defaults, attention)
                    controls.append(_control(spec, host, value, elem_id, True, attention, total_vram_mb))
                    profile = gr.Dropdown(
                        label="Fill from profile",
                        choices=[NO_PROFILE, *PROFILES],
                        value=NO_PROFILE,
                        elem_id=elem_id("profile"),
                    )
            elif spec.kind.control == "radio":
                row.append(spec)
                if len(row) == 2:
                    emit(row)
                    row = []
            else:
                if row:
                    emit(row)
                    row = []
                emit([spec])
        if row:
            emit(row)
        with gr.Row(elem_classes=["optim-row"]):
            status_box = gr.HTML(value=status_with_tips, elem_id=elem_id("status"))
            refresh = gr.Button(value="\U0001f504", elem_id=elem_id("refresh"), elem_classes=["optim-refresh"])

    if profile is not None:
        profile.change(
            fn=lambda name, *current: profile_values(name, host, backends, current),
            inputs=[profile, *controls],
            outputs=controls,
            queue=False,
            show_progress=False,
        )
    refresh.click(fn=status_with_tips, inputs=[], outputs=[status_box], queue=False, show_progress=False)

    components = [enabled, *controls]
    infotext_fields: list[tuple[Any, Any]] = [(enabled, lambda params: INFOTEXT_KEY in params)]
    for spec, component in zip(SETTING_FIELDS, controls, strict=True):
        infotext_fields.append((component, _from_infotext(spec.name, host)))
    return UiParts(components, infotext_fields, [INFOTEXT_KEY])


def settings_section_options(
    host: HostKind, backends: Sequence[BackendInfo], supported_fields: Sequence[str]
) -> list[tuple[str, dict[str, Any]]]:
    """The Settings → Optim page, as plain data the script turns into OptionInfo objects: one default per
    field this host supports (``optim_default_<field>``, from FIELDS), then the extension's own options."""
    attention = attention_choices(backends)
    out: list[tuple[str, dict[str, Any]]] = []
    for spec in SETTING_FIELDS:
        if spec.name not in supported_fields:
            continue
        control = spec.kind.control
        choices = attention if spec.name == "attention" else spec.kind.choices(host, None)
        component: Any = {"dropdown": gr.Dropdown, "radio": gr.Radio, "checkbox": gr.Checkbox}.get(control, gr.Number)
        args: dict[str, Any] = (
            {"choices": list(choices or [])}
            if choices is not None
            else {}
            if control == "checkbox"
            else {"precision": 0}
        )
        label = f"Default {spec.label[0].lower()}{spec.label[1:]} when the Optim accordion is on"
        out.append(
            (
                spec.option_key,
                {
                    "default": spec.kind.to_ui(spec.default),
                    "label": label,
                    "component": component,
                    "component_args": args,
                },
            )
        )
    out += [
        (
            "optim_console_level",
            {
                "default": "INFO",
                "label": "Console messages",
                "component": gr.Radio,
                "component_args": {"choices": ["DEBUG", "INFO", "WARNING", "ERROR"]},
            },
        ),
        (
            "optim_telemetry_infotext",
            {
                "default": False,
                "label": 'Write speed and peak memory into infotext ("Optim telemetry")',
                "component": gr.Checkbox,
                "component_args": {},
            },
        ),
        (
            "optim_check_at_startup",
            {
                "default": True,
                "label": "Check launch flags and environment at start-up",
                "component": gr.Checkbox,
                "component_args": {},
            },
        ),
    ]
    return out


_BENCH_INTRO = (
    "<p>One short txt2img generation per candidate: your current Optim defaults (the baseline), then "
    "one change at a time. A warm-up generation runs first and is not counted. Images are not saved; "
    "other generations wait until it is done. Short generations vary from run to run: with Repeats "
    "above 1 each candidate runs that many times, in turns, and its median counts.</p>"
)


def _bench_inputs(prompt: str, width: int, height: int, steps: int, labels: Sequence[str]) -> list[Any]:
    """The benchmark's inputs, in ``run``'s order: prompt, width, height, steps, candidates, repeats."""
    from lib_optim.bench import DEFAULT_PROMPT, REPEATS_MAX, SIZE_MAX, SIZE_MIN, SIZE_STEP, STEPS_MAX, STEPS_MIN

    gr.HTML(value=_BENCH_INTRO, elem_id="optim_bench_intro")
    with gr.Row():
        prompt_box = gr.Textbox(label="Prompt", value=prompt or DEFAULT_PROMPT, lines=1, elem_id="optim_bench_prompt")
    with gr.Row():
        size = {"minimum": SIZE_MIN, "maximum": SIZE_MAX, "step": SIZE_STEP}
        width_slider = gr.Slider(label="Width", value=width, elem_id="optim_bench_w", **size)
        height_slider = gr.Slider(label="Height", value=height, elem_id="optim_bench_h", **size)
        steps_slider = gr.Slider(
            label="Steps", minimum=STEPS_MIN, maximum=STEPS_MAX, step=1, value=steps, elem_id="optim_bench_steps"
        )
        repeats_slider = gr.Slider(
            label="Repeats", minimum=1, maximum=REPEATS_MAX, step=1, value=1, elem_id="optim_bench_repeats"
        )
    kinds_box = gr.CheckboxGroup(
        label="Candidates: change one at a time", choices=list(labels), value=list(labels), elem_id="optim_bench_kinds"
    )
    return [prompt_box, width_slider, height_slider, steps_slider, kinds_box, repeats_slider]


def build_bench_tab(
    *,
    run: Callable[..., tuple[str, Any]],
    make_default: Callable[[Any], str],
    kinds: Sequence[str] = ("attention", "channels_last", "vae_on_cpu"),
    prompt: str = "",
    width: int = 512,
    height: int = 512,
    steps: int = 10,
) -> tuple[Any, str, str]:
    """The "Optim" tab: benchmark the current settings against one change at a time.

    ``run(prompt, width, height, steps, kinds, repeats, progress)`` returns (report HTML, the winner's settings dict or
    None), ``progress(fraction, text)`` being a plain callable; ``make_default(winner)`` returns an HTML message.
    ``gr.Progress`` works in gradio 3.41 and 4.40 for queued events (both hosts enable the queue). Returns
    what ``script_callbacks.on_ui_tabs`` expects for one tab: ``(blocks, title, elem_id)``.
    """
    labels = [FIELDS_BY_NAME[k].label if k in FIELDS_BY_NAME else k for k in kinds]
    by_label = dict(zip(labels, kinds, strict=True))
    with gr.Blocks(analytics_enabled=False) as blocks:
        inputs = _bench_inputs(prompt, width, height, steps, labels)
        with gr.Row():
            run_button = gr.Button(value="Run benchmark", variant="primary", elem_id="optim_bench_run")
            default_button = gr.Button(value="Make the winner my default", elem_id="optim_bench_default")
        results = gr.HTML(value="", elem_id="optim_bench_results")
        message = gr.HTML(value="", elem_id="optim_bench_message")
        winner = gr.State(value=None)

        def on_run(p, w, h, s, chosen, r, progress=gr.Progress()):  # noqa: B008 - gradio's progress idiom
            def report(fraction: float, text: str) -> None:
                progress(fraction, desc=text)

            keys = [by_label.get(c, c) for c in chosen or []]
            html_text, best = run(p, int(w), int(h), int(s), keys, int(r), report)
            return html_text, best, ""

        run_button.click(fn=on_run, inputs=inputs, outputs=[results, winner, message])
        default_button.click(fn=make_default, inputs=[winner], outputs=[message])
    return blocks, "Optim", "optim_tab"
