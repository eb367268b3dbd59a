"""Apply-and-restore building blocks: every change is a context manager restored in ``finally``.

A generation's changes are collected in one :class:`Restorer` (an ExitStack). Closing it restores every
change in reverse order — each restore runs even if an earlier one fails, and closing twice is a no-op —
so the script can close it from ``postprocess`` *and* from ``p.close()`` (which the hosts always call, even
when a generation raises: ``closing(p)``, docs/hosts.md §1.6) without double-restoring.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Any

from lib_optim.log import get_logger

log = get_logger(__name__)

_MISSING = object()


@contextlib.contextmanager
def patched_attr(obj: Any, name: str, value: Any) -> Iterator[Any]:
    """Set ``obj.name = value``; put back exactly what was there (or delete it if it was absent).

    Looks in ``obj.__dict__`` rather than ``getattr`` so a class attribute seen through an instance is
    restored by deleting the instance attribute, not by pinning a copy onto the instance.
    """
    holder = vars(obj) if hasattr(obj, "__dict__") else {}
    original = holder.get(name, _MISSING)
    setattr(obj, name, value)
    try:
        yield original
    finally:
        if original is _MISSING:
            with contextlib.suppress(AttributeError):
                delattr(obj, name)
        else:
            setattr(obj, name, original)


@contextlib.contextmanager
def patched_item(mapping: Any, key: Any, value: Any) -> Iterator[Any]:
    """Set ``mapping[key] = value``; restore the old value or remove the key."""
    original = mapping.get(key, _MISSING) if hasattr(mapping, "get") else mapping[key]
    mapping[key] = value
    try:
        yield original
    finally:
        if original is _MISSING:
            mapping.pop(key, None)
        else:
            mapping[key] = original


def _is_inference(like: Any) -> bool:
    if like is None:
        return False
    if hasattr(like, "is_inference"):
        return bool(like.is_inference())
    params = getattr(like, "parameters", None)
    if callable(params):
        return any(t.is_inference() for t in params())
    return False


@contextlib.contextmanager
def weight_edit_mode(like: Any = None) -> Iterator[None]:
    """Rewrite model tensors (``param.data = ...``, ``module.to(...)``) in the mode they were made in.

    Forge loads models inside ``torch.inference_mode()`` (docs/hosts.md §6.7), so their parameters are
    inference tensors, but calls the ``process`` hook outside it (§6.7). A parameter made in
    inference mode whose ``.data`` is replaced by an ordinary tensor breaks CPU convolutions that view the
    weight ("Inference tensors do not track version counter", seen in a Forge hires pass on CPU); the other
    way round breaks in-place updates. So the new data is made in the parameter's own mode. ``no_grad``
    keeps autograd out of it.
    """
    try:
        import torch
    except ImportError:  # the plain-Python parts of lib_optim work without torch
        yield
        return
    with torch.inference_mode(_is_inference(like)), torch.no_grad():
        yield


class Restorer:
    """The changes of one generation. Enter changes with :meth:`enter`; :meth:`close` undoes them all."""

    def __init__(self, label: str):
        self.label = label
        self._stack = contextlib.ExitStack()
        self._lock = threading.Lock()
        self._closed = False
        self.notes: list[str] = []  # what was changed, for the status line and the log

    @property
    def closed(self) -> bool:
        return self._closed

    def enter(self, cm: contextlib.AbstractContextManager[Any], note: str | None = None) -> Any:
        if self._closed:
            raise RuntimeError(f"[Optim] {self.label}: changes were already restored")
        value = self._stack.enter_context(cm)
        if note:
            self.notes.append(note)
        return value

    def callback(self, fn: Callable[..., Any], *args: Any, note: str | None = None) -> None:
        """Run ``fn(*args)`` at restore time (for undo steps that are not context managers)."""
        if self._closed:
            raise RuntimeError(f"[Optim] {self.label}: changes were already restored")
        self._stack.callback(fn, *args)
        if note:
            self.notes.append(note)

    def close(self) -> bool:
        """Restore everything (once). Returns True if this call did the restoring."""
        with self._lock:
            if self._closed:
                return False
            self._closed = True
        try:
            self._stack.close()
        except Exception:
            # Every restore step still ran (ExitStack calls them all); report the failure loudly.
            log.exception("%s: restoring the host's state failed", self.label)
            raise
        log.debug("%s: restored (%s)", self.label, "; ".join(self.notes) or "nothing changed")
        return True

    def __enter__(self) -> Restorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
