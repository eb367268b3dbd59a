"""The machine's GPUs and torch, probed without initialising CUDA where possible."""

from __future__ import annotations

from lib_optim.gpu.facts import SystemFacts
from lib_optim.gpu.probe import probe_system

__all__ = [
    "SystemFacts",
    "probe_system",
]
