"""What we know about each WebUI host without importing it: one registered spec per host (its kind, names,
detection markers, flag table, adapter, capabilities) and how to detect a checkout."""

from __future__ import annotations

from lib_optim.host_specs import known as _known  # noqa: F401 - registers the built-in hosts
from lib_optim.host_specs.detect import (
    FALLBACK_HOSTS,
    HostCheckout,
    HostChoice,
    choose_host,
    detect_kind,
    detection_order,
    extension_dir,
    find_webui_root,
    webui_user_file,
)
from lib_optim.host_specs.kinds import (
    HostKind,
    HostSpec,
    Marker,
    checked_hosts,
    host_names,
    host_spec,
    host_specs,
    known_names,
    parse_host,
    profiled_hosts,
    register_host,
    resolve_ref,
    unregister_host,
)

__all__ = [
    "FALLBACK_HOSTS",
    "HostCheckout",
    "HostChoice",
    "HostKind",
    "HostSpec",
    "Marker",
    "checked_hosts",
    "choose_host",
    "detect_kind",
    "detection_order",
    "extension_dir",
    "find_webui_root",
    "host_names",
    "host_spec",
    "host_specs",
    "known_names",
    "parse_host",
    "profiled_hosts",
    "register_host",
    "resolve_ref",
    "unregister_host",
    "webui_user_file",
]
