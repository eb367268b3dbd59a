"""torch's dynamo as regional compile uses it: a fresh code object per compiled function (dynamo caches per
code object), its counters, its recompile limits and its log lines about our functions."""

from __future__ import annotations

import contextlib
import functools
import logging
import types
import warnings
from collections.abc import Callable
from typing import Any

from lib_optim.log import get_logger

log = get_logger(__name__)

# Names our compiled functions' code objects start with, so dynamo's log lines about them can be told apart.
TRAMPOLINE_PREFIX = "optim_regional_"


def _call_unbound(fn: Any, module: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(module, *args, **kwargs)


def _call_bound(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return fn(*args, **kwargs)


def _fresh_function(template: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A copy of ``template`` with its own code object: dynamo keeps its compiled entries on the code object."""
    code = template.__code__.replace(co_name=name)
    if hasattr(code, "co_qualname"):  # Python 3.11+; the name dynamo's logs and profiles show
        replace: Any = code.replace  # co_qualname is unknown to the 3.10 stubs
        code = replace(co_qualname=name)
    fn = types.FunctionType(code, template.__globals__, name, template.__defaults__, template.__closure__)
    return fn


@functools.cache
def _quiet_backend_change_warning() -> None:
    """torch < 2.2 warns at every call that switches between differently configured ``torch.compile``
    wrappers ("changing options to `torch.compile()` may require calling `torch._dynamo.reset()`"): its
    cache was per code object, shared by all wrappers of one function. Ours each have their own code
    object, so the warning never applies to them; without the filter every generation would print it."""
    warnings.filterwarnings("ignore", message=r"changing options to `torch\.compile\(\)`", category=UserWarning)


def _dynamo_counts() -> tuple[int, int, int, int]:
    """(frames compiled, frames attempted, unique graphs, graph breaks) so far in this process."""
    from torch._dynamo.utils import counters

    breaks = sum(int(n) for n in counters["graph_break"].values())
    return (
        int(counters["frames"]["ok"]),
        int(counters["frames"]["total"]),
        int(counters["stats"]["unique_graphs"]),
        breaks,
    )


def _guard_failures(code: types.CodeType) -> list[str]:
    """Why dynamo recompiled ``code`` so far: the first failing guard of each recompile, as dynamo records it
    (``torch._dynamo.utils.guard_failures``, keyed by the original code; 2.1 to 2.13)."""
    from torch._dynamo import utils

    return [str(reason) for reason in getattr(utils, "guard_failures", {}).get(code, ())]


def _reporting_guard_failures() -> Any:
    """While our compiled calls run: dynamo records why it recompiled (:func:`_guard_failures`) only while guard
    failure reporting is on on torch < 2.3 (``config.report_guard_failures``, or ``TORCH_LOGS=recompiles``); our
    blocks hold a few cache entries each, so the cost dynamo warns about (many entries per code) does not apply."""
    from torch._dynamo import config

    if getattr(config, "report_guard_failures", True):
        return contextlib.nullcontext()  # on already, or no such option (torch records them anyway)
    return config.patch(report_guard_failures=True)


def _shares_across_instances() -> bool:
    """Whether dynamo treats module parameters as graph inputs (torch >= 2.5 by default)."""
    from torch._dynamo import config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated (always True) in recent torch
        return bool(getattr(config, "inline_inbuilt_nn_modules", False))


def _limit_names() -> tuple[str | None, str | None]:
    from torch._dynamo import config

    per_function = next((n for n in ("recompile_limit", "cache_size_limit") if hasattr(config, n)), None)
    total = next(
        (n for n in ("accumulated_recompile_limit", "accumulated_cache_size_limit") if hasattr(config, n)), None
    )
    return per_function, total


def _reset_code(code: types.CodeType) -> None:
    """Drop dynamo's compiled entries on ``code`` (frees their graphs now rather than at garbage collection)."""
    try:
        import torch._dynamo

        reset = getattr(torch._dynamo, "reset_code", None)
        if reset is not None:
            reset(code)
    except Exception:  # best effort: the entries also go when the code object is collected
        log.debug("reset_code failed", exc_info=True)


class _LimitWatcher(logging.Handler):
    """Counts dynamo's "hit config.cache_size_limit / recompile_limit" warnings about our functions."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.hits = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed record from someone else's code: not ours to count
            return
        if "hit config." in message and TRAMPOLINE_PREFIX in message:
            self.hits += 1


_DYNAMO_LOGGERS = ("torch._dynamo.convert_frame",)
