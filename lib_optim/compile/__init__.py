"""Regional torch.compile: each UNet/DiT block compiled on its own, reused, restored exactly."""

from __future__ import annotations

from lib_optim.compile.availability import compile_availability
from lib_optim.compile.blocks import default_block_names
from lib_optim.compile.region import RegionPatch
from lib_optim.compile.regional import RegionalCompiler, get_compiler
from lib_optim.compile.session import CompileRegion, compile_blocks
from lib_optim.compile.traceable import FrozenFreeMemory, einops_namespace, einops_stand_in

__all__ = [
    "CompileRegion",
    "FrozenFreeMemory",
    "RegionPatch",
    "RegionalCompiler",
    "compile_availability",
    "compile_blocks",
    "default_block_names",
    "einops_namespace",
    "einops_stand_in",
    "get_compiler",
]
