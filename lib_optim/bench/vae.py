"""VAE benchmark: decode a random latent with the random-weight SD VAE untiled and tiled, side by side.

For each image size, each variant (``untiled``, then the tiled ones: ``module`` = :func:`vae_tiling.tiled_decode_vae`
with its GroupNorm statistics mode, ``callable`` = :func:`vae_tiling.tiled_decode` around the whole decode)
runs in a **fresh subprocess**, so every reading starts from the same clean process (no allocator caches,
no pages left resident by an earlier run):

- **Peak memory**: on CUDA ``torch.cuda.max_memory_allocated`` minus what was allocated before the decode;
  on CPU the process's peak resident set (``VmHWM`` reset through ``/proc/self/clear_refs``, glibc's mmap
  threshold lowered so freed tensors leave the resident set; :class:`lib_optim.bench.attention.PeakMeter`). The model
  and the latent are allocated before, the decoded image is counted.
- **Time** of that one decode (after a small warm-up decode that loads the kernels).
- **PSNR** of each tiled image against the untiled one (both clamped to [-1, 1] as the hosts do before
  converting to 8 bits): ``10·log10(4 / mean squared difference)``.
- **Prediction**: :mod:`lib_optim.vae.planner` for the same decode, and its error against the measured peak.

A variant predicted to exceed the memory limit (``mem_fraction`` of free memory) is skipped, as ``auto``
would tile rather than run it.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lib_optim.log import get_logger
from lib_optim.vae import planner as vae_planner

log = get_logger(__name__)

MIB = 1 << 20
DTYPES = {"fp32": 4, "fp16": 2, "bf16": 2}
VARIANTS = ("module", "callable")
DEFAULT_TILE = 64
_ROOT = Path(__file__).resolve().parents[2]  # the folder holding lib_optim, for the worker's import path


@dataclass
class VaeRow:
    size: int
    variant: str  # "untiled", "module/<norm>", "callable"
    tile: int | None
    overlap: int | None
    predicted_bytes: int
    measured_bytes: int | None = None
    error_pct: float | None = None
    seconds: float | None = None
    psnr_db: float | None = None
    skipped: str | None = None


@dataclass
class VaeBenchResult:
    device: str
    dtype: str
    scale: float
    inplace_silu: bool
    memory_method: str
    limit_bytes: int
    rows: list[VaeRow] = field(default_factory=list)

    @property
    def max_error_pct(self) -> float | None:
        errs = [abs(r.error_pct) for r in self.rows if r.error_pct is not None]
        return max(errs) if errs else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "max_error_pct": self.max_error_pct}


# ---------------------------------------------------------------------------------------------------------
# One measurement, in its own process.


def measure_in_subprocess(spec: dict[str, Any], *, timeout_s: float | None = None) -> dict[str, Any]:
    """Run :func:`_measure` with ``spec`` in a fresh Python process; returns its result dict (``peak_bytes``,
    ``seconds``, ``method``, and ``image`` = the path of the saved output when ``spec['save']`` is set)."""
    with tempfile.TemporaryDirectory(prefix="optim-vae-") as tmp:
        spec_path = Path(tmp) / "spec.json"
        out_path = Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(_ROOT), os.environ.get("PYTHONPATH", "")])}
        code = "import sys; from lib_optim.bench.vae import worker_main; sys.exit(worker_main(sys.argv[1:]))"
        proc = subprocess.run(
            [sys.executable, "-c", code, str(spec_path), str(out_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout_s,
            check=False,
        )
        if proc.returncode != 0 or not out_path.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"[Optim] vae bench: the measuring process failed ({proc.returncode}): {tail[0]}")
        return json.loads(out_path.read_text(encoding="utf-8"))


def worker_main(argv: Sequence[str]) -> int:
    spec = json.loads(Path(argv[0]).read_text(encoding="utf-8"))
    result = _measure(spec)
    Path(argv[1]).write_text(json.dumps(result), encoding="utf-8")
    return 0


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Build the VAE and latent of ``spec``, decode once (tiled or not) under the peak meter."""
    import torch

    from lib_optim.bench.attention import PeakMeter
    from lib_optim.vae import build_sd_vae
    from lib_optim.vae import tiling as vae_tiling

    device = torch.device(spec.get("device", "cpu"))
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    meter = PeakMeter(device)  # first: it sets the allocator up before the model's memory is taken
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[spec["dtype"]]
    model = build_sd_vae(
        spec.get("seed", 0),
        dtype,
        spec.get("scale", 1.0),
        inplace_silu=spec.get("inplace_silu", False),
        attention=spec.get("attention", "sdpa"),
        device=device,
    )
    size, batch = int(spec["size"]), int(spec.get("batch", 1))
    gen = torch.Generator().manual_seed(int(spec.get("latent_seed", 1)))
    z = torch.randn(batch, 4, size // 8, size // 8, generator=gen).to(device=device, dtype=dtype)
    variant = spec["variant"]
    tile, overlap = int(spec.get("tile") or 0), int(spec.get("overlap") or 0)

    def decode(latent: torch.Tensor) -> torch.Tensor:
        if variant == "untiled":
            return model.decode(latent)
        if variant == "callable":
            return vae_tiling.tiled_decode(model.decode, latent, tile=tile, overlap=overlap)
        return vae_tiling.tiled_decode_vae(model, latent, tile=tile, overlap=overlap, norm=spec["norm"])

    kept: list[torch.Tensor] = []
    with torch.no_grad():
        model.decode(z[:, :, :8, :8])  # loads the kernels before the peak is taken
        clock = time.perf_counter
        start = clock()
        peak = meter.measure(lambda: kept.append(decode(z)))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = clock() - start
    result: dict[str, Any] = {"peak_bytes": peak, "seconds": seconds, "method": meter.method}
    if spec.get("save"):
        torch.save(kept[0].float().cpu(), spec["save"])
        result["image"] = spec["save"]
    return result


def psnr_db(a: Any, b: Any) -> float:
    """PSNR of two images in [-1, 1] (clamped first), peak-to-peak 2."""
    mse = float(((a.clamp(-1, 1) - b.clamp(-1, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


# ---------------------------------------------------------------------------------------------------------
# The run.


def _free_bytes(device: str) -> int:
    from lib_optim.attention import free_memory_bytes

    return free_memory_bytes(device)


def run_vae_bench(
    sizes: Sequence[int] = (1024, 2048),
    *,
    device: str = "cpu",
    dtype: str | None = None,
    variants: Sequence[str] = ("module",),
    norm: str = "exact",
    tile: int = DEFAULT_TILE,
    overlap: int | None = None,
    scale: float = 1.0,
    inplace_silu: bool = False,
    batch: int = 1,
    seed: int = 0,
    mem_fraction: float = 0.8,
    free_bytes: int | None = None,
    measure: Callable[[dict[str, Any]], dict[str, Any]] = measure_in_subprocess,
    load_image: Callable[[str], Any] | None = None,
) -> VaeBenchResult:
    """Run the benchmark (module doc) and return its rows, ``untiled`` first at each size.

    ``dtype``: fp32/fp16/bf16; ``None`` = fp16 on CUDA, fp32 on CPU. ``variants``: tiled ones to run, from
    :data:`VARIANTS`. ``overlap``: latent pixels; ``None`` = the level's default (``vae_tiling.MODULE_OVERLAP``,
    ``CALLABLE_OVERLAP``). ``free_bytes``: instead of asking the device (tests).
    ``measure``/``load_image``: how one reading is taken and a saved image read (tests inject fakes)."""
    if dtype is None:
        dtype = "fp16" if device.startswith("cuda") else "fp32"
    _check_vae_bench(dtype, variants, sizes, mem_fraction)
    limit = int((free_bytes if free_bytes is not None else _free_bytes(device)) * mem_fraction)
    result = VaeBenchResult(device, dtype, scale, inplace_silu, "none", limit)
    plan = _plan(variants, norm, tile, overlap)
    with tempfile.TemporaryDirectory(prefix="optim-vae-images-") as tmp:
        run = _VaeRun(result, Path(tmp), norm, batch, seed, measure, load_image or _load_tensor)
        for size in sizes:
            run.one_size(size, plan)
    return result


def _check_vae_bench(dtype: str, variants: Sequence[str], sizes: Sequence[int], mem_fraction: float) -> None:
    if dtype not in DTYPES:
        raise ValueError(f"[Optim] vae bench dtype: {dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ValueError(f"[Optim] vae bench variant: {bad[0]!r} is not allowed; allowed: {', '.join(VARIANTS)}")
    for size in sizes:
        if not isinstance(size, int) or size < 64 or size % 8:
            raise ValueError(f"[Optim] vae bench size: {size!r} is not allowed; allowed: multiples of 8 from 64")
    if not 0 < mem_fraction <= 1:
        raise ValueError(f"[Optim] vae bench mem_fraction: {mem_fraction!r} is not allowed; allowed: (0, 1]")


def _load_tensor(path: str) -> Any:
    import torch

    return torch.load(path)


def _plan(
    variants: Sequence[str], norm: str, tile: int, overlap: int | None
) -> list[tuple[str, int | None, int | None]]:
    """The rows of one size: ``(variant name, tile, overlap)``, ``untiled`` first."""
    from lib_optim.vae import tiling as vae_tiling

    plan: list[tuple[str, int | None, int | None]] = [("untiled", None, None)]
    for v in variants:
        default = vae_tiling.MODULE_OVERLAP if v == "module" else vae_tiling.CALLABLE_OVERLAP
        plan.append((f"module/{norm}" if v == "module" else v, tile, default if overlap is None else overlap))
    return plan


@dataclass
class _VaeRun:
    """One benchmark run: its settings (in ``result`` and here) and where the saved images go."""

    result: VaeBenchResult
    images: Path
    norm: str
    batch: int
    seed: int
    measure: Callable[[dict[str, Any]], dict[str, Any]]
    load_image: Callable[[str], Any]

    def one_size(self, size: int, plan: list[tuple[str, int | None, int | None]]) -> None:
        """The rows of one size; the tiled images are compared with the untiled one."""
        reference = None
        for name, t, ov in plan:
            predicted = self.predict(size, name, t, ov)
            row = VaeRow(size, name, t, ov, predicted)
            self.result.rows.append(row)
            limit = self.result.limit_bytes
            if predicted > limit:
                row.skipped = f"predicted {predicted / MIB:.0f} MiB > limit {limit / MIB:.0f} MiB"
                continue
            measured, image = self.take(row)
            if not measured:
                continue
            if name == "untiled":
                reference = image
            elif reference is not None and image is not None:
                row.psnr_db = psnr_db(image, reference)
            del image
            log.info("[Optim] vae bench %s %s: %s", size, name, asdict(row))

    def predict(self, size: int, name: str, t: int | None, ov: int | None) -> int:
        """The planner's peak for one row."""
        common: dict[str, Any] = {
            "batch": self.batch,
            "dtype_bytes": DTYPES[self.result.dtype],
            "channels": round(vae_planner.CH * self.result.scale),
            "inplace_silu": self.result.inplace_silu,
            "device": "cuda" if self.result.device.startswith("cuda") else "cpu",
        }
        if name == "untiled":
            return vae_planner.predict_decode_peak_bytes(size, size, **common)
        assert t is not None and ov is not None
        return vae_planner.predict_tiled_peak_bytes(
            size, size, tile=t, overlap=ov, level=name.split("/", maxsplit=1)[0], norm=self.norm, **common
        )

    def take(self, row: VaeRow) -> tuple[bool, Any]:
        """Measure one row (its peak, seconds and error filled in); ``(False, None)`` when the reading failed,
        else ``(True, the decoded image or None)``."""
        result = self.result
        image_path = str(self.images / f"{row.size}-{row.variant.replace('/', '-')}.pt")
        spec = {
            "device": result.device,
            "dtype": result.dtype,
            "scale": result.scale,
            "inplace_silu": result.inplace_silu,
            "seed": self.seed,
            "size": row.size,
            "batch": self.batch,
            "variant": row.variant.split("/")[0],
            "norm": self.norm,
            "tile": row.tile,
            "overlap": row.overlap,
            "save": image_path,
        }
        try:
            got = self.measure(spec)
        except (RuntimeError, subprocess.TimeoutExpired) as exc:
            # one failed reading (out of memory, killed) must not lose the others: report it in its row
            log.debug("vae bench %s %s failed", row.size, row.variant, exc_info=True)
            row.skipped = f"failed: {str(exc).splitlines()[0][:100]}"
            return False, None
        result.memory_method = got.get("method", result.memory_method)
        measured = got.get("peak_bytes")
        row.measured_bytes, row.seconds = measured, got.get("seconds")
        if measured:
            row.error_pct = 100.0 * (row.predicted_bytes - measured) / measured
        return True, (self.load_image(got["image"]) if got.get("image") else None)


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MIB:.0f}"


def format_vae_table(result: VaeBenchResult) -> str:
    lines = [
        f"VAE decode benchmark on {result.device} ({result.dtype}, random-weight SD VAE"
        + (f" at {result.scale:g}× channels" if result.scale != 1 else "")
        + (", in-place SiLU" if result.inplace_silu else ", ldm SiLU")
        + f"); memory limit {result.limit_bytes / MIB:.0f} MiB",
        f"Peak memory: {result.memory_method}; one fresh process per reading",
        "",
        f"{'size':>6} {'variant':<16} {'tile':>5} {'ovl':>4} {'seconds':>8} {'pred MiB':>9} {'meas MiB':>9} "
        f"{'err %':>7} {'PSNR dB':>8}  note",
    ]
    for r in result.rows:
        secs = "-" if r.seconds is None else f"{r.seconds:.1f}"
        err = "-" if r.error_pct is None else f"{r.error_pct:+.1f}"
        psnr = "-" if r.psnr_db is None else ("inf" if math.isinf(r.psnr_db) else f"{r.psnr_db:.1f}")
        tile = "-" if r.tile is None else str(r.tile)
        overlap = "-" if r.overlap is None else str(r.overlap)
        lines.append(
            f"{r.size:>6} {r.variant:<16} {tile:>5} {overlap:>4} "
            f"{secs:>8} {_mib(r.predicted_bytes):>9} {_mib(r.measured_bytes):>9} {err:>7} {psnr:>8}  "
            f"{('skipped: ' + r.skipped) if r.skipped else ''}"
        )
    max_err = result.max_error_pct
    lines.append("")
    lines.append("Max planner error: " + ("n/a" if max_err is None else f"{max_err:.1f} %") + " (target ±15 %)")
    lines.append("PSNR target for tiled vs untiled: ≥ 40 dB")
    return "\n".join(lines)


def to_json(result: VaeBenchResult) -> str:
    return json.dumps(result.to_dict(), indent=2)
