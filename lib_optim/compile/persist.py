"""The compile cache that survives restarts: one folder, outside the temp folder, for what torch.compile keeps on
disk, with one subfolder per torch (and Python) version.

What goes there (torch's own caches; we only choose the folder, torch writes and keys the entries):

* inductor's generated kernels and compiled modules (C++ ``.cpp``/``.so`` on the CPU, Python/triton ``.py`` on a
  GPU), in two-letter subfolders named by the hash of their source: content-addressed, so a stale entry cannot
  be a wrong one. ``TORCHINDUCTOR_CACHE_DIR`` chooses the folder (torch 2.1.2 ``_inductor/codecache.py:91-97``,
  2.3.1 ``_inductor/utils.py:735-746``: ``functools.lru_cache``'d, so it must be set before the first compile;
  2.9 ``_inductor/runtime/cache_dir_utils.py:14-19`` reads it at every call). Without it: the temp folder.
* triton's compiled GPU kernels: inductor sets ``TRITON_CACHE_DIR`` to ``<that folder>/triton/<device>`` unless
  it is set already (2.1.2 ``_inductor/triton_heuristics.py:148-153``, 2.3.1 ``:180-185``, 2.9
  ``_inductor/runtime/cache_dir_utils.py:30-37``), so they land in our folder too.
* the FX graph cache (``<folder>/fxgraph``): whole compiled graphs, so a restart skips inductor's lowering and
  code generation, not only the C++/triton compile. Not in 2.1; in 2.3 off by default
  (``_inductor/config.py:25``, ``TORCHINDUCTOR_FX_GRAPH_CACHE``), so we turn it on for 2.3 and 2.4 unless the
  user set that variable (verified on 2.3.1: a second process hits for every block, with other weights too, for
  static and dynamic shapes, and the results match eager); on by default from 2.5.
* the AOTAutograd cache (``<folder>/aotautograd``, on by default from 2.6) and dynamo's profile of which sizes
  went dynamic (``<folder>/dynamo``, 2.7+). ``torch.compiler.save_cache_artifacts`` (2.7+) packs these same
  caches into bytes to move them elsewhere; with the folder kept, there is nothing to gain from it here.

Keys: a subfolder per torch version and Python (``torch-2.1.2+cu121-py3.10``), so an upgrade starts an empty
folder and never reads another torch's entries (``compile-cache clear --torch`` removes old ones). Within one
torch, what guards against a changed model: the blocks' weights are graph *inputs* (our trampoline passes the
block as an argument, and AOTAutograd lifts parameters to inputs), so a graph's key holds their shapes, dtypes
and strides, never their values — another checkpoint of the same architecture reuses the graph and reads its own
weights; the FX graph key also hashes the graph's code, the inductor config and source, torch's version, the GPU
and triton's version, and small constants *by value* (2.3.1 ``_inductor/codecache.py:418-436``, ``:522-570``).
Freezing (``TORCHINDUCTOR_FREEZING``, which would bake weights into the code) is off by default and bypasses
the FX graph cache when on (2.3.1 ``_inductor/codecache.py:795-797``).

* the C++ headers inductor precompiles for its CPU kernels (torch 2.9+, about 120 MB, rebuilt when missing): torch
  keeps them under the temp folder whatever ``TORCHINDUCTOR_CACHE_DIR`` says (``_HEADER_DIR``, set at import: 2.9
  ``_inductor/codecache.py:2560-2561``, 2.13 ``:3542-3543``; read at each use, ``:2610``), so a restart rebuilt
  them there; :func:`keep_precompiled_headers` points them into our folder before the first compile.

Not moved: torch 2.13's small key-value cache under the temp folder (``_inductor/cache.py:419``).

Where: ``OPTIM_COMPILE_CACHE`` if set; else, in a WebUI, ``<data dir>/cache/optim-compile`` — next to the
WebUI's own caches (``SD_WEBUI_CACHE_DIR``, default ``<data dir>/cache``: A1111 ``modules/cache.py:12``, see
docs/hosts.md §1.13), which git ignores and updates keep; else the user's cache folder
(``~/.cache/sd-webui-optim/compile``, ``%LOCALAPPDATA%`` on Windows). A ``TORCHINDUCTOR_CACHE_DIR`` the user set
is never overridden (nor ``TRITON_CACHE_DIR``): then the kernels go there, and ``compile-cache show`` and doctor
say so.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import threading
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lib_optim.compile.blocks import torch_version
from lib_optim.log import get_logger

log = get_logger(__name__)

ENV_VAR = "OPTIM_COMPILE_CACHE"
INDUCTOR_VAR = "TORCHINDUCTOR_CACHE_DIR"
TRITON_VAR = "TRITON_CACHE_DIR"
FX_GRAPH_VAR = "TORCHINDUCTOR_FX_GRAPH_CACHE"
DISABLE_VAR = "TORCHINDUCTOR_FORCE_DISABLE_CACHES"
MARKER = "OPTIM_COMPILE_CACHE.txt"
FOLDER_PREFIX = "torch-"
WEBUI_SUBFOLDER = "optim-compile"  # inside the WebUI's cache folder
_MARKER_TEXT = (
    "This folder holds sd-webui-optim's torch.compile cache, one subfolder per torch and Python version.\n"
    "Safe to delete; `python -m lib_optim compile-cache clear` does it.\n"
)
_FOLDER_RE = re.compile(r"^torch-(?P<torch>.+)-py(?P<python>\d+\.\d+)$")

Source = Literal["env", "webui", "user"]


@dataclass(frozen=True)
class CacheRoot:
    """The folder our per-torch subfolders go in, and why this one."""

    path: Path
    source: Source
    why: str


def user_cache_dir(environ: Mapping[str, str], *, platform: str | None = None) -> Path:
    """``~/.cache/sd-webui-optim/compile`` (``$XDG_CACHE_HOME``; Windows: ``%LOCALAPPDATA%``)."""
    plat = sys.platform if platform is None else platform
    if plat == "win32" and environ.get("LOCALAPPDATA"):
        base = Path(environ["LOCALAPPDATA"])
    elif environ.get("XDG_CACHE_HOME"):
        base = Path(environ["XDG_CACHE_HOME"])
    else:
        base = Path(environ.get("HOME") or Path.home()) / ".cache"
    return base / "sd-webui-optim" / "compile"


def cache_root(
    environ: Mapping[str, str], data_dir: str | os.PathLike[str] | None, *, platform: str | None = None
) -> CacheRoot:
    """``OPTIM_COMPILE_CACHE``; else ``<the WebUI's cache folder>/optim-compile`` when ``data_dir`` (the WebUI's
    data folder) is known; else the user's cache folder."""
    chosen = environ.get(ENV_VAR, "").strip()
    if chosen:
        return CacheRoot(Path(chosen).expanduser(), "env", f"set by {ENV_VAR}")
    if data_dir is not None:
        webui_cache = environ.get("SD_WEBUI_CACHE_DIR", "").strip()
        if webui_cache:
            return CacheRoot(Path(webui_cache) / WEBUI_SUBFOLDER, "webui", "in the WebUI's SD_WEBUI_CACHE_DIR")
        return CacheRoot(Path(data_dir) / "cache" / WEBUI_SUBFOLDER, "webui", f"in the WebUI's data folder {data_dir}")
    return CacheRoot(user_cache_dir(environ, platform=platform), "user", "no WebUI found: the user's cache folder")


def data_dir_from_argv(argv: Sequence[str], webui_root: Path | None) -> Path | None:
    """The WebUI's data folder: ``--data-dir`` as its launch line gives it (A1111/Forge
    ``modules/paths_internal.py:26``, parsed from sys.argv and COMMANDLINE_ARGS), else the checkout itself."""
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    parser.add_argument("--data-dir", default=None)
    known, _ = parser.parse_known_args(list(argv))
    if known.data_dir:
        given = Path(known.data_dir)
        return given if given.is_absolute() or webui_root is None else webui_root / given
    return webui_root


_VERSION_PY = re.compile(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", re.M)


def installed_torch_version() -> str | None:
    """``torch.__version__`` without importing torch: its ``torch/version.py`` (which keeps the ``+cu121`` that the
    package metadata of PyPI's wheels leaves out), else the package metadata."""
    module = sys.modules.get("torch")
    if module is not None and getattr(module, "__version__", None):
        return str(module.__version__)
    import importlib.util
    from importlib import metadata

    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        spec = None
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        try:
            match = _VERSION_PY.search((Path(location) / "version.py").read_text(encoding="utf-8"))
        except OSError:
            continue
        if match:
            return match.group(1)
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return None


def folder_name(torch: str, python: tuple[int, int] | None = None) -> str:
    """``torch-2.1.2+cu121-py3.10``: one subfolder per torch build and Python."""
    major, minor = python if python is not None else sys.version_info[:2]
    safe = re.sub(r"[^A-Za-z0-9.+_-]", "_", torch.strip()) or "unknown"
    return f"{FOLDER_PREFIX}{safe}-py{major}.{minor}"


def parse_folder_name(name: str) -> tuple[str, str] | None:
    """(torch, python) of one of our subfolder names, or None."""
    match = _FOLDER_RE.match(name)
    return (match["torch"], match["python"]) if match else None


def fx_graph_cache_state(torch: str | None, environ: Mapping[str, str]) -> tuple[bool, str]:
    """Whether we turn inductor's FX graph cache on for ``torch``, and its state in words."""
    if torch is None:
        return False, "unknown (no torch)"
    if environ.get(DISABLE_VAR) == "1":
        return False, f"off: {DISABLE_VAR}=1 turns every inductor cache off"
    version = torch_version(torch)
    if version < (2, 3):
        return False, f"not in torch {version[0]}.{version[1]}: after a restart only the kernels are reused"
    if FX_GRAPH_VAR in environ:
        state = "on" if environ[FX_GRAPH_VAR] == "1" else "off"
        return False, f"{state} (your {FX_GRAPH_VAR}={environ[FX_GRAPH_VAR]})"
    if version < (2, 5):
        return True, "on (turned on by the extension: off by default before torch 2.5)"
    aot = ", AOTAutograd cache on" if version >= (2, 6) else ""
    return False, f"on (torch's default){aot}"


@dataclass(frozen=True)
class CacheSetup:
    """What :func:`setup_compile_cache` decided: the folder inductor uses now, and whose it is."""

    root: CacheRoot
    folder: Path | None  # our subfolder for this torch (None without torch)
    inductor_dir: str | None  # what TORCHINDUCTOR_CACHE_DIR is now (None: torch's default, the temp folder)
    inductor_owner: Literal["ours", "yours", "none"]
    triton: str
    fx_graph_cache: str
    notes: tuple[str, ...] = ()

    def summary(self) -> str:
        if self.inductor_owner == "ours":
            where = f"compile cache: {self.inductor_dir} ({self.root.why})"
        elif self.inductor_owner == "yours":
            where = f"compile cache: your {INDUCTOR_VAR}={self.inductor_dir} (ours at {self.root.path} is not used)"
        else:
            where = "compile cache: not set up (" + ("; ".join(self.notes) or "no torch") + ")"
        return f"{where}; FX graph cache {self.fx_graph_cache}"


_LOCK = threading.Lock()
_DONE: dict[str, CacheSetup] = {}  # "setup": the first call's answer, for the life of the process


def setup_compile_cache(
    data_dir: str | os.PathLike[str] | None = None,
    *,
    environ: MutableMapping[str, str] | None = None,
    torch: str | None = None,
    python: tuple[int, int] | None = None,
) -> CacheSetup:
    """Point torch's compile caches at our folder for this process: called once at start-up by the host glue,
    before anything compiles. Idempotent (later calls return the first answer and log nothing); never overrides a
    ``TORCHINDUCTOR_CACHE_DIR``/``TRITON_CACHE_DIR``/``TORCHINDUCTOR_FX_GRAPH_CACHE`` the user set."""
    with _LOCK:
        if "setup" in _DONE:
            return _DONE["setup"]
        env = os.environ if environ is None else environ
        setup = _setup(env, data_dir, torch if torch is not None else installed_torch_version(), python)
        _DONE["setup"] = setup
    log.info("%s", setup.summary())
    for note in setup.notes:
        log.warning("%s", note)
    return setup


def kept_cache() -> CacheSetup | None:
    """What :func:`setup_compile_cache` set up in this process (None: not called, e.g. outside a WebUI)."""
    return _DONE.get("setup")


def current_root(environ: Mapping[str, str] | None = None) -> Path:
    """The extension's compile-cache root for this process: the one set up at start-up, else where it would be."""
    setup = kept_cache()
    return setup.root.path if setup is not None else cache_root(os.environ if environ is None else environ, None).path


def _reset_for_tests() -> None:
    with _LOCK:
        _DONE.clear()


def _setup(
    env: MutableMapping[str, str], data_dir: Any, torch: str | None, python: tuple[int, int] | None
) -> CacheSetup:
    root = cache_root(env, data_dir)
    turn_on_fx, fx_state = fx_graph_cache_state(torch, env)
    triton = f"your {TRITON_VAR}={env[TRITON_VAR]}" if env.get(TRITON_VAR) else "inside the compile cache"
    if torch is None:
        return CacheSetup(root, None, env.get(INDUCTOR_VAR), "none", triton, fx_state, ("torch is not installed",))
    folder = root.path / folder_name(torch, python)
    current = env.get(INDUCTOR_VAR)
    notes: list[str] = []
    if current and Path(current) != folder:
        owner: Literal["ours", "yours", "none"] = "yours"
    else:
        try:
            make_folder(root.path, folder)
        except OSError as exc:
            log.debug("compile cache folder %s", folder, exc_info=True)
            note = f"compile cache: cannot create {folder} ({exc}); torch keeps its cache in the temp folder"
            return CacheSetup(root, folder, current, "none", triton, fx_state, (note,))
        env[INDUCTOR_VAR] = current = str(folder)
        owner = "ours"
        chosen = _inductor_dir_already_chosen()
        if chosen is not None and Path(chosen) != folder:
            notes.append(f"compile cache: torch already uses {chosen} in this process; {folder} from the next start")
    if turn_on_fx:
        env[FX_GRAPH_VAR] = "1"
        config = sys.modules.get("torch._inductor.config")
        if config is not None:  # imported already: it read the variable at import
            config.fx_graph_cache = True  # type: ignore[attr-defined]
    return CacheSetup(root, folder, current, owner, triton, fx_state, tuple(notes))


HEADERS_FOLDER = "precompiled_headers"


def keep_precompiled_headers() -> str | None:
    """Point torch's precompiled-header folder (2.9+: ``torch._inductor.codecache._HEADER_DIR`` and its lock folder)
    into our compile-cache folder, where the kernels built with them are kept: only when that folder is in use
    (:func:`setup_compile_cache` chose it) and torch still has its default (the temp folder). Imports inductor's
    codecache (the compile about to run imports it anyway); returns the folder now used, or None; idempotent."""
    setup = kept_cache()
    if setup is None or setup.inductor_owner != "ours" or setup.folder is None:
        return None
    import importlib

    codecache = importlib.import_module("torch._inductor.codecache")
    current = getattr(codecache, "_HEADER_DIR", None)
    default_dir = getattr(codecache, "default_cache_dir", None)
    ours = str(setup.folder / HEADERS_FOLDER)
    if current is None or default_dir is None or current == ours:
        return current if current == ours else None
    if current != os.path.join(default_dir(), HEADERS_FOLDER):
        return None  # set by someone else: theirs to keep
    setattr(codecache, "_HEADER_DIR", ours)  # noqa: B010 - private to torch, absent from its stubs
    setattr(codecache, "_HEADER_LOCK_DIR", os.path.join(ours, "locks"))  # noqa: B010
    log.debug("compile cache: precompiled headers in %s (was %s)", ours, current)
    return ours


def make_folder(root: Path, folder: Path) -> None:
    """Create ``root`` and ``folder`` with our marker file in each (what ``clear`` looks for)."""
    for path in (root, folder):
        path.mkdir(parents=True, exist_ok=True)
        marker = path / MARKER
        if not marker.exists():
            marker.write_text(_MARKER_TEXT, encoding="utf-8")


def _inductor_dir_already_chosen() -> str | None:
    """The folder torch 2.1-2.4 already cached for this process (``cache_dir`` is lru_cache'd there), if any."""
    for module_name in ("torch._inductor.codecache", "torch._inductor.utils"):
        module = sys.modules.get(module_name)
        function = getattr(module, "cache_dir", None) if module is not None else None
        info = getattr(function, "cache_info", None)
        if function is not None and info is not None and info().currsize:
            return str(function())
    return None


# ------------------------------------------------------------------------------------------------- inspect


@dataclass(frozen=True)
class FolderStatus:
    """One cache folder: one of ours (per torch), or the user's own TORCHINDUCTOR_CACHE_DIR."""

    path: str
    torch: str | None
    python: str | None
    size_bytes: int
    entries: dict[str, int]
    current: bool  # what this Python's torch uses
    ours: bool  # carries our marker (clear may remove it)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "torch": self.torch,
            "python": self.python,
            "size_bytes": self.size_bytes,
            "entries": dict(self.entries),
            "current": self.current,
            "ours": self.ours,
        }


@dataclass(frozen=True)
class CacheStatus:
    root: CacheRoot
    marked: bool
    folders: list[FolderStatus]
    current: str | None  # the folder this Python's torch would use (None without torch)
    inductor_owner: Literal["ours", "yours", "none"]
    triton: str
    fx_graph_cache: str
    torch: str | None
    notes: list[str] = field(default_factory=list)

    @property
    def size_bytes(self) -> int:
        return sum(f.size_bytes for f in self.folders)

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root.path),
            "source": self.root.source,
            "why": self.root.why,
            "exists": self.root.path.is_dir(),
            "marked": self.marked,
            "size_bytes": self.size_bytes,
            "torch": self.torch,
            "current": self.current,
            "inductor": self.inductor_owner,
            "triton": self.triton,
            "fx_graph_cache": self.fx_graph_cache,
            "folders": [f.to_dict() for f in self.folders],
            "notes": list(self.notes),
        }


def count_entries(folder: Path) -> tuple[int, dict[str, int]]:
    """Total bytes, and the entries by kind: inductor's kernels/modules (two-letter folders, by file stem), FX
    graphs, AOTAutograd entries, triton kernels (its folders holding files)."""
    size = 0
    stems: set[str] = set()
    counts = {"kernels": 0, "fx_graphs": 0, "aot_autograd": 0, "triton": 0}
    for dirpath, _dirnames, filenames in os.walk(folder):
        parts = Path(dirpath).relative_to(folder).parts
        files = [f for f in filenames if not os.path.islink(os.path.join(dirpath, f))]
        for name in files:
            try:
                size += os.path.getsize(os.path.join(dirpath, name))
            except OSError:
                log.debug("cannot stat %s/%s", dirpath, name)
        if not parts:
            continue
        top = parts[0]
        if top == "fxgraph":
            counts["fx_graphs"] += sum(1 for f in files if not f.endswith(".lock"))
        elif top == "aotautograd":
            counts["aot_autograd"] += sum(1 for f in files if not f.endswith(".lock"))
        elif top == "triton" and files:
            counts["triton"] += 1
        elif len(parts) == 1 and len(top) == 2:
            stems.update(os.path.join(top, Path(f).stem) for f in files if Path(f).suffix in _KERNEL_SUFFIXES)
    counts["kernels"] = len(stems)
    return size, counts


_KERNEL_SUFFIXES = (".py", ".cpp", ".so", ".pyd", ".dll", ".cu", ".cubin")


def cache_status(
    environ: Mapping[str, str], data_dir: str | os.PathLike[str] | None, *, torch: str | None = None
) -> CacheStatus:
    """What ``compile-cache show`` prints: the root, why, every per-torch folder with its size and entries."""
    root = cache_root(environ, data_dir)
    torch = torch if torch is not None else installed_torch_version()
    current = str(root.path / folder_name(torch)) if torch else None
    _, fx_state = fx_graph_cache_state(torch, environ)
    user_dir = environ.get(INDUCTOR_VAR, "").strip()
    owner: Literal["ours", "yours", "none"] = "ours" if torch else "none"
    folders: list[FolderStatus] = []
    notes: list[str] = []
    if user_dir and (current is None or Path(user_dir) != Path(current)):
        owner = "yours"
        notes.append(f"your {INDUCTOR_VAR}={user_dir} is where torch writes; the extension does not change it")
        if Path(user_dir).is_dir():
            size, counts = count_entries(Path(user_dir))
            folders.append(FolderStatus(user_dir, None, None, size, counts, True, False))
    if root.path.is_dir():
        for sub in sorted(p for p in root.path.iterdir() if p.is_dir() and not p.is_symlink()):
            parsed = parse_folder_name(sub.name)
            if parsed is None:
                continue
            size, counts = count_entries(sub)
            is_current = owner == "ours" and str(sub) == current
            folders.append(FolderStatus(str(sub), *parsed, size, counts, is_current, (sub / MARKER).is_file()))
    triton = f"your {TRITON_VAR}={environ[TRITON_VAR]}" if environ.get(TRITON_VAR) else "inside the compile cache"
    marked = (root.path / MARKER).is_file()
    return CacheStatus(root, marked, folders, current, owner, triton, fx_state, torch, notes)


def human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"


def status_text(status: CacheStatus) -> str:
    other = "" if status.root.source == "env" else f"; {ENV_VAR} sets another"
    lines = [f"Compile cache: {status.root.path} ({status.root.why}{other})"]
    if status.current:
        use = "this torch uses" if status.inductor_owner == "ours" else "this torch would use"
        lines.append(f"  {use} {status.current}")
    lines.append(f"  triton kernels: {status.triton}; FX graph cache: {status.fx_graph_cache}")
    lines.extend(f"  note: {n}" for n in status.notes)
    if not status.folders:
        lines.append("  empty: nothing compiled yet" if status.root.path.is_dir() else "  not created yet")
        return "\n".join(lines)
    lines.append(f"  total {human_size(status.size_bytes)}")
    for folder in status.folders:
        label = Path(folder.path).name if folder.ours else f"{folder.path} (yours)"
        e = folder.entries
        lines.append(
            f"  {label}{' (current)' if folder.current and folder.ours else ''}: {human_size(folder.size_bytes)}, "
            f"{e['kernels']} kernels, {e['fx_graphs']} FX graphs, {e['aot_autograd']} AOTAutograd, "
            f"{e['triton']} triton"
        )
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------- clear


class CacheRefused(Exception):
    """``clear`` found a folder it did not make: nothing removed."""


@dataclass(frozen=True)
class ClearResult:
    root: Path
    removed: list[tuple[str, int]]
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "dry_run": self.dry_run,
            "removed": [{"path": p, "size_bytes": s} for p, s in self.removed],
            "freed_bytes": 0 if self.dry_run else sum(s for _, s in self.removed),
        }


def clear_cache(
    environ: Mapping[str, str],
    data_dir: str | os.PathLike[str] | None,
    *,
    torch: str | None = None,
    dry_run: bool = False,
) -> ClearResult:
    """Remove our per-torch folders (all, or those of torch ``torch``: ``2.1.2`` or ``2.1.2+cu121``). Only folders
    that carry our marker, under a root that carries it: anything else raises :class:`CacheRefused`."""
    root = cache_root(environ, data_dir).path
    if not root.is_dir():
        return ClearResult(root, [], dry_run)
    if root.is_symlink() or not (root / MARKER).is_file():
        raise CacheRefused(
            f"compile-cache clear: {root} has no {MARKER}, so it is not a folder the extension made; nothing "
            f"removed (point {ENV_VAR} at the right folder, or delete it yourself)"
        )
    ours = [
        (sub, parsed)
        for sub in sorted(root.iterdir())
        if sub.is_dir() and not sub.is_symlink() and (parsed := parse_folder_name(sub.name)) is not None
    ]
    if torch is not None:
        wanted = torch.strip()
        chosen = [(s, p) for s, p in ours if wanted in (p[0], p[0].split("+")[0])]
        if not chosen:
            have = ", ".join(sorted({p[0] for _, p in ours})) or "none"
            raise ValueError(f"compile-cache clear: --torch: {wanted!r} has no folder here; torch versions: {have}")
        ours = chosen
    removed: list[tuple[str, int]] = []
    for sub, _ in ours:
        if not (sub / MARKER).is_file():
            log.warning("compile-cache clear: %s has no %s; left as it is", sub, MARKER)
            continue
        size, _counts = count_entries(sub)
        if not dry_run:
            shutil.rmtree(sub)
        removed.append((str(sub), size))
    return ClearResult(root, removed, dry_run)
