"""The per-generation settings, defined once.

Everything that shows or accepts these settings is derived from :data:`FIELDS`: validation, the API's
single-dict form, the UI's positional form (the order of the script's controls), the infotext entry and
the JSON schema. Defaults change nothing: a generation with default settings runs exactly as the host
would run it without the extension.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from enum import Enum
from typing import Any

from lib_optim.hostkinds import HostKind


class Attention(str, Enum):
    HOST = "host"  # leave whatever the host selected
    AUTO = "auto"  # the fastest backend predicted to fit (lib_optim.planner)
    SDP = "sdp"  # torch.nn.functional.scaled_dot_product_attention
    SPLIT = "split"  # Doggettx split attention (A1111) / attention_split (Forge)
    SUB_QUAD = "sub-quad"  # sub-quadratic chunked attention
    XFORMERS = "xformers"
    # A1111-only optimizers (modules/sd_hijack_optimizations.py:25-155)
    SDP_NO_MEM = "sdp-no-mem"
    INVOKEAI = "invokeai"
    V1 = "v1"
    NONE = "none"  # no optimization: the model's original attention


class Tri(str, Enum):
    """A switch that can also be left as the host has it."""

    INHERIT = "inherit"
    ON = "on"
    OFF = "off"


COMMON_ATTENTION = (
    Attention.HOST,
    Attention.AUTO,
    Attention.SDP,
    Attention.SPLIT,
    Attention.SUB_QUAD,
    Attention.XFORMERS,
)
_A1111_ONLY = (Attention.SDP_NO_MEM, Attention.INVOKEAI, Attention.V1, Attention.NONE)

# Which names each host understands at all (what is *available* right now is the adapter's business).
ATTENTION_BY_HOST: dict[HostKind, tuple[Attention, ...]] = {
    HostKind.A1111: COMMON_ATTENTION + _A1111_ONLY,
    HostKind.FORGE: COMMON_ATTENTION,
    HostKind.FORGE_PREVIOUS: COMMON_ATTENTION,
    HostKind.REFORGE: (Attention.HOST,),
}

# Names people copy from A1111's settings page or other tools, accepted on input.
ATTENTION_ALIASES: dict[str, Attention] = {
    "doggettx": Attention.SPLIT,
    "split-attention": Attention.SPLIT,
    "sub-quadratic": Attention.SUB_QUAD,
    "sub_quad": Attention.SUB_QUAD,
    "subquad": Attention.SUB_QUAD,
    "quad": Attention.SUB_QUAD,
    "pytorch": Attention.SDP,
    "sdpa": Attention.SDP,
    "sdp - scaled dot product": Attention.SDP,
    "sdp-no-mem - scaled dot product without memory efficient attention": Attention.SDP_NO_MEM,
    "v1 - original v1": Attention.V1,
    "default": Attention.HOST,
}

INFERENCE_MEMORY_MIN_MB = 64
INFERENCE_MEMORY_MAX_MB = 262_144


@dataclass(frozen=True)
class FieldSpec:
    name: str  # key in the API dict, in infotext and in the JSON schema
    label: str  # UI label (the API's /sdapi/v1/script-info shows it too)
    help: str
    kind: str  # "bool" | "attention" | "tri" | "megabytes"
    hosts: tuple[HostKind, ...]  # hosts where the UI shows it / it has an effect


_ALL_HOSTS = tuple(HostKind)
_FORGE_HOSTS = (HostKind.FORGE,)

FIELDS: tuple[FieldSpec, ...] = (
    FieldSpec(
        "enabled",
        "Optim",
        "Apply the settings below to this generation; off changes nothing.",
        "bool",
        _ALL_HOSTS,
    ),
    FieldSpec(
        "attention",
        "Attention backend",
        "Cross-attention implementation for this generation: host = as the WebUI has it; auto = the fastest "
        "one predicted to fit in free memory.",
        "attention",
        _ALL_HOSTS,
    ),
    FieldSpec(
        "channels_last",
        "Channels-last UNet",
        "Store the UNet in channels-last memory format for this generation (often faster on tensor cores).",
        "tri",
        _ALL_HOSTS,
    ),
    FieldSpec(
        "vae_on_cpu",
        "VAE on CPU",
        "Decode (and, in img2img, encode) on the CPU in float32, freeing the VAE's GPU memory meanwhile.",
        "tri",
        _ALL_HOSTS,
    ),
    FieldSpec(
        "inference_memory_mb",
        "Inference memory (MB)",
        "Forge only: GPU memory kept free for computation while the model loads; 0 = as Forge has it.",
        "megabytes",
        _FORGE_HOSTS,
    ),
)
FIELD_NAMES = tuple(f.name for f in FIELDS)
FIELDS_BY_NAME = {f.name: f for f in FIELDS}


class SettingsError(ValueError):
    """A value the user gave is not allowed. The message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"[Optim] {field}: {value!r} is not allowed; allowed: {allowed}")


@dataclass(frozen=True)
class GenerationSettings:
    enabled: bool = False
    attention: Attention = Attention.HOST
    channels_last: Tri = Tri.INHERIT
    vae_on_cpu: Tri = Tri.INHERIT
    inference_memory_mb: int | None = None  # None = as the host has it

    def non_default(self) -> dict[str, Any]:
        """The fields (besides ``enabled``) that differ from their default, as API/infotext values."""
        default = GenerationSettings()
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "enabled":
                continue
            value = getattr(self, f.name)
            if value != getattr(default, f.name):
                out[f.name] = value.value if isinstance(value, Enum) else value
        return out

    @property
    def changes_anything(self) -> bool:
        return self.enabled and bool(self.non_default())

    def to_dict(self) -> dict[str, Any]:
        """The API's single-dict form (every field)."""
        return {
            "enabled": self.enabled,
            "attention": self.attention.value,
            "channels_last": _tri_to_api(self.channels_last),
            "vae_on_cpu": _tri_to_api(self.vae_on_cpu),
            "inference_memory_mb": self.inference_memory_mb,
        }

    def to_positional(self) -> list[Any]:
        """The UI's positional form, in :data:`FIELDS` order (what the script's controls hold)."""
        return [
            self.enabled,
            self.attention.value,
            self.channels_last.value,
            self.vae_on_cpu.value,
            self.inference_memory_mb or 0,
        ]

    def with_defaults_from(self, other: GenerationSettings) -> GenerationSettings:
        """Fill every field left at its default from ``other`` (e.g. settings-page defaults)."""
        default = GenerationSettings()
        changes = {
            f.name: getattr(other, f.name)
            for f in fields(self)
            if f.name != "enabled" and getattr(self, f.name) == getattr(default, f.name)
        }
        return replace(self, **changes)


def _tri_to_api(value: Tri) -> bool | None:
    return None if value is Tri.INHERIT else value is Tri.ON


# --- validation of single values ---------------------------------------------------------------------


def parse_bool(field: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.strip().lower()]
    raise SettingsError(field, value, "true or false")


_BOOL_WORDS = {"true": True, "false": False, "on": True, "off": False, "yes": True, "no": False}


def parse_attention(value: object, host: HostKind | None = None) -> Attention:
    allowed = ATTENTION_BY_HOST[host] if host is not None else tuple(Attention)
    allowed_text = ", ".join(a.value for a in allowed)
    if value is None:
        return Attention.HOST
    if isinstance(value, Attention):
        result = value
    elif isinstance(value, str):
        key = value.strip().lower()
        try:
            result = Attention(key)
        except ValueError:
            if key not in ATTENTION_ALIASES:
                raise SettingsError("attention", value, allowed_text) from None
            result = ATTENTION_ALIASES[key]
    else:
        raise SettingsError("attention", value, allowed_text)
    if result not in allowed:
        host_title = host.display_name if host is not None else "this host"
        raise SettingsError("attention", value, f"{allowed_text} (on {host_title})")
    return result


def parse_tri(field: str, value: object) -> Tri:
    if value is None:
        return Tri.INHERIT
    if isinstance(value, Tri):
        return value
    if isinstance(value, bool):
        return Tri.ON if value else Tri.OFF
    if isinstance(value, str):
        key = value.strip().lower()
        if key in ("inherit", "", "default"):
            return Tri.INHERIT
        if key in _BOOL_WORDS:
            return Tri.ON if _BOOL_WORDS[key] else Tri.OFF
    raise SettingsError(field, value, 'true, false, null, or "inherit"/"on"/"off"')


def parse_megabytes(field: str, value: object) -> int | None:
    allowed = (
        f"0 or null (as the host has it), or a whole number of MB "
        f"from {INFERENCE_MEMORY_MIN_MB} to {INFERENCE_MEMORY_MAX_MB}"
    )
    number: float
    if value is None:
        return None
    if isinstance(value, bool):
        raise SettingsError(field, value, allowed)
    if isinstance(value, (int, float)):
        number = value
    elif isinstance(value, str):
        text = value.strip().lower()
        if text in ("", "inherit", "default"):
            return None
        try:
            number = float(text)
        except ValueError:
            raise SettingsError(field, value, allowed) from None
    else:
        raise SettingsError(field, value, allowed)
    if not math.isfinite(number) or number != int(number):
        raise SettingsError(field, value, allowed)
    whole = int(number)
    if whole == 0:
        return None
    if not INFERENCE_MEMORY_MIN_MB <= whole <= INFERENCE_MEMORY_MAX_MB:
        raise SettingsError(field, value, allowed)
    return whole


def _parse_field(name: str, value: object, host: HostKind | None) -> Any:
    kind = FIELDS_BY_NAME[name].kind
    if kind == "bool":
        return parse_bool(name, value)
    if kind == "attention":
        return parse_attention(value, host)
    if kind == "tri":
        return parse_tri(name, value)
    return parse_megabytes(name, value)


# --- the three input forms -----------------------------------------------------------------------------


def from_dict(
    data: Mapping[str, Any], host: HostKind | None = None, base: GenerationSettings | None = None
) -> GenerationSettings:
    """The API's dict form. Keys are optional; ``enabled`` defaults to true (sending settings means use them).

    Absent keys take their value from ``base`` (the Settings → Optim defaults), else the field default.
    """
    if not isinstance(data, Mapping):
        raise SettingsError("args", data, "a JSON object with keys " + ", ".join(FIELD_NAMES))
    unknown = [k for k in data if k not in FIELDS_BY_NAME]
    if unknown:
        raise SettingsError("args", unknown[0], "keys " + ", ".join(FIELD_NAMES))
    values = {name: _parse_field(name, data[name], host) for name in FIELD_NAMES if name in data}
    values.setdefault("enabled", True)
    if base is not None:
        for name in FIELD_NAMES:
            values.setdefault(name, getattr(base, name))
    return GenerationSettings(**values)


def from_positional(values: Sequence[Any], host: HostKind | None = None) -> GenerationSettings:
    """The UI's positional form; missing trailing values keep their defaults (as the host API does)."""
    if len(values) > len(FIELDS):
        raise SettingsError("args", list(values), f"at most {len(FIELDS)} values: " + ", ".join(FIELD_NAMES))
    parsed = {name: _parse_field(name, value, host) for name, value in zip(FIELD_NAMES, values, strict=False)}
    return GenerationSettings(**parsed)


def from_script_args(args: Sequence[Any], host: HostKind | None = None) -> GenerationSettings:
    """What a script hook receives: the UI's positional values, or one dict in the first slot (API)."""
    if not args:
        return GenerationSettings()
    if isinstance(args[0], Mapping):
        return from_dict(args[0], host)
    return from_positional(args, host)


# --- infotext -----------------------------------------------------------------------------------------

INFOTEXT_KEY = "Optim"


def format_infotext(settings: GenerationSettings) -> str | None:
    """``attention=split, vae_on_cpu=on`` for the non-default settings; None when nothing changes."""
    if not settings.enabled:
        return None
    changed = settings.non_default()
    if not changed:
        return None
    return ", ".join(f"{name}={_infotext_value(value)}" for name, value in changed.items())


def _infotext_value(value: Any) -> str:
    return str(value)


def parse_infotext(text: str, host: HostKind | None = None) -> GenerationSettings:
    """Inverse of :func:`format_infotext`; errors name the field and value like every other input."""
    values: dict[str, Any] = {"enabled": True}
    for raw_part in text.split(","):
        part = raw_part.strip()
        if not part:
            continue
        name, sep, raw = part.partition("=")
        name = name.strip()
        if not sep or name not in FIELDS_BY_NAME or name == "enabled":
            raise SettingsError(INFOTEXT_KEY, part, "name=value pairs with names " + ", ".join(FIELD_NAMES[1:]))
        values[name] = _parse_field(name, raw.strip(), host)
    return GenerationSettings(**values)


# --- JSON schema ----------------------------------------------------------------------------------------


def json_schema(host: HostKind | None = None) -> dict[str, Any]:
    """JSON schema (draft 2020-12) of the API's dict form, for ``GET /optim/v1/schema``."""
    attention = [a.value for a in (ATTENTION_BY_HOST[host] if host is not None else tuple(Attention))]
    props: dict[str, Any] = {
        "enabled": {"type": "boolean", "default": True, "description": FIELDS_BY_NAME["enabled"].help},
        "attention": {
            "type": "string",
            "enum": attention,
            "default": Attention.HOST.value,
            "description": FIELDS_BY_NAME["attention"].help,
        },
        "channels_last": {
            "type": ["boolean", "null"],
            "default": None,
            "description": FIELDS_BY_NAME["channels_last"].help + " null = as the host has it.",
        },
        "vae_on_cpu": {
            "type": ["boolean", "null"],
            "default": None,
            "description": FIELDS_BY_NAME["vae_on_cpu"].help + " null = as the host has it.",
        },
        "inference_memory_mb": {
            "anyOf": [
                {"type": "null"},
                {"const": 0},
                {"type": "integer", "minimum": INFERENCE_MEMORY_MIN_MB, "maximum": INFERENCE_MEMORY_MAX_MB},
            ],
            "default": None,
            "description": FIELDS_BY_NAME["inference_memory_mb"].help,
        },
    }
    for name, prop in props.items():
        prop["title"] = FIELDS_BY_NAME[name].label
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "sd-webui-optim per-generation settings",
        "description": 'Pass as "alwayson_scripts": {"optim": {"args": [ {...} ]}}',
        "type": "object",
        "properties": props,
        "additionalProperties": False,
    }
