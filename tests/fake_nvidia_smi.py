"""A stand-in for ``nvidia-smi`` on the PATH: an executable script that answers ``--query-gpu`` as the real one does.

The real tool prints one line per GPU, the asked fields in order, separated by ", " (``--format=csv,noheader,nounits``:
memory in MiB without the unit), e.g. ``0, NVIDIA GeForce RTX 3060, 12288, 11893, 550.54.14, 8.6``. Drivers before
510 refuse the ``compute_cap`` field (``Field "compute_cap" is not a valid field to query.``, exit status 2); a driver
it cannot reach makes it print ``NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver...``
and exit with status 9.
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

_SCRIPT = """import json, sys
config = json.loads({config!r})
if config["fail"]:
    print(config["fail"])
    sys.exit(9)
query = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--query-gpu=")), "")
fields = query.split(",")
if "compute_cap" in fields and config["old_driver"]:
    print('Field "compute_cap" is not a valid field to query.')
    sys.exit(2)
for index, gpu in enumerate(config["gpus"]):
    row = dict(gpu, index=str(index))
    print(", ".join(row[f] for f in fields))
"""


def write_fake_nvidia_smi(
    folder: Path,
    gpus: list[tuple[str, int, int, str, str]] | None = None,
    *,
    fail: str = "",
    old_driver: bool = False,
) -> Path:
    """Write ``folder/nvidia-smi`` answering for ``gpus`` as (name, total MiB, free MiB, driver, compute cap)."""
    rows = [
        {"name": n, "memory.total": str(t), "memory.free": str(f), "driver_version": d, "compute_cap": c}
        for n, t, f, d, c in (
            gpus if gpus is not None else [("NVIDIA GeForce RTX 3060", 12288, 11893, "550.54.14", "8.6")]
        )
    ]
    config = json.dumps({"gpus": rows, "fail": fail, "old_driver": old_driver})
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "nvidia-smi"
    script.write_text(f"#!{sys.executable}\n" + _SCRIPT.format(config=config), encoding="utf-8")
    script.chmod(0o755)
    return script


def skip_reason() -> str | None:
    """Why a fake nvidia-smi cannot run here (it is a script with a #! line), or None."""
    return "needs a POSIX system to run a #! script" if os.name == "nt" else None
