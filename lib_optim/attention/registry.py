"""The attention backends: one registry entry each, and everything else reads it.

In the spirit of diffusers' ``attention_dispatch`` registry: a backend is registered once, with

- its name (an :class:`Attention` value) and the other names people type for it (aliases);
- its memory model (a function of :mod:`lib_optim.attention.memory`) and its speed rank per device;
- its place in the out-of-memory fallback order (``frugal_rank``: lower is more frugal);
- how each host finds it and which launch flag selects it there (:class:`A1111Optimizer`,
  :class:`ForgeFunctions`, :class:`LdmPatchedFunctions`);
- our own implementation for the command-line bench, and an availability probe whose reason names the fix.

Settings validation, the JSON schema, the UI's choices, the planner, the bench, the out-of-memory fallback,
the checker's attention flags and the start-up profile all read these entries, so adding a backend is one
:func:`register` call (plus, at most, a lookup in a host adapter when the host names it in a new way).

Plain Python: no torch (implementations are named by ``"module:function"`` and imported when used).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from lib_optim.attention import memory as mem
from lib_optim.host_specs import HostKind


class _AttentionMeta(type):
    """``for a in Attention`` / ``len(Attention)`` / ``"sdp" in Attention`` go over the registered names, in
    registration order, as they would for an Enum."""

    def __iter__(cls) -> Iterator[Attention]:
        return iter(_REGISTRY.names())

    def __len__(cls) -> int:
        return len(_REGISTRY.names())

    def __contains__(cls, item: object) -> bool:
        return isinstance(item, str) and _REGISTRY.find(item) is not None


class Attention(str, metaclass=_AttentionMeta):
    """The name of a registered attention backend: a ``str`` (``"sdp"``), one object per name.

    Works like a ``str`` Enum — ``Attention("sdp") is Attention.SDP``, ``.value``, iteration — but new members
    come from :func:`register`, so a backend added by the registry is a first-class value everywhere.
    ``Attention(x)`` accepts only registered canonical names; use :func:`parse_name` for aliases.
    """

    __slots__ = ()

    HOST: ClassVar[Attention]  # leave whatever the host selected
    AUTO: ClassVar[Attention]  # the fastest backend predicted to fit (lib_optim.attention.planner)
    SDP: ClassVar[Attention]
    SPLIT: ClassVar[Attention]
    SUB_QUAD: ClassVar[Attention]
    XFORMERS: ClassVar[Attention]
    SDP_NO_MEM: ClassVar[Attention]
    INVOKEAI: ClassVar[Attention]
    V1: ClassVar[Attention]
    NONE: ClassVar[Attention]

    def __new__(cls, value: object) -> Attention:
        if isinstance(value, Attention):
            return value
        found = _REGISTRY.find(value) if isinstance(value, str) else None
        if found is None:
            raise ValueError(f"{value!r} is not a registered attention backend")
        return found.name

    @classmethod
    def _make(cls, name: str) -> Attention:
        return str.__new__(cls, name)

    @property
    def value(self) -> str:
        return str.__str__(self)

    @property
    def backend(self) -> AttentionBackend:
        return _REGISTRY.get(self)

    def __repr__(self) -> str:
        return f"Attention({self.value!r})"

    def __str__(self) -> str:
        return self.value

    def __reduce__(self) -> tuple[Any, ...]:
        return (Attention, (self.value,))


# --- how each host finds a backend -----------------------------------------------------------------------


@dataclass(frozen=True)
class A1111Optimizer:
    """An A1111 cross-attention optimizer (docs/hosts.md §3.1): its exact ``title()``, the launch flag that
    makes "Automatic" prefer it, its priority in ``sd_hijack.optimizers`` and its place in the built-in list
    (which breaks priority ties), and why it can be missing from that list (with the fix)."""

    title: str
    flag: str | None
    priority: int
    order: int
    missing: str = "not in the WebUI's optimizer list (modules.sd_hijack.optimizers); restart the WebUI"


@dataclass(frozen=True)
class ForgeFunctions:
    """Forge f2's functions in ``backend.attention`` (docs/hosts.md §3.4): the UNet/DiT one, the VAE's
    single-head spatial one, and the launch flag that makes Forge choose it at start-up."""

    unet: str
    vae: str
    flag: str | None


@dataclass(frozen=True)
class LdmPatchedFunctions:
    """Forge previous / reForge: functions in ``ldm_patched.ldm.modules.attention`` (UNet) and
    ``ldm_patched.ldm.modules.diffusionmodules.model`` (VAE) (docs/hosts.md §3.5, §3.6), and the launch flag."""

    unet: str
    vae: str
    flag: str | None


Availability = Callable[[str], str]  # device type → "" when it can run there, else why (naming the fix)


@dataclass(frozen=True)
class AttentionBackend:
    """One registry entry (see the module doc)."""

    name: Attention
    title: str  # what the UI shows next to the name
    aliases: tuple[str, ...] = ()
    # None for the two choices that are not algorithms (host, auto)
    memory: Callable[[mem.AttnShape, mem.MemoryContext], int] | None = None
    runs_within: Callable[[mem.AttnShape, mem.MemoryContext], bool] | None = None  # extra "it can run" rule
    speed: Mapping[str, float] = field(default_factory=dict)  # device type → time relative to the best
    frugal_rank: int | None = None  # out-of-memory fallback order: lower = more frugal; None = never a step
    a1111: A1111Optimizer | None = None
    forge: ForgeFunctions | None = None
    ldm_patched: LdmPatchedFunctions | None = None
    implementation: str | Callable[..., Any] | None = None  # "module:function" (q, k, v) → out, for the bench
    availability: str | Availability | None = None  # "module:function" or a callable; None = always runs
    directml_safe: bool = False  # known to run under torch-directml (docs/hosts.md §4.8)

    @property
    def is_choice(self) -> bool:
        """host/auto: settings values that are not an algorithm of their own."""
        return self.memory is None

    def hosts(self) -> tuple[HostKind, ...]:
        """The hosts that can switch to it per generation (host/auto: every host)."""
        if self.is_choice:
            return tuple(HostKind)
        out = []
        if self.a1111 is not None:
            out.append(HostKind.A1111)
        if self.forge is not None:
            out.append(HostKind.FORGE)
        if self.ldm_patched is not None:
            out += [HostKind.FORGE_PREVIOUS, HostKind.REFORGE]
        return tuple(out)

    def flag(self, host: HostKind) -> str | None:
        """The launch flag that selects it on ``host``, if there is one."""
        binding: Any = {
            HostKind.A1111: self.a1111,
            HostKind.FORGE: self.forge,
            HostKind.FORGE_PREVIOUS: self.ldm_patched,
            HostKind.REFORGE: self.ldm_patched,
        }[host]
        return binding.flag if binding is not None else None

    def speed_on(self, device: str) -> float:
        """Rank on ``device`` (``cuda`` for any GPU); unmeasured backends rank last."""
        table = self.speed.get(device) if device in self.speed else self.speed.get("cuda")
        return float(table) if table is not None else 10.0

    def implementation_fn(self) -> Callable[..., Any] | None:
        return _resolve(self.implementation)

    def unavailable_reason(self, device: str) -> str:
        """ "" when our implementation can run on ``device`` (``cpu``/``cuda``), else why, naming the fix."""
        if self.implementation is None:
            return "no implementation outside the WebUI"
        probe = _resolve(self.availability)
        return str(probe(device)) if probe is not None else ""


def _resolve(ref: str | Callable[..., Any] | None) -> Callable[..., Any] | None:
    if ref is None or callable(ref):
        return ref
    module, _, name = ref.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(module), name)
    return fn


# --- the registry ------------------------------------------------------------------------------------------


class _Registry:
    def __init__(self) -> None:
        self._entries: dict[str, AttentionBackend] = {}
        self._aliases: dict[str, str] = {}
        self._lock = threading.Lock()

    def names(self) -> list[Attention]:
        return [e.name for e in self._entries.values()]

    def entries(self) -> list[AttentionBackend]:
        return list(self._entries.values())

    def find(self, text: str) -> AttentionBackend | None:
        return self._entries.get(text)

    def get(self, name: str) -> AttentionBackend:
        entry = self._entries.get(str.__str__(name))
        if entry is None:
            raise KeyError(name)
        return entry

    def lookup_alias(self, text: str) -> AttentionBackend | None:
        key = text.strip().lower()
        canonical = key if key in self._entries else self._aliases.get(key)
        return self._entries.get(canonical) if canonical is not None else None

    def add(self, entry: AttentionBackend) -> None:
        with self._lock:
            taken = [k for k in (entry.name.value, *entry.aliases) if k in self._entries or k in self._aliases]
            if taken:
                raise ValueError(f"attention backend name or alias {taken[0]!r} is registered already")
            self._entries[entry.name.value] = entry
            self._aliases.update({a.lower(): entry.name.value for a in entry.aliases})

    def remove(self, name: str) -> None:
        with self._lock:
            entry = self._entries.pop(name)
            for alias in entry.aliases:
                self._aliases.pop(alias.lower(), None)


_REGISTRY = _Registry()


def register(name: str, title: str, **spec: Any) -> Attention:
    """Register a backend (see :class:`AttentionBackend` for ``spec``) and return its name. Raises
    ValueError if the name or an alias is taken."""
    value = Attention._make(name)
    _REGISTRY.add(AttentionBackend(value, title, **spec))
    return value


def unregister(name: Attention | str) -> None:
    """Remove a backend (tests register temporary ones)."""
    _REGISTRY.remove(str.__str__(name))


def backend(name: Attention | str) -> AttentionBackend:
    return _REGISTRY.get(name)


def backends() -> list[AttentionBackend]:
    """Every registered backend, in registration order (host and auto first)."""
    return _REGISTRY.entries()


def algorithms() -> list[AttentionBackend]:
    """The backends that are algorithms (not host/auto)."""
    return [b for b in _REGISTRY.entries() if not b.is_choice]


def parse_name(text: str) -> Attention | None:
    """A registered name or alias (case and surrounding spaces ignored), or None."""
    entry = _REGISTRY.lookup_alias(text)
    return entry.name if entry is not None else None


def for_host(host: HostKind) -> tuple[Attention, ...]:
    """Every name ``host`` understands (what is *available* right now is the adapter's business)."""
    return tuple(b.name for b in _REGISTRY.entries() if host in b.hosts())


def frugal_order() -> list[Attention]:
    """The out-of-memory fallback's attention steps, most frugal first."""
    ranked = [b for b in _REGISTRY.entries() if b.frugal_rank is not None]
    return [b.name for b in sorted(ranked, key=lambda b: b.frugal_rank or 0)]


def by_forge_function(name: str) -> Attention | None:
    """The backend whose Forge f2 UNet function is ``name`` (``attention_pytorch`` → sdp)."""
    return next((b.name for b in _REGISTRY.entries() if b.forge is not None and b.forge.unet == name), None)


def by_ldm_patched_function(name: str) -> Attention | None:
    """The backend whose Forge previous / reForge UNet function is ``name``."""
    return next((b.name for b in _REGISTRY.entries() if b.ldm_patched is not None and b.ldm_patched.unet == name), None)


def by_a1111_title(title: str) -> Attention | None:
    """The backend with this A1111 optimizer title, or whose name is what A1111 calls it (``Doggettx``)."""
    low = title.strip().lower()
    for b in _REGISTRY.entries():
        if b.a1111 is not None and (b.a1111.title.lower() == low or b.a1111.title.split(" - ")[0].lower() == low):
            return b.name
    return None


# --- the backends --------------------------------------------------------------------------------------------
# Speed: time per attention call relative to the best where memory is not the limit. CPU: ratios measured by
# `python -m lib_optim bench --quick` on a 2-core x86 machine (torch 2.13, fp32; SD1.5 512², 768², SDXL
# 1024², self-attention, which dominates a step): naive ("none") 3.1-4.0, sub-quad 3.1-4.2, split as naive
# when one slice fits (3.2-4.1) and far slower when it slices (14× at 768²) — so sub-quad ranks ahead of split
# here. CUDA: the hosts' own priorities (A1111 ranks xformers, then sdp, sdp-no-mem, sub-quad and split;
# docs/hosts.md §3.1); not measured here yet (no GPU was lent to this project's sessions).

Attention.HOST = register("host", "as the WebUI has it", aliases=("default",))
Attention.AUTO = register("auto", "fastest predicted to fit")
Attention.SDP = register(
    "sdp",
    "PyTorch scaled dot product (SDPA)",
    aliases=("pytorch", "sdpa", "sdp - scaled dot product"),
    memory=mem.sdp_peak,
    speed={"cpu": 1.0, "cuda": 1.0},
    a1111=A1111Optimizer(
        "sdp - scaled dot product",
        "--opt-sdp-attention",
        70,
        2,
        "needs PyTorch 2.0 or newer (torch.nn.functional.scaled_dot_product_attention)",
    ),
    forge=ForgeFunctions("attention_pytorch", "pytorch_attention_single_head_spatial", "--attention-pytorch"),
    ldm_patched=LdmPatchedFunctions("attention_pytorch", "pytorch_attention", "--attention-pytorch"),
    implementation="lib_optim.attention.impl:sdp",
)
Attention.SPLIT = register(
    "split",
    "split attention (Doggettx)",
    aliases=("doggettx", "split-attention"),
    memory=mem.split_peak,
    runs_within=mem.split_fits,
    speed={"cpu": 3.8, "cuda": 1.9},
    frugal_rank=1,
    a1111=A1111Optimizer("Doggettx", "--opt-split-attention", 90, 6),
    # Forge's non-SDPA VAE attention (docs/hosts.md §3.4): normal_… reshapes the 4-D tensors for slice_…
    forge=ForgeFunctions("attention_split", "normal_attention_single_head_spatial", "--attention-split"),
    ldm_patched=LdmPatchedFunctions("attention_split", "normal_attention", "--attention-split"),
    implementation="lib_optim.attention.impl:split",
    directml_safe=True,
)
Attention.SUB_QUAD = register(
    "sub-quad",
    "sub-quadratic (chunked)",
    aliases=("sub-quadratic", "sub_quad", "subquad", "quad"),
    memory=mem.sub_quad_peak,
    speed={"cpu": 3.6, "cuda": 1.8},
    frugal_rank=0,
    a1111=A1111Optimizer("sub-quadratic", "--opt-sub-quad-attention", 10, 3),
    forge=ForgeFunctions("attention_sub_quad", "normal_attention_single_head_spatial", "--attention-quad"),
    ldm_patched=LdmPatchedFunctions("attention_sub_quad", "normal_attention", "--attention-quad"),
    implementation="lib_optim.attention.impl:sub_quad",
    directml_safe=True,
)
Attention.XFORMERS = register(
    "xformers",
    "xformers memory-efficient",
    memory=mem.lse_peak,
    speed={"cpu": 1.0, "cuda": 1.02},
    a1111=A1111Optimizer(
        "xformers",
        "--xformers",
        100,
        0,
        "start the WebUI with --xformers; needs an NVIDIA GPU of compute capability 6.0-9.0 and an xformers "
        "build matching torch",
    ),
    # Forge uses an installed xformers unless --disable-xformers: no flag selects it (docs/hosts.md §3.3)
    forge=ForgeFunctions("attention_xformers", "xformers_attention_single_head_spatial", None),
    ldm_patched=LdmPatchedFunctions("attention_xformers", "xformers_attention", None),
    implementation="lib_optim.attention.impl:xformers",
    availability="lib_optim.attention.impl:xformers_unavailable_reason",
)
Attention.SDP_NO_MEM = register(
    "sdp-no-mem",
    "SDPA without the memory-efficient kernel",
    aliases=("sdp-no-mem - scaled dot product without memory efficient attention",),
    memory=mem.sdp_no_mem_peak,
    speed={"cpu": 1.0, "cuda": 1.05},
    a1111=A1111Optimizer(
        "sdp-no-mem - scaled dot product without memory efficient attention",
        "--opt-sdp-no-mem-attention",
        80,
        1,
        "needs PyTorch 2.0 or newer (torch.nn.functional.scaled_dot_product_attention)",
    ),
    implementation="lib_optim.attention.impl:sdp_no_mem",
)
Attention.INVOKEAI = register(
    "invokeai",
    "InvokeAI (sliced by memory)",
    memory=mem.split_peak,  # slices the queries by free memory, like split
    speed={"cpu": 4.0, "cuda": 2.2},  # not implemented here, so not measured: ranked behind the measured ones
    a1111=A1111Optimizer("InvokeAI", "--opt-split-attention-invokeai", 10, 5),
)
Attention.V1 = register(
    "v1",
    "original split v1",
    aliases=("v1 - original v1",),
    memory=mem.naive_peak,
    speed={"cpu": 4.0, "cuda": 2.5},
    a1111=A1111Optimizer("V1 - original v1", "--opt-split-attention-v1", 10, 4),
)
Attention.NONE = register(
    "none",
    "no optimization (the model's own attention)",
    aliases=("basic",),
    memory=mem.naive_peak,
    speed={"cpu": 3.5, "cuda": 2.5},
    # "None" is handled by apply_optimizations itself, never in the optimizer list (docs/hosts.md §3.2)
    a1111=A1111Optimizer("None", "--disable-opt-split-attention", 0, -1),
    ldm_patched=LdmPatchedFunctions("attention_basic", "normal_attention", None),
    implementation="lib_optim.attention.impl:naive",
)

A1111_NONE_TITLE = "None"

DIRECTML_UNSAFE = (
    "not known to run well under DirectML: torch-directml has no fused attention kernels, so SDPA runs its "
    "math path (the whole score matrix) or falls back to the CPU; use split or sub-quad (docs/hosts.md §4.8)"
)


def directml_reason(name: Attention) -> str:
    """ "" when ``name`` is known to run under torch-directml, else why (for the adapters' availability)."""
    entry = _REGISTRY.get(name)
    return "" if entry.is_choice or entry.directml_safe else DIRECTML_UNSAFE
