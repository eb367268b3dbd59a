"""The compile cache that survives restarts (lib_optim/compile/persist.py) and ``python -m lib_optim compile-cache``.

Where torch reads its folder, cited in persist.py's docstring: ``TORCHINDUCTOR_CACHE_DIR`` (torch 2.1.2
``_inductor/codecache.py:91-97``, an lru_cache'd ``cache_dir()``), ``TRITON_CACHE_DIR`` set by inductor only when
unset (2.1.2 ``_inductor/triton_heuristics.py:148-153``), ``TORCHINDUCTOR_FX_GRAPH_CACHE`` read at import of
``torch._inductor.config`` (2.3.1 ``_inductor/config.py:25``).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from test_cli import _base_env, _fake_webui, _install, run_cli

from lib_optim.compile import persist
from lib_optim.compile.persist import (
    MARKER,
    CacheRefused,
    cache_root,
    cache_status,
    clear_cache,
    count_entries,
    data_dir_from_argv,
    folder_name,
    make_folder,
    parse_folder_name,
    setup_compile_cache,
    status_text,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def fresh_setup():
    persist._reset_for_tests()
    yield
    persist._reset_for_tests()


# --- where ------------------------------------------------------------------------------------------------------


def test_root_from_the_variable_the_webui_and_the_user_folder(tmp_path: Path) -> None:
    chosen = cache_root({"OPTIM_COMPILE_CACHE": str(tmp_path / "mine")}, tmp_path / "webui")
    assert (chosen.path, chosen.source) == (tmp_path / "mine", "env")
    webui = cache_root({}, tmp_path / "webui")
    assert (webui.path, webui.source) == (tmp_path / "webui" / "cache" / "optim-compile", "webui")
    # the WebUI's own caches moved with SD_WEBUI_CACHE_DIR (A1111 modules/cache.py:12): ours goes with them
    moved = cache_root({"SD_WEBUI_CACHE_DIR": str(tmp_path / "c")}, tmp_path / "webui")
    assert moved.path == tmp_path / "c" / "optim-compile"
    user = cache_root({"HOME": str(tmp_path / "home")}, None, platform="linux")
    assert (user.path, user.source) == (tmp_path / "home" / ".cache" / "sd-webui-optim" / "compile", "user")
    xdg = cache_root({"XDG_CACHE_HOME": str(tmp_path / "x")}, None, platform="linux")
    assert xdg.path == tmp_path / "x" / "sd-webui-optim" / "compile"
    windows = cache_root({"LOCALAPPDATA": str(tmp_path / "L")}, None, platform="win32")
    assert windows.path == tmp_path / "L" / "sd-webui-optim" / "compile"
    assert cache_root({"OPTIM_COMPILE_CACHE": "  "}, tmp_path).source == "webui"  # blank: not set


def test_data_dir_follows_the_launch_line(tmp_path: Path) -> None:
    # A1111/Forge modules/paths_internal.py:26,30: --data-dir, default the checkout
    assert data_dir_from_argv([], tmp_path) == tmp_path
    assert data_dir_from_argv(["--xformers", "--data-dir", "/srv/sd"], tmp_path) == Path("/srv/sd")
    assert data_dir_from_argv(["--data-dir=data"], tmp_path) == tmp_path / "data"
    assert data_dir_from_argv(["--data-dir", "/a", "--data-dir", "/b"], tmp_path) == Path("/b")  # the last wins


def test_one_folder_per_torch_and_python() -> None:
    assert folder_name("2.1.2+cu121", (3, 10)) == "torch-2.1.2+cu121-py3.10"
    assert folder_name("2.3.1+cu121", (3, 10)) != folder_name("2.1.2+cu121", (3, 10))
    assert folder_name("2.1.2+cu121", (3, 11)) != folder_name("2.1.2+cu121", (3, 10))
    assert folder_name("2.6.0a0+git/x y", (3, 10)) == "torch-2.6.0a0+git_x_y-py3.10"  # never a path separator
    assert parse_folder_name("torch-2.1.2+cu121-py3.10") == ("2.1.2+cu121", "3.10")
    assert parse_folder_name("fxgraph") is None


def test_the_torch_version_keeps_its_build_label(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # PyPI's cu121 wheels say "2.1.2" in their metadata but "2.1.2+cu121" in torch/version.py: read the latter
    # without importing torch, so preload (torch not imported) and doctor (torch imported) name one folder.
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('never imported')\n")
    (fake / "version.py").write_text("__version__ = '2.1.2+cu121'\ndebug = False\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert persist.installed_torch_version() == "2.1.2+cu121"
    assert "torch" not in sys.modules


# --- set up at start-up --------------------------------------------------------------------------------------------


def test_setup_points_inductor_at_our_folder_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env: dict[str, str] = {}
    with caplog.at_level(logging.INFO, logger="lib_optim"):
        first = setup_compile_cache(tmp_path / "webui", environ=env, torch="2.1.2+cu121", python=(3, 10))
        again = setup_compile_cache(tmp_path / "elsewhere", environ=env, torch="2.1.2+cu121", python=(3, 10))
    folder = tmp_path / "webui" / "cache" / "optim-compile" / "torch-2.1.2+cu121-py3.10"
    assert again is first and first.inductor_owner == "ours"
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(folder)}  # 2.1 has no FX graph cache: nothing else set
    assert (folder / MARKER).is_file() and (folder.parent / MARKER).is_file()
    assert not (tmp_path / "elsewhere").exists()
    lines = [r.getMessage() for r in caplog.records if "compile cache" in r.getMessage()]
    assert len(lines) == 1 and str(folder) in lines[0]


def test_setup_never_overrides_the_users_variables(tmp_path: Path) -> None:
    env = {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "theirs"),
        "TRITON_CACHE_DIR": str(tmp_path / "triton"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "0",
    }
    before = dict(env)
    setup = setup_compile_cache(tmp_path / "webui", environ=env, torch="2.3.1+cu121")
    assert env == before
    assert setup.inductor_owner == "yours" and setup.inductor_dir == str(tmp_path / "theirs")
    assert "your TRITON_CACHE_DIR" in setup.triton
    assert setup.fx_graph_cache == "off (your TORCHINDUCTOR_FX_GRAPH_CACHE=0)"
    assert not (tmp_path / "webui").exists()  # nothing of ours created


def test_setup_turns_the_fx_graph_cache_on_only_where_it_is_off_by_default(tmp_path: Path) -> None:
    for torch, expected in (("2.1.2", None), ("2.3.1+cu121", "1"), ("2.4.1", "1"), ("2.5.1", None), ("2.13.0", None)):
        persist._reset_for_tests()
        env: dict[str, str] = {}
        setup_compile_cache(tmp_path, environ=env, torch=torch)
        assert env.get("TORCHINDUCTOR_FX_GRAPH_CACHE") == expected, torch


def test_setup_after_inductor_config_was_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch 2.3.1 _inductor/config.py:25 reads the variable at import: if it is imported already, set the value
    config = types.ModuleType("torch._inductor.config")
    config.fx_graph_cache = False  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch._inductor.config", config)
    setup_compile_cache(tmp_path, environ={}, torch="2.3.1")
    assert config.fx_graph_cache is True  # type: ignore[attr-defined]


def test_setup_says_when_torch_already_chose_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch 2.1.2 _inductor/codecache.py:91-97: cache_dir() is lru_cache'd, fixed at its first call
    codecache = types.ModuleType("torch._inductor.codecache")
    codecache.cache_dir = functools.lru_cache(None)(lambda: "/tmp/torchinductor_someone")  # type: ignore[attr-defined]
    codecache.cache_dir()  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch._inductor.codecache", codecache)
    setup = setup_compile_cache(tmp_path, environ={}, torch="2.1.2")
    assert any("already uses /tmp/torchinductor_someone" in n for n in setup.notes)


def test_setup_without_torch_or_a_writable_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(persist, "installed_torch_version", lambda: None)
    env: dict[str, str] = {}
    assert setup_compile_cache(tmp_path, environ=env).inductor_owner == "none" and env == {}
    persist._reset_for_tests()
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    setup = setup_compile_cache(None, environ={"OPTIM_COMPILE_CACHE": str(blocked)}, torch="2.5.1")
    assert setup.inductor_owner == "none" and "cannot create" in setup.notes[0]


def test_preload_sets_the_cache_up_in_the_webui_data_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lib_optim.hosts import startup

    for name in (
        "TORCHINDUCTOR_CACHE_DIR",
        "TORCHINDUCTOR_FX_GRAPH_CACHE",
        "OPTIM_COMPILE_CACHE",
        "SD_WEBUI_CACHE_DIR",
    ):
        monkeypatch.delenv(name, raising=False)  # restored after the test, whatever preload sets
    paths = types.ModuleType("modules.paths_internal")
    paths.data_path = str(tmp_path / "data")  # type: ignore[attr-defined] # A1111 modules/paths_internal.py:30
    modules = types.ModuleType("modules")
    modules.paths_internal = paths  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.paths_internal", paths)
    startup._setup_compile_cache()
    import os

    assert Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]).parent == tmp_path / "data" / "cache" / "optim-compile"


# --- show and clear ------------------------------------------------------------------------------------------------


def _fake_entries(folder: Path) -> None:
    """Inductor's layout (2.3.1): kernels in two-letter folders by source hash, fxgraph/, triton/<device>/<hash>/."""
    make_folder(folder.parent, folder)
    (folder / "ab").mkdir()
    for name in ("cabc.cpp", "cabc.so", "cdef.py"):
        (folder / "ab" / name).write_bytes(b"x" * 100)
    (folder / "fxgraph" / "v5" / "fkey").mkdir(parents=True)
    (folder / "fxgraph" / "v5" / "fkey" / "entry").write_bytes(b"y" * 50)
    (folder / "aotautograd" / "akey").mkdir(parents=True)
    (folder / "aotautograd" / "akey" / "entry").write_bytes(b"z" * 10)
    (folder / "triton" / "0" / "HASH").mkdir(parents=True)
    (folder / "triton" / "0" / "HASH" / "k.cubin").write_bytes(b"t" * 20)
    (folder / "locks").mkdir()
    (folder / "locks" / "cabc.lock").write_bytes(b"")


def test_entries_are_counted_by_kind(tmp_path: Path) -> None:
    folder = tmp_path / "root" / "torch-2.3.1-py3.10"
    _fake_entries(folder)
    size, counts = count_entries(folder)
    assert counts == {"kernels": 2, "fx_graphs": 1, "aot_autograd": 1, "triton": 1}
    assert size == 300 + 50 + 10 + 20 + len((folder / MARKER).read_bytes())


def test_show_lists_each_torch_folder(tmp_path: Path) -> None:
    root = tmp_path / "data" / "cache" / "optim-compile"
    _fake_entries(root / "torch-2.1.2+cu121-py3.10")
    _fake_entries(root / "torch-2.3.1+cu121-py3.10")
    (root / "not-ours").mkdir()
    status = cache_status({}, tmp_path / "data", torch="2.3.1+cu121")
    data = status.to_dict()
    assert data["root"] == str(root) and data["source"] == "webui" and data["marked"] is True
    assert [Path(f["path"]).name for f in data["folders"]] == ["torch-2.1.2+cu121-py3.10", "torch-2.3.1+cu121-py3.10"]
    assert [f["torch"] for f in data["folders"]] == ["2.1.2+cu121", "2.3.1+cu121"]
    assert data["size_bytes"] == sum(f["size_bytes"] for f in data["folders"]) > 0
    text = status_text(status)
    assert f"Compile cache: {root}" in text and "2 kernels, 1 FX graphs, 1 AOTAutograd, 1 triton" in text


def test_show_reports_the_users_own_inductor_folder(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    _fake_entries(theirs / "x")
    status = cache_status({"TORCHINDUCTOR_CACHE_DIR": str(theirs)}, tmp_path / "data", torch="2.5.1")
    assert status.inductor_owner == "yours"
    assert status.folders[0].path == str(theirs) and not status.folders[0].ours
    assert "your TORCHINDUCTOR_CACHE_DIR" in status_text(status)


def test_clear_removes_only_our_marked_folders(tmp_path: Path) -> None:
    root = tmp_path / "data" / "cache" / "optim-compile"
    for name in ("torch-2.1.2+cu121-py3.10", "torch-2.1.2+cu121-py3.11", "torch-2.3.1+cu121-py3.10"):
        _fake_entries(root / name)
    unmarked = root / "torch-2.5.1-py3.10"
    unmarked.mkdir()
    (root / "notes.txt").write_text("the user's")
    dry = clear_cache({}, tmp_path / "data", torch="2.1.2", dry_run=True)
    assert len(dry.removed) == 2 and (root / "torch-2.1.2+cu121-py3.10").is_dir()
    done = clear_cache({}, tmp_path / "data", torch="2.1.2")
    assert sorted(Path(p).name for p, _ in done.removed) == ["torch-2.1.2+cu121-py3.10", "torch-2.1.2+cu121-py3.11"]
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "notes.txt", "torch-2.3.1+cu121-py3.10", unmarked.name]
    clear_cache({}, tmp_path / "data")
    assert sorted(p.name for p in root.iterdir()) == [MARKER, "notes.txt", unmarked.name]  # no marker: kept
    with pytest.raises(ValueError, match=r"--torch: '9\.9' has no folder here"):
        clear_cache({}, tmp_path / "data", torch="9.9")


def test_clear_refuses_a_folder_without_our_marker(tmp_path: Path) -> None:
    elsewhere = tmp_path / "important"
    (elsewhere / "torch-2.1.2-py3.10").mkdir(parents=True)
    (elsewhere / "torch-2.1.2-py3.10" / "work.txt").write_text("keep me")
    with pytest.raises(CacheRefused, match="not a folder the extension made"):
        clear_cache({"OPTIM_COMPILE_CACHE": str(elsewhere)}, None)
    assert (elsewhere / "torch-2.1.2-py3.10" / "work.txt").read_text() == "keep me"


def test_the_commands(tmp_path: Path) -> None:
    ext = _install(tmp_path / "sd-webui-optim")
    root = tmp_path / "cache"
    _fake_entries(root / "torch-2.1.2+cu121-py3.10")
    env = _base_env(OPTIM_COMPILE_CACHE=str(root))
    shown = run_cli("compile-cache", "show", "--json", cwd=ext, env=env)
    assert shown.rc == 0, shown
    data = shown.json()
    assert data["root"] == str(root) and data["source"] == "env"
    assert data["folders"][0]["entries"] == {"kernels": 2, "fx_graphs": 1, "aot_autograd": 1, "triton": 1}
    text = run_cli("compile-cache", "show", cwd=ext, env=env)
    assert f"Compile cache: {root} (set by OPTIM_COMPILE_CACHE)" in text.out
    dry = run_cli("compile-cache", "clear", "--dry-run", cwd=ext, env=env)
    assert dry.rc == 0 and "Would delete" in dry.out and (root / "torch-2.1.2+cu121-py3.10").is_dir(), dry
    bad = run_cli("compile-cache", "clear", "--torch", "1.0", "--json", cwd=ext, env=env)
    assert bad.rc == 64 and "--torch: '1.0' has no folder here" in bad.json()["error"], bad
    cleared = run_cli("compile-cache", "clear", "--json", cwd=ext, env=env)
    assert cleared.rc == 0 and cleared.json()["freed_bytes"] > 0 and not (root / "torch-2.1.2+cu121-py3.10").exists()
    (tmp_path / "mine").mkdir()
    refused = run_cli("compile-cache", "clear", cwd=ext, env=_base_env(OPTIM_COMPILE_CACHE=str(tmp_path / "mine")))
    assert refused.rc == 1 and "not a folder the extension made" in refused.err, refused


def test_the_command_finds_the_webuis_data_folder(tmp_path: Path) -> None:
    # As doctor finds the WebUI: walking up from the extension, reading its webui-user file's --data-dir.
    root = _fake_webui(tmp_path / "webui", "a1111")
    extension = _install(root / "extensions" / "sd-webui-optim")
    script = "webui-user.bat" if sys.platform == "win32" else "webui-user.sh"
    data = tmp_path / "data"
    line = (
        f"set COMMANDLINE_ARGS=--data-dir {data}\n"
        if sys.platform == "win32"
        else f'export COMMANDLINE_ARGS="--data-dir {data}"\n'
    )
    (root / script).write_text(line, encoding="utf-8")
    shown = run_cli("compile-cache", "show", "--json", cwd=extension, env=_base_env())
    assert shown.json()["root"] == str(data / "cache" / "optim-compile"), shown


# --- a real compile -----------------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("clang++") is None, reason="no C++ compiler")
def test_a_real_compile_writes_into_our_folder(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    code = (
        "import sys, torch\n"
        "from lib_optim.compile import setup_compile_cache\n"
        "from lib_optim.compile.regional import RegionalCompiler\n"
        f"setup = setup_compile_cache({str(tmp_path / 'webui')!r})\n"
        "class ResBlock(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.lin = torch.nn.Linear(8, 8)\n"
        "    def forward(self, x):\n"
        "        return torch.nn.functional.silu(self.lin(x)) * 2 + 1\n"
        "root = torch.nn.Sequential(ResBlock())\n"
        "x = torch.linspace(-2, 2, 64).reshape(8, 8)\n"
        "with torch.no_grad():\n"
        "    want = root(x)\n"
        "    with RegionalCompiler(eager_first_call=False).apply(root, ('ResBlock',), key='k') as app:\n"
        "        got = root(x)\n"
        "assert app.stats.compiles >= 1 and not app.stats.fell_back, app.stats\n"
        "assert torch.allclose(got, want, atol=1e-6)\n"
        "print(setup.folder)\n"
    )
    temp = tmp_path / "temp"
    temp.mkdir()
    env = _base_env(PYTHONPATH=str(ROOT), TMPDIR=str(temp))
    for name in [k for k in env if k.startswith(("OPTIM_COMPILE", "TRITON_", "SD_WEBUI_CACHE"))]:
        env.pop(name)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert proc.returncode == 0, proc.stderr
    folder = Path(proc.stdout.strip().splitlines()[-1])
    assert folder.parent == tmp_path / "webui" / "cache" / "optim-compile"
    _size, counts = count_entries(folder)
    assert counts["kernels"] >= 1, counts
    # torch 2.9+ precompiles headers for its C++ kernels into the temp folder unless we point it at ours
    assert not list(temp.rglob(persist.HEADERS_FOLDER)), sorted(str(p) for p in temp.rglob("*"))[:10]
    torch_folder = persist.torch_version(parse_folder_name(folder.name)[0])  # type: ignore[index]
    if torch_folder >= (2, 9):
        assert (folder / persist.HEADERS_FOLDER).is_dir()
    if torch_folder >= (2, 6):
        assert counts["fx_graphs"] >= 1 and counts["aot_autograd"] >= 1, counts  # on by default: ours too
    status = json.loads(
        json.dumps(cache_status({}, tmp_path / "webui", torch=parse_folder_name(folder.name)[0]).to_dict())
    )  # type: ignore[index]
    assert status["folders"][0]["current"] is True and status["folders"][0]["entries"]["kernels"] >= 1


def test_precompiled_headers_move_into_our_folder_only_from_torchs_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch 2.9+ ``_inductor/codecache.py``: ``_HEADER_DIR = os.path.join(default_cache_dir(), "precompiled_headers")``
    and ``_HEADER_LOCK_DIR`` beside it, set at import, read at each use."""
    default = tmp_path / "temp" / "torchinductor_me"
    codecache = types.SimpleNamespace(
        default_cache_dir=lambda: str(default),
        _HEADER_DIR=str(default / "precompiled_headers"),
        _HEADER_LOCK_DIR=str(default / "precompiled_headers" / "locks"),
    )
    monkeypatch.setitem(sys.modules, "torch._inductor.codecache", codecache)
    assert persist.keep_precompiled_headers() is None  # no compile cache of ours set up: nothing moves
    setup = setup_compile_cache(tmp_path / "webui", environ={}, torch="2.9.0+cu128", python=(3, 10))
    ours = str(setup.folder / persist.HEADERS_FOLDER)  # type: ignore[operator]
    assert persist.keep_precompiled_headers() == ours == codecache._HEADER_DIR
    assert str(Path(ours) / "locks") == codecache._HEADER_LOCK_DIR
    assert persist.keep_precompiled_headers() == ours  # idempotent
    codecache._HEADER_DIR = str(tmp_path / "someone-elses")
    assert persist.keep_precompiled_headers() is None and str(tmp_path / "someone-elses") == codecache._HEADER_DIR
    persist._reset_for_tests()
    codecache._HEADER_DIR = str(default / "precompiled_headers")
    setup_compile_cache(
        tmp_path / "webui", environ={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "mine")}, torch="2.9.0", python=(3, 10)
    )
    assert persist.keep_precompiled_headers() is None  # the user's own inductor folder: torch's defaults stay
    assert str(default / "precompiled_headers") == codecache._HEADER_DIR
