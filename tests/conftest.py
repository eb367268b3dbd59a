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
