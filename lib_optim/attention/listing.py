"""``bench --list-backends``: every attention algorithm in the registry, how each host runs it (its own function
or optimizer, or a kernel we call in its place) and whether it runs on this device, else why and the fix."""

from __future__ import annotations

from typing import Any

from lib_optim.attention.registry import Kernel, algorithms


def backend_rows(device: str, no_torch_reason: str = "") -> list[dict[str, Any]]:
    """One row per algorithm; ``no_torch_reason`` (this Python has no torch) stands for every backend's reason."""
    rows: list[dict[str, Any]] = []
    for entry in algorithms():
        reason = no_torch_reason or entry.unavailable_reason(device)
        bound = {host: entry.binding(host) for host in entry.hosts()}
        kinds = {h.value: "kernel" if isinstance(b, Kernel) else "host" for h, b in bound.items()}
        rows.append(
            {"name": entry.name.value, "title": entry.title, "hosts": kinds, "available": not reason, "reason": reason}
        )
    return rows


def backends_text(device: str, rows: list[dict[str, Any]]) -> str:
    lines = [f"attention backends on {device} (hosts: host = the WebUI's own, kernel = ours in its place)"]
    for row in rows:
        hosts = ", ".join(f"{h}:{k}" for h, k in row["hosts"].items())
        status = "available" if row["available"] else f"not here: {row['reason']}"
        lines.append(f"  {row['name']:<11} {status}\n  {'':<11} {row['title']}; {hosts}")
    return "\n".join(lines)
