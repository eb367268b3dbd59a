"""The Optim accordion under the gradio each host pins (A1111: 3.41.2, Forge f2: 4.40.0).

tools/test.sh runs this file in one virtualenv per gradio version; without gradio it is skipped.
"""

from __future__ import annotations

import pytest

gr = pytest.importorskip("gradio")

from fake_adapter import BACKENDS  # noqa: E402

from lib_optim import ui  # noqa: E402
from lib_optim.host_specs.kinds import HostKind  # noqa: E402
from lib_optim.settings import FIELDS, Attention, GenerationSettings, Tri, format_infotext  # noqa: E402

pytestmark = pytest.mark.gradio


class FakeInputAccordion(gr.Checkbox):
    """Imitates A1111's InputAccordion (modules/ui_components.py:88-144): a hidden checkbox that is the
    value, plus a gr.Accordion entered as the context for the children."""

    def __init__(self, value, **kwargs):
        super().__init__(value, **{**kwargs, "elem_id": f"{kwargs.get('elem_id')}-checkbox", "visible": False})
        self.accordion = gr.Accordion(label=kwargs.get("label", "Accordion"), open=value, elem_id=kwargs.get("elem_id"))

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, *exc):
        self.accordion.__exit__(*exc)

    def get_block_name(self):
        return "checkbox"


def build(
    host=HostKind.A1111,
    defaults=None,
    supported=("enabled", "attention", "channels_last", "vae_on_cpu"),
):
    calls = []

    def status():
        calls.append(1)
        return ui.status_html("attention: Doggettx", "1 warning", ["[warning] --medvram: slow"])

    with gr.Blocks():
        parts = ui.build(
            host=host,
            backends=BACKENDS,
            defaults=defaults or GenerationSettings(),
            elem_id=lambda item: f"script_txt2img_optim_{item}",
            input_accordion=FakeInputAccordion,
            status=status,
            total_vram_mb=8192,
            supported_fields=supported,
        )
    return parts, calls


def test_components_follow_the_settings_fields():
    parts, _ = build()
    assert len(parts.components) == len(FIELDS)
    enabled, attention, channels_last, vae_on_cpu, memory, compile_, tiling = parts.components
    assert enabled.value is False
    assert attention.value == "host"
    assert channels_last.value == "inherit"
    assert vae_on_cpu.value == "inherit"
    assert memory.value == 0
    assert (compile_.value, tiling.value) == ("off", "inherit")
    # the values ui() returns are exactly the positional defaults the API builds from them
    assert [c.value for c in parts.components] == GenerationSettings().to_positional()
    assert attention.label == FIELDS[1].label


def test_only_available_backends_are_offered_and_the_rest_explained():
    parts, _ = build()
    attention = parts.components[1]
    choices = [c[0] if isinstance(c, (tuple, list)) else c for c in attention.choices]
    assert "xformers" not in choices
    assert {"host", "auto", "sdp", "split", "sub-quad"} == set(choices)
    note = ui.unavailable_note(BACKENDS)
    assert "--xformers" in note
    # the reasons fold away in the status line instead of pushing the dropdown down (its info stays empty)
    assert not getattr(attention, "info", None)
    assert "optim-unavailable" in ui.status_html("x", "y", unavailable=note)


def test_inference_memory_only_on_forge():
    a1111, _ = build()
    assert a1111.components[4].visible is False
    forge, _ = build(
        HostKind.FORGE, supported=("enabled", "attention", "channels_last", "vae_on_cpu", "inference_memory_mb")
    )
    assert forge.components[4].visible is True


def test_defaults_from_settings_page_fill_the_controls():
    defaults = GenerationSettings(False, Attention.SPLIT, Tri.ON, Tri.OFF, 2048)
    parts, _ = build(HostKind.FORGE, defaults)
    assert [c.value for c in parts.components] == [False, "split", "on", "off", 2048, "off", "inherit"]
    # a default this install cannot do falls back to "host"
    parts, _ = build(defaults=GenerationSettings(attention=Attention.XFORMERS))
    assert parts.components[1].value == "host"


def test_infotext_paste_restores_the_controls():
    parts, _ = build()
    settings = GenerationSettings(True, Attention.SPLIT, Tri.ON, Tri.INHERIT, 2048)
    params = {"Steps": "20", "Optim": format_infotext(settings)}
    pasted = [fn(params) if callable(fn) else params.get(fn) for _, fn in parts.infotext_fields]
    assert pasted == settings.to_positional()
    assert [c for c, _ in parts.infotext_fields] == parts.components
    # without our entry: the accordion turns off and the other controls are left alone
    assert [fn({"Steps": "20"}) for _, fn in parts.infotext_fields] == [False] + [None] * (len(FIELDS) - 1)
    # someone else's broken entry does not break the paste
    assert parts.infotext_fields[1][1]({"Optim": "attention=warp"}) is None
    assert parts.paste_field_names == ["Optim"]


def test_profile_picker_fills_controls():
    controls = [None] * (len(FIELDS) - 1)
    updates = ui.profile_values("8gb-low", HostKind.FORGE, BACKENDS, controls)
    assert [u["value"] for u in updates] == ["sub-quad", "inherit", "on", 2048, "off", "inherit"]
    updates = ui.profile_values("24gb", HostKind.A1111, BACKENDS, controls)
    assert updates[0]["value"] == "host"  # sdp-no-mem is not available in this install
    kept = ui.profile_values(ui.NO_PROFILE, HostKind.A1111, BACKENDS, controls)
    assert all("value" not in u for u in kept)


def test_status_html():
    html = ui.status_html("attention: sdp", "no findings")
    assert "attention: sdp" in html and "<details>" not in html
    escaped = ui.status_html("<b>", "x", ["a<script>"])
    assert "<script>" not in escaped
    # javascript/optim.js refreshes the line while the compile warm-up runs
    assert 'data-warmup="running"' in ui.status_html("x", "y", warmup_state="running")


def test_the_status_line_shows_the_compile_warm_up():
    from fake_adapter import FakeAdapter

    from lib_optim.compile import CompileWarmup, WarmupState
    from lib_optim.hosts import webui
    from lib_optim.runtime import Runtime

    rt = Runtime(host=HostKind.A1111, adapter=FakeAdapter(), warmup=CompileWarmup())
    rt.warmup._state = WarmupState("running", 12, 38)
    html = webui.status_text(rt)
    assert "compile warm-up: running 12/38 blocks" in html and 'data-warmup="running"' in html
    rt.warmup._state = WarmupState("done", 38, 38, seconds=74.0)
    assert "compile warm-up: done in 74 s" in webui.status_text(rt)
    rt.warmup._state = WarmupState("failed", reason="install triton")
    assert "compile warm-up: failed: install triton" in webui.status_text(rt)
    rt.warmup._state = WarmupState()
    assert "warm-up" not in webui.status_text(rt)


def test_build_has_no_side_effects_when_called_again():
    # the API builds ui() twice more per tab to read defaults (A1111 modules/api/api.py:315-333)
    first, _ = build()
    second, _ = build()
    assert [c.value for c in first.components] == [c.value for c in second.components]


def test_settings_section_options_are_valid_components():
    forge_fields = ("enabled", "attention", "channels_last", "vae_on_cpu", "inference_memory_mb")
    options = dict(ui.settings_section_options(HostKind.FORGE, BACKENDS, forge_fields))
    with gr.Blocks():
        for spec in options.values():
            spec["component"](value=spec["default"], **spec["component_args"])
    assert "optim_console_level" in options
    # one default per field the host supports, keyed optim_default_<field>, offering what this install can do
    assert [k for k in options if k.startswith("optim_default_")] == [f"optim_default_{n}" for n in forge_fields[1:]]
    assert options["optim_default_attention"]["component_args"]["choices"] == [
        "host",
        "auto",
        "sdp",
        "split",
        "sub-quad",
    ]
    a1111 = dict(ui.settings_section_options(HostKind.A1111, BACKENDS, forge_fields[:4]))
    assert "optim_default_inference_memory_mb" not in a1111
