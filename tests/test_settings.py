"""The per-generation settings: validation, the three input forms, infotext and the schema."""

from __future__ import annotations

import itertools
import json

import pytest

from lib_optim.attention import registry
from lib_optim.attention.registry import Attention
from lib_optim.host_specs.kinds import HostKind
from lib_optim.settings import (
    FIELD_NAMES,
    FIELDS,
    INFOTEXT_KEY,
    Compile,
    GenerationSettings,
    SettingsError,
    Tri,
    VaeTiling,
    format_infotext,
    from_dict,
    from_positional,
    from_script_args,
    json_schema,
    parse_infotext,
)


def all_settings() -> list[GenerationSettings]:
    memories = [None, 64, 2048, 262_144]
    out = [GenerationSettings(True, a, c, v, m) for a, c, v, m in itertools.product(Attention, Tri, Tri, memories)]
    # the two choice fields, every value, beside a few of the others
    out += [
        GenerationSettings(True, a, Tri.ON, Tri.INHERIT, 1024, compile=c, vae_tiling=t)
        for a, c, t in itertools.product((Attention.HOST, Attention.SPLIT), Compile, VaeTiling)
    ]
    return out


def test_defaults_change_nothing():
    default = GenerationSettings()
    assert not default.enabled
    assert default.non_default() == {}
    assert not default.changes_anything
    assert format_infotext(default) is None
    # enabled with every control left alone still changes nothing
    assert not GenerationSettings(enabled=True).changes_anything


def test_positional_order_is_the_fields_order():
    s = GenerationSettings(True, Attention.SPLIT, Tri.ON, Tri.OFF, 2048)
    assert s.to_positional() == [True, "split", "on", "off", 2048, "off", "inherit"]
    assert len(s.to_positional()) == len(FIELDS)
    assert all(f.label and f.help for f in FIELDS)


@pytest.mark.parametrize("settings", all_settings())
def test_dict_and_positional_round_trip(settings):
    assert from_dict(settings.to_dict()) == settings
    assert from_positional(settings.to_positional()) == settings
    assert from_script_args(settings.to_positional()) == settings
    assert from_script_args([settings.to_dict()]) == settings
    # the dict form is plain JSON
    assert from_dict(json.loads(json.dumps(settings.to_dict()))) == settings


@pytest.mark.parametrize("settings", all_settings())
def test_infotext_round_trip(settings):
    text = format_infotext(settings)
    if not settings.non_default():
        assert text is None
        return
    assert text is not None
    assert parse_infotext(text) == settings


def test_infotext_lists_only_non_default_values():
    s = GenerationSettings(True, Attention.HOST, Tri.INHERIT, Tri.ON, None)
    assert format_infotext(s) == "vae_on_cpu=on"
    assert INFOTEXT_KEY == "Optim"
    assert format_infotext(GenerationSettings(False, Attention.SDP)) is None


def test_api_example_from_the_issue():
    s = from_script_args(
        [{"attention": "split", "channels_last": True, "vae_on_cpu": True, "inference_memory_mb": 2048}]
    )
    assert s == GenerationSettings(True, Attention.SPLIT, Tri.ON, Tri.ON, 2048)


def test_dict_enabled_defaults_true_and_can_be_false():
    assert from_dict({}).enabled
    assert not from_dict({"enabled": False, "attention": "sdp"}).enabled


def test_positional_missing_values_keep_defaults():
    assert from_positional([True, "sdp"]) == GenerationSettings(True, Attention.SDP)
    assert from_script_args([]) == GenerationSettings()


@pytest.mark.parametrize(
    ("alias", "expected"),
    [
        ("Doggettx", Attention.SPLIT),
        ("sub-quadratic", Attention.SUB_QUAD),
        ("SDP", Attention.SDP),
        ("sdp - scaled dot product", Attention.SDP),
        ("pytorch", Attention.SDP),
        (None, Attention.HOST),
    ],
)
def test_attention_aliases(alias, expected):
    assert from_dict({"attention": alias}).attention is expected


@pytest.mark.parametrize(
    ("data", "field", "value"),
    [
        ({"attention": "warp-drive"}, "attention", "warp-drive"),
        ({"attention": 3}, "attention", 3),
        ({"channels_last": "maybe"}, "channels_last", "maybe"),
        ({"channels_last": 1}, "channels_last", 1),
        ({"vae_on_cpu": []}, "vae_on_cpu", []),
        ({"inference_memory_mb": 10}, "inference_memory_mb", 10),
        ({"inference_memory_mb": 1.5}, "inference_memory_mb", 1.5),
        ({"inference_memory_mb": -100}, "inference_memory_mb", -100),
        ({"inference_memory_mb": True}, "inference_memory_mb", True),
        ({"inference_memory_mb": "lots"}, "inference_memory_mb", "lots"),
        ({"inference_memory_mb": float("nan")}, "inference_memory_mb", None),
        ({"enabled": "sure"}, "enabled", "sure"),
        ({"attentoin": "sdp"}, "args", "attentoin"),
    ],
)
def test_errors_name_field_value_and_allowed(data, field, value):
    with pytest.raises(SettingsError) as info:
        from_dict(data)
    err = info.value
    assert err.field == field
    message = str(err)
    assert message.startswith("[Optim] ")
    assert f"{field}:" in message
    assert "allowed:" in message
    if value is not None:
        assert repr(value) in message


def test_attention_allowed_per_host():
    with pytest.raises(SettingsError) as info:
        from_dict({"attention": "invokeai"}, host=HostKind.FORGE)
    assert "on WebUI Forge f2" in str(info.value)
    allowed, _, why = str(info.value).split("allowed:")[1].partition(";")
    assert "invokeai" not in allowed
    assert why.strip() == "'invokeai' is bound only for AUTOMATIC1111 WebUI v1.10, not for WebUI Forge f2"
    assert from_dict({"attention": "invokeai"}, host=HostKind.A1111).attention is Attention.INVOKEAI
    for host in HostKind:
        assert Attention.HOST in registry.for_host(host), host


def test_too_many_positional_values():
    with pytest.raises(SettingsError, match="at most 7 values"):
        from_positional([True, "sdp", "on", "on", 0, "off", "inherit", "extra"])


def test_not_a_dict_in_dict_form():
    with pytest.raises(SettingsError, match="a JSON object"):
        from_dict(["sdp"])  # type: ignore[arg-type]


def test_megabytes_inherit_spellings():
    for value in (None, 0, "0", "", "inherit", 0.0):
        assert from_dict({"inference_memory_mb": value}).inference_memory_mb is None
    assert from_dict({"inference_memory_mb": "2048"}).inference_memory_mb == 2048
    assert from_dict({"inference_memory_mb": 2048.0}).inference_memory_mb == 2048


@pytest.mark.parametrize("text", ["attention", "attention=sdp, bogus=1", "enabled=true", "attention=warp"])
def test_bad_infotext(text):
    with pytest.raises(SettingsError):
        parse_infotext(text)


def test_with_defaults_from_fills_only_defaults():
    user = GenerationSettings(True, Attention.SPLIT)
    defaults = GenerationSettings(False, Attention.SDP, Tri.ON, Tri.ON, 1024)
    merged = user.with_defaults_from(defaults)
    assert merged == GenerationSettings(True, Attention.SPLIT, Tri.ON, Tri.ON, 1024)


def test_json_schema_matches_fields_and_validates_examples():
    schema = json_schema()
    assert set(schema["properties"]) == set(FIELD_NAMES)
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]["attention"]["enum"]) == {a.value for a in Attention}
    forge = json_schema(HostKind.FORGE)
    assert "sdp-no-mem" not in forge["properties"]["attention"]["enum"]
    for name, prop in schema["properties"].items():
        assert prop["title"] == next(f.label for f in FIELDS if f.name == name)
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(GenerationSettings(True, Attention.SPLIT, Tri.ON, Tri.ON, 2048).to_dict(), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"attention": "warp"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"inference_memory_mb": 10}, schema)


def test_dict_absent_keys_take_base_defaults_but_explicit_inherit_stays():
    base = GenerationSettings(False, Attention.SDP, Tri.ON, Tri.ON, 1024)
    s = from_dict({"attention": "split", "vae_on_cpu": None}, base=base)
    assert s == GenerationSettings(True, Attention.SPLIT, Tri.ON, Tri.INHERIT, 1024)
