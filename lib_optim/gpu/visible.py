"""Which GPUs CUDA shows a process and how it numbers them: ``CUDA_VISIBLE_DEVICES`` and ``CUDA_DEVICE_ORDER``
applied to the GPUs the driver lists.

What CUDA does (CUDA Programming Guide, "CUDA Environment Variables"):

- ``CUDA_DEVICE_ORDER=FASTEST_FIRST`` (the default) numbers the devices "fastest to slowest, using a simple
  heuristic"; ``PCI_BUS_ID`` numbers them by PCI bus ID, which is nvidia-smi's (and NVML's) numbering.
- ``CUDA_VISIBLE_DEVICES`` lists device numbers (in CUDA's numbering above) or GPU UUIDs (``GPU-…``; a prefix
  that names one GPU is enough) or MIG instances (``MIG-…``). The listed devices become ``cuda:0``, ``cuda:1``, …
  in the order listed; an invalid entry ends the list ("only the devices whose index precedes the invalid index
  are visible"), so an empty value or ``-1`` hides every GPU.

CUDA does not publish its speed heuristic, so ``FASTEST_FIRST`` is approximated: higher compute capability
first, then more memory, then PCI bus order (identical cards are assumed to keep PCI order). Two different cards
with the same compute capability, or one without a known compute capability, may be in either order: each is
listed in :attr:`CudaNumbering.unsure` with the cards it may swap with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

from lib_optim.gpu.facts import GpuInfo, SystemFacts

Order = Literal["pci", "fastest", "as-probed"]


@dataclass(frozen=True)
class CudaNumbering:
    """The GPUs CUDA shows a process, in its numbering: ``visible[i]`` is ``cuda:i``.

    ``ranked``: every GPU in CUDA's numbering before ``CUDA_VISIBLE_DEVICES`` (the numbers its entries name).
    ``order``: how ``ranked`` was made (``as-probed``: torch listed the GPUs under the same variables).
    ``unsure``: for a GPU (by its ``index``), the other cards CUDA may rank in its place. ``visible_devices``:
    the ``CUDA_VISIBLE_DEVICES`` applied (None: unset). ``stopped_at``: the entry that ended the list.
    ``problem``: why the list cannot be known here (then ``visible`` is empty). ``entries``: the
    ``CUDA_VISIBLE_DEVICES`` entry that named each visible GPU (empty when unset).
    """

    ranked: tuple[GpuInfo, ...]
    visible: tuple[GpuInfo, ...]
    order: Order
    visible_devices: str | None = None
    stopped_at: str | None = None
    unsure: Mapping[int, tuple[GpuInfo, ...]] = field(default_factory=dict)
    problem: str | None = None
    entries: tuple[str, ...] = ()

    def by_rank(self, position: int) -> bool:
        """``visible[position]`` was found by its number in ``ranked`` (so by CUDA_DEVICE_ORDER), not by UUID."""
        return self.visible_devices is None or (position < len(self.entries) and self.entries[position].isdigit())

    def in_pci_order(self) -> bool:
        """``ranked`` is nvidia-smi's order, for certain."""
        return self.order == "pci" or (
            self.order == "fastest" and not self.unsure and list(self.ranked) == _pci_order(self.ranked)
        )


def device_order(env: Mapping[str, str]) -> Literal["pci", "fastest"]:
    """``CUDA_DEVICE_ORDER``: ``PCI_BUS_ID`` or (anything else, unset) ``FASTEST_FIRST``."""
    return "pci" if env.get("CUDA_DEVICE_ORDER", "").strip().upper() == "PCI_BUS_ID" else "fastest"


def _pci_order(gpus: Sequence[GpuInfo]) -> list[GpuInfo]:
    if gpus and all(g.pci_bus_id for g in gpus):
        return sorted(gpus, key=lambda g: ((g.pci_bus_id or "").lower(), g.index))
    return sorted(gpus, key=lambda g: g.index)


def _speed_key(gpu: GpuInfo) -> tuple[int, int, int]:
    major, minor = gpu.compute_capability or (-1, -1)
    return (-major, -minor, -(gpu.total_mb or 0))


def _may_swap(a: GpuInfo, b: GpuInfo) -> bool:
    """CUDA's speed ranking of two cards is beyond what we know: different cards, same or unknown capability."""
    if a.name == b.name and a.compute_capability == b.compute_capability:
        return False
    return a.compute_capability is None or b.compute_capability is None or a.compute_capability == b.compute_capability


def rank(
    gpus: Sequence[GpuInfo], order: Literal["pci", "fastest"]
) -> tuple[list[GpuInfo], dict[int, tuple[GpuInfo, ...]]]:
    """Every GPU in CUDA's numbering for ``order``, and the cards whose place is a guess (see the module doc)."""
    pci = _pci_order(gpus)
    if order == "pci":
        return pci, {}
    ranked = sorted(pci, key=_speed_key)  # stable: PCI order among equals
    unsure = {g.index: peers for g in ranked if (peers := tuple(h for h in ranked if h is not g and _may_swap(g, h)))}
    return ranked, unsure


def _entry(ranked: Sequence[GpuInfo], entry: str) -> GpuInfo | str:
    """The GPU one ``CUDA_VISIBLE_DEVICES`` entry names, or why it names none."""
    if entry.isdigit():
        number = int(entry)
        return ranked[number] if number < len(ranked) else f"there is no device {number}"
    if entry.upper().startswith("GPU-"):
        wanted = entry.lower()
        hits = [g for g in ranked if g.uuid and g.uuid.lower().startswith(wanted)]
        return hits[0] if len(hits) == 1 else ("no GPU has this UUID" if not hits else "the prefix fits several GPUs")
    return "not a device number or GPU UUID"


@dataclass(frozen=True)
class _Applied:
    visible: list[GpuInfo]
    entries: list[str]
    stopped_at: str | None = None
    problem: str | None = None


def _apply_visible_devices(ranked: Sequence[GpuInfo], value: str) -> _Applied:
    """``CUDA_VISIBLE_DEVICES=value`` over ``ranked``. A ``MIG-`` entry is a problem (MIG instances are not
    listed here); an entry CUDA cannot match ends the list."""
    applied = _Applied([], [])
    for raw in value.split(","):
        entry = raw.strip()
        if entry.upper().startswith("MIG-"):
            return _Applied(
                [],
                [],
                problem=f"CUDA_VISIBLE_DEVICES names a MIG instance ({entry}): which card it is on is not known here",
            )
        if entry.upper().startswith("GPU-") and not any(g.uuid for g in ranked):
            return _Applied([], [], problem=f"CUDA_VISIBLE_DEVICES names {entry}, and no GPU UUID could be read here")
        found = _entry(ranked, entry)
        if isinstance(found, str):
            return _Applied(applied.visible, applied.entries, f"{entry!r} ({found})")
        if found not in applied.visible:
            applied.visible.append(found)
            applied.entries.append(entry)
    return applied


def _cuda_vars(env: Mapping[str, str]) -> tuple[str | None, Literal["pci", "fastest"]]:
    return env.get("CUDA_VISIBLE_DEVICES"), device_order(env)


def cuda_numbering(system: SystemFacts, env: Mapping[str, str], probed_env: Mapping[str, str]) -> CudaNumbering:
    """The GPUs a process started with ``env`` gets from CUDA. ``probed_env``: the environment the probe ran
    in, which matters when torch listed the GPUs (it already applied its own ``CUDA_VISIBLE_DEVICES``)."""
    value, order = _cuda_vars(env)
    gpus = list(system.gpus)
    if system.gpu_source == "torch":
        if any(g.vendor in ("apple", "intel") for g in gpus):  # MPS, XPU: CUDA's variables do not apply
            return CudaNumbering(tuple(gpus), tuple(gpus), "as-probed")
        if _cuda_vars(probed_env) == (value, order):
            return CudaNumbering(tuple(gpus), tuple(gpus), "as-probed", value)
        if _cuda_vars(probed_env) != (None, order):
            return CudaNumbering(
                tuple(gpus),
                (),
                "as-probed",
                value,
                problem="only torch could list the GPUs, and doctor runs with other CUDA_VISIBLE_DEVICES or "
                "CUDA_DEVICE_ORDER than the WebUI: run it with the WebUI's",
            )
        ranked: list[GpuInfo] = gpus
        unsure: dict[int, tuple[GpuInfo, ...]] = {}
        how: Order = "as-probed"
    else:
        ranked, unsure = rank(gpus, order)
        how = order
    if value is None:
        return CudaNumbering(tuple(ranked), tuple(ranked), how, None, None, unsure)
    applied = _apply_visible_devices(ranked, value)
    return CudaNumbering(
        tuple(ranked),
        tuple(applied.visible),
        how,
        value,
        applied.stopped_at,
        unsure,
        applied.problem,
        tuple(applied.entries),
    )
