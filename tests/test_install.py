"""install.py installs only what is missing, never torch/torchvision/xformers, and honours --skip-install."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

from lib_optim.requirements import NEVER_INSTALL, RUNTIME_REQUIREMENTS

ROOT = Path(__file__).resolve().parent.parent


def load_install():
    spec = importlib.util.spec_from_file_location("optim_install", ROOT / "install.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fake_launch(skip_install: bool):
    """Imitates the launcher API install.py uses (A1111 v1.10.1 modules/launch_utils.py:139-144: run_pip)."""
    calls: list[tuple[str, str]] = []
    launch = types.ModuleType("launch")
    launch.args = types.SimpleNamespace(skip_install=skip_install)
    launch.run_pip = lambda command, desc=None, live=False: calls.append((command, desc))
    return launch, calls


def test_requirements_never_include_host_owned_packages():
    names = {req.split("=")[0].split(">")[0].split("<")[0].strip().lower() for req in RUNTIME_REQUIREMENTS.values()}
    assert not names & NEVER_INSTALL
    assert not set(RUNTIME_REQUIREMENTS) & NEVER_INSTALL


def test_installs_only_missing(monkeypatch):
    install = load_install()
    assert install.missing_requirements(lambda module: True) == []
    assert install.missing_requirements(lambda module: False) == list(RUNTIME_REQUIREMENTS.values())


def test_main_runs_pip_for_missing_module(monkeypatch):
    install = load_install()
    launch, calls = fake_launch(skip_install=False)
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    install.main()
    assert [c[0] for c in calls] == [f'install "{r}"' for r in RUNTIME_REQUIREMENTS.values()]


def test_main_installs_nothing_when_present(monkeypatch):
    install = load_install()
    launch, calls = fake_launch(skip_install=False)
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object())
    install.main()
    assert calls == []


def test_skip_install_is_honoured(monkeypatch):
    install = load_install()
    launch, calls = fake_launch(skip_install=True)
    monkeypatch.setitem(sys.modules, "launch", launch)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    install.main()
    assert calls == []


def test_runs_as_a_separate_process_like_the_host_does(tmp_path):
    # The host runs `python <ext>/install.py` with PYTHONPATH=<webui root> (launch_utils.py:228-241).
    webui = tmp_path / "webui"
    webui.mkdir()
    (webui / "launch.py").write_text(
        "import types\nargs = types.SimpleNamespace(skip_install=False)\n"
        "def run_pip(command, desc=None, live=False):\n    print('PIP', command)\n"
    )
    result = subprocess.run(
        [sys.executable, str(ROOT / "install.py")],
        env={"PYTHONPATH": str(webui), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        check=True,
    )
    missing = [r for m, r in RUNTIME_REQUIREMENTS.items() if importlib.util.find_spec(m) is None]
    assert result.stdout.count("PIP") == len(missing)


def test_skip_install_is_honoured_from_the_extensions_tab_too():
    """The tab runs install.py in a subprocess (through a shell) with only COMMANDLINE_ARGS, not the WebUI's
    own command line (A1111 v1.10.1 modules/launch_utils.py:228-241): the flag is found in an ancestor."""
    install = load_install()
    args = types.SimpleNamespace(skip_install=False)
    webui = [["/bin/sh", "-c", '"python" "install.py"'], ["python", "launch.py", "--skip-install", "--api"]]
    assert install.skip_install_requested(args, webui) is True
    assert install.skip_install_requested(args, [["python", "launch.py", "--api"]]) is False
    assert install.skip_install_requested(types.SimpleNamespace(skip_install=True), []) is True
    # the real ancestors of this test process are readable and carry no such flag
    assert install.skip_install_requested(args) is ("--skip-install" in " ".join(sys.argv))
