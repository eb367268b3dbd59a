"""Kernels we call ourselves (the registry's :class:`~lib_optim.attention.registry.Kernel` bindings), and the glue
that puts one in place of a host's attention function.

A kernel is a callable ``(q, k, v, mask=None) -> out`` in SDPA's layout, ``(batch, heads, tokens, dim_head)``.
:class:`GuardedKernel` checks its entry's :class:`~lib_optim.attention.registry.Constraints` before every call
and runs SDPA for a call the kernel cannot take (a VAE's 512-wide head, an fp32 upcast, a mask), saying so once
per reason. The host glue adapts it to each host's call site:

- Forge f2 and ldm_patched (Forge previous, reForge): :func:`host_attention_function` has the signature of the
  host's ``attention_pytorch`` — ``(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False)``,
  Forge f2 ``backend/attention.py:324``, reForge ``ldm_patched/ldm/modules/attention.py:482`` (which adds
  ``skip_output_reshape``) — and is rebound where the adapters rebind the host's own functions
  (docs/hosts.md §3.4-§3.6).
- A1111: its sdp optimizer calls ``torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask,
  dropout_p=0.0, is_causal=False)`` with ``(batch, heads, tokens, dim_head)`` tensors, looked up at call time
  (``modules/sd_hijack_optimizations.py:524-537``, v1.10.1); :func:`sdpa_with_kernel` is that function with the
  kernel inside, installed by the adapter for the generation only, while the sdp optimizer is active.

The kernels' signatures, from their sources:

- SageAttention ``sageattention/core.py:79-88`` (thu-ml/SageAttention d1a57a5):
  ``sageattn(q, k, v, tensor_layout="HND", is_causal=False, sm_scale=None, return_lse=False, **kwargs)``,
  "HND" = ``(batch, heads, tokens, dim_head)``.
- FlashAttention-2 ``flash_attn/flash_attn_interface.py:1156-1168`` (Dao-AILab/flash-attention 0251105):
  ``flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
  softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False)`` with
  ``(batch, tokens, heads, dim_head)`` tensors (:1192-1194).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from lib_optim.attention import registry
from lib_optim.attention.registry import Attention, Constraints
from lib_optim.log import get_logger

log = get_logger(__name__)

_TOLD: set[tuple[str, str]] = set()  # (backend, reason) already said: one line per reason per process
_TOLD_LOCK = threading.Lock()

SAGE_INSTALL = "pip install sageattention"
FLASH_INSTALL = "pip install flash-attn --no-build-isolation"


# --- the kernels -------------------------------------------------------------------------------------------------


def sage(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """SageAttention on ``(batch, heads, tokens, dim_head)`` tensors ("HND", its default layout)."""
    if mask is not None:
        raise ValueError("[Optim] attention sage: sageattn takes no attention mask")
    from sageattention import sageattn

    return sageattn(q, k, v, tensor_layout="HND", is_causal=False)


def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """FlashAttention-2 on ``(batch, heads, tokens, dim_head)`` tensors: flash_attn_func wants
    ``(batch, tokens, heads, dim_head)``, so the heads and tokens axes swap on the way in and out (views)."""
    if mask is not None:
        raise ValueError("[Optim] attention flash: flash_attn_func takes no attention mask")
    from flash_attn import flash_attn_func

    out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=0.0, causal=False)
    return out.transpose(1, 2)


def _unavailable(package: str, function: str, install: str, device: str, minimum: tuple[int, int]) -> str:
    """Why ``package.function`` cannot run on ``device`` ("" when it can), each reason with its fix."""
    reasons = []
    try:
        module = importlib.import_module(package)
        if not callable(getattr(module, function, None)):
            reasons.append(f"{package} has no {function} (an old or broken build); {install} --upgrade")
    except ModuleNotFoundError:
        reasons.append(f"{package} is not installed: {install}")
    except Exception as exc:  # noqa: BLE001 - a build that does not match torch raises anything at import
        reasons.append(
            f"{package} does not import ({type(exc).__name__}: {exc}); reinstall it for this torch: {install}"
        )
    if device != "cuda":
        reasons.append("needs a CUDA GPU")
    elif not torch.cuda.is_available():
        reasons.append("needs a CUDA GPU (torch sees none)")
    else:
        have = tuple(torch.cuda.get_device_capability())
        if have < minimum:
            reasons.append(
                f"needs CUDA compute capability ≥ {minimum[0]}.{minimum[1]} (this GPU has {have[0]}.{have[1]})"
            )
    return "; ".join(reasons)


def _minimum(name: Attention) -> tuple[int, int]:
    constraints = registry.backend(name).constraints
    return (constraints.min_compute_capability if constraints else None) or (0, 0)


def sage_unavailable_reason(device: str) -> str:
    return _unavailable("sageattention", "sageattn", SAGE_INSTALL, device, _minimum(Attention.SAGE))


def flash_unavailable_reason(device: str) -> str:
    return _unavailable("flash_attn", "flash_attn_func", FLASH_INSTALL, device, _minimum(Attention.FLASH))


# --- every call checked ------------------------------------------------------------------------------------------


class GuardedKernel:
    """The backend ``name``'s kernel, ``(q, k, v, mask=None)`` in ``(batch, heads, tokens, dim_head)``: a call its
    constraints rule out runs ``sdpa`` instead (the real SDPA, captured before anything wraps it), with one
    ``[Optim]`` line per reason."""

    def __init__(self, name: Attention | str, sdpa: Callable[..., torch.Tensor] | None = None) -> None:
        entry = registry.backend(name)
        kernel = entry.kernel_fn()
        if kernel is None:
            raise ValueError(f"[Optim] attention: {entry.name.value!r} is not a kernel we call")
        self.name = entry.name
        self.kernel: Callable[..., torch.Tensor] = kernel
        self.constraints = entry.constraints or Constraints()
        self.sdpa = sdpa if sdpa is not None else F.scaled_dot_product_attention

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        why = self.constraints.violation(q, k, v, mask)
        if not why:
            return self.kernel(q, k, v, mask)
        self._tell(why)
        return self.sdpa(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)

    def _tell(self, why: str) -> None:
        key = (self.name.value, why)
        with _TOLD_LOCK:
            if key in _TOLD:
                return
            _TOLD.add(key)
        log.info("[Optim] attention %s: SDPA for calls with %s", self.name.value, why)


def forget_told() -> None:
    """Say every fallback reason again (tests)."""
    with _TOLD_LOCK:
        _TOLD.clear()


# --- the host call sites ------------------------------------------------------------------------------------------


def host_attention_function(name: Attention | str) -> Callable[..., torch.Tensor]:
    """The kernel with the signature and layouts of Forge f2's / ldm_patched's ``attention_pytorch``: q, k, v as
    ``(batch, tokens, heads·dim_head)`` (or ``(batch, heads, tokens, dim_head)`` with ``skip_reshape``), out as
    ``(batch, tokens, heads·dim_head)`` (or heads-first with ``skip_output_reshape``); a 2-D or 3-D mask gets
    the batch and heads axes SDPA broadcasts over (reForge ``attention.py:493-499``)."""
    guard = GuardedKernel(name)

    def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        heads: int,
        mask: torch.Tensor | None = None,
        attn_precision: Any = None,
        skip_reshape: bool = False,
        skip_output_reshape: bool = False,
        **_kwargs: Any,
    ) -> torch.Tensor:
        if skip_reshape:
            b, _, _, dim_head = q.shape
        else:
            b, _, width = q.shape
            dim_head = width // heads
            q, k, v = (t.view(b, -1, heads, dim_head).transpose(1, 2) for t in (q, k, v))
        if mask is not None and mask.ndim == 2:
            mask = mask.unsqueeze(0)
        if mask is not None and mask.ndim == 3:
            mask = mask.unsqueeze(1)
        out = guard(q, k, v, mask)
        return out if skip_output_reshape else out.transpose(1, 2).reshape(b, -1, heads * dim_head)

    attention.__name__ = attention.__qualname__ = f"attention_{guard.name.value.replace('-', '_')}"
    return attention


def sdpa_with_kernel(name: Attention | str, sdpa: Callable[..., torch.Tensor] | None = None) -> Callable[..., Any]:
    """``torch.nn.functional.scaled_dot_product_attention`` with the kernel inside: calls as A1111's sdp optimizer
    makes them (4-D, no dropout, not causal, default scale) go to the kernel; any other call to ``sdpa``."""
    original = sdpa if sdpa is not None else F.scaled_dot_product_attention
    guard = GuardedKernel(name, original)

    def scaled_dot_product_attention(
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        if args or kwargs or dropout_p or is_causal or query.dim() != 4:
            return original(query, key, value, attn_mask, dropout_p, is_causal, *args, **kwargs)
        return guard(query, key, value, attn_mask)

    scaled_dot_product_attention.optim_kernel = guard.name.value  # type: ignore[attr-defined]
    return scaled_dot_product_attention


# --- the command-line bench: (batch·heads, tokens, dim_head) like lib_optim.attention.impl ----------------------


def _bench(name: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return GuardedKernel(name)(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)).squeeze(0)


def sage_bench(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _bench(Attention.SAGE, q, k, v)


def flash_bench(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return _bench(Attention.FLASH, q, k, v)
