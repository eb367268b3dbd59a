"""What a compiled block sees while its compiled code runs (and is traced): the host's Python that dynamo
cannot trace without a graph break, swapped for traceable equivalents for the duration of the call.

A graph break inside a block splits it into frames that live *outside* our regions: they belong to code
objects every block shares (the host's ``forward`` functions, its helpers), so dynamo's per-code cache fills
up across blocks, and on torch < 2.5 those frames recompile on every generation (docs/hosts.md §6.10).
Each host adapter lists, as :class:`RegionPatch` es, what in its blocks would break the graph and what to call
instead; :func:`patched` applies them around each compiled call and restores them in ``finally``, so the
eager code before and after — the host's first call that applies LoRA weights, everything between blocks —
runs the host's own code unchanged.

A replacement must be the *same object* from one generation to the next: dynamo guards on the identity of
what it read (a module global, a class attribute), so a fresh function per generation would recompile
every block each time. Build replacements once (module level or cached), never per call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

from lib_optim.log import get_logger

log = get_logger(__name__)

_MISSING = object()


@dataclass(frozen=True)
class RegionPatch:
    """``setattr(owner, attr, replacement)`` while compiled code runs. ``why`` cites the host's site."""

    owner: Any
    attr: str
    replacement: Any
    why: str = ""


@dataclass(frozen=True)
class RegionContext:
    """A context manager entered around the compiled call, outside the traced code: what a host's block enters
    with a ``with`` statement dynamo cannot trace (A1111's ``torch.backends.cuda.sdp_kernel`` choice), entered
    once around the whole call instead, so tracing and running see the same state. ``why`` cites the host's site."""

    enter: Callable[[], AbstractContextManager[Any]]
    why: str = ""


RegionChange = RegionPatch | RegionContext


@contextlib.contextmanager
def patched(patches: Sequence[RegionChange]) -> Iterator[None]:
    """Apply ``patches`` in order (enter the contexts), restore them in reverse order (exact values; attributes
    that were absent are removed again; contexts exited), whatever happens inside."""
    saved: list[tuple[RegionPatch, Any]] = []
    with contextlib.ExitStack() as contexts:
        try:
            for patch in patches:
                if isinstance(patch, RegionContext):
                    contexts.enter_context(patch.enter())
                    continue
                saved.append((patch, _own_value(patch.owner, patch.attr)))
                setattr(patch.owner, patch.attr, patch.replacement)
            yield
        finally:
            _restore(saved)


def _restore(saved: list[tuple[RegionPatch, Any]]) -> None:
    for patch, old in reversed(saved):
        if old is _MISSING:
            with contextlib.suppress(AttributeError):
                delattr(patch.owner, patch.attr)
        else:
            setattr(patch.owner, patch.attr, old)


def _own_value(owner: Any, attr: str) -> Any:
    """The attribute as stored on ``owner`` itself: a class's own ``__dict__`` entry (not an inherited one); an
    instance's ``__dict__`` entry, or what its ``__getattr__`` answers (an ``nn.Module`` keeps its submodules and
    parameters outside ``__dict__``), but not its class's attribute (removing ours shows that one again)."""
    if isinstance(owner, type):
        return vars(owner).get(attr, _MISSING)
    namespace = getattr(owner, "__dict__", None)
    if namespace is not None:
        if attr in namespace:
            return namespace[attr]
        if hasattr(type(owner), attr):
            return _MISSING
    return getattr(owner, attr, _MISSING)


@contextlib.contextmanager
def specialisable(block: Any) -> Iterator[None]:
    """Take our wrapper out of the block's ``__dict__`` while its compiled code runs. Before torch 2.5 dynamo
    treats a module with an instance ``forward`` as monkey patched (``torch/_dynamo/mutation_guard.py``,
    ``is_dynamic_nn_module``) and traces it unspecialised: ``self.parameters()`` (ldm ``ResBlock.forward``)
    then breaks the graph, and the resume frames, shared by every block, recompile on every generation."""
    namespace = vars(block)
    saved = namespace.pop("forward", _MISSING)
    try:
        yield
    finally:
        if saved is not _MISSING:
            namespace["forward"] = saved
