"""The planner: attention shapes, peak-memory formulas (by hand and measured), and auto's choice."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lib_optim.attention.memory import AttnShape, attention_shapes, split_steps, sub_quad_chunks
from lib_optim.attention.planner import MIB, choose_auto_attention, predict_peak_bytes
from lib_optim.attention.registry import Attention

SD15_512_SELF = AttnShape("self", 16, 4096, 4096, 40)
GIB = 1 << 30


def test_sd15_shapes() -> None:
    shapes = attention_shapes("sd15", 512, 512, 1)
    got = [(s.kind, s.bh, s.nq, s.nk, s.dim_head, s.level) for s in shapes]
    assert got == [
        ("self", 16, 4096, 4096, 40, 1),
        ("cross", 16, 4096, 77, 40, 1),
        ("self", 16, 1024, 1024, 80, 2),
        ("cross", 16, 1024, 77, 80, 2),
        ("self", 16, 256, 256, 160, 4),
        ("cross", 16, 256, 77, 160, 4),
        ("self", 16, 64, 64, 160, 8),  # the mid block
        ("cross", 16, 64, 77, 160, 8),
    ]
    assert attention_shapes("sd15", 768, 768, 2)[0] == AttnShape("self", 32, 9216, 9216, 40, 1)
    assert attention_shapes("sd15", 512, 512, 1, cfg=False)[0].bh == 8


def test_sdxl_shapes_and_odd_sizes() -> None:
    shapes = attention_shapes("sdxl", 1024, 1024, 1)
    assert [(s.kind, s.bh, s.nq, s.nk, s.dim_head) for s in shapes] == [
        ("self", 20, 4096, 4096, 64),
        ("cross", 20, 4096, 77, 64),
        ("self", 40, 1024, 1024, 64),
        ("cross", 40, 1024, 77, 64),
    ]
    # 520x776: latent 65x97, halved by stride-2 convolutions to 33x49
    assert attention_shapes("sdxl", 520, 776, 1)[0].nq == 33 * 49
    with pytest.raises(ValueError, match="allowed: sd15, sdxl"):
        attention_shapes("sd3", 512, 512)


def test_split_steps_like_the_hosts() -> None:
    s = 16 * 4096 * 4096 * 2  # fp16 score matrix, 512 MiB
    assert split_steps(16, 4096, 4096, 2, 3 * s) == 1
    assert split_steps(16, 4096, 4096, 2, GIB) == 2  # 1.5 GiB needed -> 2 slices
    assert split_steps(16, 4096, 4096, 4, GIB) == 4  # fp32: 1 GiB x 2.5 = 2.5 GiB -> 4
    assert split_steps(16, 4096, 4096, 4, 3 * GIB) == 1


def test_sub_quad_chunks() -> None:
    assert sub_quad_chunks(16, 4096, 4096, 40, 2, chunk_threshold=0) == (1024, 64)  # √Nk
    assert sub_quad_chunks(16, 4096, 4096, 40, 2, free_bytes=GIB) == (1024, 4096)  # Q·Kᵀ fits 70 %
    assert sub_quad_chunks(16, 4096, 77, 40, 2, kv_chunk=10, chunk_threshold=0) == (1024, 10)
    assert sub_quad_chunks(16, 300, 77, 40, 2, q_chunk=1024) == (300, 8)  # no free memory known: √77


def test_formulas_by_hand() -> None:
    s, o = 16 * 4096 * 4096 * 2, 16 * 4096 * 40 * 2  # fp16 scores, output
    assert predict_peak_bytes("none", SD15_512_SELF) == 2 * s + o
    assert predict_peak_bytes(Attention.SDP, SD15_512_SELF, device="cuda") == o + 16 * 4096 * 4
    assert predict_peak_bytes("xformers", SD15_512_SELF) == o + 16 * 4096 * 4
    # sdp-no-mem in fp32 on CUDA is the math kernel: scores, softmax, a 1-byte mask, output
    s4, o4 = 2 * s, 2 * o
    assert predict_peak_bytes("sdp-no-mem", SD15_512_SELF, dtype_bytes=4) == 2 * s4 + s4 // 4 + o4
    # split with 1 GiB free: 2 slices of 2048 queries
    assert predict_peak_bytes("split", SD15_512_SELF, free_bytes=GIB) == o + 2 * (16 * 2048 * 4096 * 2)
    assert predict_peak_bytes("split", SD15_512_SELF, steps=4) == o + 2 * (16 * 1024 * 4096 * 2)
    # sub-quad, chunked keys: output + a 1024x64 block + the running values + 5 vectors
    assert predict_peak_bytes("sub-quad", SD15_512_SELF, chunk_threshold=0) == (
        o + 16 * 1024 * 64 * 2 + 16 * 1024 * 40 * 2 + 5 * 16 * 1024 * 2
    )
    # CPU flash kernel, fp32, 2 threads: blocks of 256 queries x 512 keys
    per_thread = (256 * 512 + 2 * 256 + 256 * 40) * 4
    assert predict_peak_bytes("sdp", SD15_512_SELF, dtype_bytes=4, device="cpu", threads=2) == (
        2 * o + 16 * 4096 * 4 + 2 * per_thread
    )
    with pytest.raises(ValueError, match="no memory model"):
        predict_peak_bytes("flux-attention", SD15_512_SELF)


def test_cpu_flash_repacks_k_and_v_for_amx() -> None:
    """bf16/fp16 on an AMX CPU: FlashAttentionKernel.cpp packs K (head size rounded up to even) and V (each
    key block rounded up to even) for its brgemm calls, plus a per-thread transpose buffer — only with at
    least 64 queries and keys and enough matmul work per thread."""
    plain = predict_peak_bytes("sdp", SD15_512_SELF, dtype_bytes=2, device="cpu", threads=2)
    packed = predict_peak_bytes("sdp", SD15_512_SELF, dtype_bytes=2, device="cpu", threads=2, cpu_pack=True)
    assert packed - plain == 16 * 4096 * 40 * 2 * 2 + 2 * 512 * 40 * 2
    odd = AttnShape("self", 4, 1000, 1001, 41)  # odd head size and an odd last key block (1001 = 512 + 489)
    extra = predict_peak_bytes("sdp", odd, dtype_bytes=2, device="cpu", threads=1, cpu_pack=True) - (
        predict_peak_bytes("sdp", odd, dtype_bytes=2, device="cpu", threads=1)
    )
    assert extra == 4 * 1001 * 42 * 2 + 4 * (512 + 490) * 41 * 2 + 1 * 512 * 41 * 2
    few_keys = AttnShape("cross", 16, 4096, 63, 40)
    for shape, kw in ((few_keys, {}), (SD15_512_SELF, {"dtype_bytes": 4})):
        args = {"dtype_bytes": 2, "device": "cpu", "threads": 2, **kw}
        assert predict_peak_bytes("sdp", shape, cpu_pack=True, **args) == predict_peak_bytes("sdp", shape, **args)
    # the packing must pay for itself: 64 heads of 64 queries on 64 threads is one block each, too little work
    small = AttnShape("self", 64, 64, 4096, 40)
    assert predict_peak_bytes("sdp", small, dtype_bytes=2, device="cpu", threads=64, cpu_pack=True) == (
        predict_peak_bytes("sdp", small, dtype_bytes=2, device="cpu", threads=64)
    )


# Measured in a fresh interpreter, as `python -m lib_optim bench` measures: the peak meter is set up before
# any large allocation. In this long-lived test process, heap chunks freed by earlier tests would serve part of
# a call from already-resident pages (or, once trimmed, be counted again), and the readings would depend on
# which tests ran first.
_MEASURE = """
import json, sys
import torch
from lib_optim.attention import impl
from lib_optim.bench.attention import PeakMeter

meter = PeakMeter(torch.device("cpu"))
run = {
    "none": impl.naive,
    "sdp": impl.sdp,
    "sdp-math": lambda q, k, v: impl.sdp_variant(q, k, v, "math"),
    "split": impl.split,
    "sub-quad": impl.sub_quad,
}
peaks = []
for backend, (bh, nq, nk, d), dtype_name, kwargs in json.loads(sys.argv[1]):
    dtype = getattr(torch, dtype_name)
    q, k, v = (torch.randn(bh, n, d).to(dtype) for n in (nq, nk, nk))
    run[backend](q, k, v, **kwargs)  # warm-up: kernels and thread pools resident first
    peaks.append(meter.measure(lambda: run[backend](q, k, v, **kwargs)))
    del q, k, v
print(json.dumps({"method": meter.method, "threads": torch.get_num_threads(),
                  "pack": {n: impl.cpu_packs(getattr(torch, n)) for n in ("bfloat16", "float16", "float32")},
                  "peaks": peaks}))
"""


def _measure_peaks(cases: list[tuple[str, AttnShape, str, dict[str, Any]]]) -> dict[str, Any]:
    pytest.importorskip("torch")
    payload = json.dumps([(b, (s.bh, s.nq, s.nk, s.dim_head), dt, kw) for b, s, dt, kw in cases])
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, payload],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["method"] == "none":
        pytest.skip("peak memory is not measurable on this system")
    return result


def _assert_within(cases: list[tuple[str, AttnShape, str, dict[str, Any]]], tolerance: float = 0.15) -> None:
    result = _measure_peaks(cases)
    for (backend, shape, dtype_name, kwargs), measured in zip(cases, result["peaks"], strict=True):
        element = 4 if dtype_name == "float32" else 2
        name = backend.removesuffix("-math")  # "sdp-math": SDPA with its math kernel forced
        predicted = predict_peak_bytes(
            name,
            shape,
            kernel="math" if backend.endswith("-math") else None,
            dtype_bytes=element,
            device="cpu",
            threads=result["threads"],
            cpu_pack=result["pack"][dtype_name],
            **kwargs,
        )
        assert measured and measured > 0, (backend, shape)
        error = abs(predicted - measured) / measured
        assert error < tolerance, (backend, shape, dtype_name, predicted / MIB, measured / MIB)


@pytest.mark.parametrize("dtype_name", ["bfloat16", "float16"])
def test_reduced_precision_cpu_flash_matches_measured_peak(dtype_name: str) -> None:
    """The 2-byte CPU formulas against torch on this CPU, with or without AMX (impl.cpu_packs says which)."""
    _assert_within([("sdp", AttnShape("self", 16, 2048, 2048, 40), dtype_name, {})])


def test_formulas_match_measured_peaks_on_cpu() -> None:
    shape = AttnShape("self", 8, 1024, 1024, 40)  # 32 MiB of fp32 scores
    cross = AttnShape("cross", 8, 2048, 77, 80)
    big = AttnShape("self", 16, 2048, 2048, 40)
    _assert_within(
        [
            ("none", shape, "float32", {}),
            ("sdp-math", shape, "float32", {}),
            ("split", shape, "float32", {"steps": 4}),
            ("sub-quad", big, "float32", {"q_chunk": 1024, "chunk_threshold": 0}),
            ("sub-quad", cross, "float32", {"q_chunk": 512, "free_bytes": GIB}),
            ("sdp", cross, "float32", {}),
        ]
    )


def test_auto_without_limit_picks_fastest() -> None:
    # The Forge adapter's call: no memory known, sdp first.
    choice = choose_auto_attention([Attention.SPLIT, Attention.SDP], width=512, height=512, batch=1)
    assert choice.attention is Attention.SDP and "sdp" in choice.reason
    assert choose_auto_attention([Attention.SPLIT, Attention.SUB_QUAD]).attention is Attention.SUB_QUAD
    # the device's own speed table: on the CPU naive attention beats sub-quad (one matmul pair, no
    # chunk loop), on CUDA sub-quad is ahead
    assert choose_auto_attention([Attention.SUB_QUAD, Attention.NONE], device="cpu", dtype_bytes=4).attention is (
        Attention.NONE
    )
    assert choose_auto_attention([Attention.NONE, Attention.SUB_QUAD]).attention is Attention.SUB_QUAD
    # on the CPU sub-quad ranks ahead of split (which slows down a lot once it slices)
    assert choose_auto_attention([Attention.SPLIT, Attention.SUB_QUAD], device="cpu").attention is Attention.SUB_QUAD


def test_auto_picks_fastest_that_fits() -> None:
    available = [Attention.SDP_NO_MEM, Attention.SUB_QUAD, Attention.NONE]
    # fp32 on CUDA: sdp-no-mem is the math kernel, ~2.3 GiB at 512²; sub-quad slices to fit
    plenty = choose_auto_attention(available, dtype_bytes=4, free_mb=8000)
    assert plenty.attention is Attention.SDP_NO_MEM
    tight = choose_auto_attention(available, dtype_bytes=4, free_mb=2000)
    assert tight.attention is Attention.SUB_QUAD and "predicted to fit" in tight.reason


def test_auto_respects_budget() -> None:
    available = [Attention.SDP_NO_MEM, Attention.SUB_QUAD]
    choice = choose_auto_attention(available, dtype_bytes=4, free_mb=80_000, budget_mb=2000)
    assert choice.attention is Attention.SUB_QUAD
    assert "2000 MiB" in choice.reason


def test_auto_falls_back_to_most_frugal() -> None:
    choice = choose_auto_attention([Attention.SDP_NO_MEM, Attention.NONE], dtype_bytes=4, free_mb=10)
    assert choice.attention is Attention.NONE  # 2·S + O beats the math kernel's 2·S + S/4 + O
    assert "most frugal" in choice.reason


def test_auto_uses_measured_speed() -> None:
    choice = choose_auto_attention([Attention.SDP, Attention.SPLIT], speed={"split": 0.5})
    assert choice.attention is Attention.SPLIT


def test_auto_needs_a_backend() -> None:
    with pytest.raises(ValueError, match="allowed: host"):
        choose_auto_attention([Attention.HOST, Attention.AUTO])
