"""The GPU report's compile measurement, each in a fresh Python process: cold and warm compile caches.

:func:`compile_cold_warm` makes an empty folder, points ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR``
of the child processes into it, and runs :func:`lib_optim.bench.compile.run_compile_bench` twice with it:
first with the folder empty (**cold**: every kernel generated and, under ``max-autotune``, tuned), then in
a second process (**warm**: what inductor's FX graph cache and triton's kernel cache hand a restarted WebUI).
The inductor caches are switched on for the children (``TORCHINDUCTOR_FX_GRAPH_CACHE=1``,
``TORCHINDUCTOR_AUTOGRAD_CACHE=1``; torch 2.3 has the first off by default), and the extension's own
persistent cache setting (``OPTIM_COMPILE_CACHE``) and ``TORCHINDUCTOR_FORCE_DISABLE_CACHES`` are taken out
of their environment, so this measurement owns its cache whatever the shell has set.

A child that runs past its time is killed with its whole process group (inductor's compile workers are
its children), and the caller sees :class:`subprocess.TimeoutExpired`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from lib_optim.log import get_logger

log = get_logger(__name__)

_ROOT = Path(__file__).resolve().parents[2]  # the folder holding lib_optim, for the child's import path
# Taken out of the children's environment: they would point the compile cache elsewhere or switch it off.
CACHE_OVERRIDES = ("OPTIM_COMPILE_CACHE", "TORCHINDUCTOR_FORCE_DISABLE_CACHES")
CACHE_SWITCHES = {"TORCHINDUCTOR_FX_GRAPH_CACHE": "1", "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}

# (spec, environment, timeout seconds) -> the child's result dict; tests inject a fake
ChildRunner = Callable[[dict[str, Any], dict[str, str], float], dict[str, Any]]


def cache_env(cache: Path, base: Mapping[str, str]) -> dict[str, str]:
    """The children's environment: ``base`` with the compile caches in ``cache`` and switched on."""
    env = {k: v for k, v in base.items() if k not in CACHE_OVERRIDES}
    env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
    env["TRITON_CACHE_DIR"] = str(cache / "triton")
    env.update(CACHE_SWITCHES)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(_ROOT), base.get("PYTHONPATH", "")) if p)
    return env


def count_files(folder: Path) -> int:
    """Files under ``folder`` (0 when it does not exist): how much a cold run left in the cache."""
    return sum(1 for p in folder.rglob("*") if p.is_file()) if folder.is_dir() else 0


def run_child(spec: dict[str, Any], env: dict[str, str], timeout_s: float) -> dict[str, Any]:
    """Run :func:`worker_main` with ``spec`` in a fresh Python process (its own process group); its result dict.

    Past ``timeout_s`` the group is killed and :class:`subprocess.TimeoutExpired` raised; a child that fails
    raises ``RuntimeError`` with the last line it printed."""
    with tempfile.TemporaryDirectory(prefix="optim-gpu-report-") as tmp:
        folder = Path(tmp)
        spec_path, out_path, log_path = folder / "spec.json", folder / "result.json", folder / "child.log"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        code = "import sys; from lib_optim.bench.cold_warm import worker_main; sys.exit(worker_main(sys.argv[1:]))"
        # output to a file, not a pipe: a killed child's compile workers cannot keep a pipe open and hang us
        with open(log_path, "w", encoding="utf-8") as child_log:
            proc = subprocess.Popen(
                [sys.executable, "-c", code, str(spec_path), str(out_path)],
                stdout=child_log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=os.name == "posix",
            )
            try:
                proc.wait(timeout=max(timeout_s, 0.001))
            except BaseException:  # its time is up, or ours (Ctrl-C): a child in its own session would run on
                _kill_group(proc)
                raise
        if proc.returncode != 0 or not out_path.exists():
            lines = log_path.read_text(encoding="utf-8", errors="replace").strip().splitlines()
            raise RuntimeError(
                f"[Optim] gpu report: the compile process failed ({proc.returncode}): {(lines or ['no output'])[-1]}"
            )
        result: dict[str, Any] = json.loads(out_path.read_text(encoding="utf-8"))
        return result


def _kill_group(proc: subprocess.Popen[Any]) -> None:
    """Kill ``proc`` and the processes it started (its process group, on POSIX), and reap it."""
    kill = getattr(os, "killpg", None)
    try:
        if kill is not None and os.name == "posix":
            kill(proc.pid, signal.SIGKILL)
        else:
            proc.kill()
    except ProcessLookupError:
        log.debug("compile child %s was gone before it was killed", proc.pid)
    proc.wait()


def worker_main(argv: Sequence[str]) -> int:
    """The child: one :func:`run_compile_bench` as ``argv[0]`` (a JSON spec) says, its result to ``argv[1]``."""
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = measure(spec)
    Path(argv[1]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Time the UNet of ``spec`` eager and compiled (:func:`run_compile_bench`); its result as a dict, with
    the seconds this took and the cache folder and files the process found."""
    import torch

    from lib_optim.bench.compile import run_compile_bench

    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    found = count_files(Path(cache)) if cache else None
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec["dtype"]]
    start = time.perf_counter()
    result = run_compile_bench(
        latent=(int(spec["latent"][0]), int(spec["latent"][1])),
        batch=int(spec["batch"]),
        model_channels=int(spec["model_channels"]),
        context_dim=int(spec["context_dim"]),
        heads=int(spec["heads"]),
        unet=spec["unet"],
        rounds=int(spec["rounds"]),
        mode=spec["mode"],
        backend=spec["backend"],
        device=spec["device"],
        dtype=dtype,
    )
    data = result.to_dict()
    data.update(measure_s=time.perf_counter() - start, cache_dir=cache, cache_files_found=found)
    return data


class PartRunner(Protocol):
    """How the report runs one part within its time budget (:class:`lib_optim.bench.gpu_report.Parts`)."""

    def part(self, name: str, needs_s: float, body: Callable[[float], None]) -> str: ...

    def skip(self, name: str, reason: str) -> None: ...


def compile_cold_warm(
    spec: dict[str, Any],
    *,
    base_env: Mapping[str, str],
    runner: ChildRunner,
    parts: PartRunner,
    name: str,
    needs_s: tuple[float, float],
    rows: list[dict[str, Any]],
    clock: Callable[[], float] = time.monotonic,
) -> None:
    """The cold run, then the warm one, as the parts ``{name}/cold`` and ``{name}/warm`` (``parts.part`` hands
    each the seconds left and returns its status); each appends its row to ``rows``. The warm run is skipped
    when the cold one did not finish: a half-filled cache would measure nothing."""
    cache = Path(tempfile.mkdtemp(prefix="optim-gpu-report-cache-"))
    env = cache_env(cache, base_env)

    def body(cache_state: str, left: float) -> None:
        files = count_files(cache)
        start = clock()
        result = runner({**spec, "cache": cache_state}, env, left)
        rows.append({**result, "cache": cache_state, "cache_files_before": files, "process_s": clock() - start})

    try:
        if parts.part(f"{name}/cold", needs_s[0], partial(body, "cold")) == "ok":
            parts.part(f"{name}/warm", needs_s[1], partial(body, "warm"))
        else:
            parts.skip(f"{name}/warm", "the cold run did not finish")
    finally:
        shutil.rmtree(cache, ignore_errors=True)
