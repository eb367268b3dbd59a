"""What we know about each WebUI host without importing it: its kind, names and how to detect a checkout."""

from __future__ import annotations

from lib_optim.host_specs.detect import HostCheckout, detect_kind, extension_dir, find_webui_root
from lib_optim.host_specs.kinds import CHECKED_HOSTS, PROFILED_HOSTS, HostKind, parse_host

__all__ = [
    "CHECKED_HOSTS",
    "PROFILED_HOSTS",
    "HostCheckout",
    "HostKind",
    "detect_kind",
    "extension_dir",
    "find_webui_root",
    "parse_host",
]
