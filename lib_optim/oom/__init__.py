"""The out-of-memory retry: the next, more frugal setting to try after an OOM."""

from __future__ import annotations

from lib_optim.oom.retry import FallbackStep, infotext_note, is_out_of_memory, next_frugal

__all__ = [
    "FallbackStep",
    "infotext_note",
    "is_out_of_memory",
    "next_frugal",
]
