"""Attention backends: the registry, our own implementations, their memory model and the planner.

This is the wing's face: other parts of lib_optim import from here, never from the modules inside.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lib_optim import lazy_exports
from lib_optim.attention.listing import backend_rows, backends_text
from lib_optim.attention.planner import (
    MIB,
    AttnShape,
    attention_shapes,
    choose_auto_attention,
    choose_for_shapes,
    predict_peak_bytes,
)
from lib_optim.attention.registry import (
    A1111_NONE_TITLE,
    DIRECTML_UNSAFE,
    A1111Optimizer,
    Attention,
    AttentionBackend,
    Binding,
    Constraints,
    ForgeFunctions,
    Kernel,
    LdmPatchedFunctions,
    algorithms,
    backend,
    backends,
    by_a1111_title,
    by_forge_function,
    by_ldm_patched_function,
    directml_reason,
    for_host,
    frugal_order,
    kernel_backends,
    not_on_host,
    parse_name,
    register,
    unregister,
)

if TYPE_CHECKING:  # the torch-heavy module loads on first use, so importing the wing stays cheap
    from lib_optim.attention import impl
    from lib_optim.attention.impl import free_memory_bytes
    from lib_optim.attention.kernels import GuardedKernel, host_attention_function, sdpa_with_kernel

_LAZY: dict[str, tuple[str, str | None]] = {
    "free_memory_bytes": ("lib_optim.attention.impl", "free_memory_bytes"),
    "impl": ("lib_optim.attention.impl", None),  # our implementations of every algorithm, as a module
    # the kernels we call ourselves, and their glue for the hosts' call sites
    "GuardedKernel": ("lib_optim.attention.kernels", "GuardedKernel"),
    "host_attention_function": ("lib_optim.attention.kernels", "host_attention_function"),
    "sdpa_with_kernel": ("lib_optim.attention.kernels", "sdpa_with_kernel"),
}

__getattr__ = lazy_exports(__name__, _LAZY)


__all__ = [
    "A1111_NONE_TITLE",
    "DIRECTML_UNSAFE",
    "MIB",
    "A1111Optimizer",
    "Attention",
    "AttentionBackend",
    "AttnShape",
    "Binding",
    "Constraints",
    "ForgeFunctions",
    "GuardedKernel",
    "Kernel",
    "LdmPatchedFunctions",
    "algorithms",
    "attention_shapes",
    "backend",
    "backend_rows",
    "backends",
    "backends_text",
    "by_a1111_title",
    "by_forge_function",
    "by_ldm_patched_function",
    "choose_auto_attention",
    "choose_for_shapes",
    "directml_reason",
    "for_host",
    "free_memory_bytes",
    "frugal_order",
    "host_attention_function",
    "impl",
    "kernel_backends",
    "not_on_host",
    "parse_name",
    "predict_peak_bytes",
    "register",
    "sdpa_with_kernel",
    "unregister",
]
