"""``python -m lib_optim bench --gpu-report``: one GPU report in one command, within a time budget.

The matrix, in this order (the cheap, always-wanted parts first; each part is one row of the parts table):

1. **attention** — every attention backend and SDPA kernel that runs here
   (:func:`lib_optim.bench.attention.run_bench`), at the largest self- and cross-attention call of SD1.5 512²
   and SDXL 1024², in fp16 and in bf16: median ms, ×best, peak memory. One part per dtype and shape.
2. **vae** — the SD VAE decode whole vs tiled (:func:`lib_optim.bench.vae.run_vae_bench`) at 1024² and
   2048²: peak memory, seconds, PSNR; one fresh process per reading. One part per size.
3. **compile** — an SD1.5-shaped UNet (320 channels, 512², batch 2) eager vs regionally compiled
   (:class:`lib_optim.compile.RegionalCompiler`, modes ``on`` and ``max-autotune``): steady ms, compile
   seconds, with a cold and then a warm compile cache (:mod:`lib_optim.bench.cold_warm`: two fresh processes
   sharing a new cache folder), and what the compiled steady call's peak memory adds to the eager one's
   (CUDA; ``null`` on the CPU). One part per mode and cache.

**Budget**: the parts share one deadline (``budget_s`` from the start, 450 s by default, so the whole command
with Python's start-up stays under 8 minutes on one H100). Before each part the clock (injected: tests use a
fake) is read; a part that would start past the deadline, or with less time left than it needs to be worth
starting, is recorded as skipped with the reason ``budget`` and not run. A compile process is given the time
left as its timeout and killed past it (also recorded as ``budget``). The parts run in the process that
imports torch, except the VAE readings and the compile runs, which each have their own.

``--quick`` (for tests and a CPU): tiny shapes (the 64² attention call, a 128² decode of a quarter-width VAE,
a one-level UNet at 8×8), fp32 only, a 120 s budget. Output: ``gpu-report.json`` and ``gpu-report.md`` in
``--out`` (:func:`write_report`); the markdown is printed too (``--json``: the JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from lib_optim import __version__
from lib_optim.bench.cold_warm import ChildRunner, compile_cold_warm, run_child
from lib_optim.bench.gpu_table import format_markdown
from lib_optim.log import get_logger

log = get_logger(__name__)

SCHEMA = 1
PARTS = ("attention", "vae", "compile")
COMPILE_MODES = ("on", "max-autotune")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
DTYPE_NAMES = ("fp32", "fp16", "bf16")
DEFAULT_BUDGET_S = 450.0
QUICK_BUDGET_S = 120.0
SKIPPED_BUDGET = "budget"
JSON_NAME = "gpu-report.json"
MARKDOWN_NAME = "gpu-report.md"
MIB = 1 << 20

# The compile runs' UNet: SD1.5's layout and widths at 512² (latent 64², cond + uncond), and a tiny one.
FULL_COMPILE = {
    "unet": "sd15",
    "model_channels": 320,
    "context_dim": 768,
    "heads": 8,
    "latent": [64, 64],
    "batch": 2,
    "rounds": 10,
}
QUICK_COMPILE = {
    "unet": "one-level",
    "model_channels": 8,
    "context_dim": 16,
    "heads": 2,
    "latent": [8, 8],
    "batch": 1,
    "rounds": 2,
}
# The least time left (seconds) for which a part is started: below it, it could not finish.
FULL_NEEDS_S = {"attention": 10.0, "vae": 15.0, "compile/cold": 60.0, "compile/warm": 20.0}
QUICK_NEEDS_S = {"attention": 1.0, "vae": 1.0, "compile/cold": 1.0, "compile/warm": 1.0}


@dataclass(frozen=True)
class ReportPlan:
    """What one report runs (:func:`make_plan`)."""

    device: str
    quick: bool
    parts: tuple[str, ...]
    dtypes: tuple[str, ...]  # attention's
    attention_specs: tuple[str, ...]
    vae_sizes: tuple[int, ...]
    vae_dtype: str
    vae_scale: float
    vae_tile: int
    vae_overlap: int | None
    compile_modes: tuple[str, ...]
    compile_backend: str
    compile_spec: dict[str, Any]
    needs_s: dict[str, float]


def make_plan(
    device: str = "cuda",
    *,
    quick: bool = False,
    dtype: str | None = None,
    parts: Sequence[str] = PARTS,
    compile_backend: str = "inductor",
    compile_modes: Sequence[str] = COMPILE_MODES,
) -> ReportPlan:
    """The report's matrix for ``device`` (module doc); ``dtype`` restricts every part to one dtype."""
    _check_choice("--device", device, ("cpu", "cuda"))
    _check_choice("--dtype", dtype, DTYPE_NAMES, optional=True)
    _check_choice("--compile-backend", compile_backend, COMPILE_BACKENDS)
    for part in parts:
        _check_choice("--parts", part, PARTS)
    for mode in compile_modes:
        _check_choice("compile mode", mode, COMPILE_MODES)
    if not parts:
        raise ValueError(f"[Optim] bench --gpu-report --parts: none given; allowed: {', '.join(PARTS)}")
    native = "fp16" if device == "cuda" else "fp32"
    one = dtype or ("fp32" if quick else native)
    return ReportPlan(
        device=device,
        quick=quick,
        parts=tuple(p for p in PARTS if p in parts),
        dtypes=(dtype,) if dtype else (("fp32",) if quick else ("fp16", "bf16")),
        attention_specs=("tiny",) if quick else ("sd15-512", "sdxl-1024"),
        vae_sizes=(128,) if quick else (1024, 2048),
        vae_dtype=one,
        vae_scale=0.25 if quick else 1.0,
        vae_tile=12 if quick else 64,
        vae_overlap=4 if quick else None,
        compile_modes=tuple(compile_modes),
        compile_backend=compile_backend,
        compile_spec={**(QUICK_COMPILE if quick else FULL_COMPILE), "dtype": one, "device": device},
        needs_s=dict(QUICK_NEEDS_S if quick else FULL_NEEDS_S),
    )


def _check_choice(name: str, value: str | None, allowed: Sequence[str], *, optional: bool = False) -> None:
    if (value is None and optional) or value in allowed:
        return
    raise ValueError(f"[Optim] bench --gpu-report {name}: {value!r} is not allowed; allowed: {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------------------------
# The parts and their budget.


@dataclass
class PartResult:
    """One part: ``ok``, ``skipped`` (``skipped`` says why: ``budget``, or a reason) or ``failed`` (``error``)."""

    name: str
    status: str
    seconds: float | None = None
    skipped: str | None = None
    error: str | None = None
    note: str = ""


class Parts:
    """Runs parts one after another against one deadline read from ``clock``; records each."""

    def __init__(
        self, budget_s: float, clock: Callable[[], float], progress: Callable[[str], None] | None = None
    ) -> None:
        self.clock = clock
        self.start = clock()
        self.deadline = self.start + budget_s
        self.results: list[PartResult] = []
        self.progress = progress

    def left(self) -> float:
        return self.deadline - self.clock()

    def part(self, name: str, needs_s: float, body: Callable[[float], None]) -> str:
        """Run ``body(seconds left)`` unless the deadline is past or less than ``needs_s`` is left; its status."""
        left = self.left()
        if left <= 0 or left < needs_s:
            note = f"{max(left, 0.0):.0f} s left, it needs about {needs_s:.0f} s"
            return self._record(PartResult(name, "skipped", skipped=SKIPPED_BUDGET, note=note))
        start = self.clock()
        result = PartResult(name, "ok")
        try:
            body(left)
        except subprocess.TimeoutExpired:
            log.debug("gpu report part %s ran out of time", name, exc_info=True)
            result.status, result.skipped, result.note = "skipped", SKIPPED_BUDGET, f"stopped after {left:.0f} s"
        except Exception as exc:  # one part's failure (out of memory, a compile error) must not lose the others
            log.debug("gpu report part %s failed", name, exc_info=True)
            result.status, result.error = "failed", _first_line(exc)
        result.seconds = self.clock() - start
        return self._record(result)

    def skip(self, name: str, reason: str) -> None:
        self._record(PartResult(name, "skipped", skipped=reason))

    def _record(self, result: PartResult) -> str:
        self.results.append(result)
        if self.progress is not None:
            took = "" if result.seconds is None else f" ({result.seconds:.1f} s)"
            why = result.skipped or result.error
            self.progress(f"[Optim] gpu report: {result.name}: {result.status}{took}" + (f": {why}" if why else ""))
        return result.status


def _first_line(exc: BaseException) -> str:
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------
# The report.


@dataclass
class GpuReport:
    plan: ReportPlan
    budget_s: float
    environment: dict[str, Any]
    parts: list[PartResult] = field(default_factory=list)
    attention: list[dict[str, Any]] = field(default_factory=list)
    vae: list[dict[str, Any]] = field(default_factory=list)
    compile: list[dict[str, Any]] = field(default_factory=list)
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        data = {
            "schema": SCHEMA,
            "command": "python -m lib_optim bench --gpu-report",
            "lib_optim": __version__,
            "device": self.plan.device,
            "quick": self.plan.quick,
            "budget_s": self.budget_s,
            "elapsed_s": self.elapsed_s,
            "environment": self.environment,
            "plan": asdict(self.plan),
            "parts": [asdict(p) for p in self.parts],
            "attention": self.attention,
            "vae": self.vae,
            "compile": self.compile,
        }
        return _json_safe(data)


def _json_safe(value: Any) -> Any:
    """Standard JSON: NaN becomes null, ±inf the strings "inf"/"-inf" (a PSNR of identical images)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def environment(device: str) -> dict[str, Any]:
    """Python, torch, CUDA, triton and the GPU the report ran on."""
    import importlib.metadata

    import torch

    try:
        triton: str | None = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "triton": triton,
        "cpu_threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if device == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_memory_bytes=int(props.total_memory),
            multiprocessors=int(props.multi_processor_count),
        )
    return env


AttentionRunner = Callable[..., Any]  # lib_optim.bench.attention.run_bench's signature
VaeMeasure = Callable[[dict[str, Any], float], dict[str, Any]]  # (spec, timeout seconds) -> reading


def run_gpu_report(
    plan: ReportPlan,
    *,
    budget_s: float | None = None,
    clock: Callable[[], float] = time.monotonic,
    attention: AttentionRunner | None = None,
    vae_measure: VaeMeasure | None = None,
    compile_child: ChildRunner | None = None,
    environ: Mapping[str, str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> GpuReport:
    """Run ``plan``'s parts within ``budget_s`` seconds by ``clock`` (module doc). ``attention``,
    ``vae_measure`` and ``compile_child`` take the readings (tests inject fakes); ``environ``: the
    environment the compile processes start from; ``progress``: called with a line after each part."""
    budget = budget_s if budget_s is not None else (QUICK_BUDGET_S if plan.quick else DEFAULT_BUDGET_S)
    if not budget > 0:
        raise ValueError(f"[Optim] bench --gpu-report --budget: {budget!r} is not allowed; allowed: seconds > 0")
    _check_device(plan.device)
    parts = Parts(budget, clock, progress)
    report = GpuReport(plan, budget, environment(plan.device))
    if "attention" in plan.parts:
        from lib_optim.bench.attention import run_bench

        for dtype in plan.dtypes:
            for spec in plan.attention_specs:
                body = partial(_attention_part, report, spec, dtype, attention or run_bench)
                parts.part(f"attention/{dtype}/{spec}", plan.needs_s["attention"], body)
        _release_cuda_cache(plan.device)
    if "vae" in plan.parts:
        measure = vae_measure or _vae_in_subprocess
        for size in plan.vae_sizes:
            parts.part(f"vae/{size}", plan.needs_s["vae"], partial(_vae_part, report, size, measure, parts))
    if "compile" in plan.parts:
        _compile_parts(report, parts, compile_child or run_child, os.environ if environ is None else environ, clock)
    report.parts = parts.results
    report.elapsed_s = clock() - parts.start
    return report


def _check_device(device: str) -> None:
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "[Optim] bench --gpu-report --device: 'cuda' is not allowed here (torch sees no GPU); allowed: cpu"
        )


def _release_cuda_cache(device: str) -> None:
    """Hand the memory torch's allocator keeps back to the GPU, for the VAE and compile processes after."""
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def _attention_part(report: GpuReport, spec: str, dtype: str, run: AttentionRunner, left: float) -> None:
    from lib_optim.bench.attention import target_labels

    plan = report.plan
    # quick: the hosts' backends; else every backend and SDPA kernel that runs here. Always the largest calls.
    backends = None if plan.quick else target_labels(plan.device, dtype)
    result = run([spec], device=plan.device, quick=True, dtype=dtype, backends=backends)
    for r in result.rows:
        report.attention.append(
            {
                "spec": r.spec,
                "call": r.shape,
                "kind": r.kind,
                "dtype": dtype,
                "backend": r.backend,
                "median_ms": None if r.median_s is None else r.median_s * 1000,
                "ratio": r.ratio,
                "rounds": r.rounds,
                "measured_bytes": r.measured_bytes,
                "predicted_bytes": r.predicted_bytes,
                "skipped": r.skipped,
            }
        )


def _vae_in_subprocess(spec: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    from lib_optim.bench.vae import measure_in_subprocess

    return measure_in_subprocess(spec, timeout_s=timeout_s)


def _vae_part(report: GpuReport, size: int, measure: VaeMeasure, parts: Parts, left: float) -> None:
    from lib_optim.bench.vae import run_vae_bench

    plan = report.plan

    def within_budget(spec: dict[str, Any]) -> dict[str, Any]:
        remaining = parts.left()
        if remaining <= 0:
            raise RuntimeError(SKIPPED_BUDGET)
        try:
            return measure(spec, remaining)
        except subprocess.TimeoutExpired:
            log.debug("gpu report: vae reading %s ran out of time", spec.get("variant"), exc_info=True)
            raise RuntimeError(SKIPPED_BUDGET) from None

    result = run_vae_bench(
        (size,),
        device=plan.device,
        dtype=plan.vae_dtype,
        variants=("module",),
        scale=plan.vae_scale,
        tile=plan.vae_tile,
        overlap=plan.vae_overlap,
        measure=within_budget,
    )
    for r in result.rows:
        skipped = SKIPPED_BUDGET if r.skipped == f"failed: {SKIPPED_BUDGET}" else r.skipped
        row = {k: v for k, v in asdict(r).items() if k != "skipped"}
        report.vae.append({**row, "dtype": result.dtype, "memory_method": result.memory_method, "skipped": skipped})


def _compile_parts(
    report: GpuReport, parts: Parts, child: ChildRunner, environ: Mapping[str, str], clock: Callable[[], float]
) -> None:
    from lib_optim.compile import compile_availability

    plan = report.plan
    for mode in plan.compile_modes:
        name = f"compile/{mode}"
        ok, why = compile_availability(plan.device, mode=mode, backend=plan.compile_backend)
        if not ok:
            parts.skip(f"{name}/cold", f"torch.compile cannot run here: {why}")
            parts.skip(f"{name}/warm", f"torch.compile cannot run here: {why}")
            continue
        compile_cold_warm(
            {**plan.compile_spec, "mode": mode, "backend": plan.compile_backend},
            base_env=environ,
            runner=child,
            parts=parts,
            name=name,
            needs_s=(plan.needs_s["compile/cold"], plan.needs_s["compile/warm"]),
            rows=report.compile,
            clock=clock,
        )


# ---------------------------------------------------------------------------------------------------------
# Output.


def write_report(report: GpuReport, out: Path) -> tuple[Path, Path]:
    """Write ``gpu-report.json`` and ``gpu-report.md`` into ``out`` (made if missing); their paths."""
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / JSON_NAME, out / MARKDOWN_NAME
    data = report.to_dict()
    json_path.write_text(json.dumps(data, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    md_path.write_text(format_markdown(data) + "\n", encoding="utf-8")
    return json_path, md_path


def add_arguments(bench: argparse.ArgumentParser) -> None:
    """``bench --gpu-report`` and its options (with ``--device``, ``--quick``, ``--dtype``, ``--json``)."""
    group = bench.add_argument_group("--gpu-report")
    group.add_argument(
        "--gpu-report",
        action="store_true",
        help="instead: one GPU report (attention backends, VAE whole vs tiled, regional compile cold and warm) "
        f"within a time budget; writes {JSON_NAME} and {MARKDOWN_NAME} to --out (tools/measure_gpu.sh)",
    )
    group.add_argument("--out", metavar="DIR", default="optim-gpu-report", help="where --gpu-report writes")
    group.add_argument(
        "--budget",
        type=float,
        metavar="SECONDS",
        help=f"--gpu-report's time budget (default {DEFAULT_BUDGET_S:.0f}, --quick {QUICK_BUDGET_S:.0f}); "
        "parts that do not fit are skipped",
    )
    group.add_argument("--parts", default=",".join(PARTS), help=f"--gpu-report's parts, comma-separated: {PARTS}")
    group.add_argument(
        "--compile-backend",
        default="inductor",
        choices=COMPILE_BACKENDS,
        help="--gpu-report's torch.compile backend (eager/aot_eager generate no code: tests)",
    )


def command(args: argparse.Namespace, out: Callable[[str], None], err: Callable[[str], None]) -> int:
    """``bench --gpu-report``: run the report, write its files, print the markdown (``--json``: the JSON)."""
    for flag, given in (("--compile", args.compile), ("--vae", args.vae), ("--plot", args.plot)):
        if given:
            raise ValueError(f"[Optim] bench --gpu-report: {flag} is not allowed with it; leave {flag} out")
    folder = Path(args.out)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"[Optim] bench --gpu-report --out: {str(folder)!r} is a file; allowed: a folder")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    plan = make_plan(args.device, quick=args.quick, dtype=args.dtype, parts=parts, compile_backend=args.compile_backend)
    report = run_gpu_report(plan, budget_s=args.budget, progress=err)
    json_path, md_path = write_report(report, folder)
    out(json_path.read_text(encoding="utf-8").rstrip() if args.json else md_path.read_text(encoding="utf-8").rstrip())
    err(f"[Optim] GPU report written to {json_path} and {md_path}")
    return 0
