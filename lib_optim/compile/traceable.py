"""Traceable stand-ins for what the hosts' blocks call and dynamo cannot trace on the torch they pin.

``rearrange``/``repeat``: einops' patterns as plain ``reshape``/``permute``/``expand``. einops 0.4.1 (what
A1111 v1.10.1, Forge f2 and Forge previous pin) caches its recipes with ``functools.lru_cache`` keyed by the
shape; under ``torch.compile`` a size becomes symbolic after the first size change and hashing it fails
(``unhashable type: 'SymInt'``, docs/hosts.md §6.10). These take sizes from ``tensor.shape`` as they are,
symbolic or not, and cache nothing. They cover the patterns the hosts' blocks use (named axes, groups,
``...``, ``1``/``()``) and raise ``ValueError`` for anything else, naming the pattern.

``FrozenFreeMemory``: a host's free-memory query (Forge ``get_free_memory``) answered from a figure
measured before the compiled region: the real one reads ``psutil``/CUDA statistics, a graph break.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

_ELLIPSIS = "..."
_BARE_ELLIPSIS = "...*"  # "..." outside parentheses: one axis per dimension it covers
Group = list[str]

# Everything below that runs while dynamo traces returns None for a pattern it does not cover instead of
# raising: dynamo on the torch the hosts pin cannot trace an exception. Only the public functions raise.


def _parse_side(side: str) -> list[Group] | None:
    """``'b (h w) c'`` → ``[['b'], ['h', 'w'], ['c']]``; ``1`` and ``()`` are empty groups (a size-1 axis)."""
    groups: list[Group] = []
    current: Group | None = None
    for token in side.replace("(", " ( ").replace(")", " ) ").split():
        if token == "(":
            if current is not None:
                return None
            current = []
        elif token == ")":
            if current is None:
                return None
            groups.append(current)
            current = None
        elif token == "1":
            if current is None:
                groups.append([])  # a size-1 axis; inside a group a factor of 1: nothing to record
        elif token == _ELLIPSIS or token.isidentifier():
            if current is None:
                groups.append([_BARE_ELLIPSIS if token == _ELLIPSIS else token])
            else:
                current.append(token)
        else:
            return None
    return groups if current is None else None


def _expand_ellipsis(groups: list[Group], count: int) -> list[Group]:
    names = [f"{_ELLIPSIS}{i}" for i in range(count)]
    out: list[Group] = []
    for group in groups:
        if group == [_BARE_ELLIPSIS]:
            out.extend([name] for name in names)
        elif _ELLIPSIS in group:
            expanded: Group = []
            for axis in group:
                expanded.extend(names if axis == _ELLIPSIS else [axis])
            out.append(expanded)
        else:
            out.append(group)
    return out


def _split(pattern: str, ndim: int) -> tuple[list[Group], list[Group]] | None:
    if pattern.count("->") != 1:
        return None
    left_text, right_text = pattern.split("->")
    left, right = _parse_side(left_text), _parse_side(right_text)
    if left is None or right is None or any(_ELLIPSIS in group for group in left):
        return None  # "..." inside a group on the left: not a pattern the hosts use
    has_ellipsis = [_BARE_ELLIPSIS] in left
    count = ndim - (len(left) - 1) if has_ellipsis else 0
    if (not has_ellipsis and len(left) != ndim) or count < 0:
        return None
    return _expand_ellipsis(left, count), _expand_ellipsis(right, count)


def _plan(pattern: str, ndim: int, given: Any, allow_new: bool) -> tuple[list[Group], list[Group]] | None:
    """The pattern's two sides when this module can carry it out for an ``ndim`` tensor with the axis sizes
    named in ``given``; None otherwise."""
    sides = _split(pattern, ndim)
    if sides is None:
        return None
    left, right = sides
    elementary = [a for g in left for a in g]
    wanted = [a for g in right for a in g]
    if any(len([a for a in g if a not in given]) > 1 for g in left):
        return None
    if len(set(wanted)) != len(wanted) or any(a not in wanted for a in elementary):
        return None
    new = [a for a in wanted if a not in elementary]
    if new and (not allow_new or any(a not in given for a in new)):
        return None
    return left, right


def _execute(tensor: Any, left: list[Group], right: list[Group], lengths: dict[str, Any]) -> Any:
    sizes: dict[str, Any] = {}
    for index, group in enumerate(left):
        dim = tensor.shape[index]
        known = _product([lengths[a] for a in group if a in lengths])
        for axis in group:
            sizes[axis] = lengths[axis] if axis in lengths else dim // known
    elementary = [a for g in left for a in g]
    wanted = [a for g in right for a in g]
    for axis in wanted:
        if axis not in sizes:
            sizes[axis] = lengths[axis]
    x = tensor.reshape([sizes[a] for a in elementary])
    position = {a: i for i, a in enumerate(elementary)}  # (list.index is opaque to dynamo on torch 2.1)
    order = [position[a] for a in wanted if a in position]
    if order != list(range(len(order))):
        x = x.permute(order)
    if len(wanted) != len(elementary):  # new axes (repeat): broadcast them in
        x = x.reshape([sizes[a] if a in elementary else 1 for a in wanted]).expand([sizes[a] for a in wanted])
    return x.reshape([_product([sizes[a] for a in g]) for g in right])


def _product(values: list[Any]) -> Any:
    """The product of sizes, symbolic ones included (``math.prod`` is opaque to dynamo on older torch)."""
    result: Any = 1
    for value in values:
        result = result * value
    return result


def _transform(tensor: Any, pattern: str, lengths: dict[str, Any], *, allow_new: bool) -> Any:
    plan = _plan(pattern, tensor.dim(), lengths, allow_new)
    if plan is None:
        raise ValueError(
            f"[Optim] einops stand-in: pattern {pattern!r} for a {tensor.dim()}-d tensor with sizes "
            f"{sorted(lengths)} is not one it covers"
        )
    return _execute(tensor, plan[0], plan[1], lengths)


def rearrange(tensor: Any, pattern: str, **axes_lengths: Any) -> Any:
    """``einops.rearrange`` for the patterns the hosts' blocks use, traceable with symbolic sizes."""
    return _transform(tensor, pattern, axes_lengths, allow_new=False)


def repeat(tensor: Any, pattern: str, **axes_lengths: Any) -> Any:
    """``einops.repeat`` for the patterns the hosts' blocks use (new axes need their size), traceable."""
    return _transform(tensor, pattern, axes_lengths, allow_new=True)


_STAND_INS: dict[tuple[str, int], Callable[..., Any]] = {}


def einops_stand_in(kind: str, original: Callable[..., Any]) -> Callable[..., Any]:
    """``rearrange``/``repeat`` for a host module's global: ours, or einops' own for a pattern ours does not
    cover. One object per (kind, original) for the process: dynamo guards on the identity of the global."""
    if kind not in ("rearrange", "repeat"):
        raise ValueError(f"[Optim] einops stand-in: kind={kind!r} is not allowed; allowed: rearrange, repeat")
    key = (kind, id(original))
    if key not in _STAND_INS:
        allow_new = kind == "repeat"

        def stand_in(tensor: Any, pattern: str, **axes_lengths: Any) -> Any:
            plan = _plan(pattern, tensor.dim(), axes_lengths, allow_new)
            if plan is None:
                return original(tensor, pattern, **axes_lengths)
            return _execute(tensor, plan[0], plan[1], axes_lengths)

        stand_in.__name__ = stand_in.__qualname__ = f"optim_{kind}"
        _STAND_INS[key] = stand_in
    return _STAND_INS[key]


class EinopsNamespace:
    """Stands in for the ``einops`` module where a host calls ``einops.rearrange(...)`` (Forge
    ``backend/attention.py``); one per einops module."""

    def __init__(self, module: Any):
        self.rearrange = einops_stand_in("rearrange", module.rearrange)
        self.repeat = einops_stand_in("repeat", module.repeat)


_NAMESPACES: dict[int, EinopsNamespace] = {}


def einops_namespace(module: Any) -> EinopsNamespace:
    """The process's one :class:`EinopsNamespace` for ``module``."""
    if id(module) not in _NAMESPACES:
        _NAMESPACES[id(module)] = EinopsNamespace(module)
    return _NAMESPACES[id(module)]


def traceable_partial(func: Callable[..., Any], /, *args: Any, **keywords: Any) -> Callable[..., Any]:
    """``functools.partial`` as a closure: dynamo on torch 2.1 neither creates nor calls a ``functools.partial``
    (its ``skip_files``; A1111's and ldm_patched's sub-quadratic attention build them per call). Called the same way,
    it returns the same result; it is not a ``functools.partial`` object (no ``.func``/``.args``)."""

    def call(*more: Any, **more_keywords: Any) -> Any:
        return func(*args, *more, **{**keywords, **more_keywords})  # later keywords win, as in functools

    return call


def is_function(obj: Any) -> bool:
    """``inspect.isfunction`` (what ldm's and sgm's ``default`` call), which dynamo on torch 2.1 does not trace:
    ``inspect`` is in its skip files."""
    return isinstance(obj, types.FunctionType)


class FrozenFreeMemory:
    """A host's ``get_free_memory(dev=None, torch_free_too=False)`` answered from :meth:`measure`'s figure.

    One instance per host function, kept for the process: dynamo guards on the identity of what it inlined,
    so it must not change between generations. The figures are rounded down to a power of two and kept while
    the memory measured still holds them (:func:`_sticky`): dynamo specialises on them, and a figure that moved
    by a few megabytes would recompile every block (the host only uses it to choose chunk sizes). Measured for
    the device the generation runs on."""

    def __init__(self, real: Callable[..., Any]):
        self.real = real
        self.figures: tuple[int, int] | None = None

    def measure(self, device: Any) -> None:
        """Ask the real function now, outside the region (the figures move as :func:`_sticky` says)."""
        total, torch_free = self.real(device, True)
        old = self.figures or (None, None)
        slack = _slack(device)
        self.figures = (_sticky(old[0], int(total), slack), _sticky(old[1], int(torch_free), slack))

    def __call__(self, dev: Any = None, torch_free_too: bool = False) -> Any:
        figures = self.figures
        if figures is None:  # never measured: ask the real function (a graph break, never a wrong figure)
            return self.real(dev, torch_free_too)
        return figures if torch_free_too else figures[0]


class FrozenAvailableMemory:
    """A host's zero-argument free-memory query (A1111 ``get_available_vram``) answered from :meth:`measure`'s
    figure, rounded down to a power of two; one instance per host function (see :class:`FrozenFreeMemory`)."""

    def __init__(self, real: Callable[[], Any]):
        self.real = real
        self.figure: int | None = None

    def measure(self, device: Any = None) -> None:
        """Ask the real function now, outside the region (``device``: the one the figure is for; the host's
        function chooses it itself)."""
        self.figure = _sticky(self.figure, int(self.real()), _slack(device))

    def __call__(self) -> Any:
        figure = self.figure
        return self.real() if figure is None else figure


STICKY_GAIN = 4  # how many times the figure free memory must grow to before the answered figure rises
CPU_SLACK = 2  # on the CPU (RAM, which can page) the figure may stay up to twice what is free


def _slack(device: Any) -> int:
    return CPU_SLACK if device is not None and str(device).startswith("cpu") else 1


def _sticky(figure: int | None, measured: int, slack: int = 1) -> int:
    """The figure to answer with after measuring ``measured`` bytes free: rounded down to a power of two; kept
    while it is at most ``slack`` times what is free and free memory has not grown ``STICKY_GAIN``-fold. Each
    figure is a constant in the compiled code, so free memory that wavers across a power of two (another program,
    the OS cache) would otherwise recompile every attention block at the next generation. On a GPU (slack 1) the
    answer never exceeds what is free; on the CPU it may be up to twice that: RAM pages rather than failing, and
    the attention functions only choose their slice sizes from it."""
    rounded = _floor_pow2(measured)
    if figure is None or rounded * slack < figure or rounded >= STICKY_GAIN * figure:
        return rounded
    return figure


def _floor_pow2(value: int) -> int:
    return 1 << (value.bit_length() - 1) if value > 0 else 0
