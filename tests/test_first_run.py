"""The README's first command, exactly as written, in a fresh copy of this repository with no WebUI around it,
run by a Python that has neither torch nor pynvml: what most people type first (issue 9)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from fake_nvidia_smi import skip_reason, write_fake_nvidia_smi
from test_cli import _base_env

ROOT = Path(__file__).resolve().parent.parent
_NOT_SHIPPED = {".git", ".ci-venvs", "__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}


def readme_first_command() -> str:
    """The first command of README's "The two commands" section, as a user would copy it."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## The two commands", 1)[1]
    match = re.search(r"```bash\n(.+?)\n```", section, re.DOTALL)
    assert match, "README: no command under 'The two commands'"
    return match.group(1).strip()


def _repository_files() -> list[str]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.decode()
        return [name for name in listed.split("\0") if name and (ROOT / name).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (a release archive): every file
        return [
            str(p.relative_to(ROOT))
            for p in ROOT.rglob("*")
            if p.is_file() and not _NOT_SHIPPED & set(p.relative_to(ROOT).parts)
        ]


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = tmp_path_factory.mktemp("fresh") / "sd-webui-optim"
    for name in _repository_files():
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return dest


@pytest.fixture(scope="module")
def bare_python_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin folder of a new virtualenv: this interpreter without any installed package."""
    home = tmp_path_factory.mktemp("bare") / "venv"
    venv.EnvBuilder(with_pip=False, symlinks=os.name != "nt").create(home)
    bin_dir = home / ("Scripts" if os.name == "nt" else "bin")
    probe = "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('pynvml'))"
    found = subprocess.run([bin_dir / "python", "-c", probe], capture_output=True, text=True, check=True).stdout
    assert found.split() == ["None", "None"], found
    return bin_dir


def _run_as_written(clone: Path, path: str) -> subprocess.CompletedProcess[str]:
    command = readme_first_command()
    assert command == "python -m lib_optim doctor"  # what the README says, and what this test runs
    shell = shutil.which("bash") or shutil.which("sh")
    if shell is None:
        pytest.skip("needs a shell to run the command as typed")
    return subprocess.run(
        [shell, "-c", command],
        cwd=clone,
        env=_base_env(PATH=path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_readme_first_command_in_a_fresh_clone(clone: Path, bare_python_bin: Path) -> None:
    assert not (clone.parent / "launch.py").exists()  # no WebUI around it
    result = _run_as_written(clone, f"{bare_python_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    assert result.returncode in (0, 1, 2), result
    assert "Traceback" not in result.stderr, result.stderr
    out = result.stdout
    assert out.startswith("Python   ")
    assert "torch    not installed in this Python" in out
    assert f"No WebUI checkout found around {clone.resolve()}: showing " in out
    assert "Recommended profile: " in out
    assert "-m lib_optim doctor" in out  # which Python to run for exact figures


@pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
def test_readme_first_command_on_a_gpu_machine(clone: Path, bare_python_bin: Path, tmp_path: Path) -> None:
    fake_bin = tmp_path / "driver-bin"
    write_fake_nvidia_smi(fake_bin, [("NVIDIA GeForce RTX 3060", 12288, 11893, "550.54.14", "8.6")])
    path = os.pathsep.join([str(bare_python_bin), str(fake_bin), os.environ.get("PATH", "")])
    result = _run_as_written(clone, path)
    assert result.returncode in (0, 1, 2), result
    out = result.stdout
    assert "GPU 0    NVIDIA GeForce RTX 3060 [nvidia], 12288 MB (11893 MB free), sm 8.6, via nvidia-smi" in out
    assert "Driver   NVIDIA 550.54.14 (via nvidia-smi)" in out
    assert "Recommended profile: 12gb (for the NVIDIA GeForce RTX 3060 (12288 MB))" in out
    assert "Recommended profile: cpu" not in out
    assert "--use-cpu" not in out and "--always-cpu" not in out
    assert "missing or broken" not in out
