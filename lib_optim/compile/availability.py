"""Whether regional compile can work on a device, and a compile failure told in one line that names the fix."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from typing import Any

from lib_optim.compile.blocks import _INDUCTOR_MODES, MIN_TORCH, _check_mode, torch_version
from lib_optim.compile.dynamo import TRAMPOLINE_PREFIX, _fresh_function
from lib_optim.log import get_logger

log = get_logger(__name__)

_COMPILERS_POSIX = ("g++", "c++", "clang++")
_SMOKE_RESULTS: dict[tuple[str, str, str], tuple[bool, str]] = {}


def compile_availability(
    device: Any,
    *,
    mode: str = "on",
    backend: str = "inductor",
    smoke_test: bool = False,
    which: Callable[[str], str | None] = shutil.which,
    environ: Mapping[str, str] | None = None,
    platform: str | None = None,
) -> tuple[bool, str]:
    """Whether regional compile can work for ``device``; when not, a reason that names the fix.

    Cheap checks only (torch version, platform, device type, compiler/triton present), unless
    ``smoke_test``: then a tiny function is really compiled and run on the device (a few seconds, once
    per process per device/backend/mode). ``which``/``environ``/``platform`` are injectable for tests.
    """
    _check_mode(mode)
    env = os.environ if environ is None else environ
    plat = sys.platform if platform is None else platform
    try:
        import torch
    except ImportError:
        return False, "torch is not installed"
    version = torch_version(str(torch.__version__))
    if version < MIN_TORCH or not hasattr(torch, "compile"):
        return False, f"torch >= 2.1 needed for torch.compile (found {torch.__version__}); upgrade torch"
    try:
        from torch._dynamo import eval_frame

        check = getattr(eval_frame, "check_if_dynamo_supported", None)
        if check is not None:
            check()
    except Exception as exc:  # the message is torch's own reason (Windows on 2.1, Python 3.12 before 2.4)
        log.debug("dynamo unsupported here", exc_info=True)
        return False, f"torch.compile is not supported here by torch {torch.__version__}: {exc}; upgrade torch"
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        return False, f"unknown device {device!r}: {exc}"
    if backend != "inductor":
        return True, ""  # the test backends (eager, aot_eager) generate no code
    kind = dev.type
    if kind in ("mps", "privateuseone"):
        return False, "not supported on DirectML/MPS: torch.compile's inductor has no code generator for this device"
    if kind == "cpu":
        if plat == "win32" and version < (2, 5):
            return False, "inductor's CPU backend on Windows needs torch >= 2.5 and the MSVC Build Tools (cl.exe)"
        if not _cxx_compiler(env, plat, which):
            if plat == "win32":
                return False, "install the MSVC Build Tools (cl.exe) and start from a Developer prompt, or set CXX"
            return False, "install a C++ compiler (gcc/clang) or set CXX"
    elif kind in ("cuda", "xpu"):
        if importlib.util.find_spec("triton") is None:
            hint = "pip install triton-windows" if plat == "win32" else "pip install triton"
            return False, f"install triton ({hint}); inductor generates its {kind.upper()} kernels with it"
        if kind == "cuda" and getattr(torch.version, "hip", None) is None and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(dev)
            if major < 7:
                return False, (
                    f"this GPU (compute capability {major}.{minor}) is too old for triton, which needs 7.0 or newer"
                )
    else:
        return False, f"torch.compile's inductor has no code generator for device type {kind!r}"
    if smoke_test:
        return _smoke_test(dev, mode, backend)
    return True, ""


def _cxx_compiler(env: Mapping[str, str], plat: str, which: Callable[[str], str | None]) -> str | None:
    configured = env.get("CXX")
    if configured:
        return which(configured) or (configured if os.path.isfile(configured) else None)
    names = ("cl",) if plat == "win32" else _COMPILERS_POSIX
    for name in names:
        found = which(name)
        if found:
            return found
    return None


def _smoke_test(dev: Any, mode: str, backend: str) -> tuple[bool, str]:
    cache_key = (str(dev), mode, backend)
    if cache_key in _SMOKE_RESULTS:
        return _SMOKE_RESULTS[cache_key]
    import torch

    def probe(x: Any) -> Any:
        return torch.nn.functional.silu(x) * 2 + 1

    kwargs: dict[str, Any] = {"backend": backend}
    if backend == "inductor" and _INDUCTOR_MODES.get(mode):
        kwargs["mode"] = _INDUCTOR_MODES[mode]
    try:
        compiled = torch.compile(_fresh_function(probe, TRAMPOLINE_PREFIX + "probe"), **kwargs)
        x = torch.linspace(-2, 2, 16, device=dev)
        ok = bool(torch.allclose(compiled(x), probe(x), atol=1e-5))
        result = (True, "") if ok else (False, "a compiled test function gave wrong results")
    except Exception as exc:  # any failure here is the answer the probe exists to give
        log.debug("torch.compile smoke test failed", exc_info=True)
        result = (False, describe_compile_error(exc))
    _SMOKE_RESULTS[cache_key] = result
    return result


def describe_compile_error(exc: BaseException) -> str:
    """A one-line reason for a compile failure, naming the fix when it is a known cause."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain and len(chain) < 16:
        chain.append(current)
        current = current.__cause__ or current.__context__
    names = {type(e).__name__ for e in chain}
    text = " ".join(str(e) for e in chain).lower()
    if "InvalidCxxCompiler" in names or "no working c++ compiler" in text or ("cxx" in text and "not found" in text):
        return "no working C++ compiler: install a C++ compiler (gcc/clang) or set CXX"
    if "python.h" in text:
        return "the Python development headers are missing: install python3-dev (or your distribution's equivalent)"
    if "CppCompileError" in names or "c++ compile error" in text:
        return "the C++ compiler failed on inductor's code: update gcc/clang or set CXX to a working one"
    if "triton" in text and ("cannot find" in text or "no module" in text or "install" in text or "not found" in text):
        return "install triton (pip install triton; on Windows triton-windows)"
    if "compute capability" in text and "triton" in text:
        return "this GPU is too old for triton (needs compute capability 7.0 or newer)"
    first = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__
