"""Kernels we call ourselves (registry Kernel bindings): SageAttention and FlashAttention-2 through stand-in
modules with the packages' exact signatures, the per-call constraints and their SDPA fallback, the availability
reasons, the glue on every host, ``bench --list-backends``, and a backend bound for one host only.

The stand-ins compute with SDPA, so what is checked is our side: the layout and arguments we call them with,
and that the numbers equal SDPA's.

- ``sageattention.sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False,
  **kwargs)``: thu-ml/SageAttention ``sageattention/core.py:79-88``; "HND" = (batch, heads, tokens, dim_head),
  "NHD" = (batch, tokens, heads, dim_head) (:96-107).
- ``flash_attn.flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
  softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)`` with (batch, seqlen, nheads,
  headdim) tensors: Dao-AILab/flash-attention ``flash_attn/flash_attn_interface.py:1156-1194``.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from test_host_forge import forge  # noqa: F401  (the Forge f2 fakes, docs/hosts.md §3.4, cited there)

from lib_optim.attention import Attention, Constraints, LdmPatchedFunctions, backend, for_host, register, unregister
from lib_optim.attention import kernels as glue
from lib_optim.attention.memory import lse_peak
from lib_optim.host_specs import HostKind
from lib_optim.settings import GenerationSettings, SettingsError, from_dict

ROOT = Path(__file__).resolve().parents[1]
B, H, N, D = 2, 3, 16, 8


def hnd(*, dtype: torch.dtype = torch.float32, d: int = D, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, N, d, generator=g).to(dtype) for _ in range(3))


def _sdpa_in(q: Any, k: Any, v: Any, layout: str, is_causal: bool, scale: Any) -> Any:
    if layout == "HND":
        return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, scale=scale)
    if layout == "NHD":
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=is_causal, scale=scale
        )
        return out.transpose(1, 2)
    raise ValueError(layout)


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, tuple, dict]]]:
    """``sageattention`` and ``flash_attn`` in sys.modules with the kernels' signatures (module doc), computing
    with SDPA; every call is recorded (function, shapes, arguments)."""
    calls: list[tuple[str, tuple, dict]] = []

    def sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs):
        calls.append(("sageattn", tuple(q.shape), {"tensor_layout": tensor_layout, "is_causal": is_causal, **kwargs}))
        return _sdpa_in(q, k, v, tensor_layout, is_causal, sm_scale)

    def flash_attn_func(
        q,
        k,
        v,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
    ):
        calls.append(("flash_attn_func", tuple(q.shape), {"dropout_p": dropout_p, "causal": causal}))
        return _sdpa_in(q, k, v, "NHD", causal, softmax_scale)  # (batch, seqlen, nheads, headdim) in and out

    sage = types.ModuleType("sageattention")
    sage.sageattn = sageattn  # type: ignore[attr-defined]
    flash = types.ModuleType("flash_attn")
    flash.flash_attn_func = flash_attn_func  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sageattention", sage)
    monkeypatch.setitem(sys.modules, "flash_attn", flash)
    glue.forget_told()
    yield calls
    glue.forget_told()


@pytest.fixture
def cpu_kernel(stand_ins: list) -> Iterator[Attention]:
    """SageAttention's kernel with its constraints but the device one (this machine has no GPU), as a backend."""
    sage = backend(Attention.SAGE).constraints
    assert sage is not None
    name = register(
        "test-sage-cpu",
        "sage on the CPU (test)",
        memory=lse_peak,
        speed={"cpu": 0.1, "cuda": 0.1},
        kernel="lib_optim.attention.kernels:sage",
        constraints=Constraints(dtypes=(*sage.dtypes, "float32"), max_head_dim=sage.max_head_dim, masks=False),
    )
    try:
        yield name
    finally:
        unregister(name)


# --- the kernels: layout, arguments, numbers ---------------------------------------------------------------------


def test_sage_is_called_in_hnd_layout_and_equals_sdpa(stand_ins: list) -> None:
    q, k, v = hnd()
    out = glue.sage(q, k, v)
    assert stand_ins == [("sageattn", (B, H, N, D), {"tensor_layout": "HND", "is_causal": False})]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


def test_flash_is_called_in_bshd_layout_and_equals_sdpa(stand_ins: list) -> None:
    q, k, v = hnd()
    out = glue.flash(q, k, v)
    assert stand_ins == [("flash_attn_func", (B, N, H, D), {"dropout_p": 0.0, "causal": False})]
    assert out.shape == (B, H, N, D)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("name", [Attention.SAGE, Attention.FLASH])
def test_real_packages_when_installed_match_sdpa(name: Attention) -> None:
    reason = backend(name).unavailable_reason("cuda")
    if reason:
        pytest.skip(reason)  # this machine: not installed, no GPU
    q, k, v = (t.cuda().half() for t in hnd(d=64))
    out = glue.GuardedKernel(name)(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=3e-2, rtol=3e-2)


# --- constraints before every call -----------------------------------------------------------------------------------


def fallback_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "SDPA for calls" in r.getMessage()]


def test_a_call_the_kernel_cannot_take_runs_sdpa_with_one_line(
    cpu_kernel: Attention, stand_ins: list, caplog: pytest.LogCaptureFixture
) -> None:
    guard = glue.GuardedKernel(cpu_kernel)
    caplog.set_level(logging.INFO, logger="lib_optim")
    q, k, v = hnd(d=160)  # sage: head dim ≤ 128
    for _ in range(3):
        torch.testing.assert_close(guard(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert stand_ins == []
    assert fallback_lines(caplog) == ["[Optim] attention test-sage-cpu: SDPA for calls with head dim 160 > 128"]
    q, k, v = hnd()
    mask = torch.zeros(B, H, N, N).masked_fill_(
        torch.rand(B, H, N, N, generator=torch.Generator().manual_seed(1)) > 0.7, -1e4
    )
    torch.testing.assert_close(guard(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    torch.testing.assert_close(guard(q, k, v), F.scaled_dot_product_attention(q, k, v))  # this one it takes
    assert [c[0] for c in stand_ins] == ["sageattn"]
    assert len(fallback_lines(caplog)) == 2 and "attention mask" in fallback_lines(caplog)[1]


@pytest.mark.parametrize("name", [Attention.SAGE, Attention.FLASH])
def test_the_registered_kernels_refuse_cpu_and_fp32_calls(
    name: Attention, stand_ins: list, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="lib_optim")
    guard = glue.GuardedKernel(name)
    q, k, v = hnd()
    torch.testing.assert_close(guard(q, k, v), F.scaled_dot_product_attention(q, k, v))
    q, k, v = hnd(dtype=torch.float16)
    torch.testing.assert_close(guard(q, k, v), F.scaled_dot_product_attention(q, k, v))
    assert stand_ins == []
    lines = fallback_lines(caplog)
    assert len(lines) == 2 and "dtype float32" in lines[0] and "device cpu" in lines[1]


def test_constraints_name_what_is_wrong() -> None:
    c = backend(Attention.FLASH).constraints
    assert c is not None
    meta = torch.empty(1, 2, 4, 300, device="meta", dtype=torch.float16)
    assert c.violation(meta, meta, meta) == "head dim 300 > 256"
    ok = torch.empty(1, 2, 4, 64, device="meta", dtype=torch.bfloat16)
    assert c.violation(ok, ok, ok) == "device meta (it takes cuda)"
    long = Constraints(max_tokens=3)
    assert long.violation(ok, ok, ok) == "sequence length 4 > 3"


# --- availability names the fix ---------------------------------------------------------------------------------------


def test_availability_here_names_the_fix() -> None:
    if "sageattention" in sys.modules or "flash_attn" in sys.modules:
        pytest.skip("a package is importable here")
    sage = backend(Attention.SAGE).unavailable_reason("cuda")
    flash = backend(Attention.FLASH).unavailable_reason("cpu")
    assert "pip install sageattention" in sage
    assert "pip install flash-attn --no-build-isolation" in flash and "needs a CUDA GPU" in flash


def test_availability_names_the_compute_capability(stand_ins: list, monkeypatch: pytest.MonkeyPatch) -> None:
    assert backend(Attention.SAGE).unavailable_reason("cpu") == "needs a CUDA GPU"  # it imports now
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (7, 5))
    assert backend(Attention.FLASH).unavailable_reason("cuda") == (
        "needs CUDA compute capability ≥ 8.0 (this GPU has 7.5)"
    )
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 6))
    assert backend(Attention.SAGE).unavailable_reason("cuda") == ""


# --- the hosts' call sites ------------------------------------------------------------------------------------------


def test_forge_and_ldm_patched_call_layout(cpu_kernel: Attention, stand_ins: list) -> None:
    """attention_pytorch(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False) takes and returns
    (batch, tokens, heads·dim_head) (Forge backend/attention.py:324-339, reForge attention.py:482-506)."""
    fn = glue.host_attention_function(cpu_kernel)
    q, k, v = hnd()
    flat = [t.transpose(1, 2).reshape(B, N, H * D) for t in (q, k, v)]
    want = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, H * D)
    torch.testing.assert_close(fn(*flat, H), want)
    assert stand_ins[-1] == ("sageattn", (B, H, N, D), {"tensor_layout": "HND", "is_causal": False})
    torch.testing.assert_close(
        fn(q, k, v, H, skip_reshape=True, skip_output_reshape=True), F.scaled_dot_product_attention(q, k, v)
    )
    mask = torch.zeros(N, N)
    mask[:, -3:] = -1e4
    torch.testing.assert_close(
        fn(*flat, H, mask=mask),
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(B, N, H * D),
    )
    assert len(stand_ins) == 2  # the masked call ran SDPA
    assert fn.__name__ == "attention_test_sage_cpu"


def test_a1111_sdpa_with_the_kernel_inside(cpu_kernel: Attention, stand_ins: list) -> None:
    """A1111's sdp forward calls SDPA(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False) on (batch, heads,
    tokens, dim_head) (modules/sd_hijack_optimizations.py:524-537): those go to the kernel, others do not."""
    wrapped = glue.sdpa_with_kernel(cpu_kernel)
    q, k, v = hnd()
    torch.testing.assert_close(
        wrapped(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False), F.scaled_dot_product_attention(q, k, v)
    )
    assert len(stand_ins) == 1
    torch.testing.assert_close(
        wrapped(q, k, v, is_causal=True), F.scaled_dot_product_attention(q, k, v, is_causal=True)
    )
    torch.testing.assert_close(wrapped(q, k, v, scale=0.5), F.scaled_dot_product_attention(q, k, v, scale=0.5))
    assert len(stand_ins) == 1


def test_forge_adapter_rebinds_the_kernel_and_restores(cpu_kernel: Attention, forge: Any) -> None:  # noqa: F811
    before = forge.attn.attention_function
    vae_before = forge.attn.attention_function_single_head_spatial
    assert cpu_kernel in forge.adapter.available_attention()
    session = forge.adapter.begin(forge.p, GenerationSettings(enabled=True, attention=cpu_kernel))
    ours = forge.attn.attention_function
    assert ours.__name__ == "attention_test_sage_cpu" and forge.unet_nn.attention_function is ours
    assert forge.attn.attention_function_single_head_spatial is vae_before  # the VAE keeps the host's
    assert session.attention_used == cpu_kernel.value
    session.restorer.close()
    assert forge.attn.attention_function is before


def test_ldm_patched_adapter_rebinds_the_kernel_and_restores(
    cpu_kernel: Attention, monkeypatch: pytest.MonkeyPatch
) -> None:
    from test_host_ldm_patched import build_host  # docs/hosts.md §3.5, §3.6 fakes, cited there

    host = build_host(monkeypatch, HostKind.REFORGE)
    before = host.attn.optimized_attention
    blocks = [vars(m).get("optimized_attention") for m in host.vae.first_stage_model.modules()]
    assert cpu_kernel in host.adapter.available_attention()
    session = host.adapter.begin(host.p, GenerationSettings(enabled=True, attention=cpu_kernel))
    ours = host.attn.optimized_attention
    assert ours.__name__ == "attention_test_sage_cpu" and host.attn.optimized_attention_masked is ours
    assert all(vars(m)["optimized_attention"] is ours for m in host.copies.values() if "optimized_attention" in vars(m))
    assert [vars(m).get("optimized_attention") for m in host.vae.first_stage_model.modules()] == blocks
    session.restorer.close()
    assert host.attn.optimized_attention is before


def test_a1111_adapter_wraps_sdpa_only_inside_the_generation(cpu_kernel: Attention) -> None:
    from test_host_a1111 import FakeA1111, make_p  # modules/sd_hijack.py fakes, cited there

    from lib_optim.hosts.a1111 import A1111Adapter

    world = FakeA1111()
    world.startup()
    adapter = A1111Adapter(modules=world.modules())
    assert cpu_kernel in adapter.available_attention()
    original = torch.nn.functional.scaled_dot_product_attention
    session = adapter.begin(make_p(world), GenerationSettings(enabled=True, attention=cpu_kernel))
    try:
        assert world.shared.opts.data["cross_attention_optimization"] == "sdp - scaled dot product"
        assert getattr(torch.nn.functional.scaled_dot_product_attention, "optim_kernel", None) == cpu_kernel.value
        assert session.attention_used == cpu_kernel.value
    finally:
        session.restorer.close()
    assert torch.nn.functional.scaled_dot_product_attention is original


# --- one host only ------------------------------------------------------------------------------------


@pytest.fixture
def reforge_only() -> Iterator[Attention]:
    name = register(
        "reforge-only",
        "a backend only reForge has (test)",
        memory=lse_peak,
        speed={"cpu": 2.0, "cuda": 2.0},
        bindings={HostKind.REFORGE: LdmPatchedFunctions("attention_split", "normal_attention", None)},
    )
    try:
        yield name
    finally:
        unregister(name)


def test_a_backend_bound_for_reforge_only(reforge_only: Attention, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_host_a1111 import FakeA1111
    from test_host_ldm_patched import build_host

    from lib_optim.hosts.a1111 import A1111Adapter

    assert backend(reforge_only).hosts() == (HostKind.REFORGE,)
    assert for_host(HostKind.REFORGE)[-1] is reforge_only and reforge_only not in for_host(HostKind.FORGE_PREVIOUS)
    reforge = build_host(monkeypatch, HostKind.REFORGE)
    assert reforge_only in reforge.adapter.available_attention()
    session = reforge.adapter.begin(reforge.p, GenerationSettings(enabled=True, attention=reforge_only))
    assert reforge.attn.optimized_attention is reforge.attn.attention_split
    session.restorer.close()
    assert from_dict({"attention": "reforge-only"}, HostKind.REFORGE).attention is reforge_only
    with pytest.raises(SettingsError, match="bound only for reForge, not for AUTOMATIC1111"):
        from_dict({"attention": "reforge-only"}, HostKind.A1111)
    with pytest.raises(SettingsError, match="bound only for reForge"):
        from_dict({"attention": "reforge-only"}, HostKind.FORGE_PREVIOUS)
    previous = build_host(monkeypatch, HostKind.FORGE_PREVIOUS)
    assert reforge_only not in {b.attention for b in previous.adapter.attention_backends()}
    world = FakeA1111()
    world.startup()
    assert reforge_only not in {b.attention for b in A1111Adapter(modules=world.modules()).attention_backends()}


# --- bench --list-backends ----------------------------------------------------------------------------


def test_bench_lists_every_backend_with_why_and_the_fix() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "lib_optim", "bench", "--list-backends", "--json"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    listed = {b["name"]: b for b in json.loads(run.stdout)["backends"]}
    assert set(listed) == {b.value for b in Attention if not backend(b).is_choice}
    assert listed["sdp"]["available"] and listed["sdp"]["hosts"]["reforge"] == "host"
    if json.loads(run.stdout)["device"] == "cpu":
        for name, fix in (("sage", "pip install sageattention"), ("flash", "pip install flash-attn")):
            assert not listed[name]["available"]
            assert fix in listed[name]["reason"] and "CUDA GPU" in listed[name]["reason"]
            assert set(listed[name]["hosts"].values()) == {"kernel"}
    text = subprocess.run(
        [sys.executable, "-m", "lib_optim", "bench", "--list-backends"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    ).stdout
    assert "sage" in text and "flash" in text


def test_auto_never_trades_sdpa_for_an_unmeasured_kernel() -> None:
    # sage and flash carry no speed figure until measured on a GPU: auto keeps SDPA where both fit
    from lib_optim.attention import Attention, choose_auto_attention

    choice = choose_auto_attention([Attention.SAGE, Attention.FLASH, Attention.SDP], device="cuda")
    assert choice.attention is Attention.SDP
