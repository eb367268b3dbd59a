"""Regional torch.compile: each UNet/DiT block compiled on its own, reused, restored exactly; ``compile=auto``
compiles only when the job pays for it; the warm-up compiles a loaded model's blocks in the background."""

from __future__ import annotations

from lib_optim.compile.advice import (
    CompileAdvice,
    CompileProbe,
    compile_advice,
    compile_section_dict,
    compile_section_text,
)
from lib_optim.compile.auto import (
    AutoDecision,
    AutoJob,
    AutoKey,
    AutoMemory,
    AutoPlanner,
    AutoRecord,
    AutoRun,
    decide,
    default_auto_memory_path,
    get_auto_planner,
    make_job,
)
from lib_optim.compile.availability import compile_availability
from lib_optim.compile.blocks import default_block_names
from lib_optim.compile.persist import setup_compile_cache
from lib_optim.compile.persist_cli import add_compile_cache_parser, run_compile_cache
from lib_optim.compile.region import RegionChange, RegionContext, RegionPatch
from lib_optim.compile.regional import RegionalCompiler, get_compiler
from lib_optim.compile.rewrite import helpers_of, traceable_function, traceable_functions
from lib_optim.compile.session import AUTO_DATA_KEY, VAE_DATA_KEY, CompileRegion, compile_blocks, compile_vae_blocks
from lib_optim.compile.traceable import (
    FrozenAvailableMemory,
    FrozenFreeMemory,
    einops_namespace,
    einops_stand_in,
    is_function,
    traceable_partial,
)
from lib_optim.compile.warmup import (
    WARMUP_MODES,
    WARMUP_STATES,
    CompileWarmup,
    WarmupPart,
    WarmupState,
    WarmupStopped,
    WarmupTarget,
)

__all__ = [
    "AUTO_DATA_KEY",
    "VAE_DATA_KEY",
    "WARMUP_MODES",
    "WARMUP_STATES",
    "AutoDecision",
    "AutoJob",
    "AutoKey",
    "AutoMemory",
    "AutoPlanner",
    "AutoRecord",
    "AutoRun",
    "CompileAdvice",
    "CompileProbe",
    "CompileRegion",
    "CompileWarmup",
    "FrozenAvailableMemory",
    "FrozenFreeMemory",
    "RegionChange",
    "RegionContext",
    "RegionPatch",
    "RegionalCompiler",
    "WarmupPart",
    "WarmupState",
    "WarmupStopped",
    "WarmupTarget",
    "add_compile_cache_parser",
    "compile_advice",
    "compile_availability",
    "compile_blocks",
    "compile_section_dict",
    "compile_section_text",
    "compile_vae_blocks",
    "decide",
    "default_auto_memory_path",
    "default_block_names",
    "einops_namespace",
    "einops_stand_in",
    "get_auto_planner",
    "get_compiler",
    "helpers_of",
    "is_function",
    "make_job",
    "run_compile_cache",
    "setup_compile_cache",
    "traceable_function",
    "traceable_functions",
    "traceable_partial",
]
