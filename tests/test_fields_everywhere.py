"""One FIELDS entry reaches every consumer of the per-generation settings.

A fake on/off field is added to :data:`lib_optim.settings.FIELDS` (and to the GenerationSettings dataclass) for the
duration of a test, with no other edit, and each consumer must show it: the UI's controls and tooltips, the
Settings → Optim page, EffectiveState, the GPU-only fields, the benchmark's candidates, the profiles' per-generation
defaults, infotext, the JSON schema, the X/Y/Z axes and the positional form. The UI parts need gradio (run this file
in the gradio virtualenvs too); the rest runs anywhere.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
from fake_adapter import FakeAdapter

from lib_optim import adapter as adapter_mod
from lib_optim import settings
from lib_optim.bench import generation as generation_bench
from lib_optim.host_specs import HostKind
from lib_optim.launch import profiles
from lib_optim.settings import BoolKind, FieldSpec, GenerationSettings

FAKE = FieldSpec(
    "fake_switch",
    "Fake switch",
    "A field that exists only in this test.",
    BoolKind(),
    tip="The fake switch's tooltip.",
    gpu_only=True,
    state=lambda state: state.extra.get("fake_now"),
)


@contextlib.contextmanager
def extra_field(spec: FieldSpec, default: Any) -> Iterator[None]:
    """Add ``spec`` to FIELDS (last) and a field of that name to GenerationSettings, in place, then remove both.

    The dataclass is extended by swapping in the generated methods of a subclass that has the extra field, so
    every module that imported GenerationSettings sees it."""
    cls = GenerationSettings
    extended = dataclasses.make_dataclass(
        cls.__name__, [(spec.name, type(default), dataclasses.field(default=default))], bases=(cls,), frozen=True
    )
    names = ("__init__", "__eq__", "__hash__", "__repr__", "__dataclass_fields__", "__match_args__")
    saved = {name: cls.__dict__[name] for name in names if name in cls.__dict__}
    for name in saved:
        setattr(cls, name, extended.__dict__[name])
    settings._SPECS.append(spec)
    try:
        yield
    finally:
        settings._SPECS.remove(spec)
        for name, value in saved.items():
            setattr(cls, name, value)


@pytest.fixture
def fake_field() -> Iterator[FieldSpec]:
    with extra_field(FAKE, False):
        yield FAKE


class FakeSwitchAdapter(FakeAdapter):
    """The test adapter, supporting the fake field too, on a CPU or a GPU."""

    def __init__(self, device: str = "cuda") -> None:
        super().__init__(device=device)

    def supported_fields(self) -> tuple[str, ...]:
        return (*super().supported_fields(), FAKE.name)

    def generation_device_type(self) -> str | None:
        return self.device

    def effective_state(self) -> adapter_mod.EffectiveState:
        state = super().effective_state()
        return dataclasses.replace(state, extra={"fake_now": True})


def on(**values: Any) -> GenerationSettings:
    return GenerationSettings(enabled=True, **values)


def test_the_helper_adds_and_removes_the_field() -> None:
    before = list(settings.FIELD_NAMES)
    with extra_field(FAKE, False):
        assert settings.FIELD_NAMES[-1] == FAKE.name
        assert getattr(GenerationSettings(), FAKE.name) is False
    assert list(settings.FIELD_NAMES) == before
    assert FAKE.name not in {f.name for f in dataclasses.fields(GenerationSettings)}
    with pytest.raises(TypeError):
        GenerationSettings(**{FAKE.name: True})


def test_positional_form_round_trips(fake_field: FieldSpec) -> None:
    chosen = on(fake_switch=True)
    positional = chosen.to_positional()
    assert len(positional) == len(settings.FIELDS) and positional[-1] is True
    assert settings.from_positional(positional) == chosen
    assert settings.from_dict(chosen.to_dict()) == chosen
    assert settings.from_dict({"fake_switch": "on"}).fake_switch is True  # type: ignore[attr-defined]


def test_infotext_writes_and_reads_it(fake_field: FieldSpec) -> None:
    text = settings.format_infotext(on(fake_switch=True))
    assert text == "fake_switch=True"
    assert settings.parse_infotext(text or "") == on(fake_switch=True)
    with pytest.raises(settings.SettingsError, match="fake_switch"):
        settings.parse_infotext("fake_switch=maybe")


def test_json_schema_lists_it(fake_field: FieldSpec) -> None:
    prop = settings.json_schema()["properties"][FAKE.name]
    assert prop == {"type": "boolean", "default": False, "title": FAKE.label, "description": FAKE.help}


def test_settings_options_store_it(fake_field: FieldSpec) -> None:
    assert on(fake_switch=True).to_options()["optim_default_fake_switch"] is True
    stored = {"optim_default_fake_switch": True}
    read = settings.from_options(stored.get)
    assert read.fake_switch is True  # type: ignore[attr-defined]


def test_tooltip_comes_from_the_entry(fake_field: FieldSpec) -> None:
    assert settings.tooltips()[FAKE.name] == "The fake switch's tooltip."
    assert settings.tooltips()["compile"] == settings.FIELDS_BY_NAME["compile"].help  # no tip: the help


def test_effective_state_reports_it(fake_field: FieldSpec) -> None:
    state = FakeSwitchAdapter().effective_state()
    assert state.current[FAKE.name] is True
    assert FakeAdapter().effective_state().current[FAKE.name] is None  # unknown


def test_gpu_only_fields_follow_the_entry(fake_field: FieldSpec) -> None:
    assert FAKE.name in settings.GPU_ONLY_FIELDS
    assert FAKE.name in FakeSwitchAdapter("cuda").meaningful_fields()
    assert FAKE.name not in FakeSwitchAdapter("cpu").meaningful_fields()
    assert "vae_on_cpu" not in FakeSwitchAdapter("cpu").meaningful_fields()  # a real one, for comparison


def test_bench_candidates_vary_it(fake_field: FieldSpec) -> None:
    adapter = FakeSwitchAdapter()
    found = generation_bench.candidates(GenerationSettings(), [], adapter.supported_fields(), kinds=[FAKE.name])
    assert [c.label for c in found] == ["baseline", "fake_switch=True"]
    assert FAKE.name in generation_bench.KINDS
    assert generation_bench.KIND_LABELS[FAKE.name] == FAKE.label
    assert FAKE.name in generation_bench.CSV_COLUMNS
    rows = generation_bench.summarize([generation_bench.CandidateResult("baseline", on(), seconds=1.0)])
    assert rows[0][FAKE.name] is False


def test_profiles_carry_it(fake_field: FieldSpec) -> None:
    assert profiles._gen(fake_switch=True).fake_switch is True  # type: ignore[attr-defined]
    # a profile that does not name it leaves it at its default (PROFILES itself was built before the field existed)
    assert profiles._gen(settings.Attention.SDP, channels_last=settings.Tri.ON).fake_switch is False  # type: ignore[attr-defined]
    with pytest.raises(settings.SettingsError, match="fake_switch"):
        profiles._gen(fake_switch="maybe")


def test_xyz_axes_offer_it(fake_field: FieldSpec, monkeypatch: pytest.MonkeyPatch) -> None:
    from lib_optim.hosts import webui
    from lib_optim.runtime import get_runtime

    class AxisOption:  # A1111 v1.10.1 scripts/xyz_grid.py:214-215
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
            self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices

    xyz = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[])
    script_class = type("Script", (), {"__module__": "xyz_grid.py"})
    # modules/scripts.py:379-381: scripts_data holds ScriptClassData(script_class, path, basedir, module)
    scripts = types.SimpleNamespace(scripts_data=[types.SimpleNamespace(script_class=script_class, module=xyz)])
    monkeypatch.setitem(sys.modules, "modules", types.SimpleNamespace(scripts=scripts))
    monkeypatch.setitem(sys.modules, "modules.scripts", scripts)
    rt = get_runtime()
    monkeypatch.setattr(rt, "adapter", FakeSwitchAdapter())
    monkeypatch.setattr(rt, "host", HostKind.A1111)
    webui.register_xyz_axes()
    axis = next(a for a in xyz.axis_options if a.label == "[Optim] Fake switch")
    assert axis.choices is None  # a switch: typed values, no dropdown
    axis.confirm(None, [True, "off"])
    with pytest.raises(RuntimeError, match="fake_switch"):
        axis.confirm(None, ["maybe"])


def test_every_setting_field_has_exactly_one_apply_method() -> None:
    """APPLIERS: field → the HostAdapter method that applies it; no field without one, no stale entry."""
    assert set(adapter_mod.APPLIERS) == set(settings.SETTING_NAMES)
    methods = list(adapter_mod.APPLIERS.values())
    assert len({m.__name__ for m in methods}) == len(methods)
    for method in methods:
        assert getattr(adapter_mod.HostAdapter, method.__name__) is method
    declared = {name for name in vars(adapter_mod.HostAdapter) if name.startswith("apply_")}
    assert declared == {m.__name__ for m in methods}  # no apply method the table forgets


def test_a_field_without_an_apply_method_is_not_supported(fake_field: FieldSpec) -> None:
    assert adapter_mod.APPLIERS.get(FAKE.name) is None
    assert FakeSwitchAdapter().applier(FAKE.name) is None  # begin() reports and skips it


# --- the UI (gradio) -------------------------------------------------------------------------------------------


def test_ui_builds_its_control_and_tooltip(fake_field: FieldSpec) -> None:
    gr = pytest.importorskip("gradio")
    from fake_adapter import BACKENDS

    from lib_optim import ui

    status = ui.status_html("attention: Doggettx", "no findings")
    with gr.Blocks():
        with gr.Accordion("Optim") as accordion:
            enabled = gr.Checkbox(False, visible=False)

        @contextlib.contextmanager
        def input_accordion(value: bool, **kwargs: Any) -> Iterator[Any]:
            with accordion:
                yield enabled

        parts = ui.build(
            host=HostKind.A1111,
            backends=BACKENDS,
            defaults=GenerationSettings(),
            elem_id=lambda item: f"script_txt2img_optim_{item}",
            input_accordion=input_accordion,
            status=lambda: status,
            supported_fields=FakeSwitchAdapter().supported_fields(),
        )
    control = parts.components[-1]
    assert len(parts.components) == len(settings.FIELDS)
    assert isinstance(control, gr.Checkbox) and control.label == FAKE.label and control.value is False
    assert control.elem_id == "script_txt2img_optim_fake_switch"
    assert "The fake switch&#x27;s tooltip." in ui.tips_html(settings.tooltips())
    options = dict(ui.settings_section_options(HostKind.A1111, BACKENDS, FakeSwitchAdapter().supported_fields()))
    option = options["optim_default_fake_switch"]
    assert option["component"] is gr.Checkbox and option["default"] is False
