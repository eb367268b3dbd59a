"""Traceable copies of a host's Python functions: the same source, with the few constructs that dynamo on the
torch the hosts pin (2.1.2) cannot trace written the way it can. The host's code is read from its own file at
run time and recompiled in memory with the host module's globals; nothing of it is stored in this project.

What changes (each a graph break on torch 2.1, docs/hosts.md §6.10):

- a generator expression unpacked into names, ``q, k, v = (f(t) for t in (q, k, v))``, and the same with
  ``map(lambda t: ..., (q, k, v))``: a list comprehension (``UNPACK_SEQUENCE`` of a generator);
- ``t.element_size()``: ``torch.finfo(t.dtype).bits // 8`` for floating tensors (a ``torch.*`` op returning an
  int).
- a submodule container unpacked into names, ``out_proj, dropout = self.to_out``: indexed item by item;
- ``x.bit_length()``: :func:`bit_length` (a ``SymInt`` has no ``bit_length``), called through a module global
  that exists only while compiled code runs (:func:`helpers_of`);
- a loop over ``torch.arange(a, b, step)`` (``for i in ...`` or a comprehension): ``range(a, b, step)``, the
  same indices as ints; as 0-dim tensors they reach comparisons that decide control flow (A1111's sub-quadratic
  attention ``chunk_scanner``/``narrow_trunc``), a graph break.

A function without such constructs, without source, with a closure or decorators is not copied (None): the
original runs, and dynamo breaks the graph there as before.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
import types
from collections.abc import Callable
from typing import Any

from lib_optim.log import get_logger

log = get_logger(__name__)


def bit_length(value: int) -> int:
    """``int.bit_length`` as a loop: with a symbolic size (after a size change) ``SymInt`` has no ``bit_length``
    (A1111's InvokeAI attention, ``einsum_op_tensor_mem``); dynamo traces the loop and guards on the value."""
    if value < 0:
        value = -value
    count = 0
    while value:
        value >>= 1
        count += 1
    return count


# Helpers the copies call by these names: module globals only while compiled code runs (helper_patches).
BIT_LENGTH = "_optim_bit_length"
HELPERS: dict[str, Callable[..., Any]] = {BIT_LENGTH: bit_length}


def helpers_of(copy: Callable[..., Any]) -> dict[str, Callable[..., Any]]:
    """The helpers a traceable copy calls as globals of its module (name → function)."""
    return dict(getattr(copy, "__optim_helpers__", {}))


class _Rewriter(ast.NodeTransformer):
    def __init__(self, torch_name: str | None):
        self.torch_name = torch_name
        self.changed = 0
        self.helpers: set[str] = set()

    def visit_Assign(self, node: ast.Assign) -> Any:
        self.generic_visit(node)
        if len(node.targets) == 1 and isinstance(node.targets[0], (ast.Tuple, ast.List)):
            listed = _as_list(node.value) or _as_items(node.targets[0], node.value)
            if listed is not None:
                node.value = listed
                self.changed += 1
        return node

    def visit_For(self, node: ast.For) -> Any:
        self.generic_visit(node)
        node.iter = self._as_range(node.iter)
        return node

    def visit_comprehension(self, node: ast.comprehension) -> Any:
        self.generic_visit(node)
        node.iter = self._as_range(node.iter)
        return node

    def _as_range(self, iterable: ast.expr) -> ast.expr:
        """``torch.arange(args)`` → ``range(args)`` (positional arguments only, as ``range`` takes them)."""
        if (
            self.torch_name is not None
            and isinstance(iterable, ast.Call)
            and isinstance(iterable.func, ast.Attribute)
            and iterable.func.attr == "arange"
            and isinstance(iterable.func.value, ast.Name)
            and iterable.func.value.id == self.torch_name
            and 1 <= len(iterable.args) <= 3
            and not iterable.keywords
        ):
            self.changed += 1
            return ast.Call(func=ast.Name(id="range", ctx=ast.Load()), args=iterable.args, keywords=[])
        return iterable

    def visit_Call(self, node: ast.Call) -> Any:
        self.generic_visit(node)
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "bit_length" and not node.args and not node.keywords:
            self.changed += 1
            self.helpers.add(BIT_LENGTH)
            return ast.Call(func=ast.Name(id=BIT_LENGTH, ctx=ast.Load()), args=[func.value], keywords=[])
        if (
            self.torch_name is not None
            and isinstance(func, ast.Attribute)
            and func.attr == "element_size"
            and not node.args
            and not node.keywords
        ):
            self.changed += 1
            finfo = ast.Call(
                func=ast.Attribute(value=ast.Name(id=self.torch_name, ctx=ast.Load()), attr="finfo", ctx=ast.Load()),
                args=[ast.Attribute(value=func.value, attr="dtype", ctx=ast.Load())],
                keywords=[],
            )
            bits = ast.Attribute(value=finfo, attr="bits", ctx=ast.Load())
            return ast.BinOp(left=bits, op=ast.FloorDiv(), right=ast.Constant(value=8))
        return node


def _as_list(value: ast.expr) -> ast.expr | None:
    """``(e for t in xs)`` → ``[e for t in xs]``; ``map(f, xs)`` → ``[f(_optim_item) for _optim_item in xs]``."""
    if isinstance(value, ast.GeneratorExp):
        return ast.ListComp(elt=value.elt, generators=value.generators)
    if (
        isinstance(value, ast.Call)
        and isinstance(value.func, ast.Name)
        and value.func.id == "map"
        and len(value.args) == 2
        and not value.keywords
    ):
        item = ast.Name(id="_optim_item", ctx=ast.Load())
        call = ast.Call(func=value.args[0], args=[item], keywords=[])
        loop = ast.comprehension(
            target=ast.Name(id="_optim_item", ctx=ast.Store()), iter=value.args[1], ifs=[], is_async=0
        )
        return ast.ListComp(elt=call, generators=[loop])
    return None


def _as_items(target: ast.Tuple | ast.List, value: ast.expr) -> ast.expr | None:
    """``a, b = self.layers`` → ``a, b = self.layers[0], self.layers[1]``: a submodule container unpacked into
    names (A1111's ``out_proj, dropout = self.to_out``) is ``UNPACK_SEQUENCE NNModuleVariable`` on torch 2.1."""
    names = target.elts
    if (
        not isinstance(value, ast.Attribute)
        or not isinstance(value.value, ast.Name)
        or value.value.id != "self"
        or any(isinstance(name, ast.Starred) for name in names)
    ):
        return None
    items: list[ast.expr] = [
        ast.Subscript(value=value, slice=ast.Constant(value=index), ctx=ast.Load()) for index in range(len(names))
    ]
    return ast.Tuple(elts=items, ctx=ast.Load())


@functools.cache
def traceable_function(fn: Callable[..., Any]) -> Callable[..., Any] | None:
    """A copy of ``fn`` dynamo can trace on torch 2.1, or None when ``fn`` needs none or cannot be copied. One copy
    per function for the process: dynamo guards on the identity of what it calls."""
    if not isinstance(fn, types.FunctionType) or fn.__closure__:
        return None
    try:
        source = textwrap.dedent(inspect.getsource(fn))
        tree = ast.parse(source)
    except (OSError, TypeError, SyntaxError, IndentationError):
        log.debug("no source for %r: not rewritten", fn, exc_info=True)
        return None
    definition = tree.body[0] if tree.body else None
    if not isinstance(definition, ast.FunctionDef) or definition.decorator_list or definition.name != fn.__name__:
        return None
    torch_name = next((name for name, value in fn.__globals__.items() if _is_torch(value)), None)
    rewriter = _Rewriter(torch_name)
    tree = ast.fix_missing_locations(rewriter.visit(tree))
    if not rewriter.changed:
        return None
    first_line = fn.__code__.co_firstlineno
    ast.increment_lineno(tree, first_line - 1)  # tracebacks and dynamo's logs point at the host's own lines
    namespace: dict[str, Any] = {}
    exec(compile(tree, fn.__code__.co_filename, "exec"), fn.__globals__, namespace)
    copy = namespace[fn.__name__]
    copy.__defaults__ = fn.__defaults__
    copy.__kwdefaults__ = fn.__kwdefaults__
    copy.__qualname__ = fn.__qualname__
    copy.__module__ = fn.__module__
    copy.__optim_helpers__ = {name: HELPERS[name] for name in sorted(rewriter.helpers)}
    log.debug("traceable copy of %s.%s (%d constructs rewritten)", fn.__module__, fn.__qualname__, rewriter.changed)
    return copy


def _is_torch(value: Any) -> bool:
    return isinstance(value, types.ModuleType) and value.__name__ == "torch"


def traceable_functions(module: Any) -> dict[str, Callable[..., Any]]:
    """``name → traceable copy`` for the functions defined in ``module`` that need one."""
    copies = {}
    for name, value in list(vars(module).items()):
        if isinstance(value, types.FunctionType) and value.__module__ == module.__name__:
            copy = traceable_function(value)
            if copy is not None:
                copies[name] = copy
    return copies
