"""The machine's GPUs and torch, probed without initialising CUDA where possible; which of them CUDA shows."""

from __future__ import annotations

from lib_optim.gpu.facts import GpuInfo, SystemFacts
from lib_optim.gpu.probe import probe_system
from lib_optim.gpu.visible import CudaNumbering, cuda_numbering

__all__ = [
    "CudaNumbering",
    "GpuInfo",
    "SystemFacts",
    "cuda_numbering",
    "probe_system",
]
