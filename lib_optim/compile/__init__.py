"""Regional torch.compile: each UNet/DiT block compiled on its own, reused, restored exactly."""

from __future__ import annotations

from lib_optim.compile.availability import compile_availability
from lib_optim.compile.blocks import default_block_names
from lib_optim.compile.regional import RegionalCompiler, get_compiler
from lib_optim.compile.session import compile_blocks

__all__ = [
    "RegionalCompiler",
    "compile_availability",
    "compile_blocks",
    "default_block_names",
    "get_compiler",
]
