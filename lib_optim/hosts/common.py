"""What the script glue (:mod:`lib_optim.hosts.webui`) and the Optim tab (:mod:`lib_optim.hosts.optim_tab`)
share: the runtime for this process, the Settings → Optim defaults, the Optim script in a script runner, and
small helpers around the host's ``modules.devices``. Host modules are looked up when called, never at import.
"""

from __future__ import annotations

import sys
from typing import Any

from lib_optim.host_specs import HostKind
from lib_optim.hosts import create_adapter, detect_running_host
from lib_optim.log import get_logger
from lib_optim.runtime import Runtime, get_runtime
from lib_optim.settings import GenerationSettings, SettingsError, from_options

log = get_logger(__name__)

SCRIPT_TITLE = "Optim"  # the script's title(); the API's alwayson_scripts key is its lower case
SECTION = ("optim", "Optim")  # Settings → Optim (section id, title)
# Listed under "Stable Diffusion", beside the hosts' own "Optimizations" page, not "Uncategorized"
# (OptionInfo.category_id, docs/hosts.md §1.9)
SETTINGS_CATEGORY = "sd"


def ensure_runtime() -> Runtime:
    """Detect the host and create its adapter once per process (preload may have done it already)."""
    rt = get_runtime()
    if rt.adapter is None:
        checkout = detect_running_host()
        kind = checkout.kind if checkout else HostKind.A1111
        rt.host = kind
        rt.adapter = create_adapter(kind)
        try:
            rt.host_version = rt.adapter.version()
        except Exception:  # a missing version string must not stop the extension
            log.debug("host version unknown", exc_info=True)
    return rt


def opts() -> Any:
    from modules import shared

    return shared.opts


def defaults_from_options() -> GenerationSettings:
    """Settings → Optim defaults, then the start-up profile's (``--optim-profile``) for fields left at their
    default there; a bad saved value is reported and ignored (never breaks the UI)."""
    options = opts()
    rt = ensure_runtime()
    fields = rt.adapter.supported_fields() if rt.adapter is not None else None
    try:
        saved = from_options(lambda key, default: getattr(options, key, default), rt.host, fields)
    except SettingsError as exc:
        log.warning("Settings → Optim has a value that is not allowed, using defaults: %s", exc)
        saved = GenerationSettings()
    return saved.with_defaults_from(rt.defaults)


def optim_script(runner: Any) -> Any:
    """The Optim script among ``runner``'s AlwaysVisible scripts, or None."""
    return next((s for s in getattr(runner, "alwayson_scripts", []) if s.title() == SCRIPT_TITLE), None)


def generation_device() -> str | None:
    """The device the host generates on (``modules.devices.device``), as text; None before it is set."""
    device = getattr(sys.modules.get("modules.devices"), "device", None)
    return str(device) if device is not None else None


def free_memory() -> None:
    """The host's own cache emptying (``devices.torch_gc``); best effort."""
    gc = getattr(sys.modules.get("modules.devices"), "torch_gc", None)
    if callable(gc):
        try:
            gc()
        except Exception:  # freeing memory is best effort; the caller goes on either way
            log.debug("torch_gc failed", exc_info=True)


def first_line(exc: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` — enough to say what went wrong in a log line or a table cell."""
    text = (str(exc).strip().splitlines() or [""])[0][:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
