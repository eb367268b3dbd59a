"""Benchmarks: attention kernels, whole generations, regional compile and the VAE, side by side in one run; the
GPU report (all of them within a time budget, as JSON and markdown)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from lib_optim import lazy_exports
from lib_optim.bench import generation
from lib_optim.bench.generation import (
    DEFAULT_PROMPT,
    KIND_LABELS,
    REPEATS_MAX,
    SIZE_MAX,
    SIZE_MIN,
    SIZE_STEP,
    STEPS_MAX,
    STEPS_MIN,
    BenchCandidate,
    CandidateResult,
)

if TYPE_CHECKING:  # the torch-heavy modules load on first use, so importing the wing stays cheap
    from lib_optim.bench.attention import format_table as attention_bench_table
    from lib_optim.bench.attention import run_bench as run_attention_bench
    from lib_optim.bench.attention import to_json as attention_bench_json
    from lib_optim.bench.attention import write_plot as write_attention_plot
    from lib_optim.bench.compile import format_compile_table, run_compile_bench
    from lib_optim.bench.gpu_report import add_arguments as add_gpu_report_arguments
    from lib_optim.bench.gpu_report import command as gpu_report_command
    from lib_optim.bench.gpu_report import make_plan as make_gpu_report_plan
    from lib_optim.bench.gpu_report import run_gpu_report
    from lib_optim.bench.gpu_report import write_report as write_gpu_report
    from lib_optim.bench.vae import format_vae_table as vae_bench_table
    from lib_optim.bench.vae import run_vae_bench
    from lib_optim.bench.vae import to_json as vae_bench_json

_LAZY: dict[str, tuple[str, str | None]] = {
    "add_gpu_report_arguments": ("lib_optim.bench.gpu_report", "add_arguments"),
    "gpu_report_command": ("lib_optim.bench.gpu_report", "command"),
    "make_gpu_report_plan": ("lib_optim.bench.gpu_report", "make_plan"),
    "run_gpu_report": ("lib_optim.bench.gpu_report", "run_gpu_report"),
    "write_gpu_report": ("lib_optim.bench.gpu_report", "write_report"),
    "attention_bench_json": ("lib_optim.bench.attention", "to_json"),
    "attention_bench_table": ("lib_optim.bench.attention", "format_table"),
    "format_compile_table": ("lib_optim.bench.compile", "format_compile_table"),
    "run_attention_bench": ("lib_optim.bench.attention", "run_bench"),
    "run_compile_bench": ("lib_optim.bench.compile", "run_compile_bench"),
    "run_vae_bench": ("lib_optim.bench.vae", "run_vae_bench"),
    "vae_bench_json": ("lib_optim.bench.vae", "to_json"),
    "vae_bench_table": ("lib_optim.bench.vae", "format_vae_table"),
    "write_attention_plot": ("lib_optim.bench.attention", "write_plot"),
}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "DEFAULT_PROMPT",
    "KIND_LABELS",
    "REPEATS_MAX",
    "SIZE_MAX",
    "SIZE_MIN",
    "SIZE_STEP",
    "STEPS_MAX",
    "STEPS_MIN",
    "BenchCandidate",
    "CandidateResult",
    "add_gpu_report_arguments",
    "attention_bench_json",
    "attention_bench_table",
    "format_compile_table",
    "generation",
    "gpu_report_command",
    "make_gpu_report_plan",
    "run_attention_bench",
    "run_compile_bench",
    "run_gpu_report",
    "run_vae_bench",
    "vae_bench_json",
    "vae_bench_table",
    "write_attention_plot",
    "write_gpu_report",
]
