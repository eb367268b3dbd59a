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
from lib_optim.host_specs import HostKind, host_spec, host_specs


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
    SAGE: ClassVar[Attention]
    FLASH: ClassVar[Attention]

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


@dataclass(frozen=True)
class Kernel:
    """A kernel we call ourselves (SageAttention, FlashAttention-2…): ``fn`` is ``"module:function"`` or a
    callable ``(q, k, v, mask=None) -> out`` with q, k, v and out as ``(batch, heads, tokens, dim_head)`` — the
    layout of ``torch.nn.functional.scaled_dot_product_attention``. Our glue installs it in place of the host's
    attention function (:mod:`lib_optim.attention.kernels`): on A1111 by wrapping SDPA inside the generation
    while the host's sdp optimizer is active, on Forge f2 and ldm_patched by rebinding the UNet's attention
    function; the VAE keeps the host's attention. No launch flag selects it."""

    fn: str | Callable[..., Any]
    flag: None = None


Binding = A1111Optimizer | ForgeFunctions | LdmPatchedFunctions | Kernel


@dataclass(frozen=True)
class Constraints:
    """What a kernel accepts, checked before every call (:meth:`violation`); a call that breaks one runs SDPA.

    ``dtypes``: torch dtype names (``"float16"``); ``max_head_dim``; ``devices``: device types; ``masks``:
    whether an attention mask is accepted; ``max_tokens``: the longest sequence; ``min_compute_capability``:
    checked by the availability probe (once), not per call."""

    dtypes: tuple[str, ...] = ()
    max_head_dim: int | None = None
    devices: tuple[str, ...] = ()
    masks: bool = True
    max_tokens: int | None = None
    min_compute_capability: tuple[int, int] | None = None

    def violation(self, q: Any, k: Any, v: Any, mask: Any = None) -> str:
        """ "" when the kernel takes these (batch, heads, tokens, dim_head) tensors, else why not."""
        dtype = str(q.dtype).removeprefix("torch.")
        if self.dtypes and (dtype not in self.dtypes or k.dtype != q.dtype or v.dtype != q.dtype):
            return f"dtype {dtype} (it takes {'/'.join(self.dtypes)})"
        head_dim = int(q.shape[-1])
        if self.max_head_dim is not None and max(head_dim, int(v.shape[-1])) > self.max_head_dim:
            return f"head dim {max(head_dim, int(v.shape[-1]))} > {self.max_head_dim}"
        if self.devices and q.device.type not in self.devices:
            return f"device {q.device.type} (it takes {'/'.join(self.devices)})"
        if not self.masks and mask is not None:
            return "an attention mask (it takes none)"
        tokens = max(int(q.shape[-2]), int(k.shape[-2]))
        if self.max_tokens is not None and tokens > self.max_tokens:
            return f"sequence length {tokens} > {self.max_tokens}"
        return ""


Availability = Callable[[str], str]  # device type → "" when it can run there, else why (naming the fix)


def _family(family: str) -> tuple[HostKind, ...]:
    """The registered hosts whose adapter switches this binding family (their spec's ``attention``)."""
    return tuple(spec.kind for spec in host_specs() if spec.attention == family)


_BINDING_TYPES = (A1111Optimizer, ForgeFunctions, LdmPatchedFunctions, Kernel)


@dataclass(frozen=True)
class AttentionBackend:
    """One registry entry (see the module doc).

    How each host runs it is ``bindings`` (host kind → :data:`Binding`); ``a1111``, ``forge``, ``ldm_patched``
    (both ldm_patched hosts) and ``kernel`` (a :class:`Kernel` on every host) are shorthands merged into it,
    an explicit ``bindings`` entry winning. After construction ``a1111``/``forge``/``ldm_patched`` hold the
    host-function bindings (``ldm_patched`` only when both ldm_patched hosts share one) and ``kernel`` the
    :class:`Kernel`, if any."""

    name: Attention
    title: str  # what the UI shows next to the name
    aliases: tuple[str, ...] = ()
    # None for the two choices that are not algorithms (host, auto)
    memory: Callable[[mem.AttnShape, mem.MemoryContext], int] | None = None
    runs_within: Callable[[mem.AttnShape, mem.MemoryContext], bool] | None = None  # extra "it can run" rule
    # device type → time relative to the best: the planner's speed rank (its efficiency; ``efficiency()``)
    speed: Mapping[str, float] = field(default_factory=dict)
    frugal_rank: int | None = None  # out-of-memory fallback order: lower = more frugal; None = never a step
    a1111: A1111Optimizer | None = None
    forge: ForgeFunctions | None = None
    ldm_patched: LdmPatchedFunctions | None = None
    kernel: Kernel | str | Callable[..., Any] | None = None
    bindings: Mapping[HostKind, Binding] = field(default_factory=dict)
    constraints: Constraints | None = None  # what a Kernel accepts per call
    implementation: str | Callable[..., Any] | None = None  # "module:function" (q, k, v) → out, for the bench
    availability: str | Availability | None = None  # "module:function" or a callable; None = always runs
    directml_safe: bool = False  # known to run under torch-directml (docs/hosts.md §4.8)

    def __post_init__(self) -> None:
        kernel = self.kernel if self.kernel is None or isinstance(self.kernel, Kernel) else Kernel(self.kernel)
        merged: dict[HostKind, Binding] = {host: kernel for host in HostKind} if kernel is not None else {}
        for family, shorthand in (("a1111", self.a1111), ("forge", self.forge), ("ldm_patched", self.ldm_patched)):
            if shorthand is not None:
                merged.update({host: shorthand for host in _family(family)})
        merged.update(self.bindings)
        for host, binding in merged.items():
            if not isinstance(host, HostKind) or not isinstance(binding, _BINDING_TYPES):
                raise ValueError(f"[Optim] attention backend {self.name.value!r}: bad binding {host!r}: {binding!r}")
        object.__setattr__(self, "bindings", dict(merged))
        object.__setattr__(self, "a1111", self._shared(merged, "a1111", A1111Optimizer))
        object.__setattr__(self, "forge", self._shared(merged, "forge", ForgeFunctions))
        object.__setattr__(self, "ldm_patched", self._shared(merged, "ldm_patched", LdmPatchedFunctions))
        object.__setattr__(self, "kernel", next((b for b in merged.values() if isinstance(b, Kernel)), None))

    @staticmethod
    def _shared(merged: Mapping[HostKind, Binding], family: str, kind: type) -> Any:
        """The host-function binding every host of ``family`` shares, or None (none, or they differ)."""
        found = {id(merged.get(h)): merged.get(h) for h in _family(family)}
        only = next(iter(found.values())) if len(found) == 1 else None
        return only if isinstance(only, kind) else None

    @property
    def is_choice(self) -> bool:
        """host/auto: settings values that are not an algorithm of their own."""
        return self.memory is None

    def hosts(self) -> tuple[HostKind, ...]:
        """The hosts that can switch to it per generation (host/auto: every host)."""
        if self.is_choice:
            return tuple(HostKind)
        return tuple(host for host in HostKind if self.binding(host) is not None)

    def binding(self, host: HostKind) -> Binding | None:
        """How ``host`` runs it (its own optimizer/function, or our :class:`Kernel`), or None. A host registered
        after this entry gets the binding its family shares (its spec's ``attention``), or the kernel."""
        if host in self.bindings:
            return self.bindings[host]
        shared: dict[str, Binding | None] = {"a1111": self.a1111, "forge": self.forge, "ldm_patched": self.ldm_patched}
        kernel = self.kernel if isinstance(self.kernel, Kernel) else None
        return shared.get(host_spec(host).attention) or kernel

    def flag(self, host: HostKind) -> str | None:
        """The launch flag that selects it on ``host``, if there is one."""
        binding = self.binding(host)
        return binding.flag if binding is not None else None

    def not_on(self, host: HostKind) -> str:
        """ "" when ``host`` can switch to it, else why (the hosts that can)."""
        if host in self.hosts():
            return ""
        where = ", ".join(h.display_name for h in self.hosts()) or "no WebUI"
        return f"{self.name.value!r} is bound only for {where}, not for {host.display_name}"

    def efficiency(self, device: str) -> float | None:
        """Its measured or ranked time on ``device`` relative to the best (lower is faster), or None when the
        entry has no figure for it (the planner then ranks it last)."""
        value = self.speed.get(device) if device in self.speed else self.speed.get("cuda")
        return float(value) if value is not None else None

    def speed_on(self, device: str) -> float:
        """Rank on ``device`` (``cuda`` for any GPU); unmeasured backends rank last."""
        value = self.efficiency(device)
        return value if value is not None else 10.0

    def implementation_fn(self) -> Callable[..., Any] | None:
        return _resolve(self.implementation)

    def kernel_fn(self) -> Callable[..., Any] | None:
        """The :class:`Kernel`'s callable ``(q, k, v, mask=None)``, imported on first use, or None."""
        return _resolve(self.kernel.fn) if isinstance(self.kernel, Kernel) else None

    def unavailable_reason(self, device: str) -> str:
        """ "" when our implementation can run on ``device`` (``cpu``/``cuda``), else why, naming the fix."""
        probe = _resolve(self.availability)
        reason = str(probe(device)) if probe is not None else ""
        if reason or self.implementation is not None or self.kernel is not None:
            return reason
        return "no implementation outside the WebUI"


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


def kernel_backends() -> list[AttentionBackend]:
    """The backends that are a :class:`Kernel` we call ourselves on at least one host."""
    return [b for b in _REGISTRY.entries() if b.kernel is not None]


def not_on_host(name: Attention | str, host: HostKind) -> str:
    """ "" when ``host`` can switch to the backend ``name``, else why (the hosts it is bound for)."""
    return _REGISTRY.get(name).not_on(host)


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

# Kernels we call ourselves (Kernel bindings: every host), each checked per call (Constraints) and falling back to
# SDPA for a call it cannot take. Speed: not measured here (no GPU was lent), so no figure: `auto` ranks them last
# and never trades SDPA for an unmeasured kernel (SageAttention's INT8 QK also changes the image slightly); a user
# picks them by name until `bench --device cuda` figures go here.
Attention.SAGE = register(
    "sage",
    "SageAttention (INT8-quantized kernel)",
    aliases=("sageattention", "sage-attention", "sageattn"),
    memory=mem.lse_peak,  # a fused kernel: no score matrix, like xformers/flash
    kernel="lib_optim.attention.kernels:sage",
    # sageattention/core.py:139-157 (thu-ml/SageAttention d1a57a5): fp16/bf16 only, CUDA sm80/86/89/90/120/121
    # ("Unsupported CUDA architecture" else); :270-271 "Unsupported head_dim" above 128; sageattn takes no mask
    constraints=Constraints(
        dtypes=("float16", "bfloat16"),
        max_head_dim=128,
        devices=("cuda",),
        masks=False,
        min_compute_capability=(8, 0),
    ),
    implementation="lib_optim.attention.kernels:sage_bench",
    availability="lib_optim.attention.kernels:sage_unavailable_reason",
)
Attention.FLASH = register(
    "flash",
    "FlashAttention-2 kernel",
    aliases=("flash-attn", "flash_attn", "flash-attention", "flashattention", "fa2"),
    memory=mem.lse_peak,
    kernel="lib_optim.attention.kernels:flash",
    # flash-attention README "Requirements": Ampere/Ada/Hopper, fp16 and bf16, head dims up to 256;
    # flash_attn/flash_attn_interface.py:33 `assert head_dim <= 256`; flash_attn_func takes no mask (:1156-1168)
    constraints=Constraints(
        dtypes=("float16", "bfloat16"),
        max_head_dim=256,
        devices=("cuda",),
        masks=False,
        min_compute_capability=(8, 0),
    ),
    implementation="lib_optim.attention.kernels:flash_bench",
    availability="lib_optim.attention.kernels:flash_unavailable_reason",
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
