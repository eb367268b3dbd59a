"""A stand-in for nvidia-ml-py's ``pynvml`` module (tests/test_telemetry.py checks it against the real API)."""

from __future__ import annotations

import threading
import types
from collections.abc import Callable, Mapping
from typing import Any


class FakeNVMLError(Exception):
    """Stands in for pynvml.NVMLError (a plain Exception subclass in nvidia-ml-py)."""


class FakeMemory:
    """Like pynvml's c_nvmlMemory_t: byte counts as attributes."""

    def __init__(self, total: int, used: int) -> None:
        self.total = total
        self.used = used
        self.free = total - used


def fake_pynvml(
    api: Mapping[str, Callable[..., Any]], *, fail: Mapping[str, Exception] | None = None
) -> tuple[types.ModuleType, list[tuple[str, tuple[Any, ...]]]]:
    """A ``pynvml`` module with ``nvmlInit``/``nvmlShutdown`` and the functions in ``api``; returns it and the
    calls made, ``(name, args)`` in order (the log is thread-safe: telemetry samples from its own thread). A
    name in ``fail`` raises its exception instead."""
    calls: list[tuple[str, tuple[Any, ...]]] = []
    failures = dict(fail or {})
    lock = threading.Lock()

    def wrap(name: str, result: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            with lock:
                calls.append((name, args))
            if name in failures:
                raise failures[name]
            return result(*args)

        return call

    module = types.ModuleType("pynvml")
    module.NVMLError = FakeNVMLError  # type: ignore[attr-defined]
    for name, result in {"nvmlInit": lambda: None, "nvmlShutdown": lambda: None, **api}.items():
        setattr(module, name, wrap(name, result))
    return module, calls


def names(calls: list[tuple[str, tuple[Any, ...]]]) -> list[str]:
    return [name for name, _ in calls]


def names_missing_from(real: types.ModuleType, fake: types.ModuleType) -> list[str]:
    """The NVML names ``fake`` defines that the installed nvidia-ml-py does not have (should be none)."""
    return [n for n in vars(fake) if (n.startswith("nvml") or n == "NVMLError") and not hasattr(real, n)]
