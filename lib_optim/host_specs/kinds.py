"""The WebUI hosts we know: one :class:`HostSpec` each, registered here, and everything else reads them.

A host is registered once (:func:`register_host`) with its name and the names users type, how to recognise
its checkout on disk, its launch-flag table, its adapter class, the attention binding family its adapter
uses, whether it has launch profiles and what it cannot do. The command line's ``--host``, the checker, the
environment notes, the doctor, the profiles, detection and the adapter factory iterate the registered specs,
so a fifth host is one :func:`register_host` call (tests/test_host_specs.py registers one).

:class:`HostKind` is the host's name: a ``str`` (``"forge"``), one object per name, that works like a ``str``
Enum (``HostKind("forge") is HostKind.FORGE``, ``.value``, ``for h in HostKind``) while members come from the
registry (the same device as ``lib_optim.attention.registry.Attention``).

Plain Python: the flag table and the adapter are named by ``"module:attribute"`` and resolved by the wing that
uses them (launch, hosts), so this wing imports neither.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

AttentionBinding = Literal["a1111", "forge", "ldm_patched"]
Family = Literal["a1111", "forge"]
GpuFlagEffect = Literal["index", "visible-devices"]


class _HostKindMeta(type):
    """``for h in HostKind`` / ``len(HostKind)`` / ``"forge" in HostKind`` go over the registered hosts, in
    registration order, as they would for an Enum."""

    def __iter__(cls) -> Iterator[HostKind]:
        return iter(_REGISTRY.kinds())

    def __len__(cls) -> int:
        return len(_REGISTRY.kinds())

    def __contains__(cls, item: object) -> bool:
        return isinstance(item, str) and str.__str__(item) in _REGISTRY.specs


class HostKind(str, metaclass=_HostKindMeta):
    """The name of a registered WebUI host: a ``str`` (``"a1111"``), one object per name.

    ``HostKind(x)`` accepts only registered canonical names; use :func:`parse_host` for what users type.
    """

    __slots__ = ()

    A1111: ClassVar[HostKind]  # AUTOMATIC1111 stable-diffusion-webui v1.10.x
    FORGE: ClassVar[HostKind]  # WebUI Forge f2 (main; backend/ package, gradio 4)
    FORGE_PREVIOUS: ClassVar[HostKind]  # Forge tag `previous` (ldm_patched/, gradio 3)
    REFORGE: ClassVar[HostKind]  # Panchovix reForge (ldm_patched/, gradio 3)

    def __new__(cls, value: object) -> HostKind:
        if isinstance(value, HostKind):
            return value
        spec = _REGISTRY.specs.get(value) if isinstance(value, str) else None
        if spec is None:
            raise ValueError(f"{value!r} is not a registered WebUI host; known: {known_names()}")
        return spec.kind

    @classmethod
    def _make(cls, name: str) -> HostKind:
        return str.__new__(cls, name)

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def name(self) -> str:
        """The attribute name, as an Enum member's (``FORGE_PREVIOUS``)."""
        return _attribute(self.value)

    @property
    def spec(self) -> HostSpec:
        return host_spec(self)

    @property
    def display_name(self) -> str:
        return host_spec(self).display_name

    @property
    def is_forge_family(self) -> bool:
        return host_spec(self).family == "forge"

    def __repr__(self) -> str:
        return f"HostKind({self.value!r})"

    def __str__(self) -> str:
        return self.value

    def __reduce__(self) -> tuple[Any, ...]:
        return (HostKind, (self.value,))


def _attribute(value: str) -> str:
    return value.upper().replace("-", "_")


@dataclass(frozen=True)
class Marker:
    """One thing a checkout of the host has on disk (paths relative to its root, ``/``-separated).

    ``is_dir``: the path is a folder (else a file). ``contains``: the file holds this text. ``version_prefix``:
    the file's first ``version = '...'`` starts with this (``modules_forge/forge_version.py``).
    """

    path: str
    is_dir: bool = False
    contains: str = ""
    version_prefix: str = ""


@dataclass(frozen=True)
class HostSpec:
    """One registered host (see the module doc)."""

    kind: HostKind
    display_name: str
    aliases: tuple[str, ...] = ()  # other names users type (lower case)
    family: Family = "forge"
    # Detection (docs/hosts.md §8.1): the checkout is this host when every marker of one of these sets is there.
    # An empty set matches any checkout (the fallback); hosts with more markers per set are tried first.
    markers: tuple[tuple[Marker, ...], ...] = ()
    # The launch-flag table: "module:attribute" naming a sequence of lib_optim.launch.FlagSpec rows or a
    # mapping {kind: rows}, the rows themselves, or a callable returning them. None: the checker does not
    # cover this host's flags.
    flag_table: str | Callable[[], Any] | Any | None = None
    # The adapter: "module:Class" or the class. With adapter_takes_kind it is built as cls(kind), else cls().
    adapter: str | Callable[..., Any] | None = None
    adapter_takes_kind: bool = False
    attention: AttentionBinding = "ldm_patched"  # which AttentionBackend binding its adapter switches
    # The host whose launch profiles apply here (lib_optim/launch/profiles.py): itself, another, or None.
    profiles_from: str | None = None
    # The torch its launcher installs when TORCH_COMMAND is not set; the environment notes
    # (lib_optim/launch/env_notes.py) were read against it. None: those notes do not cover this host.
    default_torch: str | None = None
    supports_inference_memory: bool = True  # a per-generation computation budget (Forge's inference memory)
    # The launch flag that picks the GPU (docs/hosts.md §2.6) and what its number N does: "index" runs on cuda:N,
    # the N-th GPU CUDA shows; "visible-devices" sets CUDA_VISIBLE_DEVICES=N (replacing the user's) before torch
    # starts, then runs on cuda:0. ignored_gpu_flags: flags the host parses but never uses to pick the GPU.
    gpu_flag: str | None = None
    gpu_flag_effect: GpuFlagEffect = "index"
    ignored_gpu_flags: tuple[str, ...] = ()
    infotext_callables: bool = True  # calls a callable in extra_generation_params (docs/hosts.md §7.5)

    @property
    def has_profiles(self) -> bool:
        return self.profiles_from == self.kind.value

    @property
    def checked(self) -> bool:
        return self.flag_table is not None

    def names(self) -> tuple[str, ...]:
        return (self.kind.value, *self.aliases)

    def specificity(self) -> int:
        return max((len(m) for m in self.markers), default=0)


class _Registry:
    def __init__(self) -> None:
        self.specs: dict[str, HostSpec] = {}
        self.aliases: dict[str, str] = {}
        self._lock = threading.Lock()

    def kinds(self) -> list[HostKind]:
        return [s.kind for s in self.specs.values()]

    def add(self, spec: HostSpec) -> None:
        with self._lock:
            taken = [n for n in spec.names() if n in self.specs or n in self.aliases]
            if taken:
                raise ValueError(f"host name or alias {taken[0]!r} is registered already")
            self.specs[spec.kind.value] = spec
            self.aliases.update(dict.fromkeys(spec.aliases, spec.kind.value))

    def remove(self, value: str) -> HostSpec:
        with self._lock:
            spec = self.specs.pop(value, None)
            if spec is None:
                raise ValueError(f"host: {value!r} is not registered; known: {known_names()}")
            for alias in spec.aliases:
                self.aliases.pop(alias, None)
            return spec


_REGISTRY = _Registry()


def register_host(kind: str, display_name: str, **spec: Any) -> HostKind:
    """Register a host (see :class:`HostSpec` for ``spec``) and return its kind; ``HostKind.<NAME>`` names it
    too (``fake-host`` → ``HostKind.FAKE_HOST``). Raises ValueError if the name or an alias is taken."""
    name = kind.strip().lower()
    if not name or name != kind:
        raise ValueError(f"host: {kind!r} must be a non-empty lower-case name")
    value = HostKind._make(name)
    aliases = tuple(a.strip().lower() for a in spec.pop("aliases", ()))
    _REGISTRY.add(HostSpec(value, display_name, aliases, **spec))
    setattr(HostKind, _attribute(name), value)
    return value


def unregister_host(kind: HostKind | str) -> None:
    """Remove a host (tests register temporary ones)."""
    spec = _REGISTRY.remove(str.__str__(kind))
    if getattr(HostKind, _attribute(spec.kind.value), None) is spec.kind:
        delattr(HostKind, _attribute(spec.kind.value))


def host_spec(kind: HostKind | str) -> HostSpec:
    """The spec of a registered host; ValueError naming the known ones otherwise."""
    spec = _REGISTRY.specs.get(str.__str__(kind))
    if spec is None:
        raise ValueError(f"host: {str(kind)!r} is not a known WebUI; known: {known_names()}")
    return spec


def host_specs() -> tuple[HostSpec, ...]:
    """Every registered spec, in registration order."""
    return tuple(_REGISTRY.specs.values())


def known_names() -> str:
    return ", ".join(_REGISTRY.specs)


def host_names() -> tuple[str, ...]:
    """Every name ``--host`` and the API accept: the kinds, then their aliases."""
    return (*_REGISTRY.specs, *_REGISTRY.aliases)


def checked_hosts() -> tuple[HostKind, ...]:
    """Hosts whose flag tables the checker carries (docs/hosts.md §2.1)."""
    return tuple(s.kind for s in host_specs() if s.checked)


def profiled_hosts() -> tuple[HostKind, ...]:
    """Hosts with launch profiles of their own (lib_optim/launch/profiles.py)."""
    return tuple(s.kind for s in host_specs() if s.has_profiles)


def parse_host(value: str) -> HostKind:
    """Parse a host name as typed by a user; the error names the value and the allowed ones."""
    key = value.strip().lower() if isinstance(value, str) else value
    if isinstance(key, str):
        canonical = key if key in _REGISTRY.specs else _REGISTRY.aliases.get(key)
        if canonical is not None:
            return _REGISTRY.specs[canonical].kind
    raise ValueError(f"host: {value!r} is not a known WebUI; allowed: {known_names()}")


def resolve_ref(ref: object) -> Any:
    """A spec's lazy reference: ``"module:attribute"`` is imported now; anything else is returned as it is."""
    if not isinstance(ref, str):
        return ref
    module, sep, attribute = ref.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"host spec reference {ref!r}: expected 'module:attribute'")
    return getattr(importlib.import_module(module), attribute)
