#!/usr/bin/env python3
"""Generate lib_optim/launch/envtables.py: which environment variables are read, by what, and where.

The checker's question "does anything read this variable?" is answered from sources, not from a list of
examples.  Only names in the checked families (``TORCH_``, ``PYTORCH_``, ``CUDA_``, ``CUDNN_``, ``NVIDIA_``,
``NCCL_``, ``MALLOC_``, ``XFORMERS_``) are recorded for torch and the documented lists; the hosts' own reads
are recorded whatever their name.

How each source is read (nothing is imported or executed):

* **torch**, from installed wheels (``site-packages/torch``):

  - its Python files, parsed with ``ast``: ``os.environ.get("X")``, ``os.getenv("X")``, ``environ.get``,
    ``os.environ["X"]``, ``"X" in os.environ``, a name bound to a string literal in the same module
    (``LOG_ENV_VAR = "TORCH_LOGS"`` … ``os.environ.get(LOG_ENV_VAR)``), a call of a helper whose name contains
    ``env`` with the name as first argument (``_get_env("X")``, ``parse_debug_env("X")``; not ``set_env``), and
    the keywords ``env_name_default=`` / ``env_name_force=`` of torch's config modules.  An f-string whose
    literal start is in a family (``os.environ.get(f"TORCH_NCCL_{x}")``) is recorded as a prefix pattern.
    A literal default (``os.environ.get("X", "0")``) is kept: it is the value the reader uses when X is unset.
  - its shared libraries (``torch/lib/*.so*``): every NUL-terminated string in the ``.rodata`` section that
    is a whole family name.  C++ reads its variables with ``getenv("X")`` / ``c10::utils::check_env("X")`` /
    ``c10::utils::get_env("X")``, whose argument is such a string, but a string in a binary is only *present in
    the binary*: the method cannot see the call.  Names that are known not to be variables (cuDNN enumerator
    names torch prints, build macros: :data:`NOT_VARIABLES`) are left out.  A library whose linker merged a
    name into the tail of a longer string is not seen.
  - A CPU-only wheel has no CUDA libraries: for it only the absence of a *Python* read is evidence
    (``TORCH_SOURCES[...]["cuda_libraries"]`` says which wheels had them).

* **xformers**: no host venv has it installed, so its Python files are read the same way from the
  facebookresearch/xformers git mirror at the tags the hosts install (A1111 and Forge previous:
  ``xformers==0.0.23.post1``; Forge f2: ``0.0.27``; reForge installs the newest: the newest tag here).
* **the hosts**: every ``*.py`` file of each host at the revisions of tools/gen_flagtables.py, read the same
  way (no family filter), plus ``$NAME`` / ``${NAME`` in ``webui.sh`` and ``webui-macos-env.sh`` and ``%NAME%``
  in ``webui.bat``.  Writes (``os.environ["X"] = …``, ``setdefault``, ``export X=``) are kept apart: a variable
  the host sets itself cannot be told from the user's inside the WebUI.
* **documented readers** outside torch (the CUDA driver and runtime, the NVIDIA Container Toolkit, cuDNN,
  NCCL, glibc's malloc, jemalloc, PyTorch's macOS- and ROCm-only variables): hand-maintained lists below,
  each with its citation, and the documented default where the documentation gives one.

Usage::

    python tools/gen_envtables.py              # the default venvs, mirrors; writes the module
    python tools/gen_envtables.py --check      # exit 1 when the committed module differs (the date aside)
    python tools/gen_envtables.py --torch /path/to/site-packages/torch --torch ...   # other wheels
"""

from __future__ import annotations

import argparse
import ast
import datetime
import difflib
import glob
import json
import logging
import mmap
import os
import re
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("gen_envtables")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "lib_optim" / "launch" / "envtables.py"

FAMILIES = ("TORCH_", "PYTORCH_", "CUDA_", "CUDNN_", "NVIDIA_", "NCCL_", "MALLOC_", "XFORMERS_")
FAMILY_RE = re.compile(r"^(?:" + "|".join(f[:-1] for f in FAMILIES) + r")_[A-Z0-9_]+$")
ANY_NAME_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")

# The wheels the hosts install (lib_optim/host_specs/known.py default_torch) and the one CI tests with.
DEFAULT_TORCH = (
    "/work/hosts/a1111/venv/lib/python3*/site-packages/torch",  # 2.1.2: A1111 v1.10.1, Forge previous
    "/work/hosts/forge/venv/lib/python3*/site-packages/torch",  # 2.3.1: Forge f2
    "/work/hosts/reforge/venv/lib/python3*/site-packages/torch",  # 2.9.0: reForge
    "/work/main/.ci-venvs/main/lib/python3*/site-packages/torch",  # the current wheel (CPU build)
)

MIRROR_ROOT = Path("/work/.mirror")
XFORMERS_MIRROR = MIRROR_ROOT / "facebookresearch+xformers" / "repo"
# tag → the hosts that install it (modules/launch_utils.py XFORMERS_PACKAGE defaults)
XFORMERS_TAGS = {
    "v0.0.23.post1": "A1111 v1.10.1 modules/launch_utils.py:344, Forge previous :388",
    "v0.0.27": "Forge f2 modules/launch_utils.py:389",
    "v0.0.33": "the newest tag read: reForge installs the newest xformers, modules/launch_utils.py:396",
}
# host kind value → the xformers tag above that its launcher installs
XFORMERS_HOST_TAGS = {
    "a1111": "v0.0.23.post1",
    "forge": "v0.0.27",
    "forge-previous": "v0.0.23.post1",
    "reforge": "v0.0.33",
}
# host kind value → (git dir, revision); the same revisions as tools/gen_flagtables.py
HOST_SOURCES = {
    "a1111": (MIRROR_ROOT / "kklouzal+stable-diffusion-webui" / "repo", "v1.10.1"),
    "forge": (MIRROR_ROOT / "lllyasviel+stable-diffusion-webui-forge" / "repo", "main"),
    "forge-previous": (MIRROR_ROOT / "lllyasviel+stable-diffusion-webui-forge" / "repo", "previous"),
    "reforge": (MIRROR_ROOT / "Panchovix+stable-diffusion-webui-reForge" / "repo", "main"),
}
HOST_SHELL_FILES = ("webui.sh", "webui-macos-env.sh", "webui.bat")

# Whole family names found in torch's binaries that are not environment variables: cuDNN enumerator names
# (cudnn-frontend's to_string tables, compiled into libtorch_cuda.so), the TORCH_LIBRARY* registration macros
# and version macros printed by torch's build-configuration string.
NOT_VARIABLES = re.compile(
    r"^(?:CUDNN_(?:STATUS|DATA|POINTWISE|TENSOR|NUMERICAL_NOTE|BEHAVIOR_NOTE|ATTR|TYPE|BACKEND|HEUR|"
    r"REDUCE|RESAMPLE|NORM|PTR|KNOB|LAYOUT|SIGNAL|GENSTATS|RNG|BN_FINALIZE|CONVOLUTION|CROSS_CORRELATION|"
    r"DEFAULT_MATH|TENSOR_OP_MATH|FMA_MATH|NOT_PROPAGATE_NAN|PROPAGATE_NAN|SOFTMAX|RNN|LINEAR|BATCHNORM|"
    r"FWD_MODE|WGRAD_MODE|CTC|SEQDATA|LOSS|POOLING|ACTIVATION|OP_TENSOR|POINTWISE_MODE|FRACTION|DIM)_|"
    r"TORCH_LIBRARY(?:_FRAGMENT|_IMPL)?$|(?:TORCH|CUDA|CUDNN|NCCL)_VERSION(?:_[A-Z]+)?$|CUDA_R_|CUDA_C_|"
    r"CUDA_ERROR_|CUDA_SUCCESS$|NCCL_OP_|CUDA_ARRAY3D_)"
)

# --- documented readers ---------------------------------------------------------------------------------
# name → (reader, citation, documented default or None).  Entries ending in "*" are prefixes.  A default is
# given only where the cited page states it ("0 or 1 (default is 0)"): redundant-env relies on it.
_CUDA_GUIDE = "CUDA C++ Programming Guide, 'CUDA Environment Variables'"
_MPS_GUIDE = "NVIDIA Multi-Process Service guide, 'Environment Variables'"
_CTK = "NVIDIA Container Toolkit, 'Specialized Configurations with Docker' (read when a container is created)"
_CUDNN = "cuDNN documentation, 'Error Reporting and API Logging'"
_NCCL = "NCCL documentation, 'Environment Variables'"
_MALLOPT = "mallopt(3) and the glibc manual, 'Memory Allocation Tunables'"
_TORCH_MPS = "PyTorch documentation, 'MPS Environment Variables' (macOS wheels only)"
_TORCH_HIP = "PyTorch documentation, 'HIP (ROCm) semantics' (ROCm wheels only)"
_TORCH_CUDA = "PyTorch documentation, 'CUDA Environment Variables'"
_CUDA_WIN = "CUDA Installation Guide for Microsoft Windows"
_CUDA_IMAGES = "NVIDIA CUDA container images (nvidia/cuda Dockerfiles)"
DOCUMENTED: dict[str, tuple[str, str, str | None]] = {
    "CUDA_VISIBLE_DEVICES": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_MANAGED_FORCE_DEVICE_ALLOC": ("the CUDA driver", _CUDA_GUIDE, "0"),
    "CUDA_DEVICE_ORDER": ("the CUDA driver", _CUDA_GUIDE, "FASTEST_FIRST"),
    "CUDA_CACHE_DISABLE": ("the CUDA driver", _CUDA_GUIDE, "0"),
    "CUDA_CACHE_PATH": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_CACHE_MAXSIZE": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_FORCE_PTX_JIT": ("the CUDA driver", _CUDA_GUIDE, "0"),
    "CUDA_DISABLE_PTX_JIT": ("the CUDA driver", _CUDA_GUIDE, "0"),
    "CUDA_FORCE_JIT": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_DISABLE_JIT": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_LAUNCH_BLOCKING": ("the CUDA driver", _CUDA_GUIDE, "0"),
    "CUDA_DEVICE_MAX_CONNECTIONS": ("the CUDA driver", _CUDA_GUIDE, "8"),
    "CUDA_DEVICE_MAX_COPY_CONNECTIONS": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_AUTO_BOOST": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_SCALE_LAUNCH_QUEUES": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_GRAPHS_USE_NODE_PRIORITY": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_DEVICE_WAITS_ON_EXCEPTION": ("the CUDA driver", _CUDA_GUIDE, "0"),
    "CUDA_MODULE_LOADING": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_MODULE_DATA_LOADING": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_ENABLE_COREDUMP_ON_EXCEPTION": ("the CUDA driver", _CUDA_GUIDE, "0"),
    "CUDA_ENABLE_CPU_COREDUMP_ON_EXCEPTION": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_ENABLE_LIGHTWEIGHT_COREDUMP": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_ENABLE_USER_TRIGGERED_COREDUMP": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_COREDUMP_FILE": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_COREDUMP_PIPE": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_COREDUMP_SHOW_PROGRESS": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_COREDUMP_GENERATION_FLAGS": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_LOG_FILE": ("the CUDA driver", _CUDA_GUIDE, None),
    "CUDA_MPS_*": ("the CUDA driver (Multi-Process Service client)", _MPS_GUIDE, None),
    "NVIDIA_TF32_OVERRIDE": ("cuBLAS and cuDNN", "NVIDIA cuBLAS documentation, 'Tensor Core Usage' (TF32)", None),
    "NVIDIA_VISIBLE_DEVICES": ("the NVIDIA Container Toolkit", _CTK, None),
    "NVIDIA_DRIVER_CAPABILITIES": ("the NVIDIA Container Toolkit", _CTK, None),
    "NVIDIA_REQUIRE_*": ("the NVIDIA Container Toolkit", _CTK, None),
    "NVIDIA_DISABLE_REQUIRE": ("the NVIDIA Container Toolkit", _CTK, None),
    "NVIDIA_MIG_CONFIG_DEVICES": ("the NVIDIA Container Toolkit", _CTK, None),
    "NVIDIA_MIG_MONITOR_DEVICES": ("the NVIDIA Container Toolkit", _CTK, None),
    "CUDNN_LOGINFO_DBG": ("cuDNN 8", _CUDNN, None),
    "CUDNN_LOGWARN_DBG": ("cuDNN 8", _CUDNN, None),
    "CUDNN_LOGERR_DBG": ("cuDNN 8", _CUDNN, None),
    "CUDNN_LOGLEVEL_DBG": ("cuDNN 9", _CUDNN, None),
    "CUDNN_LOGDEST_DBG": ("cuDNN", _CUDNN, None),
    "CUDNN_CONV_WSCAP_DBG": ("cuDNN", _TORCH_CUDA, None),
    "CUDNN_ERRATA_JSON_FILE": ("cuDNN (cudnn-frontend)", _TORCH_CUDA, None),
    "CUDNN_FRONTEND_LOG_INFO": ("cudnn-frontend", "cudnn-frontend documentation, 'Logging'", None),
    "CUDNN_FRONTEND_LOG_FILE": ("cudnn-frontend", "cudnn-frontend documentation, 'Logging'", None),
    "NCCL_*": ("NCCL (multi-GPU communication; only torch.distributed starts it)", _NCCL, None),
    "MALLOC_ARENA_MAX": ("glibc malloc", _MALLOPT, None),
    "MALLOC_ARENA_TEST": ("glibc malloc", _MALLOPT, None),
    "MALLOC_CHECK_": ("glibc malloc (2.34+: only with libc_malloc_debug.so preloaded)", _MALLOPT, None),
    "MALLOC_MMAP_MAX_": ("glibc malloc", _MALLOPT, None),
    "MALLOC_MMAP_THRESHOLD_": ("glibc malloc", _MALLOPT, None),
    "MALLOC_PERTURB_": ("glibc malloc", _MALLOPT, "0"),
    "MALLOC_TOP_PAD_": ("glibc malloc", _MALLOPT, None),
    "MALLOC_TRIM_THRESHOLD_": ("glibc malloc", _MALLOPT, None),
    "MALLOC_TRACE": ("glibc mtrace(3), when the program calls mtrace()", "mtrace(3)", None),
    "MALLOC_CONF": ("jemalloc, when it is the allocator (LD_PRELOAD)", "jemalloc(3), 'TUNING'", None),
    "PYTORCH_ENABLE_MPS_FALLBACK": ("torch on macOS (MPS)", _TORCH_MPS, None),
    "PYTORCH_MPS_*": ("torch on macOS (MPS)", _TORCH_MPS, None),
    "PYTORCH_DEBUG_MPS_ALLOCATOR": ("torch on macOS (MPS)", _TORCH_MPS, None),
    "PYTORCH_HIP_ALLOC_CONF": ("torch ROCm builds", _TORCH_HIP, None),
    "PYTORCH_NO_HIP_MEMORY_CACHING": ("torch ROCm builds", _TORCH_HIP, None),
    # Not read by anything the WebUI runs, but set by installers and images rather than by users: a finding for
    # them would be noise in every such shell.
    "CUDA_PATH_V*": ("the CUDA Toolkit installer on Windows (one per installed version)", _CUDA_WIN, None),
    "CUDA_VERSION": ("a label the NVIDIA CUDA container images set", _CUDA_IMAGES, None),
    "NVIDIA_PRODUCT_NAME": ("a label the NVIDIA CUDA container images set", _CUDA_IMAGES, None),
    "NVIDIA_CUDA_END_OF_LIFE": ("a label the NVIDIA CUDA container images set", _CUDA_IMAGES, None),
    "PYTORCH_VERSION": ("a label the pytorch/pytorch container images set", "pytorch/pytorch Dockerfile", None),
}


# --- Python reads -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Read:
    name: str  # a variable, or a prefix ending in "*"
    where: str  # path:line
    default: str | None  # the literal default, when the read has one
    write: bool = False


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _is_environ(node: ast.AST) -> bool:
    return _dotted(node) in {"os.environ", "environ", "_os.environ"}


class _Scanner(ast.NodeVisitor):
    def __init__(self, path: str, accept: re.Pattern[str], constants: dict[str, str]):
        self.path = path
        self.accept = accept
        self.constants = constants
        self.out: list[Read] = []

    def _name(self, node: ast.AST | None) -> str | None:
        """The variable a read names: a string literal, or a name bound to one in this module."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        key = node.id if isinstance(node, ast.Name) else node.attr if isinstance(node, ast.Attribute) else None
        return self.constants.get(key) if key else None

    def _prefix(self, node: ast.AST | None) -> str | None:
        if isinstance(node, ast.JoinedStr) and node.values:
            first = node.values[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and len(node.values) > 1:
                return first.value
        return None

    def _add(self, node: ast.AST, arg: ast.AST | None, default: ast.AST | None = None, write: bool = False) -> None:
        line = getattr(arg, "lineno", None) or getattr(node, "lineno", 0)  # the name's own line
        name = self._name(arg)
        if name is not None and self.accept.match(name):
            value = default.value if isinstance(default, ast.Constant) and isinstance(default.value, str) else None
            self.out.append(Read(name, f"{self.path}:{line}", value, write))
            return
        prefix = self._prefix(arg)
        if prefix and any(prefix.startswith(f) for f in FAMILIES) and self.accept is FAMILY_RE:
            self.out.append(Read(prefix + "*", f"{self.path}:{line}", None, write))

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        dotted = _dotted(func)
        first = node.args[0] if node.args else None
        if isinstance(func, ast.Attribute) and _is_environ(func.value):
            if func.attr in ("get", "pop") and first is not None:
                self._add(node, first, node.args[1] if len(node.args) > 1 else None)
            elif func.attr == "setdefault" and first is not None:
                self._add(node, first, write=True)
            elif func.attr == "update":
                for arg in node.args:
                    if isinstance(arg, ast.Dict):
                        for key in arg.keys:
                            self._add(node, key, write=True)
        elif dotted in ("os.getenv", "getenv", "_os.getenv") and first is not None:
            self._add(node, first, node.args[1] if len(node.args) > 1 else None)
        elif dotted in ("os.putenv", "putenv") and first is not None:
            self._add(node, first, write=True)
        else:
            last = dotted.rsplit(".", 1)[-1].lower()
            if "env" in last and not last.lstrip("_").startswith(("set", "unset", "del")) and first is not None:
                self._add(node, first)
            for kw in node.keywords:
                if kw.arg in ("env_name_default", "env_name_force"):
                    items = kw.value.elts if isinstance(kw.value, (ast.List, ast.Tuple)) else [kw.value]
                    for item in items:
                        self._add(node, item)
        self.generic_visit(node)

    def visit_Subscript(self, node: ast.Subscript) -> None:
        if _is_environ(node.value):
            self._add(node, node.slice, write=isinstance(node.ctx, ast.Store))
        self.generic_visit(node)

    def visit_Compare(self, node: ast.Compare) -> None:
        if len(node.ops) == 1 and isinstance(node.ops[0], (ast.In, ast.NotIn)) and _is_environ(node.comparators[0]):
            self._add(node, node.left)
        self.generic_visit(node)


def _constants(tree: ast.AST, accept: re.Pattern[str]) -> dict[str, str]:
    """Names bound to a string literal that could be a variable (module, class or function level)."""
    out: dict[str, str] = {}
    for node in ast.walk(tree):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        else:
            continue
        if isinstance(value, ast.Constant) and isinstance(value.value, str) and accept.match(value.value):
            for target in targets:
                key = target.id if isinstance(target, ast.Name) else getattr(target, "attr", None)
                if key:
                    out[key] = value.value
    return out


def scan_python(text: str, path: str, accept: re.Pattern[str] = FAMILY_RE) -> list[Read]:
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError) as exc:
        log.debug("%s: not parsed (%s)", path, exc)
        return []
    scanner = _Scanner(path, accept, _constants(tree, accept))
    scanner.visit(tree)
    return scanner.out


# --- binaries ---------------------------------------------------------------------------------------------


def _rodata(data: mmap.mmap) -> tuple[int, int] | None:
    """(offset, size) of the .rodata section of an ELF64 little-endian file, or None."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        return None
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    (names_off,) = struct.unpack_from("<Q", data, shoff + shstrndx * shentsize + 0x18)
    for i in range(shnum):
        base = shoff + i * shentsize
        (name_index,) = struct.unpack_from("<I", data, base)
        end = data.find(b"\0", names_off + name_index)
        if data[names_off + name_index : end] == b".rodata":
            offset, size = struct.unpack_from("<QQ", data, base + 0x18)
            return offset, size
    return None


_BINARY_NAME = re.compile(rb"(?<=\0)(?:" + b"|".join(f[:-1].encode() for f in FAMILIES) + rb")_[A-Z0-9_]+(?=\0)")


def scan_binary(path: Path) -> set[str]:
    """Whole family names among the NUL-terminated strings of the file's .rodata."""
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        section = _rodata(data)
        if section is None:
            return set()
        offset, size = section
        chunk = data[max(offset - 1, 0) : offset + size]
    return {m.group(0).decode() for m in _BINARY_NAME.finditer(chunk) if not NOT_VARIABLES.match(m.group(0).decode())}


# --- torch ------------------------------------------------------------------------------------------------


@dataclass
class Scan:
    """What one source reads: name → first place, name → literal default (None: a read without one)."""

    reads: dict[str, str] = field(default_factory=dict)
    defaults: dict[str, set[str | None]] = field(default_factory=dict)
    writes: dict[str, str] = field(default_factory=dict)

    def add(self, read: Read) -> None:
        if read.write:
            self.writes.setdefault(read.name, read.where)
            return
        self.reads.setdefault(read.name, read.where)
        self.defaults.setdefault(read.name, set()).add(read.default)

    def default_of(self, name: str) -> str | None:
        values = self.defaults.get(name, set())
        if len(values) != 1:
            return None
        (value,) = values
        return value or None  # no empty defaults: setting X= to mean "unset" is not worth a finding


_FAMILY_LITERAL = re.compile(r"""["'](?:""" + "|".join(f[:-1] for f in FAMILIES) + r")_")


def _is_test_code(path: Path) -> bool:
    """torch's test harness (torch/testing, test_*.py): it reads and sets variables, but not in a WebUI."""
    return "testing" in path.parts or path.name.startswith("test_")


def _own_library(name: str) -> bool:
    """torch's own libraries: not the third-party ones bundled next to them (libgomp, libcusparseLt) and not the
    test libraries of some builds (libtorchbind_test.so, libjitbackend_test.so, …)."""
    return name.startswith(("libtorch", "libc10", "libcaffe2", "libnvfuser", "libshm")) and "test" not in name


def torch_version(root: Path) -> tuple[str, str]:
    text = (root / "version.py").read_text(encoding="utf-8")
    version = re.search(r"^__version__\s*=\s*'([^']+)'", text, re.M)
    git = re.search(r"^git_version\s*=\s*'([^']+)'", text, re.M)
    if not version:
        raise SystemExit(f"{root}: no __version__ in version.py")
    return version.group(1), git.group(1) if git else "?"


def scan_torch(root: Path) -> tuple[Scan, dict[str, object]]:
    scan = Scan()
    side_reads: list[Read] = []
    files = sorted((p for p in root.rglob("*.py") if "__pycache__" not in p.parts), key=lambda p: (_is_test_code(p), p))
    for py in files:
        text = py.read_text(encoding="utf-8", errors="replace")
        if not _FAMILY_LITERAL.search(text):
            continue  # a file without a family name in a string literal reads none (constants are per module)
        rel = py.relative_to(root.parent).as_posix()
        for read in scan_python(text, rel):
            if _is_test_code(py) or py.name == "collect_env.py":
                if not read.write:  # test harnesses and the bug-report script do not set variables in a WebUI
                    side_reads.append(read)
            else:
                scan.add(read)
    libraries = sorted(p for p in (root / "lib").glob("*.so*") if p.is_file() and _own_library(p.name))
    for lib in libraries:
        rel = lib.relative_to(root.parent).as_posix()
        for name in sorted(scan_binary(lib)):
            scan.reads.setdefault(name, rel)
            scan.defaults.setdefault(name, set()).add(None)  # a C++ reader's default is not known
    for read in side_reads:  # named last: a real reader (Python or a library) is the better place to cite
        scan.add(read)
    version, git = torch_version(root)
    info: dict[str, object] = {
        "version": version,
        "git_version": git,
        "cuda_libraries": (root / "lib" / "libc10_cuda.so").exists(),
        "python_files": len(files),
        "libraries": [lib.name for lib in libraries],
    }
    return scan, info


# --- git sources (xformers, the hosts) --------------------------------------------------------------------


def _git(git_dir: Path, *args: str) -> str:
    res = subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"git --git-dir={git_dir} {' '.join(args)}: {res.stderr.strip()}")
    return res.stdout


def git_files(git_dir: Path, rev: str, wanted: Iterable[str] = (), under: str = "") -> Iterator[tuple[str, str]]:
    """(path, text) of every *.py file under ``under`` at ``rev`` (and the ``wanted`` files), one git process."""
    listing = _git(git_dir, "ls-tree", "-r", "--name-only", rev, *([under] if under else [])).splitlines()
    paths = [p for p in listing if p.endswith(".py")]
    paths += [p for p in wanted if p not in paths]
    blob_input = "".join(f"{rev}:{p}\n" for p in paths)
    res = subprocess.run(
        ["git", f"--git-dir={git_dir}", "cat-file", "--batch"],
        input=blob_input.encode(),
        capture_output=True,
        check=True,
    )
    data, pos = res.stdout, 0
    for path in paths:
        header_end = data.index(b"\n", pos)
        header = data[pos:header_end].split()
        if header[-1] == b"missing":
            pos = header_end + 1
            continue
        size = int(header[2])
        yield path, data[header_end + 1 : header_end + 1 + size].decode("utf-8", errors="replace")
        pos = header_end + 1 + size + 1


def rev_label(git_dir: Path, rev: str) -> str:
    sha = _git(git_dir, "rev-parse", "--verify", f"{rev}^{{commit}}").strip()
    return f"{git_dir.parent.name.replace('+', '/')} {rev} ({sha[:8]})"


_SHELL_READ = re.compile(r"\$\{?([A-Z][A-Z0-9_]*)")
_SHELL_WRITE = re.compile(r"^\s*export\s+([A-Z][A-Z0-9_]*)=", re.M)
_BAT_READ = re.compile(r"%([A-Z][A-Z0-9_]*)%")
_BAT_WRITE = re.compile(r"^\s*set\s+\"?([A-Z][A-Z0-9_]*)=", re.M | re.I)


def scan_shell(text: str, path: str) -> list[Read]:
    reads_re, writes_re = (_BAT_READ, _BAT_WRITE) if path.endswith(".bat") else (_SHELL_READ, _SHELL_WRITE)
    out: list[Read] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith(("#", "::", "rem ", "REM ")):
            continue
        out += [Read(m.group(1), f"{path}:{lineno}", None, True) for m in writes_re.finditer(line)]
        out += [Read(m.group(1), f"{path}:{lineno}", None) for m in reads_re.finditer(line)]
    return out


_ENV_WORD = re.compile(r"environ|getenv|env\w*\(|env_name_", re.I)


def scan_git(git_dir: Path, rev: str, accept: re.Pattern[str], shell: Iterable[str] = (), under: str = "") -> Scan:
    scan = Scan()
    shell = tuple(shell)
    for path, text in git_files(git_dir, rev, shell, under):
        if path not in shell and not _ENV_WORD.search(text):
            continue  # no environ, getenv or *env*( call: nothing to read
        reads = scan_shell(text, path) if path in shell else scan_python(text, path, accept)
        for read in reads:
            scan.add(read)
    return scan


# --- rendering --------------------------------------------------------------------------------------------

HEADER = '''\
# Generated by tools/gen_envtables.py from the installed torch wheels, the xformers and host sources and
# documented lists — do not edit by hand.
# Generated on: {date}
{provenance}
# Regenerate: python tools/gen_envtables.py   (check only: python tools/gen_envtables.py --check)
# ruff: noqa: E501
"""Which environment variables something reads: torch (per release), xformers, the hosts, documented readers.

Read by lib_optim.launch.env_readers.  How each table was made (and what "present in the binary" means) is
the docstring of tools/gen_envtables.py.  Keys ending in "*" are prefixes.
"""

from __future__ import annotations

GENERATED_ON = "{date}"
FAMILIES: tuple[str, ...] = {families}
'''


def _dict_block(name: str, annotation: str, rows: Mapping[str, object]) -> list[str]:
    out = [f"{name}: {annotation} = {{"]
    out += [f"    {json.dumps(key)}: {_lit(value)}," for key, value in sorted(rows.items())]
    out.append("}")
    return out


def _lit(value: object) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {_lit(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_lit(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    if value is None:
        return "None"
    if isinstance(value, bool):
        return repr(value)
    if isinstance(value, int):
        return str(value)
    return json.dumps(value, ensure_ascii=False)


def _by_name(scans: dict[str, Scan], attr: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, scan in scans.items():
        for name, where in getattr(scan, attr).items():
            out.setdefault(name, {})[key] = where
    return out


def _defaults(scans: dict[str, Scan]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key, scan in scans.items():
        for name in scan.reads:
            default = scan.default_of(name)
            if default is not None and not name.endswith("*"):
                out.setdefault(name, {})[key] = default
    return out


@dataclass
class Inputs:
    torch: dict[str, tuple[Scan, dict[str, object]]]  # release → scan, info
    xformers: dict[str, Scan]  # tag → scan
    hosts: dict[str, Scan]  # host kind value → scan
    host_revisions: dict[str, str]  # host kind value → "owner/name rev (sha)"
    labels: dict[str, str]  # provenance lines


def render(inputs: Inputs, date: str) -> str:
    provenance = "\n".join(f"#   {line}" for line in inputs.labels.values())
    out = [HEADER.format(date=date, provenance="# Sources:\n" + provenance, families=_lit(FAMILIES)), "# fmt: off"]
    torch_scans = {release: scan for release, (scan, _info) in inputs.torch.items()}
    out += ["TORCH_SOURCES: dict[str, dict[str, object]] = {"]
    out += [f"    {json.dumps(release)}: {_lit(info)}," for release, (_scan, info) in inputs.torch.items()]
    out.append("}")
    out += ["", "# variable → {torch release: the first place it is read (path:line, or the library it is present in)}"]
    out += _dict_block("TORCH_READS", "dict[str, dict[str, str]]", _by_name(torch_scans, "reads"))
    out += ["", "# variable → {torch release: the literal default of every Python read} (no C++ reader)"]
    out += _dict_block("TORCH_DEFAULTS", "dict[str, dict[str, str]]", _defaults(torch_scans))
    out += ["", "# variable → {torch release: where torch's Python sets it itself}"]
    out += _dict_block("TORCH_WRITES", "dict[str, dict[str, str]]", _by_name(torch_scans, "writes"))
    out += ["", "# variable → {xformers tag: where it is read}"]
    out += _dict_block("XFORMERS_READS", "dict[str, dict[str, str]]", _by_name(inputs.xformers, "reads"))
    out += _dict_block("XFORMERS_DEFAULTS", "dict[str, dict[str, str]]", _defaults(inputs.xformers))
    out += _dict_block("XFORMERS_TAGS", "dict[str, str]", dict(XFORMERS_TAGS))
    out += _dict_block("XFORMERS_HOST_TAGS", "dict[str, str]", dict(XFORMERS_HOST_TAGS))
    out += ["", "# host → the revision read"]
    out += ["HOST_REVISIONS: dict[str, str] = {"]
    out += [f"    {json.dumps(host)}: {_lit(label)}," for host, label in inputs.host_revisions.items()]
    out.append("}")
    out += ["", "# variable → {host: where the host reads it}; every name, not only the families"]
    out += _dict_block("HOST_READS", "dict[str, dict[str, str]]", _by_name(inputs.hosts, "reads"))
    out += ["", "# variable → {host: where the host sets it itself}"]
    out += _dict_block("HOST_WRITES", "dict[str, dict[str, str]]", _by_name(inputs.hosts, "writes"))
    out += ["", "# variable or prefix* → (reader, citation, documented default)"]
    out += _dict_block("DOCUMENTED", "dict[str, tuple[str, str, str | None]]", dict(DOCUMENTED))
    out.append("# fmt: on")
    return "\n".join(out) + "\n"


def strip_date(text: str) -> str:
    text = re.sub(r"^# Generated on: .*$", "# Generated on: <date>", text, count=1, flags=re.M)
    return re.sub(r'^GENERATED_ON = ".*"$', 'GENERATED_ON = "<date>"', text, count=1, flags=re.M)


# --- CLI --------------------------------------------------------------------------------------------------


def _resolve(pattern: str) -> Path | None:
    hits = sorted(glob.glob(pattern))
    return Path(hits[0]) if hits else None


def collect(torch_dirs: list[Path]) -> Inputs:
    labels: dict[str, str] = {}
    torch: dict[str, tuple[Scan, dict[str, object]]] = {}
    for root in torch_dirs:
        scan, info = scan_torch(root)
        release = str(info["version"]).split("+", 1)[0]
        torch[release] = (scan, info)
        libs = "with its CUDA libraries" if info["cuda_libraries"] else "a CPU-only build: no CUDA libraries"
        n_libs = len(info["libraries"]) if isinstance(info["libraries"], list) else 0
        labels[f"torch {release}"] = (
            f"torch {info['version']} (git {str(info['git_version'])[:8]}), installed wheel, {libs}: "
            f"{info['python_files']} Python files, {n_libs} libraries"
        )
        log.info("torch %s: %d names", info["version"], len(scan.reads))
    # the installed package only: setup.py's variables (XFORMERS_BUILD_TYPE, …) matter only when building it
    xformers = {tag: scan_git(XFORMERS_MIRROR, tag, FAMILY_RE, under="xformers/") for tag in XFORMERS_TAGS}
    for tag in XFORMERS_TAGS:
        labels[f"xformers {tag}"] = f"xformers: {rev_label(XFORMERS_MIRROR, tag)}, the package's Python files"
    hosts, host_revisions = {}, {}
    for host, (git_dir, rev) in HOST_SOURCES.items():
        hosts[host] = scan_git(git_dir, rev, ANY_NAME_RE, HOST_SHELL_FILES)
        host_revisions[host] = rev_label(git_dir, rev)
        labels[f"host {host}"] = f"{host}: {host_revisions[host]}, *.py and {', '.join(HOST_SHELL_FILES)}"
    labels["documented"] = "documented readers: the hand-maintained DOCUMENTED list in tools/gen_envtables.py"
    return Inputs(torch, xformers, hosts, host_revisions, labels)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--torch", action="append", type=Path, metavar="DIR", help="a site-packages/torch directory")
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="module to write (default %(default)s)")
    ap.add_argument("--check", action="store_true", help="compare with --output (the date aside); exit 1 on difference")
    ap.add_argument("--date", default=datetime.date.today().isoformat(), help="the date written (default today)")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    torch_dirs = args.torch or [_resolve(p) for p in DEFAULT_TORCH]
    missing = [
        p for p, d in zip(args.torch or DEFAULT_TORCH, torch_dirs, strict=True) if d is None or not Path(d).is_dir()
    ]
    if missing:
        log.error("torch not found: %s", ", ".join(str(m) for m in missing))
        return 2
    text = render(collect([Path(d) for d in torch_dirs if d is not None]), args.date)
    if args.check:
        old = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if strip_date(old) == strip_date(text):
            log.info("%s is up to date", args.output)
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(args.output), "generated")
        )
        return 1
    tmp = args.output.with_suffix(".py.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.output)
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
