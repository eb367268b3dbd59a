"""Which host is running, told from the loaded code (docs/hosts.md §8.2), the checkout's files only as a fallback."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from lib_optim.host_specs.kinds import HostKind
from lib_optim.hosts import detect_running_host, running_kind


def namespace(**attrs: Any) -> types.SimpleNamespace:
    return types.SimpleNamespace(**attrs)


def args_module(**attrs: Any) -> types.ModuleType:
    """ldm_patched/modules/args_parser.py after initialize_forge() re-parsed it (FP modules_forge/
    initialization.py:38-39, RF :37-38): ``args`` is the back end's namespace."""
    module = types.ModuleType("ldm_patched.modules.args_parser")
    module.args = namespace(**attrs)
    return module


FORGE_F2 = {"modules_forge": object(), "backend.memory_management": object(), "modules.shared_cmd_options": object()}
# Forge previous: --gpu-device-id (ldm_patched/modules/args_parser.py:51); reForge: --cuda-device, --reserve-vram
# (:54, :147) and no --gpu-device-id
PREVIOUS = {"modules_forge": object(), "ldm_patched.modules.args_parser": args_module(gpu_device_id=None)}
REFORGE = {
    "modules_forge": object(),
    "ldm_patched.modules.args_parser": args_module(cuda_device=None, reserve_vram=None),
}
# A1111: preload runs inside modules.shared_cmd_options (§1.2), and no modules_forge is ever imported
A1111 = {"modules": object(), "modules.shared_cmd_options": object(), "modules.paths_internal": object()}


@pytest.mark.parametrize(
    ("loaded", "kind"),
    [
        (FORGE_F2, HostKind.FORGE),
        (PREVIOUS, HostKind.FORGE_PREVIOUS),
        (REFORGE, HostKind.REFORGE),
        (A1111, HostKind.A1111),
        ({"modules": object(), "modules.paths_internal": object()}, None),  # nothing tells yet
        ({"modules_forge.initialization": object(), "modules.shared_cmd_options": object()}, None),
        # a package named "backend" of some extension's in A1111: not Forge's
        ({"backend.memory_management": object(), "modules.shared_cmd_options": object()}, HostKind.A1111),
    ],
)
def test_running_kind(loaded: dict[str, Any], kind: HostKind | None) -> None:
    assert running_kind(loaded) is kind


def checkout(tmp_path: Path, *dirs: str, version: str | None = None) -> Path:
    root = tmp_path / "webui"
    (root / "modules").mkdir(parents=True)
    (root / "launch.py").write_text("")
    for d in dirs:
        (root / d).mkdir(parents=True, exist_ok=True)
    if version is not None:
        (root / "modules_forge" / "forge_version.py").write_text(f"version = '{version}'\n")
    return root


def install(monkeypatch: pytest.MonkeyPatch, root: Path, loaded: dict[str, Any]) -> None:
    paths = types.ModuleType("modules.paths_internal")
    paths.script_path = str(root)
    monkeypatch.setitem(sys.modules, "modules", types.ModuleType("modules"))
    monkeypatch.setitem(sys.modules, "modules.paths_internal", paths)
    for name, module in loaded.items():
        monkeypatch.setitem(sys.modules, name, module)


def test_the_running_code_wins_over_folder_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reForge renamed or checked out without its version file looks like Forge previous on disk (§8.1); the
    code it runs says reForge."""
    root = checkout(tmp_path, "modules_forge", "ldm_patched/modules")
    install(monkeypatch, root, REFORGE)
    version = types.ModuleType("modules_forge.forge_version")
    version.version = "1.0.0v2-v1.10.1RC"
    monkeypatch.setitem(sys.modules, "modules_forge.forge_version", version)
    found = detect_running_host()
    assert found is not None
    assert (found.root, found.kind, found.version) == (root, HostKind.REFORGE, "1.0.0v2-v1.10.1RC")


def test_the_checkout_decides_when_nothing_loaded_tells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = checkout(tmp_path, "modules_forge", "ldm_patched/modules", version="0.0.17v1.8.0rc")
    install(monkeypatch, root, {})
    for name in list(sys.modules):
        if name.split(".")[0] in ("modules_forge", "ldm_patched", "backend") or name == "modules.shared_cmd_options":
            monkeypatch.delitem(sys.modules, name)
    found = detect_running_host()
    assert found is not None and found.kind is HostKind.FORGE_PREVIOUS and found.version == "0.0.17v1.8.0rc"


def test_outside_a_webui(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "modules", raising=False)
    monkeypatch.delitem(sys.modules, "modules.paths_internal", raising=False)
    assert detect_running_host() is None
