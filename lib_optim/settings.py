"""The per-generation settings, defined once.

:data:`FIELDS` is the one list of the settings: each entry names a field of :class:`GenerationSettings`, its
label and help, and its :class:`FieldKind`, which knows how to read the field from any input (API, UI,
infotext, Settings page) and how to write it in each form. Validation, the API's single-dict form, the
UI's positional form (the order of the script's controls), the infotext entry, the ``optim_default_<field>``
option keys and the JSON schema are all derived from it, and so is every other consumer: the UI's controls and
their tooltips, the Settings → Optim page, X/Y/Z axes, which fields only matter on a GPU, what the host does now
(:class:`lib_optim.adapter.EffectiveState`), the benchmark's candidates and the profiles' per-generation defaults.
A new field is one :data:`FIELDS` entry (plus a dataclass field), its row in :data:`lib_optim.adapter.APPLIERS`
and its host behaviour (tests/test_fields_everywhere.py proves the rest follows).

Defaults change nothing: a generation with default settings runs exactly as the host would run it without
the extension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from dataclasses import field as dataclass_field
from enum import Enum
from typing import Any, Generic, TypeVar, overload

from lib_optim.attention import Attention, for_host, not_on_host, parse_name
from lib_optim.host_specs import HostKind


class Tri(str, Enum):
    """A switch that can also be left as the host has it."""

    INHERIT = "inherit"
    ON = "on"
    OFF = "off"


class Compile(str, Enum):
    """Regional torch.compile of the UNet's repeated blocks (lib_optim.compile.regional)."""

    OFF = "off"
    ON = "on"  # inductor, default mode
    MAX_AUTOTUNE = "max-autotune"  # inductor "max-autotune-no-cudagraphs": longer compile, tuned GPU kernels
    AUTO = "auto"  # "on" only when the job pays for the compile (lib_optim.compile.auto)


class VaeTiling(str, Enum):
    """Decode (and encode) the VAE in tiles."""

    INHERIT = "inherit"  # as the host does it (Forge tiles after an out-of-memory error, or always with Never OOM)
    ON = "on"
    OFF = "off"
    AUTO = "auto"  # tile exactly when the full decode/encode is predicted not to fit (lib_optim.vae.planner)


INFERENCE_MEMORY_MIN_MB = 64
INFERENCE_MEMORY_MAX_MB = 262_144
INFOTEXT_KEY = "Optim"
OPTION_PREFIX = "optim_default_"


class SettingsError(ValueError):
    """A value the user gave is not allowed. The message names the field, the value and what is allowed."""

    def __init__(self, field: str, value: object, allowed: str):
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"[Optim] {field}: {value!r} is not allowed; allowed: {allowed}")


_BOOL_WORDS = {"true": True, "false": False, "on": True, "off": False, "yes": True, "no": False}


# --- the kinds of field -----------------------------------------------------------------------------------


class FieldKind:
    """How one kind of field is read and written. ``control`` names the UI control (lib_optim.ui builds it)."""

    control = "text"

    def parse(self, field: str, value: object, host: HostKind | None, allowed: Sequence[str] | None) -> Any:
        """The field's value from any input form; :class:`SettingsError` naming field, value and allowed.
        ``allowed``: the values this install accepts (e.g. available attention backends), when known."""
        raise NotImplementedError

    def to_api(self, value: Any) -> Any:
        """The API's dict form (JSON)."""
        return value

    def to_ui(self, value: Any) -> Any:
        """What the UI control holds; also the infotext and Settings-page form."""
        return value

    def schema(self, host: HostKind | None, allowed: Sequence[str] | None) -> dict[str, Any]:
        raise NotImplementedError

    def choices(self, host: HostKind | None, allowed: Sequence[str] | None) -> list[str] | None:
        """The values a dropdown/radio/X-Y-Z axis offers; None for free-form values."""
        return None


class BoolKind(FieldKind):
    control = "checkbox"

    def parse(self, field: str, value: object, host: HostKind | None, allowed: Sequence[str] | None) -> bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise SettingsError(field, value, "true or false")

    def schema(self, host: HostKind | None, allowed: Sequence[str] | None) -> dict[str, Any]:
        return {"type": "boolean"}


class AttentionKind(FieldKind):
    """A registered attention backend the host understands (:mod:`lib_optim.attention.registry`); aliases accepted."""

    control = "dropdown"

    def names(self, host: HostKind | None, allowed: Sequence[str] | None) -> list[str]:
        known = for_host(host) if host is not None else tuple(Attention)
        return [a.value for a in known if allowed is None or a.value in allowed]

    def parse(self, field: str, value: object, host: HostKind | None, allowed: Sequence[str] | None) -> Attention:
        names = self.names(host, allowed)
        text = ", ".join(names)
        if value is None:
            return Attention.HOST
        result = value if isinstance(value, Attention) else parse_name(value) if isinstance(value, str) else None
        if result is None:
            raise SettingsError(field, value, text)
        if result.value not in names:
            where = f"on {host.display_name}" if host is not None else "here"
            why = not_on_host(result, host) if host is not None else ""
            raise SettingsError(field, value, f"{text} ({where})" + (f"; {why}" if why else ""))
        return result

    def to_api(self, value: Attention) -> str:
        return value.value

    def to_ui(self, value: Attention) -> str:
        return value.value

    def schema(self, host: HostKind | None, allowed: Sequence[str] | None) -> dict[str, Any]:
        return {"type": "string", "enum": self.names(host, allowed)}

    def choices(self, host: HostKind | None, allowed: Sequence[str] | None) -> list[str]:
        return self.names(host, allowed)


class TriKind(FieldKind):
    """inherit/on/off in the UI and infotext; null/true/false in the API (strings accepted too)."""

    control = "radio"

    def parse(self, field: str, value: object, host: HostKind | None, allowed: Sequence[str] | None) -> Tri:
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

    def to_api(self, value: Tri) -> bool | None:
        return None if value is Tri.INHERIT else value is Tri.ON

    def to_ui(self, value: Tri) -> str:
        return value.value

    def schema(self, host: HostKind | None, allowed: Sequence[str] | None) -> dict[str, Any]:
        return {"type": ["boolean", "null"], "description_suffix": " null = as the host has it."}

    def choices(self, host: HostKind | None, allowed: Sequence[str] | None) -> list[str]:
        return [t.value for t in Tri]


class ChoiceKind(FieldKind):
    """One value of a ``str`` Enum, by its value (case-insensitive)."""

    control = "radio"

    def __init__(self, enum: type[Enum]) -> None:
        self.enum = enum

    def parse(self, field: str, value: object, host: HostKind | None, allowed: Sequence[str] | None) -> Enum:
        if isinstance(value, self.enum):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in self.enum:
                if member.value == key:
                    return member
        raise SettingsError(field, value, ", ".join(str(m.value) for m in self.enum))

    def to_api(self, value: Enum) -> str:
        return str(value.value)

    def to_ui(self, value: Enum) -> str:
        return str(value.value)

    def schema(self, host: HostKind | None, allowed: Sequence[str] | None) -> dict[str, Any]:
        return {"type": "string", "enum": [m.value for m in self.enum]}

    def choices(self, host: HostKind | None, allowed: Sequence[str] | None) -> list[str]:
        return [str(m.value) for m in self.enum]


class MegabytesKind(FieldKind):
    """A whole number of MB within a range, or 0/null for "as the host has it"."""

    control = "slider"

    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high

    def parse(self, field: str, value: object, host: HostKind | None, allowed: Sequence[str] | None) -> int | None:
        text = f"0 or null (as the host has it), or a whole number of MB from {self.low} to {self.high}"
        number: float
        if value is None:
            return None
        if isinstance(value, bool):
            raise SettingsError(field, value, text)
        if isinstance(value, (int, float)):
            number = value
        elif isinstance(value, str):
            key = value.strip().lower()
            if key in ("", "inherit", "default"):
                return None
            try:
                number = float(key)
            except ValueError:
                raise SettingsError(field, value, text) from None
        else:
            raise SettingsError(field, value, text)
        if not math.isfinite(number) or number != int(number):
            raise SettingsError(field, value, text)
        whole = int(number)
        if whole == 0:
            return None
        if not self.low <= whole <= self.high:
            raise SettingsError(field, value, text)
        return whole

    def to_ui(self, value: int | None) -> int:
        return value or 0

    def schema(self, host: HostKind | None, allowed: Sequence[str] | None) -> dict[str, Any]:
        return {
            "anyOf": [{"type": "null"}, {"const": 0}, {"type": "integer", "minimum": self.low, "maximum": self.high}]
        }


# --- the fields ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationSettings:
    """One generation's settings; the field order is the UI's control order (see :data:`FIELDS`)."""

    enabled: bool = False
    attention: Attention = Attention.HOST
    channels_last: Tri = Tri.INHERIT
    vae_on_cpu: Tri = Tri.INHERIT
    inference_memory_mb: int | None = None  # None = as the host has it
    compile: Compile = Compile.OFF
    vae_tiling: VaeTiling = VaeTiling.INHERIT

    def non_default(self) -> dict[str, Any]:
        """The fields (besides ``enabled``) that differ from their default, in their UI/infotext form."""
        return {
            spec.name: spec.kind.to_ui(getattr(self, spec.name))
            for spec in SETTING_FIELDS
            if getattr(self, spec.name) != spec.default
        }

    @property
    def changes_anything(self) -> bool:
        return self.enabled and bool(self.non_default())

    def to_dict(self) -> dict[str, Any]:
        """The API's single-dict form (every field)."""
        return {spec.name: spec.kind.to_api(getattr(self, spec.name)) for spec in FIELDS}

    def to_positional(self) -> list[Any]:
        """The UI's positional form, in :data:`FIELDS` order (what the script's controls hold)."""
        return [spec.kind.to_ui(getattr(self, spec.name)) for spec in FIELDS]

    def to_options(self) -> dict[str, Any]:
        """The Settings → Optim defaults (``optim_default_<field>``) that store these settings."""
        return {spec.option_key: spec.kind.to_ui(getattr(self, spec.name)) for spec in SETTING_FIELDS}

    def with_defaults_from(self, other: GenerationSettings) -> GenerationSettings:
        """Fill every field left at its default from ``other`` (e.g. settings-page defaults)."""
        changes = {
            spec.name: getattr(other, spec.name) for spec in SETTING_FIELDS if getattr(self, spec.name) == spec.default
        }
        return replace(self, **changes)


@dataclass(frozen=True)
class FieldSpec:
    name: str  # key in the API dict, in infotext and in the JSON schema; a GenerationSettings field
    label: str  # UI label (the API's /sdapi/v1/script-info shows it too)
    help: str
    kind: FieldKind
    bench_values: tuple[Any, ...] | None = None  # the values the Optim tab tries (None: every other one)
    tip: str = ""  # the UI control's tooltip (javascript/optim.js shows it); "" = the help text
    gpu_only: bool = False  # it only moves things off or around a GPU: on a CPU-only host it changes nothing
    # What the host does now for this field, read from a lib_optim.adapter.EffectiveState (the benchmark flips
    # or varies from it); None: EffectiveState.extra[name] when the adapter reports it there, else unknown.
    state: Callable[[Any], Any] | None = dataclass_field(default=None, compare=False)

    @property
    def tooltip(self) -> str:
        return self.tip or self.help

    @property
    def default(self) -> Any:
        return GenerationSettings.__dataclass_fields__[self.name].default

    @property
    def option_key(self) -> str:
        """Its Settings → Optim default: ``optim_default_<name>``."""
        return OPTION_PREFIX + self.name

    def parse(self, value: object, host: HostKind | None = None, allowed: Sequence[str] | None = None) -> Any:
        return self.kind.parse(self.name, value, host, allowed)


_SPECS: list[FieldSpec] = [
    FieldSpec("enabled", "Optim", "Apply the settings below to this generation; off changes nothing.", BoolKind()),
    FieldSpec(
        "attention",
        "Attention backend",
        "Cross-attention implementation for this generation: host = as the WebUI has it; auto = the fastest "
        "one predicted to fit in free memory.",
        AttentionKind(),
        tip="Attention implementation for this generation. host = as the WebUI has it; auto = fastest that fits.",
        state=lambda state: state.attention,  # the host's name of it; the benchmark maps it to ours
    ),
    FieldSpec(
        "channels_last",
        "Channels-last UNet",
        "Store the UNet in channels-last memory format for this generation (often faster on tensor cores).",
        TriKind(),
        tip="Channels-last memory format for the UNet during this generation (tensor-core GPUs).",
        state=lambda state: state.unet_channels_last,
    ),
    FieldSpec(
        "vae_on_cpu",
        "VAE on CPU",
        "Decode (and, in img2img, encode) on the CPU in float32, freeing the VAE's GPU memory meanwhile.",
        TriKind(),
        tip="Decode (and in img2img encode) on the CPU in float32, freeing the VAE's GPU memory.",
        gpu_only=True,
        state=lambda state: None if state.vae_device is None else state.vae_device.startswith("cpu"),
    ),
    FieldSpec(
        "inference_memory_mb",
        "Inference memory (MB)",
        "Forge only: GPU memory kept free for computation while the model loads; 0 = as Forge has it.",
        MegabytesKind(INFERENCE_MEMORY_MIN_MB, INFERENCE_MEMORY_MAX_MB),
        tip="Forge: GPU memory kept free for computation while the model loads. 0 = as Forge has it.",
        gpu_only=True,
        state=lambda state: state.inference_memory_mb,
    ),
    FieldSpec(
        "compile",
        "Compile UNet blocks",
        "torch.compile the UNet's repeated blocks for this generation: the first generation compiles (tens of "
        "seconds to minutes), later ones with the same model, attention and dtype reuse it and run faster. "
        "max-autotune compiles longer for tuned GPU kernels; auto compiles only when the job's saving (measured "
        "on this machine, else estimated) outweighs the compile and its extra memory fits.",
        ChoiceKind(Compile),
        bench_values=(Compile.ON,),  # max-autotune's compile alone can outlast the whole benchmark
    ),
    FieldSpec(
        "vae_tiling",
        "Tiled VAE",
        "Decode (and, in img2img, encode) the image in tiles, so a large image's VAE fits in memory: on, off, "
        "auto = only when the full decode is predicted not to fit, inherit = as the host does it.",
        ChoiceKind(VaeTiling),
        bench_values=(VaeTiling.ON,),  # what tiling costs or saves at the size measured; auto/off follow from it
    ),
]

_T = TypeVar("_T")


class FieldsView(Sequence[_T], Generic[_T]):
    """A read-only sequence derived from the fields at every use (``read`` computes it), so that every consumer —
    whichever name it imported — sees the same fields (a test can add one for its duration:
    tests/test_fields_everywhere.py)."""

    def __init__(self, read: Callable[[], tuple[_T, ...]]) -> None:
        self._read = read

    @overload
    def __getitem__(self, index: int) -> _T: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[_T, ...]: ...
    def __getitem__(self, index: int | slice) -> _T | tuple[_T, ...]:
        return self._read()[index]

    def __len__(self) -> int:
        return len(self._read())

    def __iter__(self) -> Iterator[_T]:
        return iter(self._read())

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Sequence) and tuple(self) == tuple(other)

    def __hash__(self) -> int:
        return hash(self._read())

    def __repr__(self) -> str:
        return repr(self._read())


_V = TypeVar("_V")


class FieldsMap(Mapping[str, _V], Generic[_V]):
    """A read-only mapping field name → ``value(spec)`` over ``specs()``, derived at every use like
    :class:`FieldsView`."""

    def __init__(self, value: Callable[[FieldSpec], _V], specs: Callable[[], Sequence[FieldSpec]]) -> None:
        self._value, self._specs = value, specs

    def __getitem__(self, name: str) -> _V:
        for spec in self._specs():
            if spec.name == name:
                return self._value(spec)
        raise KeyError(name)

    def __len__(self) -> int:
        return len(self._specs())

    def __iter__(self) -> Iterator[str]:
        return iter([spec.name for spec in self._specs()])


FIELDS: Sequence[FieldSpec] = FieldsView(lambda: tuple(_SPECS))
FIELD_NAMES: Sequence[str] = FieldsView(lambda: tuple(spec.name for spec in _SPECS))
FIELDS_BY_NAME: Mapping[str, FieldSpec] = FieldsMap(lambda spec: spec, lambda: _SPECS)
SETTING_FIELDS: Sequence[FieldSpec] = FieldsView(lambda: tuple(_SPECS[1:]))  # everything but the on/off switch
SETTING_NAMES: Sequence[str] = FieldsView(lambda: tuple(spec.name for spec in _SPECS[1:]))
GPU_ONLY_FIELDS: Sequence[str] = FieldsView(lambda: tuple(spec.name for spec in _SPECS if spec.gpu_only))


def tooltips() -> dict[str, str]:
    """Each setting field's tooltip by name (the UI hands them to javascript/optim.js)."""
    return {spec.name: spec.tooltip for spec in SETTING_FIELDS}


if tuple(f.name for f in fields(GenerationSettings)) != tuple(FIELD_NAMES):  # one order for UI, API and dataclass
    raise RuntimeError("lib_optim.settings: FIELDS and GenerationSettings list different fields")


# --- the input forms ----------------------------------------------------------------------------------------

Allowed = Mapping[str, Sequence[str]]  # field name → the values this install accepts (e.g. available backends)


def _parse(name: str, value: object, host: HostKind | None, allowed: Allowed | None) -> Any:
    return FIELDS_BY_NAME[name].parse(value, host, None if allowed is None else allowed.get(name))


def from_dict(
    data: Mapping[str, Any],
    host: HostKind | None = None,
    base: GenerationSettings | None = None,
    *,
    allowed: Allowed | None = None,
) -> GenerationSettings:
    """The API's dict form. Keys are optional; ``enabled`` defaults to true (sending settings means use them).

    Absent keys take their value from ``base`` (the Settings → Optim defaults), else the field default.
    """
    if not isinstance(data, Mapping):
        raise SettingsError("args", data, "a JSON object with keys " + ", ".join(FIELD_NAMES))
    unknown = [k for k in data if k not in FIELDS_BY_NAME]
    if unknown:
        raise SettingsError("args", unknown[0], "keys " + ", ".join(FIELD_NAMES))
    values = {name: _parse(name, data[name], host, allowed) for name in FIELD_NAMES if name in data}
    values.setdefault("enabled", True)
    if base is not None:
        for spec in SETTING_FIELDS:
            values.setdefault(spec.name, getattr(base, spec.name))
    return GenerationSettings(**values)


def from_positional(
    values: Sequence[Any], host: HostKind | None = None, *, allowed: Allowed | None = None
) -> GenerationSettings:
    """The UI's positional form; missing trailing values keep their defaults (as the host API does)."""
    if len(values) > len(FIELDS):
        raise SettingsError("args", list(values), f"at most {len(FIELDS)} values: " + ", ".join(FIELD_NAMES))
    parsed = {name: _parse(name, value, host, allowed) for name, value in zip(FIELD_NAMES, values, strict=False)}
    return GenerationSettings(**parsed)


def from_script_args(
    args: Sequence[Any], host: HostKind | None = None, *, allowed: Allowed | None = None
) -> GenerationSettings:
    """What a script hook receives: the UI's positional values, or one dict in the first slot (API)."""
    if not args:
        return GenerationSettings()
    if isinstance(args[0], Mapping):
        return from_dict(args[0], host, allowed=allowed)
    return from_positional(args, host, allowed=allowed)


def from_options(
    read: Callable[[str, Any], Any], host: HostKind | None = None, fields_: Iterable[str] | None = None
) -> GenerationSettings:
    """The Settings → Optim defaults: ``read(option_key, default)`` per field (``enabled`` stays off).
    ``fields_``: the fields this host has options for (the others keep their defaults)."""
    wanted = set(fields_) if fields_ is not None else set(FIELD_NAMES)
    values = {
        spec.name: spec.parse(read(spec.option_key, spec.kind.to_ui(spec.default)), host)
        for spec in SETTING_FIELDS
        if spec.name in wanted
    }
    return GenerationSettings(**values)


# --- infotext -----------------------------------------------------------------------------------------------


def format_infotext(settings: GenerationSettings) -> str | None:
    """``attention=split, vae_on_cpu=on`` for the non-default settings; None when nothing changes."""
    if not settings.enabled:
        return None
    changed = settings.non_default()
    if not changed:
        return None
    return ", ".join(f"{name}={value}" for name, value in changed.items())


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
        values[name] = _parse(name, raw.strip(), host, None)
    return GenerationSettings(**values)


# --- JSON schema --------------------------------------------------------------------------------------------


def json_schema(host: HostKind | None = None, *, allowed: Allowed | None = None) -> dict[str, Any]:
    """JSON schema (draft 2020-12) of the API's dict form, for ``GET /optim/v1/schema``."""
    props: dict[str, Any] = {}
    for spec in FIELDS:
        prop = spec.kind.schema(host, None if allowed is None else allowed.get(spec.name))
        suffix = prop.pop("description_suffix", "")
        prop["default"] = True if spec.name == "enabled" else spec.kind.to_api(spec.default)
        prop["title"] = spec.label
        prop["description"] = spec.help + suffix
        props[spec.name] = prop
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "sd-webui-optim per-generation settings",
        "description": 'Pass as "alwayson_scripts": {"optim": {"args": [ {...} ]}}',
        "type": "object",
        "properties": props,
        "additionalProperties": False,
    }
