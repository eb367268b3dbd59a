"""The Optim accordion: the only lib_optim module that imports gradio.

Works with gradio 3.41 (A1111) and 4.40 (Forge f2): only components, arguments and ``gr.update`` that both
accept (HOSTS.md §10). Host pieces (``InputAccordion``, ``elem_id``) are passed in by the script, so this
module imports no host code. ``build`` has no side effects: the API calls ``ui()`` twice more per tab to
read default values (HOSTS.md §7.1).
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import gradio as gr

from lib_optim.hostkinds import HostKind
from lib_optim.hosts.base import BackendInfo
from lib_optim.profiles import PROFILES, ProfileError, resolve
from lib_optim.settings import (
    FIELDS_BY_NAME,
    INFERENCE_MEMORY_MIN_MB,
    INFOTEXT_KEY,
    Attention,
    GenerationSettings,
    SettingsError,
    Tri,
    parse_infotext,
)

TRI_CHOICES = [t.value for t in Tri]
NO_PROFILE = "(keep)"


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


def status_html(text: str, findings_summary: str, problems: Sequence[str] = ()) -> str:
    items = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    details = f"<details><summary>{html.escape(findings_summary)}</summary><ul>{items}</ul></details>" if items else ""
    return (
        f'<div class="optim-status"><span class="optim-status-text">{html.escape(text)}</span>'
        f'<span class="optim-status-findings">{html.escape(findings_summary)}</span>{details}</div>'
    )


def profile_values(name: str, host: HostKind, backends: Sequence[BackendInfo], current: Sequence[Any]) -> list[Any]:
    """The control values a profile puts in (attention it cannot do here falls back to ``host``)."""
    if name == NO_PROFILE or name not in PROFILES:
        return [gr.update() for _ in current]
    try:
        generation = resolve(PROFILES[name], host).generation
    except ProfileError:
        return [gr.update() for _ in current]
    available = set(attention_choices(backends))
    attention = generation.attention.value if generation.attention.value in available else Attention.HOST.value
    return [
        gr.update(value=attention),
        gr.update(value=generation.channels_last.value),
        gr.update(value=generation.vae_on_cpu.value),
        gr.update(value=generation.inference_memory_mb or 0),
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
        return settings.to_positional()[list(FIELDS_BY_NAME).index(name)]

    return read


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
    choices = attention_choices(backends)
    default_attention = defaults.attention.value if defaults.attention.value in choices else Attention.HOST.value
    note = unavailable_note(backends)

    with input_accordion(False, label=FIELDS_BY_NAME["enabled"].label, elem_id=elem_id("enabled")) as enabled:
        with gr.Row(elem_classes=["optim-row"]):
            attention = gr.Dropdown(
                label=FIELDS_BY_NAME["attention"].label,
                choices=choices,
                value=default_attention,
                elem_id=elem_id("attention"),
                info=note or None,
            )
            profile = gr.Dropdown(
                label="Fill from profile",
                choices=[NO_PROFILE, *PROFILES],
                value=NO_PROFILE,
                elem_id=elem_id("profile"),
            )
        with gr.Row(elem_classes=["optim-row"]):
            channels_last = gr.Radio(
                label=FIELDS_BY_NAME["channels_last"].label,
                choices=TRI_CHOICES,
                value=defaults.channels_last.value,
                elem_id=elem_id("channels_last"),
            )
            vae_on_cpu = gr.Radio(
                label=FIELDS_BY_NAME["vae_on_cpu"].label,
                choices=TRI_CHOICES,
                value=defaults.vae_on_cpu.value,
                elem_id=elem_id("vae_on_cpu"),
            )
        inference_memory = gr.Slider(
            label=FIELDS_BY_NAME["inference_memory_mb"].label,
            minimum=0,
            maximum=max(total_vram_mb or 24576, 4096),
            step=INFERENCE_MEMORY_MIN_MB,
            value=defaults.inference_memory_mb or 0,
            elem_id=elem_id("inference_memory_mb"),
            visible="inference_memory_mb" in supported_fields,
            info=FIELDS_BY_NAME["inference_memory_mb"].help,
        )
        with gr.Row(elem_classes=["optim-row"]):
            status_box = gr.HTML(value=status, elem_id=elem_id("status"))
            refresh = gr.Button(value="\U0001f504", elem_id=elem_id("refresh"), elem_classes=["optim-refresh"])

    controls = [attention, channels_last, vae_on_cpu, inference_memory]
    profile.change(
        fn=lambda name, *current: profile_values(name, host, backends, current),
        inputs=[profile, *controls],
        outputs=controls,
        queue=False,
        show_progress=False,
    )
    refresh.click(fn=status, inputs=[], outputs=[status_box], queue=False, show_progress=False)

    components = [enabled, attention, channels_last, vae_on_cpu, inference_memory]
    infotext_fields: list[tuple[Any, Any]] = [(enabled, lambda params: INFOTEXT_KEY in params)]
    for name, component in zip(
        ("attention", "channels_last", "vae_on_cpu", "inference_memory_mb"), controls, strict=True
    ):
        infotext_fields.append((component, _from_infotext(name, host)))
    return UiParts(components, infotext_fields, [INFOTEXT_KEY])


def settings_section_options(host: HostKind, attention_names: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The Settings → Optim page, as plain data the script turns into OptionInfo objects."""
    return {
        "optim_default_attention": {
            "default": Attention.HOST.value,
            "label": "Default attention backend when the Optim accordion is on",
            "component": gr.Dropdown,
            "component_args": {"choices": list(attention_names)},
        },
        "optim_default_channels_last": {
            "default": Tri.INHERIT.value,
            "label": "Default channels-last UNet",
            "component": gr.Radio,
            "component_args": {"choices": TRI_CHOICES},
        },
        "optim_default_vae_on_cpu": {
            "default": Tri.INHERIT.value,
            "label": "Default VAE on CPU",
            "component": gr.Radio,
            "component_args": {"choices": TRI_CHOICES},
        },
        "optim_default_inference_memory_mb": {
            "default": 0,
            "label": "Default inference memory in MB (Forge; 0 = as Forge has it)",
            "component": gr.Number,
            "component_args": {"precision": 0},
            "hosts": (HostKind.FORGE,),
        },
        "optim_console_level": {
            "default": "INFO",
            "label": "Console messages",
            "component": gr.Radio,
            "component_args": {"choices": ["DEBUG", "INFO", "WARNING", "ERROR"]},
        },
        "optim_telemetry_infotext": {
            "default": False,
            "label": 'Write speed and peak memory into infotext ("Optim telemetry")',
            "component": gr.Checkbox,
            "component_args": {},
        },
        "optim_check_at_startup": {
            "default": True,
            "label": "Check launch flags and environment at start-up",
            "component": gr.Checkbox,
            "component_args": {},
        },
    }


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
    from lib_optim.webbench import (
        DEFAULT_PROMPT,
        KIND_LABELS,
        REPEATS_MAX,
        SIZE_MAX,
        SIZE_MIN,
        SIZE_STEP,
        STEPS_MAX,
        STEPS_MIN,
    )

    labels = [KIND_LABELS.get(k, k) for k in kinds]
    by_label = dict(zip(labels, kinds, strict=True))
    with gr.Blocks(analytics_enabled=False) as blocks:
        gr.HTML(
            value=(
                "<p>One short txt2img generation per candidate: your current Optim defaults (the baseline), then "
                "one change at a time. A warm-up generation runs first and is not counted. Images are not saved; "
                "other generations wait until it is done. Short generations vary from run to run: with Repeats "
                "above 1 each candidate runs that many times, in turns, and its median counts.</p>"
            ),
            elem_id="optim_bench_intro",
        )
        with gr.Row():
            prompt_box = gr.Textbox(
                label="Prompt", value=prompt or DEFAULT_PROMPT, lines=1, elem_id="optim_bench_prompt"
            )
        with gr.Row():
            width_slider = gr.Slider(
                label="Width", minimum=SIZE_MIN, maximum=SIZE_MAX, step=SIZE_STEP, value=width, elem_id="optim_bench_w"
            )
            height_slider = gr.Slider(
                label="Height",
                minimum=SIZE_MIN,
                maximum=SIZE_MAX,
                step=SIZE_STEP,
                value=height,
                elem_id="optim_bench_h",
            )
            steps_slider = gr.Slider(
                label="Steps", minimum=STEPS_MIN, maximum=STEPS_MAX, step=1, value=steps, elem_id="optim_bench_steps"
            )
            repeats_slider = gr.Slider(
                label="Repeats", minimum=1, maximum=REPEATS_MAX, step=1, value=1, elem_id="optim_bench_repeats"
            )
        kinds_box = gr.CheckboxGroup(
            label="Candidates: change one at a time", choices=labels, value=labels, elem_id="optim_bench_kinds"
        )
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

        run_button.click(
            fn=on_run,
            inputs=[prompt_box, width_slider, height_slider, steps_slider, kinds_box, repeats_slider],
            outputs=[results, winner, message],
        )
        default_button.click(fn=make_default, inputs=[winner], outputs=[message])
    return blocks, "Optim", "optim_tab"
