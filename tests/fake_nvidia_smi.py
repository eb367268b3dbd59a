"""A stand-in for ``nvidia-smi`` on the PATH: an executable script that answers ``--query-gpu`` as the real one does.

The real tool prints one line per GPU, the asked fields in order, separated by ", " (``--format=csv,noheader,nounits``:
memory in MiB without the unit), e.g. ``0, NVIDIA GeForce RTX 3060, 12288, 11893, 550.54.14, 8.6``; ``uuid`` is
``GPU-`` and 32 hex digits in 5 groups, ``pci.bus_id`` ``00000000:01:00.0``. A field it does not know makes it refuse
the whole query with ``Field "compute_cap" is not a valid field to query.`` on stdout and exit status 2 (drivers
before 510 do not know ``compute_cap``); a driver it cannot reach makes it print ``NVIDIA-SMI has failed because it
couldn't communicate with the NVIDIA driver...`` and exit with status 9. ``hang_s`` imitates a wedged driver: it
sleeps before answering (writing its pid to ``pid_file`` first).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FAILED_DRIVER = (
    "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver. Make sure that the latest "
    "NVIDIA driver is installed and running."
)

_SCRIPT = """import json, os, sys, time
config = json.loads({config!r})
if config["pid_file"]:
    with open(config["pid_file"], "w") as f:
        f.write(str(os.getpid()))
time.sleep(config["hang_s"])
if config["fail"]:
    print(config["fail"])
    sys.exit(9)
query = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--query-gpu=")), "")
fields = query.split(",")
for field in fields:
    if field in config["unknown_fields"]:
        print('Field "%s" is not a valid field to query.' % field)
        print()
        sys.exit(2)
for index, gpu in enumerate(config["gpus"]):
    row = dict(gpu, index=str(index))
    print(", ".join(row[f] for f in fields))
"""


def fake_uuid(index: int) -> str:
    """The UUID the fake gives GPU ``index``."""
    return f"GPU-{index:08x}-1111-2222-3333-444455556666"


def fake_bus_id(index: int) -> str:
    """The PCI bus id the fake gives GPU ``index`` (one bus per GPU, in index order, as nvidia-smi numbers them)."""
    return f"00000000:{index + 1:02X}:00.0"


def write_fake_nvidia_smi(
    folder: Path,
    gpus: list[tuple[str, int, int, str, str]] | None = None,
    *,
    fail: str = "",
    old_driver: bool = False,
    unknown_fields: tuple[str, ...] = (),
    hang_s: float = 0.0,
    pid_file: Path | None = None,
) -> Path:
    """Write ``folder/nvidia-smi`` answering for ``gpus`` as (name, total MiB, free MiB, driver, compute cap).

    ``old_driver``: a driver before 510 (it does not know ``compute_cap``); ``unknown_fields``: more fields it
    refuses."""
    rows = [
        {
            "name": n,
            "memory.total": str(t),
            "memory.free": str(f),
            "driver_version": d,
            "compute_cap": c,
            "uuid": fake_uuid(i),
            "pci.bus_id": fake_bus_id(i),
        }
        for i, (n, t, f, d, c) in enumerate(
            gpus if gpus is not None else [("NVIDIA GeForce RTX 3060", 12288, 11893, "550.54.14", "8.6")]
        )
    ]
    unknown = [*unknown_fields, *(["compute_cap"] if old_driver else [])]
    config = json.dumps(
        {
            "gpus": rows,
            "fail": fail,
            "unknown_fields": unknown,
            "hang_s": hang_s,
            "pid_file": str(pid_file) if pid_file else "",
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\n" + _SCRIPT.format(config=config), encoding="utf-8")
    script.chmod(0o755)
    return script


def skip_reason() -> str | None:
    """Why a fake nvidia-smi cannot run here (it is a script with a #! line), or None."""
    return "needs a POSIX system to run a #! script" if os.name == "nt" else None
