"""Fixtures shared by the unit tests."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture
def planner_requests(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], list[dict[str, Any]]]:
    """``spy("a1111")`` → the keyword arguments of every ``choose_auto_attention`` call that host adapter
    makes from then on (the real planner still answers)."""

    def spy(host: str) -> list[dict[str, Any]]:
        module = importlib.import_module(f"lib_optim.hosts.{host}")
        calls: list[dict[str, Any]] = []
        real = module.choose_auto_attention

        def recording(available: Any, **kwargs: Any) -> Any:
            calls.append(kwargs)
            return real(available, **kwargs)

        monkeypatch.setattr(module, "choose_auto_attention", recording)
        return calls

    return spy


@pytest.fixture(autouse=True)
def _compile_auto_memory_in_tmp(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> None:
    """``compile=auto`` remembers its figures in ``~/.cache``: never from a test (each test gets its own file, and a
    fresh process planner)."""
    import hashlib

    from lib_optim.compile import auto

    name = hashlib.sha1(request.node.nodeid.encode()).hexdigest()[:16]
    path = tmp_path_factory.getbasetemp() / f"compile-auto-{name}.json"
    monkeypatch.setattr(auto, "default_auto_memory_path", lambda: path)
    auto.get_auto_planner.cache_clear()
