"""Our attention implementations against torch's reference softmax(QKᵀ/√d)V, on odd sizes, fp32 CPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from lib_optim.attention import impl  # noqa: E402
from lib_optim.attention.registry import Attention  # noqa: E402

ATOL = 2e-5


def reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    d = q.shape[-1]
    scores = q.double() @ k.double().transpose(1, 2) / d**0.5
    return (scores.softmax(dim=-1) @ v.double()).float()


def qkv(bh: int, nq: int, nk: int, d: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(bh, nq, d, generator=gen)
    k = torch.randn(bh, nk, d, generator=gen)
    v = torch.randn(bh, nk, d, generator=gen)
    return q, k, v


CASES = [
    (2, 4097, 77, 40),  # cross-attention: 77 context tokens, one query past a power of two
    (2, 333, 333, 64),  # self-attention, odd token count
    (3, 1025, 129, 24),
]


@pytest.mark.parametrize("shape", CASES)
@pytest.mark.parametrize(
    "name",
    ["naive", "sdp", "split", "split-steps", "sub-quad", "sub-quad-chunked", "sub-quad-kv"],
)
def test_matches_reference(name: str, shape: tuple[int, int, int, int]) -> None:
    q, k, v = qkv(*shape)
    fns = {
        "naive": lambda: impl.naive(q, k, v),
        "sdp": lambda: impl.sdp(q, k, v),
        "split": lambda: impl.split(q, k, v),
        "split-steps": lambda: impl.split(q, k, v, steps=8),  # slices that do not divide Nq
        "sub-quad": lambda: impl.sub_quad(q, k, v),  # everything fits: the no-kv-chunk fast path
        "sub-quad-chunked": lambda: impl.sub_quad(q, k, v, q_chunk=256, chunk_threshold=0),  # √Nk key chunks
        "sub-quad-kv": lambda: impl.sub_quad(q, k, v, q_chunk=100, kv_chunk=50, chunk_threshold=0),
    }
    out = fns[name]()
    assert out.shape == (*q.shape[:2], v.shape[2])
    assert out.dtype == q.dtype
    torch.testing.assert_close(out, reference(q, k, v), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("kernel", impl.SDP_KERNELS)
def test_sdp_variants_that_run_here_match(kernel: str) -> None:
    if not impl.sdp_kernel_works(kernel, "cpu", torch.float32, 40):
        pytest.skip(f"SDPA kernel {kernel} does not run on CPU")
    q, k, v = qkv(2, 4097, 77, 40)
    torch.testing.assert_close(impl.sdp_variant(q, k, v, kernel), reference(q, k, v), atol=ATOL, rtol=1e-4)


def test_available_backends_on_cpu() -> None:
    names = impl.available_backends("cpu")
    assert {"sdp", "split", "sub-quad", "none", "sdp-no-mem"} <= set(names)
    assert all(isinstance(name, Attention) for name in names)
    assert "xformers" not in names  # xformers is CUDA-only
    assert "invokeai" not in names and "v1" not in names  # no implementation of ours
    kernels = impl.sdp_kernels("cpu")
    assert "math" in kernels
    assert "efficient" not in kernels and "cudnn" not in kernels  # CUDA kernels
    q, k, v = qkv(2, 65, 77, 16)
    for fn in [*names.values(), *kernels.values()]:
        torch.testing.assert_close(fn(q, k, v), reference(q, k, v), atol=ATOL, rtol=1e-4)


def test_extreme_scores_stay_finite() -> None:
    # The online softmax subtracts the running maximum: large logits must not overflow.
    q, k, v = qkv(1, 300, 300, 8)
    q = q * 60
    out = impl.sub_quad(q, k, v, q_chunk=64, kv_chunk=17, chunk_threshold=0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference(q, k, v), atol=1e-4, rtol=1e-4)


def test_split_refuses_past_64_steps() -> None:
    q, k, v = qkv(1, 512, 512, 8)
    with pytest.raises(MemoryError, match="64"):
        impl.split(q, k, v, free_bytes=1000)


def test_bad_layout_is_refused() -> None:
    q = torch.zeros(1, 2, 3, 4)
    with pytest.raises(ValueError, match="batch\\*heads"):
        impl.sdp(q, q, q)
