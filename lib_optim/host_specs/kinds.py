"""The WebUI hosts we know, by the names used on the command line, in the API and in tables."""

from __future__ import annotations

from enum import Enum


class HostKind(str, Enum):
    A1111 = "a1111"  # AUTOMATIC1111 stable-diffusion-webui v1.10.x
    FORGE = "forge"  # WebUI Forge f2 (main; backend/ package, gradio 4)
    FORGE_PREVIOUS = "forge-previous"  # Forge tag `previous` (ldm_patched/, gradio 3)
    REFORGE = "reforge"  # Panchovix reForge (ldm_patched/, gradio 3)

    @property
    def display_name(self) -> str:
        return _TITLES[self]

    @property
    def is_forge_family(self) -> bool:
        return self is not HostKind.A1111


_TITLES = {
    HostKind.A1111: "AUTOMATIC1111 WebUI v1.10",
    HostKind.FORGE: "WebUI Forge f2",
    HostKind.FORGE_PREVIOUS: "WebUI Forge (previous)",
    HostKind.REFORGE: "reForge",
}

# Hosts whose flag tables the checker carries (docs/hosts.md §2.1).
CHECKED_HOSTS = (HostKind.A1111, HostKind.FORGE, HostKind.FORGE_PREVIOUS, HostKind.REFORGE)
# Hosts with launch profiles (lib_optim/launch/profiles.py).
PROFILED_HOSTS = (HostKind.A1111, HostKind.FORGE, HostKind.FORGE_PREVIOUS)


def parse_host(value: str) -> HostKind:
    """Parse a host name as typed by a user; the error names the value and the allowed ones."""
    try:
        return HostKind(value.strip().lower())
    except ValueError:
        allowed = ", ".join(h.value for h in HostKind)
        raise ValueError(f"host: {value!r} is not a known WebUI; allowed: {allowed}") from None
