"""Shared graphs before torch 2.5: identical blocks compile once.

Before 2.5 dynamo does not inline ``nn.Module`` s: every block instance is traced on its own and its
parameters are captured when it compiles, so SD1.5's 38 blocks make 38 inductor compiles although they come
in a handful of shapes. What is captured, though, is only a list: AOTAutograd lifts the parameters and
buffers to inputs of the compiled function and keeps them in the closure of the ``forward`` it returns
(``torch/_functorch/aot_autograd.py``, ``aot_module_simplified``: ``params_flat`` and ``compiled_fn``, the
same in 2.1.2 and 2.3.1). This backend sits in front of inductor: a graph it has compiled before — same
code, same parameter and input shapes, strides, dtypes and devices, same grad and autocast state — gets the
compiled function again with this block's own parameters in place of the first block's. Dynamo still traces
and guards each block (cheap); inductor, the expensive part, runs once per distinct block.

Anything this cannot prove equal compiles normally: a graph holding tensor constants that are not
parameters or buffers (their values are baked into the code), inductor's ``freezing`` (parameters baked
in too), an AOT ``forward`` whose closure is not the expected one.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

from lib_optim.log import get_logger

log = get_logger(__name__)

_AOT_CELLS = ("params_flat", "compiled_fn")


class SharedGraphBackend:
    """A dynamo backend: inductor (in ``mode``) once per distinct graph, rebound to each block's parameters."""

    compiler_name = "inductor"

    def __init__(self, mode: str | None = None, dynamic: bool | None = None, inner: Any = None):
        """``inner``: the backend behind this one (tests: ``"aot_eager"``); default inductor in ``mode``."""
        import torch

        if inner is None:
            inner = torch._TorchCompileInductorWrapper(mode, None, dynamic)
        elif isinstance(inner, str):
            from torch._dynamo.backends.registry import lookup_backend

            inner = lookup_backend(inner)
        self.inner: Callable[..., Any] = inner
        self.compiled: dict[Any, Any] = {}
        self.compiles = 0
        self.reused = 0

    def __call__(self, gm: Any, example_inputs: list[Any]) -> Any:
        key = graph_key(gm, example_inputs)
        entry = self.compiled.get(key) if key is not None else None
        if entry is not None:
            rebound = rebind(entry, gm)
            if rebound is not None:
                self.reused += 1
                return rebound
        compiled = self.inner(gm, example_inputs)
        self.compiles += 1
        template = _template(compiled) if key is not None else None
        if template is not None:
            self.compiled[key] = template
        return compiled


def graph_key(gm: Any, example_inputs: list[Any]) -> Any:
    """What makes two dynamo graphs compile to the same code, or None when that cannot be told."""
    import torch
    from torch._inductor import config as inductor_config

    if getattr(inductor_config, "freezing", False):
        return None
    state = dict(gm.named_parameters(remove_duplicate=False))
    state.update(gm.named_buffers(remove_duplicate=False))
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target not in state:
            return None  # a tensor constant: its value is in the compiled code
    return (
        gm.code,
        tuple((name, _tensor_meta(t)) for name, t in state.items()),
        tuple(_tensor_meta(x) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs),
        torch.is_grad_enabled(),
        torch.is_autocast_enabled(),
        torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None,
        torch.is_autocast_cpu_enabled(),
    )


def _tensor_meta(t: Any) -> tuple[Any, ...]:
    return (tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t.requires_grad)


def _aot_forward(compiled: Any) -> types.FunctionType | None:
    """AOTAutograd's ``forward(*runtime_args)`` inside what inductor returned (through dynamo's ``disable``
    wrappers, which keep ``__wrapped__``)."""
    current = compiled
    for _ in range(8):
        code = getattr(current, "__code__", None)
        if code is not None and all(cell in code.co_freevars for cell in _AOT_CELLS):
            return current if isinstance(current, types.FunctionType) else None
        current = getattr(current, "__wrapped__", None)
        if current is None:
            return None
    return None


def _template(compiled: Any) -> types.FunctionType | None:
    """``compiled``'s AOT forward without its parameters (placeholders of the same count), for :func:`rebind`: the
    cache must not keep the first block's weights alive after its model is gone (nor ``forward.named_parameters``,
    AOTAutograd's handle on the graph module, which the copy leaves out)."""
    forward = _aot_forward(compiled)
    if forward is None or forward.__closure__ is None:
        return None
    cells = dict(zip(forward.__code__.co_freevars, forward.__closure__, strict=True))
    cells["params_flat"] = types.CellType([None] * len(cells["params_flat"].cell_contents))
    closure = tuple(cells[name] for name in forward.__code__.co_freevars)
    return types.FunctionType(forward.__code__, forward.__globals__, forward.__name__, forward.__defaults__, closure)


def rebind(compiled: Any, gm: Any) -> Any:
    """``compiled``'s AOT forward with ``gm``'s parameters and buffers (in AOTAutograd's order), or None."""
    import torch
    from torch.utils import _pytree as pytree

    forward = _aot_forward(compiled)
    if forward is None or forward.__closure__ is None:
        return None
    params = {**dict(gm.named_parameters(remove_duplicate=False)), **dict(gm.named_buffers(remove_duplicate=False))}
    params_flat, _ = pytree.tree_flatten(params)
    cells = dict(zip(forward.__code__.co_freevars, forward.__closure__, strict=True))
    if len(cells["params_flat"].cell_contents) != len(params_flat):
        return None
    cells["params_flat"] = types.CellType(list(params_flat))
    closure = tuple(cells[name] for name in forward.__code__.co_freevars)
    fresh = types.FunctionType(forward.__code__, forward.__globals__, forward.__name__, forward.__defaults__, closure)
    return torch._dynamo.disable(fresh)
