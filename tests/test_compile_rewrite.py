"""Traceable copies of host functions (lib_optim.compile.rewrite): the constructs torch 2.1's dynamo cannot trace
inside A1111's and Forge's attention code (docs/hosts.md §6.10) — an unpacked generator expression or ``map``, and
``tensor.element_size()`` — are rewritten from the function's own source; the copy computes the same, keeps the
module's globals (so a region patch of ``rearrange`` reaches it) and is one object per function."""

from __future__ import annotations

import ast
import importlib
import inspect
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from lib_optim.compile import traceable_function, traceable_functions

HOST_LIKE = """
from functools import partial

import torch


def scale(t):
    return t * 2


def split_heads(q_in, k_in, v_in, h):
    # A1111 modules/sd_hijack_optimizations.py:240 unpacks a generator expression like this
    q, k, v = (t.reshape(t.shape[0], -1, h, t.shape[-1] // h) for t in (q_in, k_in, v_in))
    return q + k + v


def with_map(q, k, v):
    # stablediffusion ldm/modules/attention.py:171
    q, k, v = map(lambda t: scale(t), (q, k, v))
    return q - k + v


def tensor_bytes(q, k):
    # A1111 sd_hijack_optimizations.py:328, Forge f2 backend/attention.py:349
    return q.shape[0] * q.shape[1] * k.shape[1] * q.element_size()


def narrow_trunc(input, dim, start, length):
    # A1111 modules/sub_quadratic_attention.py:22-28, verbatim
    return torch.narrow(input, dim, start, length if input.shape[dim] >= start + length else input.shape[dim] - start)


def chunk_sums(x, chunk):
    # modules/sub_quadratic_attention.py:100-102: a comprehension over torch.arange feeding narrow_trunc
    parts = [narrow_trunc(x, 1, i, chunk).sum(dim=1) for i in torch.arange(0, x.shape[1], chunk)]
    return torch.stack(parts)


def loop_total(x, chunk):
    total = x.new_zeros(())
    for i in torch.arange(0, x.shape[1], chunk):
        total = total + narrow_trunc(x, 1, i, chunk).sum()
    return total


def scaled_scores(q, k, scale):
    return q @ k.transpose(1, 2) * scale


def with_partial(q, k):
    # modules/sub_quadratic_attention.py:183-193 builds partials on every call
    scores = partial(scaled_scores, scale=0.5)
    return scores(q, k)


def project_out(self, x):
    # A1111 modules/sd_hijack_optimizations.py:420 unpacks the to_out Sequential
    out_proj, dropout = self.to_out
    return dropout(out_proj(x))


def tensor_mem_scale(q, k):
    # A1111 modules/sd_hijack_optimizations.py:328-331 (einsum_op_tensor_mem) decides its slices this way
    size_mb = q.shape[0] * q.shape[1] * k.shape[1] // 64
    if size_mb <= 1:
        return q
    div = 1 << int((size_mb - 1) / 1).bit_length()
    return q * div


def plain(x):
    return x + 1


def with_closure():
    y = 1

    def inner(x):
        return x + y

    return inner
"""


@pytest.fixture
def host_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "optim_host_like.py").write_text(HOST_LIKE)
    monkeypatch.syspath_prepend(str(tmp_path))
    module = importlib.import_module("optim_host_like")
    yield module
    sys.modules.pop("optim_host_like", None)


def _has_generator(fn) -> bool:
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    return any(isinstance(node, ast.GeneratorExp) for node in ast.walk(tree))


def test_only_the_functions_that_need_it_are_copied(host_module) -> None:
    copies = traceable_functions(host_module)
    assert sorted(copies) == [
        "chunk_sums",
        "loop_total",
        "project_out",
        "split_heads",
        "tensor_bytes",
        "tensor_mem_scale",
        "with_map",
    ]
    assert traceable_function(host_module.plain) is None
    assert traceable_function(host_module.with_closure()) is None  # a closure cannot be recompiled alone


def test_the_copies_compute_the_same_without_the_untraceable_constructs(host_module) -> None:
    copies = traceable_functions(host_module)
    q, k, v = (torch.randn(2, 6, 8) for _ in range(3))
    assert torch.equal(copies["split_heads"](q, k, v, 2), host_module.split_heads(q, k, v, 2))
    assert torch.equal(copies["with_map"](q, k, v), host_module.with_map(q, k, v))
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        half = q.to(dtype)
        assert copies["tensor_bytes"](half, k) == host_module.tensor_bytes(half, k)
    code = copies["split_heads"].__code__
    assert code.co_filename == host_module.split_heads.__code__.co_filename  # tracebacks name the host's file
    assert "element_size" not in copies["tensor_bytes"].__code__.co_names
    x = torch.randn(2, 7, 3)  # 7 columns in chunks of 3: the last chunk truncated
    assert torch.equal(copies["chunk_sums"](x, 3), host_module.chunk_sums(x, 3))
    assert torch.equal(copies["loop_total"](x, 3), host_module.loop_total(x, 3))
    assert _has_generator(host_module.split_heads)


def test_a_copy_reads_the_module_globals_at_call_time_and_is_one_object(host_module, monkeypatch) -> None:
    copies = traceable_functions(host_module)
    assert traceable_function(host_module.with_map) is copies["with_map"]  # dynamo guards on its identity
    monkeypatch.setattr(host_module, "scale", lambda t: t * 3)  # a region patch of a module global reaches it
    q = torch.ones(1, 2, 2)
    assert torch.equal(copies["with_map"](q, q, q), q * 3)


def test_the_copies_trace_as_one_graph(host_module) -> None:
    import torch._dynamo

    copies = traceable_functions(host_module)
    torch._dynamo.reset()
    compiled = torch.compile(copies["split_heads"], backend="eager", fullgraph=True)
    q = torch.randn(2, 6, 8)
    assert torch.equal(compiled(q, q, q, 2), host_module.split_heads(q, q, q, 2))


def test_the_arange_loops_trace_as_one_graph_only_as_copies(host_module) -> None:
    """Over ``torch.arange`` the index is a tensor and ``narrow_trunc``'s comparison decides control flow: a graph
    break on every torch; over ``range`` it is an int."""
    import torch._dynamo

    copies = traceable_functions(host_module)
    x = torch.randn(2, 7, 3)
    for name in ("chunk_sums", "loop_total"):
        torch._dynamo.reset()
        compiled = torch.compile(copies[name], backend="eager", fullgraph=True)
        assert torch.equal(compiled(x, 3), getattr(host_module, name)(x, 3))
        torch._dynamo.reset()
        with pytest.raises(Exception, match=r"(?i)data.dependent|tensor|unsupported|control flow"):
            torch.compile(getattr(host_module, name), backend="eager", fullgraph=True)(x, 3)


def test_traceable_partial_calls_like_functools_partial_and_traces(host_module, monkeypatch) -> None:
    import functools

    import torch._dynamo

    from lib_optim.compile import traceable_partial

    def f(*args, **kwargs):
        return args, kwargs

    ours, theirs = traceable_partial(f, 1, a=2), functools.partial(f, 1, a=2)
    for args, kwargs in (((), {}), ((3,), {"b": 4}), ((), {"a": 5})):  # later keywords win
        assert ours(*args, **kwargs) == theirs(*args, **kwargs)
    monkeypatch.setattr(host_module, "partial", traceable_partial)  # the region patch (compile_regions)
    torch._dynamo.reset()
    q = torch.randn(2, 3, 4)
    compiled = torch.compile(host_module.with_partial, backend="eager", fullgraph=True)
    assert torch.equal(compiled(q, q), q @ q.transpose(1, 2) * 0.5)


def test_an_unpacked_submodule_container_traces_as_one_graph(host_module) -> None:
    import torch._dynamo

    layer = torch.nn.Module()
    layer.to_out = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.0))
    copy = traceable_functions(host_module)["project_out"]
    x = torch.randn(2, 4)
    torch._dynamo.reset()
    compiled = torch.compile(copy, backend="eager", fullgraph=True)
    with torch.no_grad():
        assert torch.equal(compiled(layer, x), host_module.project_out(layer, x))


def test_bit_length_of_a_symbolic_size_through_the_helper(host_module, monkeypatch) -> None:
    """After a size change sizes are symbolic and ``SymInt`` has no ``bit_length`` (A1111's InvokeAI attention failed
    at 512² this way): the copy calls :func:`lib_optim.compile.rewrite.bit_length` through a module global that the
    region patches in (``helpers_of``)."""
    import torch._dynamo

    from lib_optim.compile import helpers_of
    from lib_optim.compile.rewrite import bit_length

    assert [bit_length(v) for v in (0, 1, 2, 255, 256, -5)] == [v.bit_length() for v in (0, 1, 2, 255, 256, -5)]
    copy = traceable_functions(host_module)["tensor_mem_scale"]
    helpers = helpers_of(copy)
    assert list(helpers.values()) == [bit_length]
    for name, helper in helpers.items():
        monkeypatch.setattr(host_module, name, helper, raising=False)
    torch._dynamo.reset()
    compiled = torch.compile(copy, backend="eager", dynamic=True)
    for rows in (4, 9, 16):
        q, k = torch.ones(rows, 8), torch.ones(rows, 32)
        assert torch.equal(compiled(q, k), host_module.tensor_mem_scale(q, k))
