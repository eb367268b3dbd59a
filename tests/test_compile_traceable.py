"""The traceable stand-ins regional compile puts in the hosts' block code (lib_optim.compile.traceable).

einops' ``rearrange``/``repeat`` are compared with einops itself (tools/test.sh installs it for the tests) on the
patterns the hosts' blocks use, then traced by dynamo with symbolic sizes (einops 0.4.1, which A1111 v1.10.1 and
both Forges pin, fails there: ``unhashable type: 'SymInt'``). ``FrozenFreeMemory`` answers a host's free-memory
query from a figure measured before the compiled region.
"""

from __future__ import annotations

from typing import Any

import einops
import pytest
import torch

from lib_optim.compile import FrozenFreeMemory, einops_namespace, einops_stand_in, traceable

# (function, pattern, input shape, axis lengths) — the host sites:
#   ldm/modules/attention.py (A1111's stablediffusion repository) :128-139, :171, :184-193, :330, :337;
#   A1111 modules/sd_hijack_optimizations.py (b n (h d) -> b h n d and back);
#   Forge backend/nn/unet.py:66, :316, :324, :471; backend/attention.py:73, :75;
#   sgm/ldm_patched video blocks ((b t) c h w <-> b c t h w, b ... -> (b n) ..., t -> b t).
HOST_PATTERNS: list[tuple[str, str, tuple[int, ...], dict[str, int]]] = [
    ("rearrange", "b c h w -> b (h w) c", (2, 3, 4, 5), {}),
    ("rearrange", "b (h w) c -> b c h w", (2, 20, 3), {"h": 4, "w": 5}),
    ("rearrange", "b (h w) c -> b c h w", (2, 20, 3), {"h": 4}),
    ("rearrange", "b n (h d) -> (b h) n d", (2, 7, 6), {"h": 3}),
    ("rearrange", "(b h) n d -> b n (h d)", (6, 7, 2), {"h": 3}),
    ("rearrange", "b n (h d) -> b h n d", (2, 7, 6), {"h": 3}),
    ("rearrange", "b h n d -> b n (h d)", (2, 3, 7, 2), {}),
    ("rearrange", "b c h w -> b c (h w)", (2, 3, 4, 5), {}),
    ("rearrange", "b c (h w) -> b c h w", (2, 3, 20), {"h": 4}),
    ("rearrange", "b i j -> b j i", (2, 3, 4), {}),
    ("rearrange", "b ... -> b (...)", (2, 3, 4, 5), {}),
    ("rearrange", "b ... -> b (...)", (2, 3), {}),
    ("repeat", "b j -> (b h) () j", (2, 5), {"h": 3}),
    ("repeat", "b -> b d", (4,), {"d": 3}),
    ("rearrange", "b t c ... -> b c t ...", (2, 3, 4, 5, 6), {}),
    ("rearrange", "b t c ... -> b c t ...", (2, 3, 4), {}),
    ("rearrange", "b c -> b 1 c", (2, 3), {}),
    ("rearrange", "(b t) c h w -> b c t h w", (6, 3, 4, 5), {"t": 3}),
    ("rearrange", "b c t h w -> (b t) c h w", (2, 3, 4, 5, 6), {}),
    ("repeat", "b ... -> (b n) ...", (2, 3, 4), {"n": 3}),
    ("repeat", "t -> b t", (4,), {"b": 3}),
]


def distinct(shape: tuple[int, ...]) -> torch.Tensor:
    """Every element different, so a wrong permutation cannot pass."""
    return torch.arange(int(torch.tensor(shape).prod())).reshape(shape).float()


@pytest.mark.parametrize(("kind", "pattern", "shape", "lengths"), HOST_PATTERNS)
def test_the_host_patterns_equal_einops(kind: str, pattern: str, shape: tuple[int, ...], lengths: dict[str, int]):
    x = distinct(shape)
    expected = getattr(einops, kind)(x, pattern, **lengths)
    ours = getattr(traceable, kind)(x, pattern, **lengths)
    assert ours.shape == expected.shape and torch.equal(ours, expected)
    stand_in = einops_stand_in(kind, getattr(einops, kind))(x, pattern, **lengths)
    assert torch.equal(stand_in, expected)


def test_uncovered_patterns_raise_naming_the_pattern():
    with pytest.raises(ValueError, match=r"pattern 'b c h w -> b c' for a 4-d tensor"):
        traceable.rearrange(distinct((2, 3, 4, 5)), "b c h w -> b c")  # a reduction, not a rearrangement
    with pytest.raises(ValueError, match=r"'b \(h w\) c -> b c h w'.*not one it covers"):
        traceable.rearrange(distinct((2, 20, 3)), "b (h w) c -> b c h w")  # two unknowns in one group
    with pytest.raises(ValueError, match="not one it covers"):
        traceable.repeat(distinct((2, 5)), "b j -> (b h) j")  # a new axis without its size
    with pytest.raises(ValueError, match="not one it covers"):
        traceable.rearrange(distinct((2, 3, 4)), "b c h w -> b (h w) c")  # wrong number of dimensions


def test_an_uncovered_pattern_goes_to_the_original():
    calls: list[tuple[str, dict[str, Any]]] = []

    def original(tensor: torch.Tensor, pattern: str, **lengths: Any) -> torch.Tensor:
        calls.append((pattern, lengths))
        return einops.rearrange(tensor, pattern, **lengths)

    stand_in = einops_stand_in("rearrange", original)
    x = distinct((2, 20, 3))
    with pytest.raises(einops.EinopsError):
        stand_in(x, "b (h w) c -> b c h w")  # einops' own error, not ours
    assert calls == [("b (h w) c -> b c h w", {})]
    stand_in(x, "b (h w) c -> b c h w", h=4)  # covered: the original is not asked
    assert len(calls) == 1


def test_one_stand_in_per_original_and_kind():
    assert einops_stand_in("rearrange", einops.rearrange) is einops_stand_in("rearrange", einops.rearrange)
    assert einops_stand_in("repeat", einops.repeat) is not einops_stand_in("rearrange", einops.rearrange)
    namespace = einops_namespace(einops)
    assert namespace is einops_namespace(einops)  # Forge's `einops.rearrange(...)` sites: one namespace per module
    assert namespace.rearrange is einops_stand_in("rearrange", einops.rearrange)
    assert namespace.repeat is einops_stand_in("repeat", einops.repeat)
    with pytest.raises(ValueError, match=r"kind='reduce' is not allowed; allowed: rearrange, repeat"):
        einops_stand_in("reduce", einops.reduce)


# what the patches put in the host module's globals (lib_optim.hosts.compile_regions.einops_patches)
rearrange = einops_stand_in("rearrange", einops.rearrange)
repeat = einops_stand_in("repeat", einops.repeat)


def attention_like(x: torch.Tensor, mask: torch.Tensor, heads: int) -> torch.Tensor:
    """A block's einops calls in order (ldm/modules/attention.py:171-193, :330-337), through the stand-ins."""
    _, _, h, w = x.shape
    tokens = rearrange(x, "b c h w -> b (h w) c")
    q = rearrange(tokens, "b n (h d) -> (b h) n d", h=heads)
    mask = repeat(rearrange(mask, "b ... -> b (...)"), "b j -> (b h) () j", h=heads)
    weights = torch.softmax((q @ q.transpose(1, 2)).masked_fill(~mask, -1e4), dim=-1)
    out = rearrange(weights @ q, "(b h) n d -> b n (h d)", h=heads)
    return rearrange(out, "b (h w) c -> b c h w", h=h, w=w)


def test_the_stand_ins_trace_with_symbolic_sizes_without_a_graph_break():
    torch._dynamo.reset()
    compiled = torch.compile(attention_like, fullgraph=True, dynamic=True, backend="eager")
    for size in (4, 6):  # fullgraph=True: a graph break would raise
        x = torch.randn(2, 8, size, size)
        mask = torch.rand(2, size, size) > 0.2
        assert torch.equal(compiled(x, mask, 2), attention_like(x, mask, 2))
    with torch.no_grad():  # and the stand-ins compute what einops computes
        x = torch.randn(2, 8, 4, 4)
        mask = torch.rand(2, 4, 4) > 0.2
        _, _, h, w = x.shape
        tokens = einops.rearrange(x, "b c h w -> b (h w) c")
        q = einops.rearrange(tokens, "b n (h d) -> (b h) n d", h=2)
        m = einops.repeat(einops.rearrange(mask, "b ... -> b (...)"), "b j -> (b h) () j", h=2)
        weights = torch.softmax((q @ q.transpose(1, 2)).masked_fill(~m, -1e4), dim=-1)
        out = einops.rearrange(weights @ q, "(b h) n d -> b n (h d)", h=2)
        assert torch.equal(attention_like(x, mask, 2), einops.rearrange(out, "b (h w) c -> b c h w", h=h, w=w))


# ------------------------------------------------------------------------------------------- free memory


class RealFreeMemory:
    """A host's ``get_free_memory(dev=None, torch_free_too=False)`` (Forge backend/memory_management.py:1008-1038):
    (total, torch) with ``torch_free_too``, else the total. Records its calls."""

    def __init__(self, total: int, torch_free: int) -> None:
        self.total = total
        self.torch_free = torch_free
        self.calls: list[tuple[Any, bool]] = []

    def __call__(self, dev: Any = None, torch_free_too: bool = False) -> Any:
        self.calls.append((dev, torch_free_too))
        return (self.total, self.torch_free) if torch_free_too else self.total


def test_frozen_free_memory_floors_the_measured_figures_to_a_power_of_two():
    real = RealFreeMemory(total=(3 << 30) + 12345, torch_free=(5 << 20) + 1)
    frozen = FrozenFreeMemory(real)
    frozen.measure("cuda:0")
    assert real.calls == [("cuda:0", True)]  # measured once, for the generation's device, both figures
    assert frozen() == 2 << 30 and frozen("cuda:1") == 2 << 30
    assert frozen(None, True) == (2 << 30, 4 << 20)
    assert frozen(torch_free_too=True) == (2 << 30, 4 << 20)
    assert len(real.calls) == 1  # answered from the figure, the real function is not asked again
    real.total = (3 << 30) + (99 << 20)  # a few megabytes moved: the same figure, nothing for dynamo to recompile
    frozen.measure("cuda:0")
    assert frozen() == 2 << 30
    real.total, real.torch_free = 0, -5  # nothing free (or a negative difference of statistics): 0, not an error
    frozen.measure("cuda:0")
    assert frozen(None, True) == (0, 0)


def test_frozen_free_memory_unmeasured_asks_the_real_function():
    real = RealFreeMemory(total=1000, torch_free=10)
    frozen = FrozenFreeMemory(real)
    assert frozen() == 1000 and frozen("cpu", True) == (1000, 10)
    assert real.calls == [(None, False), ("cpu", True)]


def test_the_figures_hold_while_free_memory_wavers_and_never_exceed_it():
    """Free memory that wavers across a power of two (another program, a cache) would recompile every attention
    block at each crossing: the figure drops when memory drops below it, rises only on a fourfold gain."""
    from lib_optim.compile.traceable import FrozenAvailableMemory

    gib = 1 << 30
    free = [int(8.1 * gib)]
    available = FrozenAvailableMemory(lambda: free[0])
    seen = []
    for measured in (8.1, 7.9, 8.1, 7.9, 8.1, 3.5, 12.0, 16.5, 16.2):
        free[0] = int(measured * gib)
        available.measure()
        seen.append(available() / gib)
        assert available() <= free[0]  # never more than is free
    assert seen == [8, 4, 4, 4, 4, 2, 8, 8, 8]  # 12 GiB: 8 is four times 2; 16.5 GiB: 16 is not four times 8
    real = RealFreeMemory(total=int(8.1 * gib), torch_free=int(1.5 * gib))
    frozen = FrozenFreeMemory(real)
    frozen.measure("cuda:0")
    real.total, real.torch_free = int(7.9 * gib), int(1.2 * gib)
    frozen.measure("cuda:0")
    real.total = int(8.1 * gib)
    frozen.measure("cuda:0")
    assert frozen("cuda:0", True) == (4 * gib, 1 * gib)  # each figure on its own


def test_on_the_cpu_a_figure_holds_until_free_memory_halves():
    """RAM pages rather than failing: on the CPU the figure may stay up to twice what is free, so the wavering
    of a busy machine's free memory never recompiles the attention blocks."""
    gib = 1 << 30
    real = RealFreeMemory(total=int(8.1 * gib), torch_free=0)
    frozen = FrozenFreeMemory(real)
    seen = []
    for measured in (8.1, 7.9, 4.2, 3.9, 8.1, 17.0):
        real.total = int(measured * gib)
        frozen.measure("cpu")
        seen.append(frozen() / gib)
        assert frozen() <= 2 * real.total
    assert seen == [8, 8, 8, 2, 8, 8]  # 3.9 GiB: 8 is over twice that, so 2; 8.1: a fourfold gain; 17: not again
