"""What the regional compiler keeps: compiled functions per key and owner, the blocks of one application, and
the fingerprint that tells, before torch 2.5, when a host replaced a block's parameters (LoRA, a patcher) or
changed a plain value a submodule holds.
See :mod:`lib_optim.compile.regional` ("Sharing, weights and the cache-size limit")."""

from __future__ import annotations

import itertools
import types
from collections.abc import Callable
from typing import Any

from lib_optim.compile.dynamo import _reset_code

# Compiled entries one block (or one shared function per block using it) may need: a static graph, the
# dynamic one after the first size change, a batch-1 specialisation, and one spare.
DEFAULT_ENTRIES_PER_BLOCK = 4

_MISSING = object()


_SETTING_TYPES = (bool, int, float, str)  # not None: A1111's LoRA sets network_bias_backup = None on layers


def _fingerprint(block: Any) -> tuple[Any, ...]:
    """Identity, device and dtype of a block's submodules, parameters and buffers, and the plain values its
    submodules hold (``self.scale``, ``self.heads``): before torch 2.5 dynamo assumes a module's attributes never
    change and guards none of them, so compiled code would keep a value the host or an extension changed since."""
    modules = tuple(block.modules())
    settings = tuple(
        (id(m), name, value) for m in modules for name, value in vars(m).items() if type(value) in _SETTING_TYPES
    )
    tensors = tuple((id(t), t.device, t.dtype) for t in itertools.chain(block.parameters(), block.buffers()))
    return (tuple(id(m) for m in modules), tensors, settings)


class _Compiled:
    """One compiled trampoline (its code object holds dynamo's cache) plus what it was built against."""

    def __init__(self, fn: Callable[..., Any], code: types.CodeType, label: str):
        self.fn = fn
        self.code = code
        self.label = label
        self.fingerprint: tuple[Any, ...] | None = None

    def discard(self) -> None:
        _reset_code(self.code)


class _KeyState:
    """Everything cached for one full key under one owner (root module in shared mode, block otherwise)."""

    def __init__(self) -> None:
        self.compiled: dict[Any, _Compiled] = {}
        self.announced = False
        self.budget = DEFAULT_ENTRIES_PER_BLOCK


class _Slot:
    """One block inside one application."""

    def __init__(self, block: Any, original: Any, eager: Callable[..., Any], bound: bool):
        self.block = block
        self.original = original  # the instance attribute that was there, or _MISSING
        self.eager = eager
        self.bound = bound  # the instance had its own forward: call it as is
        self.calls = 0
        self.compiled_calls = 0
        self.eager_only = False
        self.compiled: _Compiled | None = None
        self.state: _KeyState | None = None
        self.wrapper: Callable[..., Any] | None = None

    def call_eager(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.bound:
            return self.eager(*args, **kwargs)
        # looked up now, as the compiled path does: a host may swap the class's forward between calls
        return type(self.block).forward(self.block, *args, **kwargs)


class _RootState:
    def __init__(self) -> None:
        self.keys: dict[tuple[Any, ...], _KeyState] = {}  # shared mode
        self.failures: dict[tuple[Any, ...], str] = {}


def _owner_of(forward: Any) -> _Slot | None:
    slot = getattr(forward, "__optim_slot__", None) if forward is not _MISSING else None
    return slot if isinstance(slot, _Slot) else None
