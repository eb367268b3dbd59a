"""Regional torch.compile: each UNet/DiT block compiled on its own, reused, restored exactly."""

from __future__ import annotations

from lib_optim.compile.advice import (
    CompileAdvice,
    CompileProbe,
    compile_advice,
    compile_section_dict,
    compile_section_text,
)
from lib_optim.compile.availability import compile_availability
from lib_optim.compile.blocks import default_block_names
from lib_optim.compile.persist import setup_compile_cache
from lib_optim.compile.persist_cli import add_compile_cache_parser, run_compile_cache
from lib_optim.compile.regional import RegionalCompiler, get_compiler
from lib_optim.compile.session import compile_blocks

__all__ = [
    "CompileAdvice",
    "CompileProbe",
    "RegionalCompiler",
    "add_compile_cache_parser",
    "compile_advice",
    "compile_availability",
    "compile_blocks",
    "compile_section_dict",
    "compile_section_text",
    "default_block_names",
    "get_compiler",
    "run_compile_cache",
    "setup_compile_cache",
]
