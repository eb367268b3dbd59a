"""The GPU the WebUI will run on, and doctor's words for it.

The host's GPU flag (``HostSpec.gpu_flag``, docs/hosts.md §2.6), ``CUDA_VISIBLE_DEVICES`` and
``CUDA_DEVICE_ORDER`` from the launch environment, over the GPUs the probe found (:mod:`lib_optim.gpu.visible`
says how CUDA numbers them). "GPU k" is the probe's numbering: nvidia-smi's where the driver listed the GPUs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from lib_optim.gpu import CudaNumbering, GpuInfo, SystemFacts, cuda_numbering
from lib_optim.host_specs import HostKind, host_spec
from lib_optim.launch.cmdline import parse_args

_VISIBLE = "CUDA_VISIBLE_DEVICES"
_ORDER = "CUDA_DEVICE_ORDER"


@dataclass(frozen=True)
class GpuChoice:
    """``gpu``: the card (None: no GPU, or it cannot be told here; ``reason`` says which). ``cuda_index``: its
    number inside the WebUI. ``maybe``: other cards it may be instead (CUDA's speed ranking is not known here).
    ``others``: every other GPU and what becomes of it. ``chosen_by``: the flags and variables that decided; empty
    when the WebUI simply takes the only GPU."""

    gpu: GpuInfo | None
    cuda_index: int | None
    reason: str
    maybe: tuple[GpuInfo, ...] = ()
    others: tuple[tuple[GpuInfo, str], ...] = ()
    chosen_by: tuple[str, ...] = ()

    @property
    def profile_gpu(self) -> GpuInfo | None:
        """The card to size the recommendation for: the chosen one; where unsure, the smallest it may be."""
        sized = [g for g in (self.gpu, *self.maybe) if g is not None and g.total_mb is not None]
        return min(sized, key=lambda g: g.total_mb or 0) if self.maybe and sized else self.gpu

    def worth_saying(self, gpu_count: int) -> bool:
        """Doctor prints the choice on a machine with several GPUs, or where something chose."""
        return gpu_count > 1 or bool(self.chosen_by)

    def lines(self) -> list[str]:
        head = _card(self.gpu) if self.gpu is not None else "no GPU"
        lines = [f"WebUI will use: {head} — because {self.reason}"]
        lines.extend(f"Other GPU:      {_card(gpu)}: {fate}" for gpu, fate in self.others)
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.gpu.index if self.gpu else None,
            "name": self.gpu.name if self.gpu else None,
            "total_mb": self.gpu.total_mb if self.gpu else None,
            "cuda_index": self.cuda_index,
            "reason": self.reason,
            "maybe": [g.index for g in self.maybe],
            "chosen_by": list(self.chosen_by),
            "others": [{"index": g.index, "name": g.name, "total_mb": g.total_mb, "fate": f} for g, f in self.others],
        }


def _card(gpu: GpuInfo) -> str:
    size = f", {gpu.total_mb} MB" if gpu.total_mb is not None else ""
    return f"GPU {gpu.index} ({gpu.name}{size})"


def _short(gpu: GpuInfo) -> str:
    cc = gpu.compute_capability
    return f"GPU {gpu.index} ({f'sm {cc[0]}.{cc[1]}' if cc else 'sm unknown'})"


@dataclass
class _Flags:
    """What the host's command line says about the GPU."""

    env: dict[str, str]
    index: int = 0
    said: tuple[str, ...] = ()
    chosen_by: tuple[str, ...] = ()
    fatal: str | None = None  # the WebUI cannot run on any GPU with this command line


def _read_flags(host: HostKind, argv: Sequence[str], env: Mapping[str, str]) -> _Flags:
    spec = host_spec(host)
    parsed = parse_args(list(argv), host)
    flags = _Flags(dict(env))
    said: list[str] = []
    for flag in spec.ignored_gpu_flags:
        if parsed.has(flag):
            instead = f" (its flag is {spec.gpu_flag})" if spec.gpu_flag else ""
            said.append(f"{spec.display_name} does not use {flag} {parsed.value(flag)} to pick the GPU{instead}")
    value = parsed.value(spec.gpu_flag) if spec.gpu_flag else None
    if spec.gpu_flag is None or value is None:
        flags.said = tuple(said)
        return flags
    flags.chosen_by = (spec.gpu_flag,)
    if spec.gpu_flag_effect == "visible-devices":
        try:
            number = int(value)
        except ValueError:
            flags.fatal = f"{spec.gpu_flag} {value!r} is not a number: the WebUI stops at start-up"
            return flags
        old = flags.env.get(_VISIBLE)
        replacing = f" (replacing your {old!r})" if old is not None and old.strip() != str(number) else ""
        flags.env[_VISIBLE] = str(number)
        said.append(
            f"{spec.gpu_flag} {number} makes {spec.display_name} set {_VISIBLE}={number}{replacing} and run on cuda:0"
        )
    elif value.strip().isdigit():
        flags.index = int(value)
        said.append(f"{spec.gpu_flag} {flags.index} makes {spec.display_name} run on cuda:{flags.index}")
    else:
        flags.fatal = f"{spec.gpu_flag} {value!r} is not a GPU number: torch refuses the device cuda:{value}"
    flags.said = tuple(said)
    return flags


def _visible_clause(numbering: CudaNumbering) -> str:
    shown = ", ".join(f"GPU {g.index} as cuda:{i}" for i, g in enumerate(numbering.visible)) or "no GPU"
    stop = f" (CUDA stops at {numbering.stopped_at})" if numbering.stopped_at else ""
    return f"{_VISIBLE}={numbering.visible_devices} shows {shown}{stop}"


def _order_clause(numbering: CudaNumbering, env: Mapping[str, str]) -> str | None:
    """How CUDA numbered the GPUs, where that decided and is worth saying (torch's own list: nothing to say)."""
    if numbering.order == "pci":
        return f"{_ORDER}={env.get(_ORDER, '').strip()} numbers the GPUs as nvidia-smi does"
    if numbering.order != "fastest" or numbering.in_pci_order():
        return None
    ranking = ", ".join(f"{i} is {_short(g)}" for i, g in enumerate(numbering.ranked))
    return (
        f"CUDA numbers the fastest GPU first unless {_ORDER}=PCI_BUS_ID: its device {ranking}, ranking by compute "
        f"capability, then memory; set {_ORDER}=PCI_BUS_ID to number them as nvidia-smi does"
    )


def _fate(gpu: GpuInfo, numbering: CudaNumbering, maybe: Sequence[GpuInfo] = ()) -> str:
    if gpu in numbering.visible:
        fate = f"cuda:{numbering.visible.index(gpu)}, not used by the WebUI"
    else:
        fate = f"hidden from the WebUI by {_VISIBLE}={numbering.visible_devices}"
    return f"{fate} — unless CUDA ranks it the other way" if gpu in maybe else fate


def choose_gpu(
    host: HostKind, system: SystemFacts, argv: Sequence[str], env: Mapping[str, str], probed_env: Mapping[str, str]
) -> GpuChoice | None:
    """The GPU ``host`` runs on when started with ``argv`` and ``env``; None where the probe found no GPU.
    ``probed_env``: the environment the probe ran in (see :func:`lib_optim.gpu.cuda_numbering`)."""
    if not system.gpus:
        return None
    flags = _read_flags(host, argv, env)
    chosen_by = (*flags.chosen_by, *(name for name in (_VISIBLE, _ORDER) if name in env))
    if flags.fatal is not None:
        return GpuChoice(None, None, "; ".join((*flags.said, flags.fatal)), chosen_by=chosen_by)
    numbering = cuda_numbering(system, flags.env, probed_env)
    if numbering.problem is not None:
        return GpuChoice(None, None, "; ".join((*flags.said, numbering.problem)), chosen_by=chosen_by)
    said = list(flags.said)
    if not flags.chosen_by:
        said.append("the WebUI runs on cuda:0, the first GPU CUDA shows")
    if numbering.visible_devices is not None:
        said.append(_visible_clause(numbering))
    by_rank = flags.index < len(numbering.visible) and numbering.by_rank(flags.index)
    order = _order_clause(numbering, flags.env)
    if order and len(numbering.ranked) > 1 and (numbering.visible_devices is None or by_rank):
        said.append(order)
    if flags.index >= len(numbering.visible):
        said.append(
            f"CUDA shows {len(numbering.visible)} GPU(s), so there is no cuda:{flags.index}: torch fails with "
            "'invalid device ordinal'"
            if numbering.visible
            else "CUDA shows no GPU, so the WebUI cannot run on one"
        )
        others = tuple((g, _fate(g, numbering)) for g in system.gpus)
        return GpuChoice(None, None, "; ".join(said), others=others, chosen_by=chosen_by)
    gpu = numbering.visible[flags.index]
    maybe = numbering.unsure.get(gpu.index, ()) if by_rank else ()
    if maybe:
        alternatives = " or ".join(_short(g) for g in maybe)
        said.append(
            f"it may be {alternatives} instead: CUDA ranks different cards of the same compute capability by a speed "
            f"this probe cannot read, so the profile is for the smallest; set {_ORDER}=PCI_BUS_ID to be sure"
        )
    others = tuple((g, _fate(g, numbering, maybe)) for g in system.gpus if g is not gpu)
    return GpuChoice(gpu, flags.index, "; ".join(said), maybe, others, chosen_by)
