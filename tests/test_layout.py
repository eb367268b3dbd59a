"""House rules a machine can check: where host code and gradio may be imported, one script, Python 3.10."""

from __future__ import annotations

import ast
import configparser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOST_PACKAGES = {"modules", "backend", "ldm", "ldm_patched", "sgm", "launch"}


def imported_top_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def lib_files() -> list[Path]:
    return sorted((ROOT / "lib_optim").rglob("*.py"))


def test_host_code_only_in_hosts_package():
    offenders = [
        (str(path.relative_to(ROOT)), sorted(imported_top_names(path) & HOST_PACKAGES))
        for path in lib_files()
        if "hosts" not in path.relative_to(ROOT / "lib_optim").parts and imported_top_names(path) & HOST_PACKAGES
    ]
    assert offenders == []


def test_gradio_only_in_ui_module():
    offenders = [
        str(path.relative_to(ROOT))
        for path in lib_files()
        if "gradio" in imported_top_names(path) and path.name != "ui.py"
    ]
    assert offenders == []


def test_exactly_one_script():
    assert [p.name for p in (ROOT / "scripts").glob("*.py")] == ["optim.py"]


def test_our_code_imported_only_as_lib_optim():
    for path in [*lib_files(), *(ROOT / "scripts").glob("*.py"), ROOT / "preload.py", ROOT / "install.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                pytest.fail(f"{path}: relative import; import our code as lib_optim.*")


@pytest.mark.parametrize(
    "name",
    [
        "preload.py",
        "install.py",
        "README.md",
        "pyproject.toml",
        "metadata.ini",
        "LICENSE",
        "CHANGELOG.md",
        "style.css",
        ".ci/run",
    ],
)
def test_layout_files_exist(name):
    assert (ROOT / name).is_file()


def test_javascript_present():
    assert list((ROOT / "javascript").glob("*.js"))


def test_metadata_ini_parses():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "metadata.ini", encoding="utf-8")
    assert parser.has_section("Extension")


def test_no_print_calls_in_shipped_code():
    # user-facing output goes through logging ("[Optim]" prefix); the CLI writes to sys.stdout explicitly
    for path in [*lib_files(), *(ROOT / "scripts").glob("*.py"), ROOT / "preload.py", ROOT / "install.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        calls = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "print"]
        assert not calls, f"{path}: print() call"


def test_python_310_compatible():
    import shutil
    import subprocess

    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (tools/test.sh installs it)")
    targets = ["lib_optim", "scripts", "preload.py", "install.py"]
    result = subprocess.run(
        [vermin, "-t=3.10-", "--no-tips", "--violations", "--eval-annotations", *targets],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_one_logger_naming_convention():
    """Every module logs through ``log = get_logger(__name__)`` (lib_optim.log): one tree, one prefix."""
    import re

    for path in lib_files():
        text = path.read_text(encoding="utf-8")
        if "get_logger(" not in text or path.name == "log.py":
            continue
        assert re.search(r"^log = get_logger\(__name__\)$", text, re.M), path
        assert not re.search(r"^\w+ = (get_logger|logging\.getLogger)\((?!__name__\))", text, re.M), path
