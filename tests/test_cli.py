"""``python -m lib_optim`` as a new user runs it: in a subprocess, from a copy of the package alone.

Every run starts from a temporary copy of ``lib_optim/`` (nothing else of the repository, no PYTHONPATH to
it), either standing alone or inside a fake WebUI checkout's ``extensions/`` folder, so ``--host auto``
has something real to find.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

import lib_optim
from lib_optim.launch.checker import RULES
from lib_optim.launch.env_notes import ENV_NOTES, env_notes_markdown
from lib_optim.launch.profiles import PROFILES
from lib_optim.webui_user import BACKUP_INFIX

PACKAGE = Path(lib_optim.__file__).resolve().parent
EX_USAGE = 64
FINDING_KEYS = {"rule", "severity", "subject", "message", "fix", "key"}
# Variables of the test runner's own shell that would leak into the checks.
_LEAKY_PREFIXES = (
    "PYTORCH_",
    "CUDA_",
    "COMMANDLINE_ARGS",
    "IGNORE_CMD_ARGS_ERRORS",
    "XFORMERS",
    "TORCHINDUCTOR_",
    "TRITON_",
    "OPTIM_COMPILE_CACHE",
    "SD_WEBUI_CACHE",
)
_DROPPED = ("PYTHONPATH", "PYTHONSAFEPATH", "PYTHONSTARTUP", "PYTHONHOME", "PYTHONINSPECT")


def _install(dest: Path) -> Path:
    """Copy the package to ``dest/lib_optim`` and return ``dest`` (the extension folder)."""
    shutil.copytree(PACKAGE, dest / "lib_optim", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _fake_webui(root: Path, kind: str) -> Path:
    (root / "modules").mkdir(parents=True)
    (root / "launch.py").write_text("# launch.py\n")
    if kind in ("forge", "forge-previous"):
        (root / "modules_forge").mkdir()
    if kind == "forge":
        (root / "backend").mkdir()
        (root / "backend" / "memory_management.py").write_text("# backend\n")
    if kind == "forge-previous":
        (root / "ldm_patched").mkdir()
    return root


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def _base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _DROPPED and not k.upper().startswith(_LEAKY_PREFIXES)}
    env["PYTHONIOENCODING"] = "utf-8"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def run_cli(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> Result:
    proc = subprocess.run(
        [sys.executable, "-m", "lib_optim", *map(str, args)],
        cwd=cwd,
        env=_base_env() if env is None else env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=120,
        check=False,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def _expected_exit(findings: list[dict[str, Any]]) -> int:
    severities = {f["severity"] for f in findings}
    return 2 if "error" in severities else 1 if "warning" in severities else 0


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}{BACKUP_INFIX}*"))


@pytest.fixture(scope="module")
def ext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh clone's extension folder, outside any WebUI."""
    return _install(tmp_path_factory.mktemp("clone") / "sd-webui-optim")


@pytest.fixture(scope="module")
def webuis(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Fake checkouts of each host, each with the extension installed in extensions/sd-webui-optim."""
    base = tmp_path_factory.mktemp("webuis")
    roots = {}
    for kind in ("a1111", "forge", "forge-previous"):
        root = _fake_webui(base / kind, kind)
        _install(root / "extensions" / "sd-webui-optim")
        roots[kind] = root
    return roots


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


# --- the copy really is on its own ------------------------------------------------------------------------


def test_runs_from_the_copy_alone(ext: Path) -> None:
    assert sorted(p.name for p in ext.iterdir()) == ["lib_optim"]
    proc = subprocess.run(
        [sys.executable, "-c", "import lib_optim, pathlib; print(pathlib.Path(lib_optim.__file__).resolve())"],
        cwd=ext,
        env=_base_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(proc.stdout.strip()) == (ext / "lib_optim" / "__init__.py").resolve()


def test_version(ext: Path) -> None:
    result = run_cli("--version", cwd=ext)
    assert result.rc == 0
    assert result.out.strip() == f"sd-webui-optim {lib_optim.__version__}"


# --- check -----------------------------------------------------------------------------------------------


def test_check_unknown_flag_is_an_error(ext: Path) -> None:
    result = run_cli("check", "--host", "a1111", "--", "--use-cuda-dsa", cwd=ext)
    assert result.rc == 2, result
    assert "--use-cuda-dsa" in result.out
    assert "[error]" in result.out
    assert "unknown-flag" in result.out


def test_check_ignored_flag_is_a_warning(ext: Path) -> None:
    result = run_cli("check", "--host", "forge", "--", "--medvram", cwd=ext)
    assert result.rc == 1, result
    assert "[warning] --medvram" in result.out


def test_check_clean(ext: Path) -> None:
    result = run_cli("check", "--host", "forge", "--no-env", "--", "--attention-pytorch", cwd=ext)
    assert result.rc == 0, result
    assert "No problems found for WebUI Forge f2." in result.out


def test_check_without_double_dash_is_a_usage_error(ext: Path) -> None:
    # Launch flags go after "--"; without it they are the CLI's own (unknown) options. Issue 9 row 18: say so.
    result = run_cli("check", "--host", "a1111", "--no-env", "--medvram", "--use-cuda-dsa", cwd=ext)
    assert result.rc == EX_USAGE, result
    assert "unrecognized arguments: --medvram --use-cuda-dsa" in result.err
    assert "WebUI launch flags go after `--`: python -m lib_optim check --host a1111 -- --medvram --use-cuda-dsa" in (
        result.err
    )
    assert result.out == ""


def test_check_json(ext: Path) -> None:
    result = run_cli(
        "check", "--host", "forge", "--no-env", "--json", "--", "--medvram", "--all-in-fp32", "--bogus-flag", cwd=ext
    )
    assert result.rc == 2, result
    data = result.json()
    assert data["host"] == "forge"
    assert data["argv"] == ["--medvram", "--all-in-fp32", "--bogus-flag"]
    findings = data["findings"]
    assert findings
    for finding in findings:
        assert set(finding) == FINDING_KEYS
        assert finding["severity"] in ("info", "warning", "error")
        assert finding["rule"] in RULES
        assert finding["key"] == f"{finding['rule']}:{finding['subject']}"
        assert finding["message"]
        assert finding["fix"]
    assert {"subject": "--bogus-flag", "rule": "unknown-flag", "severity": "error"}.items() <= findings[0].items()
    assert any(f["subject"] == "--medvram" and f["severity"] == "warning" for f in findings)
    assert _expected_exit(findings) == result.rc


def test_check_json_clean(ext: Path) -> None:
    result = run_cli("check", "--host", "a1111", "--no-env", "--json", cwd=ext)
    assert result.rc == 0, result
    assert result.json() == {"host": "a1111", "argv": [], "findings": []}


def test_check_sh_file(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_text(
        "#!/bin/bash\n"
        'export COMMANDLINE_ARGS="--medvram --api"\n'
        "export PYTORCH_CUDA_ALLOC_CONF=foo:1\n"
        'python_cmd="python3"\n'
    )
    result = run_cli("check", "--host", "forge", "--no-env", "--json", "--file", path, cwd=ext)
    assert result.rc == 2, result
    data = result.json()
    assert data["argv"] == ["--medvram", "--api"]
    by_subject = {f["subject"]: f for f in data["findings"]}
    assert by_subject["PYTORCH_CUDA_ALLOC_CONF"]["rule"] == "alloc-conf"
    assert by_subject["PYTORCH_CUDA_ALLOC_CONF"]["severity"] == "error"
    assert "foo" in by_subject["PYTORCH_CUDA_ALLOC_CONF"]["message"]
    assert by_subject["--medvram"]["severity"] == "warning"


def test_check_sh_file_ignores_unexported_variables(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_text('#!/bin/bash\nexport COMMANDLINE_ARGS="--api"\nPYTORCH_CUDA_ALLOC_CONF=foo:1\n')
    result = run_cli("check", "--host", "a1111", "--no-env", "--file", path, cwd=ext)
    assert result.rc == 0, result
    assert "PYTORCH_CUDA_ALLOC_CONF" not in result.out


def test_check_bat_file(ext: Path, work: Path) -> None:
    path = work / "webui-user.bat"
    path.write_bytes(
        b"@echo off\r\n"
        b"\r\n"
        b"set PYTHON=\r\n"
        b"set COMMANDLINE_ARGS=--xformers --use-cuda-dsa\r\n"
        b"set CUDA_LAUNCH_BLOCKING=1\r\n"
        b"\r\n"
        b"call webui.bat\r\n"
    )
    result = run_cli("check", "--host", "a1111", "--no-env", "--json", "--file", path, cwd=ext)
    assert result.rc == 2, result
    data = result.json()
    assert data["argv"] == ["--xformers", "--use-cuda-dsa"]
    rules = {(f["rule"], f["subject"]) for f in data["findings"]}
    assert ("unknown-flag", "--use-cuda-dsa") in rules
    assert ("cuda-launch-blocking", "CUDA_LAUNCH_BLOCKING") in rules


def test_check_file_plus_extra_arguments(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_text('export COMMANDLINE_ARGS="--attention-pytorch"\n')
    result = run_cli(
        "check", "--host", "forge", "--no-env", "--json", "--file", path, "--", "--attention-quad", cwd=ext
    )
    assert result.rc == 2, result
    data = result.json()
    assert data["argv"] == ["--attention-quad", "--attention-pytorch"]
    assert any(f["rule"] == "exclusive-flags" for f in data["findings"])


def test_check_missing_file_is_a_usage_error(ext: Path, work: Path) -> None:
    missing = work / "nope" / "webui-user.sh"
    result = run_cli("check", "--host", "forge", "--file", missing, cwd=ext)
    assert result.rc == EX_USAGE, result
    assert "--file" in result.err
    assert "does not exist" in result.err


def test_check_honours_the_shell_environment(ext: Path) -> None:
    env = _base_env(CUDA_LAUNCH_BLOCKING="1")
    result = run_cli("check", "--host", "forge", "--json", "--", "--attention-pytorch", cwd=ext, env=env)
    assert result.rc == 1, result
    findings = result.json()["findings"]
    assert [f["rule"] for f in findings] == ["cuda-launch-blocking"], [(f["rule"], f["subject"]) for f in findings]

    quiet = run_cli("check", "--host", "forge", "--no-env", "--", "--attention-pytorch", cwd=ext, env=env)
    assert quiet.rc == 0, quiet


def test_check_judges_variables_no_row_names(ext: Path) -> None:
    # Issue 15 §1: the generated table of who reads what (lib_optim/launch/envtables.py), from the command line
    env = _base_env(TORCH_ALLOW_TF32="1", PYTORCH_CUDA_ALOC_CONF="expandable_segments:True")
    result = run_cli("check", "--host", "forge", "--json", cwd=ext, env=env)
    assert result.rc == 1, result
    findings = {f["subject"]: f for f in result.json()["findings"]}
    assert findings["TORCH_ALLOW_TF32"]["rule"] == "no-effect-env"
    assert "torch.backends.cuda.matmul.allow_tf32" in findings["TORCH_ALLOW_TF32"]["message"]
    assert "Did you mean PYTORCH_CUDA_ALLOC_CONF?" in findings["PYTORCH_CUDA_ALOC_CONF"]["message"]
    text = run_cli("check", "--host", "forge", cwd=ext, env=env)
    assert "TORCH_ALLOW_TF32  (no-effect-env)" in text.out, text


def test_check_reads_commandline_args_from_the_shell(ext: Path) -> None:
    env = _base_env(COMMANDLINE_ARGS="--api --use-cuda-dsa")
    result = run_cli("check", "--host", "a1111", "--json", cwd=ext, env=env)
    assert result.rc == 2, result
    data = result.json()
    assert data["argv"] == ["--api", "--use-cuda-dsa"]

    quiet = run_cli("check", "--host", "a1111", "--no-env", "--json", cwd=ext, env=env)
    assert quiet.rc == 0, quiet
    assert quiet.json()["argv"] == []


def test_check_file_sees_the_shell_environment(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_text('export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --api"\n')
    env = _base_env(COMMANDLINE_ARGS="--medvram")
    result = run_cli("check", "--host", "forge", "--json", "--file", path, cwd=ext, env=env)
    assert result.rc == 1, result
    assert result.json()["argv"] == ["--medvram", "--api"]


def test_bad_host_is_a_usage_error(ext: Path) -> None:
    result = run_cli("check", "--host", "bogus", "--", "--medvram", cwd=ext)
    assert result.rc == EX_USAGE, result
    # Issue 9 row 21: the option is named once ("--host: host: 'bogus'" before).
    assert "error: --host: 'bogus' is not a known WebUI; allowed: a1111, forge, forge-previous, reforge; or auto" in (
        result.err
    )
    assert result.err.count("host:") == 1
    assert result.out == ""


def test_auto_host_outside_a_webui_covers_both_hosts(ext: Path) -> None:
    # Issue 9 row 1: a clone of this repository has no WebUI around it; check still answers, for both hosts.
    result = run_cli("check", "--no-env", "--", "--medvram", cwd=ext)
    assert result.rc == 1, result  # Forge ignores --medvram: a warning
    note = result.out.splitlines()[0]
    assert note.startswith("No WebUI checkout found around ")
    assert note.count(str(ext.resolve())) == 1  # the folder is named once (it was printed twice)
    assert "showing AUTOMATIC1111 WebUI v1.10 and WebUI Forge f2" in note
    assert "Pass --host a1111, --host forge, --host forge-previous or --host reforge for yours only." in note
    assert "for AUTOMATIC1111 WebUI v1.10" in result.out
    assert "1 finding(s) for WebUI Forge f2:" in result.out
    assert "[warning] --medvram  (ignored-by-host)" in result.out

    as_json = run_cli("check", "--no-env", "--json", "--", "--medvram", cwd=ext)
    data = as_json.json()
    assert data["host"] is None
    assert data["hosts"] == ["a1111", "forge"]
    assert data["note"] == note
    assert data["argv"] == ["--medvram"]
    assert {(f["host"], f["rule"], f["subject"]) for f in data["findings"]} >= {
        ("forge", "ignored-by-host", "--medvram")
    }
    assert all(f["rule"] in RULES for f in data["findings"])
    assert as_json.rc == _expected_exit(data["findings"]) == 1


@pytest.mark.parametrize(
    "argv",
    [
        ("check", "--host", "bogus", "--json"),  # our own usage error
        ("check", "--json", "--no-such-option"),  # argparse's
        ("check", "--json", "--medvram"),  # launch flag without --
        ("profile", "show", "9gb", "--json"),
        ("profile", "show", "24gb", "--host", "forge", "--directml", "--json"),  # a bad combination
        ("doctor", "--json", "--file", "missing-webui-user.sh"),
        ("bench", "--json", "--shapes", ","),
    ],
    ids=["bad-host", "bad-option", "no-double-dash", "bad-profile", "directml-24gb", "missing-file", "no-shapes"],
)
def test_json_errors_are_json_and_exit_64(ext: Path, argv: tuple[str, ...]) -> None:
    # Issue 9 rows 1 and 20: --json always prints JSON, errors too, and every usage error exits 64.
    result = run_cli(*argv, cwd=ext)
    assert result.rc == EX_USAGE, result
    data = result.json()
    assert set(data) == {"error", "exit_code"}
    assert data["exit_code"] == EX_USAGE
    assert data["error"] in result.err  # the same message, for people, on stderr


@pytest.mark.parametrize(
    "argv",
    [
        ("frobnicate",),
        ("check", "--no-such-option"),
        ("profile",),
        ("profile", "apply", "8gb-low"),  # --file is required
    ],
    ids=["bad-command", "bad-option", "no-action", "missing-file"],  # no command at all: the list, exit 0 (below)
)
def test_argparse_errors_exit_64(ext: Path, argv: tuple[str, ...]) -> None:
    result = run_cli(*argv, cwd=ext)
    assert result.rc == EX_USAGE, result
    assert "usage:" in result.err


# --- --host auto inside a WebUI checkout -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "rc"),
    [("a1111", 2), ("forge", 0), ("forge-previous", 0)],
)
def test_auto_detects_the_host_around_the_extension(webuis: dict[str, Path], kind: str, rc: int) -> None:
    extension = webuis[kind] / "extensions" / "sd-webui-optim"
    result = run_cli("check", "--no-env", "--json", "--", "--attention-pytorch", cwd=extension)
    assert result.rc == rc, result
    assert result.json()["host"] == kind


def test_auto_uses_the_extension_location_not_the_cwd(webuis: dict[str, Path], work: Path) -> None:
    extension = webuis["forge"] / "extensions" / "sd-webui-optim"
    env = _base_env(PYTHONPATH=str(extension))
    result = run_cli("check", "--no-env", "--json", "--", "--attention-pytorch", cwd=work, env=env)
    assert result.rc == 0, result
    assert result.json()["host"] == "forge"


@pytest.mark.parametrize("kind", ["a1111", "forge", "forge-previous"])
def test_auto_detects_the_host_from_the_file_folder(ext: Path, webuis: dict[str, Path], kind: str) -> None:
    path = webuis[kind] / f"webui-user-{kind}.sh"
    path.write_text('#!/bin/bash\nexport COMMANDLINE_ARGS="--attention-pytorch"\n')
    result = run_cli("check", "--no-env", "--json", "--file", path, cwd=ext)
    assert result.rc == (2 if kind == "a1111" else 0), result
    data = result.json()
    assert data["host"] == kind
    assert data["argv"] == ["--attention-pytorch"]


def test_explicit_host_wins_over_auto(webuis: dict[str, Path]) -> None:
    extension = webuis["forge"] / "extensions" / "sd-webui-optim"
    result = run_cli("check", "--host", "a1111", "--no-env", "--json", "--", "--attention-pytorch", cwd=extension)
    assert result.rc == 2, result
    assert result.json()["host"] == "a1111"


def test_profile_apply_detects_the_host_from_the_file(ext: Path, webuis: dict[str, Path]) -> None:
    path = webuis["forge"] / "webui-user-apply.sh"
    path.write_text("#!/bin/bash\n")
    result = run_cli("profile", "apply", "8gb-low", "--file", path, "--dry-run", cwd=ext)
    assert result.rc == 0, result
    assert "--attention-quad" in result.out  # the Forge flag, not A1111's --opt-sub-quad-attention
    assert path.read_text() == "#!/bin/bash\n"


# --- doctor ----------------------------------------------------------------------------------------------


def test_doctor(ext: Path) -> None:
    as_json = run_cli("doctor", "--host", "forge", "--json", cwd=ext)
    data = as_json.json()
    assert data["host"] == "forge"
    assert {"python", "torch", "gpus"} <= set(data["system"])
    for finding in data["findings"]:
        assert set(finding) == FINDING_KEYS
    assert as_json.rc == _expected_exit(data["findings"]), as_json
    recommended = data["recommended_profile"]
    assert recommended["name"] in PROFILES
    if not data["system"]["gpus"] and not data["system"]["directml"]:
        assert recommended["name"] == "cpu"
        assert recommended["flags"] == ["--always-cpu", "--skip-torch-cuda-test"]
    assert "COMMANDLINE_ARGS" in recommended["commandline"]

    text = run_cli("doctor", "--host", "forge", cwd=ext)
    assert text.rc == as_json.rc, text
    assert f"Recommended profile: {recommended['name']} ({recommended['reason']})" in text.out
    assert recommended["commandline"] in text.out
    assert f"python -m lib_optim profile apply {recommended['name']} --file" in text.out
    if recommended["name"] == "cpu":
        # Appended to the user's own arguments, never replacing them (issue 9 row 13).
        expected = (
            "set COMMANDLINE_ARGS=%COMMANDLINE_ARGS% "
            if sys.platform == "win32"
            else ('export COMMANDLINE_ARGS="$COMMANDLINE_ARGS ')
        )
        assert f"{expected}--always-cpu --skip-torch-cuda-test" in text.out


def test_doctor_outside_a_webui_covers_both_hosts(ext: Path) -> None:
    # Issue 9 row 1: the README's first command, from a clone with no WebUI around it.
    result = run_cli("doctor", cwd=ext)
    assert result.rc in (0, 1, 2), result
    assert "No WebUI checkout found around" in result.out
    assert "for AUTOMATIC1111 WebUI v1.10" in result.out
    assert "for WebUI Forge f2" in result.out
    assert "Recommended profile: " in result.out
    assert "On AUTOMATIC1111 WebUI v1.10:" in result.out
    assert "On WebUI Forge f2:" in result.out

    as_json = run_cli("doctor", "--json", cwd=ext)
    data = as_json.json()
    assert data["host"] is None
    assert data["hosts"] == ["a1111", "forge"]
    assert set(data["recommended_profile"]["by_host"]) == {"a1111", "forge"}
    assert data["recommended_profile"]["name"] in PROFILES
    assert {f["host"] for f in data["findings"]} <= {"a1111", "forge"}
    assert as_json.rc == _expected_exit(data["findings"]) == result.rc


# --- profile list / show ---------------------------------------------------------------------------------


def test_profile_list(ext: Path) -> None:
    result = run_cli("profile", "list", cwd=ext)
    assert result.rc == 0, result
    names = [line.split()[0] for line in result.out.splitlines() if line.strip()]
    assert names == [*PROFILES, "auto"]
    for profile in PROFILES.values():
        assert profile.title in result.out

    as_json = run_cli("profile", "list", "--json", cwd=ext)
    assert as_json.rc == 0, as_json
    rows = as_json.json()
    assert [row["name"] for row in rows] == [*PROFILES, "auto"]
    for row in rows:
        assert set(row) == {"name", "title", "description"}
        assert row["title"] and row["description"]


def test_profile_show(ext: Path) -> None:
    result = run_cli("profile", "show", "8gb-low", "--host", "forge", cwd=ext)
    assert result.rc == 0, result
    assert "8gb-low" in result.out
    assert "WebUI Forge f2" in result.out
    assert "--attention-quad --disable-xformers" in result.out
    assert "PYTORCH_CUDA_ALLOC_CONF" in result.out
    assert "garbage_collection_threshold:0.6,max_split_size_mb:128" in result.out
    assert '"inference_memory_mb": 2048' in result.out


def test_profile_show_json(ext: Path) -> None:
    result = run_cli("profile", "show", "8gb-low", "--host", "a1111", "--json", cwd=ext)
    assert result.rc == 0, result
    data = result.json()
    assert data["name"] == "8gb-low"
    assert data["host"] == "a1111"
    assert data["flags"] == ["--medvram", "--opt-sub-quad-attention"]
    assert set(data["env"]) == {"PYTORCH_CUDA_ALLOC_CONF"}
    assert data["generation"]["enabled"] is True


def test_profile_show_directml_on_forge(ext: Path) -> None:
    result = run_cli("profile", "show", "8gb-low", "--host", "forge", "--directml", "--json", cwd=ext)
    assert result.rc == 0, result
    data = result.json()
    assert "--directml" in data["flags"]
    assert data["env"] == {}


def test_profile_show_directml_on_a1111_is_refused(ext: Path) -> None:
    # A bad combination of options is a usage error (issue 9 row 20).
    result = run_cli("profile", "show", "8gb-low", "--host", "a1111", "--directml", cwd=ext)
    assert result.rc == EX_USAGE, result
    assert "A1111" in result.err
    assert "no DirectML" in result.err
    assert result.out == ""


def test_profile_show_directml_for_a_big_card_is_refused(ext: Path) -> None:
    result = run_cli("profile", "show", "24gb", "--host", "forge", "--directml", cwd=ext)
    assert result.rc == EX_USAGE, result
    assert "'24gb'" in result.err
    assert "8gb-low" in result.err


def test_profile_show_bad_name(ext: Path) -> None:
    result = run_cli("profile", "show", "9gb", "--host", "forge", cwd=ext)
    assert result.rc == EX_USAGE, result
    assert "'9gb'" in result.err
    for name in (*PROFILES, "auto"):
        assert name in result.err


def test_profile_show_reforge(ext: Path) -> None:
    result = run_cli("profile", "show", "8gb-low", "--host", "reforge", cwd=ext)
    assert result.rc == 0, result
    assert "8 GB — Low (8gb-low) on reForge" in result.out
    assert "--attention-quad --disable-xformers" in result.out


# --- profile apply / remove ------------------------------------------------------------------------------

SH_ORIGINAL = b'#!/bin/bash\n#export COMMANDLINE_ARGS=""\nexport COMMANDLINE_ARGS="--api"\npython_cmd="python3"\n'
BAT_ORIGINAL = b"@echo off\r\n\r\nset PYTHON=\r\nset COMMANDLINE_ARGS=--api\r\n\r\ncall webui.bat\r\n"


def test_profile_apply_dry_run_writes_nothing(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_bytes(SH_ORIGINAL)
    result = run_cli("profile", "apply", "8gb-low", "--host", "forge", "--file", path, "--dry-run", cwd=ext)
    assert result.rc == 0, result
    assert "(current)" in result.out
    assert "(new)" in result.out
    assert "+export COMMANDLINE_ARGS=" in result.out
    assert "--attention-quad" in result.out
    assert "(dry run: nothing written)" in result.out
    assert path.read_bytes() == SH_ORIGINAL
    assert sorted(p.name for p in work.iterdir()) == ["webui-user.sh"]


@pytest.mark.parametrize(
    ("name", "original"), [("webui-user.sh", SH_ORIGINAL), ("webui-user.bat", BAT_ORIGINAL)], ids=["sh", "bat"]
)
def test_profile_apply_twice_then_remove(ext: Path, work: Path, name: str, original: bytes) -> None:
    path = work / name
    path.write_bytes(original)
    first = run_cli("profile", "apply", "8gb-medium", "--host", "a1111", "--file", path, cwd=ext)
    assert first.rc == 0, first
    assert "profile 8gb-medium written" in first.out
    backups = _backups(path)
    assert len(backups) == 1
    assert str(backups[0]) in first.out
    assert backups[0].read_bytes() == original
    written = path.read_bytes()
    assert b"--medvram-sdxl" in written

    check = run_cli("check", "--host", "a1111", "--no-env", "--json", "--file", path, cwd=ext)
    assert check.rc == 0, check
    assert check.json()["argv"] == ["--api", "--medvram-sdxl", "--opt-sdp-attention"]

    second = run_cli("profile", "apply", "8gb-medium", "--host", "a1111", "--file", path, cwd=ext)
    assert second.rc == 0, second
    assert "Nothing to change." in second.out
    assert path.read_bytes() == written
    assert _backups(path) == backups

    dry = run_cli("profile", "remove", "--file", path, "--dry-run", cwd=ext)
    assert dry.rc == 0, dry
    assert "(dry run: nothing written)" in dry.out
    assert path.read_bytes() == written

    removed = run_cli("profile", "remove", "--file", path, cwd=ext)
    assert removed.rc == 0, removed
    assert "removed" in removed.out
    assert path.read_bytes() == original

    again = run_cli("profile", "remove", "--file", path, cwd=ext)
    assert again.rc == 0, again
    assert "Nothing to change." in again.out
    assert path.read_bytes() == original


def test_profile_apply_refused_writes_nothing(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    original = b'#!/bin/bash\nexport COMMANDLINE_ARGS="--attention-pytorch"\n'
    path.write_bytes(original)
    result = run_cli("profile", "apply", "8gb-low", "--host", "forge", "--file", path, cwd=ext)
    assert result.rc == 1, result
    assert "not written" in result.err
    assert "--attention-pytorch" in result.err
    assert path.read_bytes() == original
    assert _backups(path) == []


def test_profile_apply_bad_file_suffix(ext: Path, work: Path) -> None:
    path = work / "webui-user.txt"
    result = run_cli("profile", "apply", "8gb-low", "--host", "forge", "--file", path, cwd=ext)
    assert result.rc == EX_USAGE, result
    assert "--file" in result.err
    assert "webui-user.txt" in result.err
    assert "*.sh" in result.err
    assert not path.exists()

    removed = run_cli("profile", "remove", "--file", path, cwd=ext)
    assert removed.rc == EX_USAGE, removed
    assert "webui-user.txt" in removed.err


def test_profile_apply_bad_file_contents(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    original = b"#!/bin/bash\n# >>> sd-webui-optim garbage\n"
    path.write_bytes(original)
    result = run_cli("profile", "apply", "12gb", "--host", "a1111", "--file", path, cwd=ext)
    assert result.rc == EX_USAGE, result
    assert f"{path}:2: malformed sd-webui-optim begin marker" in result.err
    assert "Traceback" not in result.err
    assert path.read_bytes() == original


# --- rules -----------------------------------------------------------------------------------------------


def test_rules(ext: Path) -> None:
    result = run_cli("rules", cwd=ext)
    assert result.rc == 0, result
    assert result.out.startswith("| Rule | Severity | Hosts | What it finds |")
    for rule_id in RULES:
        assert f"`{rule_id}`" in result.out

    as_json = run_cli("rules", "--json", cwd=ext)
    assert as_json.rc == 0, as_json
    rows = as_json.json()
    assert [row["id"] for row in rows] == list(RULES)
    for row in rows:
        assert row["severity"] in ("info", "warning", "error")
        assert row["hosts"]


def test_rules_env(ext: Path) -> None:
    result = run_cli("rules", "--env", cwd=ext)
    assert result.rc == 0, result
    assert result.out.strip() == env_notes_markdown().strip()
    as_json = run_cli("rules", "--env", "--json", cwd=ext)
    assert as_json.rc == 0, as_json
    keys = [row["key"] for row in as_json.json() if row["rule"]]
    assert keys == [n.key for n in ENV_NOTES]


# --- issue 15 §4-5: doctor from the extension's folder; the command line itself -------------------------------


@pytest.mark.parametrize("where", ["root", "extension"])
def test_doctor_finds_the_webui_and_its_file_walking_up(tmp_path: Path, where: str) -> None:
    # From <webui>/extensions/sd-webui-optim (where a user lands after installing us) as from the WebUI's own
    # folder: the checkout above is found, and its webui-user file (what its launcher runs) is read.
    root = _fake_webui(tmp_path / "webui", "a1111")
    extension = _install(root / "extensions" / "sd-webui-optim")
    script = "webui-user.bat" if sys.platform == "win32" else "webui-user.sh"
    line = (
        "set COMMANDLINE_ARGS=--attention-pytorch\n"
        if script.endswith(".bat")
        else 'export COMMANDLINE_ARGS="--attention-pytorch"\n'
    )
    (root / script).write_text(line, encoding="utf-8")
    env = _base_env(PYTHONPATH=str(extension))
    result = run_cli("doctor", "--json", cwd=root if where == "root" else extension, env=env)
    data = result.json()
    assert data["host"] == "a1111", result
    assert "--attention-pytorch" in {f["subject"] for f in data["findings"]}, result  # a Forge flag on A1111
    assert str(root / script) in result.err  # it says which file it read
    text = run_cli("doctor", cwd=extension, env=env)
    assert f"--file {root / script} --host a1111" in text.out or "nothing to put in webui-user" in text.out, text


def test_no_arguments_lists_the_commands(ext: Path) -> None:
    # What a user typing `python -m lib_optim` wants is the list of commands, as pip answers: on stdout, exit 0
    # (not argparse's "the following arguments are required" and exit 2).
    result = run_cli(cwd=ext)
    assert result.rc == 0, result
    from lib_optim.cli import _commands, build_parser

    words = result.out.split()
    for name in _commands(build_parser()):
        assert name in words, name
    for first_words in ("check launch flags", "probe this machine", "launch profiles for", "list the checker's"):
        assert first_words in " ".join(words), first_words


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [(("doctr",), "'doctor'"), (("profil", "list"), "'profile'"), (("profile", "aply", "12gb"), "'apply'")],
)
def test_a_mistyped_command_gets_a_suggestion(ext: Path, argv: tuple[str, ...], suggestion: str) -> None:
    result = run_cli(*argv, cwd=ext)
    assert result.rc == EX_USAGE, result
    assert f"(did you mean {suggestion}?)" in result.err


def test_nothing_close_gets_no_suggestion(ext: Path) -> None:
    result = run_cli("xyzzy", cwd=ext)
    assert result.rc == EX_USAGE, result
    assert "did you mean" not in result.err and "invalid choice: 'xyzzy'" in result.err


def _all_parsers(parser: Any) -> Any:
    from lib_optim.cli import _commands

    for name, sub in _commands(parser).items():
        yield name, sub
        yield from _all_parsers(sub)


def test_every_json_option_is_in_its_help() -> None:
    from lib_optim.cli import build_parser

    with_json = []
    for name, sub in _all_parsers(build_parser()):
        option = next((a for a in sub._actions if "--json" in a.option_strings), None)
        if option is None:
            continue
        with_json.append(name)
        assert option.help, f"{name}: --json has no help text"
        assert "--json" in sub.format_help() and option.help.split()[0] in sub.format_help(), name
    assert {"check", "doctor", "list", "show", "rules", "bench"} <= set(with_json)
