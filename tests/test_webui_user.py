"""Tests for lib_optim.webui_user: reading and editing webui-user.sh / webui-user.bat."""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lib_optim import webui_user as wu
from lib_optim.webui_user import (
    WebuiUserError,
    apply_block,
    find_block,
    parse_launch_config,
    read_launch_config,
    remove_block,
    render_block,
)

# --- Stock files, verbatim -------------------------------------------------------------------------------

# A1111 v1.10.1 webui-user.sh (Forge main ships the identical file).
A1111_SH = """#!/bin/bash
#########################################################
# Uncomment and change the variables below to your need:#
#########################################################

# Install directory without trailing slash
#install_dir="/home/$(whoami)"

# Name of the subdirectory
#clone_dir="stable-diffusion-webui"

# Commandline arguments for webui.py, for example: export COMMANDLINE_ARGS="--medvram --opt-split-attention"
#export COMMANDLINE_ARGS=""

# python3 executable
#python_cmd="python3"

# git executable
#export GIT="git"

# python3 venv without trailing slash (defaults to ${install_dir}/${clone_dir}/venv)
#venv_dir="venv"

# script to launch to start the app
#export LAUNCH_SCRIPT="launch.py"

# install command for torch
#export TORCH_COMMAND="pip install torch==1.12.1+cu113 --extra-index-url https://download.pytorch.org/whl/cu113"

# Requirements file to use for stable-diffusion-webui
#export REQS_FILE="requirements_versions.txt"

# Fixed git repos
#export K_DIFFUSION_PACKAGE=""
#export GFPGAN_PACKAGE=""

# Fixed git commits
#export STABLE_DIFFUSION_COMMIT_HASH=""
#export CODEFORMER_COMMIT_HASH=""
#export BLIP_COMMIT_HASH=""

# Uncomment to enable accelerated launch
#export ACCELERATE="True"

# Uncomment to disable TCMalloc
#export NO_TCMALLOC="True"

###########################################
"""

# A1111 v1.10.1 webui-user.bat (as checked out on Windows: CRLF).
A1111_BAT = (
    "@echo off\r\n\r\nset PYTHON=\r\nset GIT=\r\nset VENV_DIR=\r\nset COMMANDLINE_ARGS=\r\n\r\ncall webui.bat\r\n"
)

# Forge main webui-user.bat.
FORGE_BAT = """@echo off

set PYTHON=
set GIT=
set VENV_DIR=
set COMMANDLINE_ARGS=

@REM Uncomment following code to reference an existing A1111 checkout.
@REM set A1111_HOME=Your A1111 checkout dir
@REM
@REM set VENV_DIR=%A1111_HOME%/venv
@REM set COMMANDLINE_ARGS=%COMMANDLINE_ARGS% ^
@REM  --ckpt-dir %A1111_HOME%/models/Stable-diffusion ^
@REM  --hypernetwork-dir %A1111_HOME%/models/hypernetworks ^
@REM  --embeddings-dir %A1111_HOME%/embeddings ^
@REM  --lora-dir %A1111_HOME%/models/Lora

call webui.bat
"""

# Forge's example, uncommented the way users do it.
FORGE_BAT_A1111_HOME = """@echo off

set PYTHON=
set GIT=
set VENV_DIR=
set COMMANDLINE_ARGS=

set A1111_HOME=C:/sd/stable-diffusion-webui

set VENV_DIR=%A1111_HOME%/venv
set COMMANDLINE_ARGS=%COMMANDLINE_ARGS% ^
 --ckpt-dir %A1111_HOME%/models/Stable-diffusion ^
 --hypernetwork-dir %A1111_HOME%/models/hypernetworks ^
 --embeddings-dir %A1111_HOME%/embeddings ^
 --lora-dir %A1111_HOME%/models/Lora

call webui.bat
"""

MESSY_SH = """#!/usr/bin/env bash
# my settings
export COMMANDLINE_ARGS="--medvram --ckpt-dir '/data/my models'"   # 8 GB card
export A=1 B="two words" C='$not_expanded'
python_cmd="python3.10"
venv_dir="-"
PYTORCH_CUDA_ALLOC_CONF=garbage_collection_threshold:0.6
export PYTORCH_CUDA_ALLOC_CONF
COMMANDLINE_ARGS="$COMMANDLINE_ARGS \\
    --opt-sdp-attention"
export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --xformers"
COMMANDLINE_ARGS+=" --api"
export OUT_DIR=${UNSET_THING:-/tmp/out}/${A}x
export WITH_HASH="a # not a comment"   # but this is
if [[ -f /nonexistent ]]; then
    echo "hello"
fi
source ./extra-settings.sh
"""


def _bash() -> str | None:
    return shutil.which("bash")


def _bash_truth(script: Path, names: list[str]) -> tuple[list[str], dict[str, str | None]]:
    """Source the file with real bash (as webui.sh does) and report what a Python child sees."""
    probe = (
        "import json, os, shlex, sys; "
        "print(json.dumps([shlex.split(os.environ.get('COMMANDLINE_ARGS', '')),"
        " {n: os.environ.get(n) for n in sys.argv[1:]}]))"
    )
    cmd = 'source "$1" >/dev/null 2>&1; exec "$2" -c "$3" "${@:4}"'
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/home/tester"}
    out = subprocess.run(
        [_bash() or "bash", "-c", cmd, "bash", str(script), sys.executable, probe, *names],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=script.parent,
    ).stdout
    args, seen = json.loads(out)
    return args, seen


# --- Reading: sh ---------------------------------------------------------------------------------------


def test_stock_sh_sets_nothing() -> None:
    cfg = parse_launch_config(A1111_SH, "sh")
    assert cfg.kind == "sh"
    assert cfg.commandline_args == []
    assert cfg.env == {}
    assert cfg.assignments == []


def test_messy_sh_effective_values() -> None:
    cfg = parse_launch_config(MESSY_SH, "sh", source="webui-user.sh")
    assert cfg.commandline_args == [
        "--medvram",
        "--ckpt-dir",
        "/data/my models",
        "--opt-sdp-attention",
        "--xformers",
        "--api",
    ]
    assert cfg.env["A"] == "1"
    assert cfg.env["B"] == "two words"
    assert cfg.env["C"] == "$not_expanded"
    assert cfg.env["OUT_DIR"] == "/tmp/out/1x"
    assert cfg.env["WITH_HASH"] == "a # not a comment"
    assert cfg.env["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6"
    # Shell variables read by webui.sh itself are reported, but they do not reach Python.
    assert cfg.env["python_cmd"] == "python3.10"
    assert cfg.env["venv_dir"] == "-"
    assert "python_cmd" not in cfg.exported
    assert "venv_dir" not in cfg.process_env()
    assert {"A", "B", "C", "COMMANDLINE_ARGS", "PYTORCH_CUDA_ALLOC_CONF"} <= cfg.exported
    lines = {(a.name, a.line_no) for a in cfg.assignments}
    assert ("COMMANDLINE_ARGS", 3) in lines
    assert ("COMMANDLINE_ARGS", 9) in lines  # continued line reported where it starts
    assert ("COMMANDLINE_ARGS", 11) in lines
    assert ("B", 4) in lines


def test_sh_unexported_commandline_args_does_not_reach_launch() -> None:
    text = 'COMMANDLINE_ARGS="--medvram"\n'
    cfg = parse_launch_config(text, "sh", source="webui-user.sh")
    assert cfg.commandline_args == []
    assert cfg.env == {"COMMANDLINE_ARGS": "--medvram"}
    assert "COMMANDLINE_ARGS" not in cfg.exported
    assert any("not exported" in w and "webui-user.sh:1" in w for w in cfg.warnings)
    # ...unless it was already exported before the file ran (macOS: webui-macos-env.sh exports it).
    cfg2 = parse_launch_config(text, "sh", base_env={"COMMANDLINE_ARGS": "--skip-torch-cuda-test"})
    assert cfg2.commandline_args == ["--medvram"]


def test_sh_expansion_uses_base_env_and_unset_is_empty() -> None:
    text = 'export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --x ${NOPE}$NOPE2"\nexport D=~/models\n'
    cfg = parse_launch_config(text, "sh", base_env={"COMMANDLINE_ARGS": "--a 'b c'", "HOME": "/home/u"})
    assert cfg.commandline_args == ["--a", "b c", "--x"]
    assert cfg.env["D"] == "/home/u/models"
    assert "HOME" not in cfg.env  # only what the file sets


def test_sh_export_then_assign_and_unset() -> None:
    text = "export LATER\nLATER=1\nexport GONE=1\nunset GONE\n"
    cfg = parse_launch_config(text, "sh")
    assert cfg.process_env() == {"LATER": "1"}
    assert cfg.unset == {"GONE"}


def test_sh_prefix_assignment_before_command_is_not_persistent() -> None:
    cfg = parse_launch_config("FOO=1 some_command --flag\n", "sh")
    assert "FOO" not in cfg.env


def test_sh_unterminated_quote_names_line() -> None:
    with pytest.raises(WebuiUserError, match=r"webui-user\.sh:2: unterminated double-quoted"):
        parse_launch_config('export A=1\nexport COMMANDLINE_ARGS="--x\n', "sh", source="webui-user.sh")


def test_sh_unsplittable_args_is_error() -> None:
    with pytest.raises(WebuiUserError, match=r"x\.sh:1: COMMANDLINE_ARGS cannot be split"):
        parse_launch_config('export COMMANDLINE_ARGS="--ckpt \'unclosed"\n', "sh", source="x.sh")


@pytest.mark.skipif(_bash() is None, reason="needs bash")
@pytest.mark.parametrize(
    "text",
    [
        MESSY_SH.replace("source ./extra-settings.sh\n", ""),
        A1111_SH,
        'export COMMANDLINE_ARGS=\'--a "b c"\'\nexport COMMANDLINE_ARGS="$COMMANDLINE_ARGS --d\\\\e"\n',
        'X=1\nexport Y=$X$X Z="${X:+set}"\nCOMMANDLINE_ARGS=--nope\n',
        "export COMMANDLINE_ARGS=\"--one\n  --two\"\nexport E=$'tab\\there'\n",
    ],
)
def test_sh_matches_real_bash(tmp_path: Path, text: str) -> None:
    script = tmp_path / "webui-user.sh"
    script.write_text(text)
    cfg = read_launch_config(script)
    names = sorted(cfg.env)
    args, seen = _bash_truth(script, names)
    assert cfg.commandline_args == args
    for name in names:
        assert seen[name] == cfg.process_env().get(name), name


# --- Reading: bat --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [A1111_BAT, FORGE_BAT, FORGE_BAT.replace("\n", "\r\n")])
def test_stock_bat_sets_nothing(text: str) -> None:
    cfg = parse_launch_config(text, "bat")
    assert cfg.kind == "bat"
    assert cfg.commandline_args == []
    # `set X=` undefines X in cmd: nothing is passed on.
    assert cfg.env == {}
    assert cfg.unset == {"PYTHON", "GIT", "VENV_DIR", "COMMANDLINE_ARGS"}
    assert [a.name for a in cfg.assignments] == ["PYTHON", "GIT", "VENV_DIR", "COMMANDLINE_ARGS"]


def test_forge_a1111_home_example_expands_and_continues() -> None:
    cfg = parse_launch_config(FORGE_BAT_A1111_HOME.replace("\n", "\r\n"), "bat")
    home = "C:/sd/stable-diffusion-webui"
    assert cfg.commandline_args == [
        "--ckpt-dir",
        f"{home}/models/Stable-diffusion",
        "--hypernetwork-dir",
        f"{home}/models/hypernetworks",
        "--embeddings-dir",
        f"{home}/embeddings",
        "--lora-dir",
        f"{home}/models/Lora",
    ]
    assert cfg.env["VENV_DIR"] == f"{home}/venv"
    assert cfg.env["A1111_HOME"] == home
    # Five physical lines, one assignment reported at its first line.
    assert [a.line_no for a in cfg.assignments if a.name == "COMMANDLINE_ARGS"] == [6, 11]


def test_messy_bat() -> None:
    text = (
        "@echo off\r\n"
        ":: my launcher\r\n"
        "REM set COMMANDLINE_ARGS=--commented-out\r\n"
        "set commandline_args=--medvram\r\n"
        'set COMMANDLINE_ARGS=%commandline_args% --ckpt-dir "C:\\My Models\\sd.safetensors"\r\n'
        'set "Commandline_Args=%COMMANDLINE_ARGS% --api" this text is ignored\r\n'
        "set OPT=a^&b\r\n"
        'set "QUOTED=a^&b"\r\n'
        'set RAW="keep quotes"\r\n'
        "set PCT=100%%\r\n"
        "set MISSING=[%NOT_DEFINED%]\r\n"
        "set A=1& set B=2\r\n"
        "set /a N=1+2\r\n"
        "call webui.bat\r\n"
        "set COMMANDLINE_ARGS=--after-launch\r\n"
    )
    cfg = parse_launch_config(text, "bat", source="webui-user.bat")
    assert cfg.commandline_args == ["--medvram", "--ckpt-dir", "C:\\My Models\\sd.safetensors", "--api"]
    assert cfg.env["OPT"] == "a&b"
    assert cfg.env["QUOTED"] == "a^&b"  # carets are literal inside quotes
    assert cfg.env["RAW"] == '"keep quotes"'
    assert cfg.env["PCT"] == "100%"
    assert cfg.env["MISSING"] == "[]"
    assert cfg.env["A"] == "1"
    assert cfg.env["B"] == "2"
    assert "N" not in cfg.env
    # Names are case-insensitive: one variable, reported upper-case like os.environ on Windows.
    assert [k for k in cfg.env if k.upper() == "COMMANDLINE_ARGS"] == ["COMMANDLINE_ARGS"]
    assert all(a.value != "--after-launch" for a in cfg.assignments)


def test_bat_spaces_around_equals_warns() -> None:
    cfg = parse_launch_config("set COMMANDLINE_ARGS = --medvram\r\n", "bat", source="webui-user.bat")
    assert cfg.commandline_args == []
    assert cfg.env == {"COMMANDLINE_ARGS ": " --medvram"}
    assert any("webui-user.bat:1" in w and "surrounding spaces" in w for w in cfg.warnings)


def test_bat_unquoted_backslash_is_lost_like_the_host_and_warns() -> None:
    cfg = parse_launch_config("set COMMANDLINE_ARGS=--ckpt-dir D:\\models\\a.ckpt\n", "bat")
    assert cfg.commandline_args == ["--ckpt-dir", "D:modelsa.ckpt"]
    assert any("backslashes" in w for w in cfg.warnings)


def test_bat_dp0_expands_to_file_directory(tmp_path: Path) -> None:
    bat = tmp_path / "webui-user.bat"
    bat.write_bytes(b'set "VENV_DIR=%~dp0venv"\r\ncall webui.bat\r\n')
    cfg = read_launch_config(bat)
    assert cfg.env["VENV_DIR"] == str(tmp_path.absolute()) + os.sep + "venv"


def test_read_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(WebuiUserError, match=r"webui-user\.sh"):
        read_launch_config(tmp_path / "webui-user.sh")


def test_unknown_suffix_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.sh, \.bat"):
        read_launch_config(tmp_path / "webui-user.txt")


# --- Rendering -----------------------------------------------------------------------------------------

TRICKY_ARGS = [
    "--medvram",
    "--ckpt-dir",
    "/models/with space/$HOME/`x`",
    'quote"inside',
    "single'quote",
    "back\\slash",
    "C:\\Program Files\\sd\\100%",
    "amp&pipe|lt<gt>caret^",
    "",
]


def test_render_sh_shape() -> None:
    block = render_block("sh", "8gb-medium", ["--medvram", "--xformers"], {"PYTORCH_CUDA_ALLOC_CONF": "x:1"})
    lines = block.splitlines()
    assert lines[0].startswith('# >>> sd-webui-optim profile "8gb-medium"')
    assert lines[1] == 'export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --medvram --xformers"'
    assert lines[2] == 'export PYTORCH_CUDA_ALLOC_CONF="x:1"'
    assert lines[3] == "# <<< sd-webui-optim <<<"
    assert block.endswith("\n")


def test_render_bat_shape() -> None:
    block = render_block("bat", "8gb-medium", ["--medvram", "--xformers"], {"SAFETENSORS_FAST_GPU": "1"})
    lines = block.splitlines()
    assert lines[0].startswith('@REM >>> sd-webui-optim profile "8gb-medium"')
    assert lines[1] == "set COMMANDLINE_ARGS=%COMMANDLINE_ARGS% --medvram --xformers"
    assert lines[2] == "set SAFETENSORS_FAST_GPU=1"
    assert lines[3] == "@REM <<< sd-webui-optim <<<"


@pytest.mark.parametrize("kind", ["sh", "bat"])
def test_render_round_trips_tokens_through_reader(kind: wu.Kind) -> None:
    block = render_block(kind, "p", TRICKY_ARGS, {"V": "a&b %c% $d \"e\" 'f'"})
    base = {"COMMANDLINE_ARGS": "--existing 'x y'"}
    cfg = parse_launch_config(block, kind, base_env=base)
    assert cfg.commandline_args == ["--existing", "x y", *TRICKY_ARGS]
    assert cfg.env["V"] == "a&b %c% $d \"e\" 'f'"


@pytest.mark.skipif(_bash() is None, reason="needs bash")
def test_render_sh_round_trips_through_real_bash(tmp_path: Path) -> None:
    script = tmp_path / "webui-user.sh"
    script.write_text(render_block("sh", "p", TRICKY_ARGS, {"V": "a&b $d \"e\" 'f' \\"}))
    args, seen = _bash_truth(script, ["V"])
    assert args == TRICKY_ARGS
    assert seen["V"] == "a&b $d \"e\" 'f' \\"


@pytest.mark.parametrize(
    ("kind", "name", "args", "env", "match"),
    [
        ("sh", 'bad"name', [], {}, "profile name"),
        ("bat", "100%", [], {}, "profile name"),
        ("sh", "ok", [], {"1BAD": "x"}, "not a valid identifier"),
        ("sh", "ok", [], {"COMMANDLINE_ARGS": "x"}, "add_args"),
        ("bat", "ok", ["a\nb"], {}, "line break"),
        ("bat", "ok", [], {"X": "a\r\nb"}, "line break"),
        ("zsh", "ok", [], {}, "unknown launcher kind"),
    ],
)
def test_render_rejects(kind: str, name: str, args: list[str], env: dict[str, str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        render_block(kind, name, args, env)  # type: ignore[arg-type]


# --- Editing -------------------------------------------------------------------------------------------


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".optim-backup-*"))


SH_BLOCK = render_block("sh", "8gb-medium", ["--medvram", "--opt-sdp-attention"], {"A": "1"})
BAT_BLOCK = render_block("bat", "8gb-medium", ["--medvram", "--opt-sdp-attention"], {"A": "1"})


@pytest.mark.parametrize(
    ("name", "original", "block"),
    [
        ("webui-user.sh", A1111_SH.encode(), SH_BLOCK),
        ("webui-user.sh", MESSY_SH.encode(), SH_BLOCK),
        ("webui-user.sh", b"export COMMANDLINE_ARGS=--x", SH_BLOCK),  # no trailing newline
        ("webui-user.sh", b"", SH_BLOCK),
        ("webui-user.bat", A1111_BAT.encode(), BAT_BLOCK),
        ("webui-user.bat", FORGE_BAT.encode(), BAT_BLOCK),
        ("webui-user.bat", b"@echo off\r\nset COMMANDLINE_ARGS=--x\r\ncall webui.bat", BAT_BLOCK),
        ("webui-user.bat", b"@echo off\r\nset X=caf\xe9\r\n", BAT_BLOCK),  # cp1252 byte, no call line
    ],
)
def test_apply_idempotent_and_remove_restores_bytes(tmp_path: Path, name: str, original: bytes, block: str) -> None:
    path = tmp_path / name
    path.write_bytes(original)

    first = apply_block(path, block)
    assert first.changed
    assert first.backup_path is not None
    assert first.backup_path.read_bytes() == original
    assert first.backup_path.name.startswith(name + ".optim-backup-")
    applied = path.read_bytes()
    assert applied.decode("utf-8", "surrogateescape") == first.new_text
    assert "+" + block.splitlines()[1] in first.diff

    info = find_block(path)
    assert info is not None
    assert info.profile_name == "8gb-medium"
    assert info.end_line - info.start_line == len(block.splitlines()) - 1

    # Line endings follow the file: every line break in the result is CRLF iff the original used CRLF.
    if b"\r\n" in original:
        assert applied.count(b"\n") == applied.count(b"\r\n")
    else:
        assert b"\r" not in applied
    # The trailing-newline state of the file is kept.
    assert applied.endswith(b"\n") == (original.endswith(b"\n") or original == b"")

    again = apply_block(path, block)
    assert not again.changed
    assert again.backup_path is None
    assert again.diff == ""
    assert path.read_bytes() == applied
    assert len(_backups(path)) == 1

    removed = remove_block(path)
    assert removed.changed
    assert removed.backup_path is not None
    assert removed.backup_path != first.backup_path
    assert removed.backup_path.read_bytes() == applied
    assert path.read_bytes() == original
    assert find_block(path) is None


def test_applied_block_takes_effect_in_reader(tmp_path: Path) -> None:
    sh = tmp_path / "webui-user.sh"
    sh.write_text(MESSY_SH)
    apply_block(sh, SH_BLOCK)
    cfg = read_launch_config(sh)
    assert cfg.commandline_args[-2:] == ["--medvram", "--opt-sdp-attention"]
    assert cfg.commandline_args[0] == "--medvram"  # user args kept, ours appended

    bat = tmp_path / "webui-user.bat"
    bat.write_bytes(FORGE_BAT_A1111_HOME.replace("\n", "\r\n").encode())
    apply_block(bat, BAT_BLOCK)
    cfg = read_launch_config(bat)
    assert cfg.commandline_args[:2] == ["--ckpt-dir", "C:/sd/stable-diffusion-webui/models/Stable-diffusion"]
    assert cfg.commandline_args[-2:] == ["--medvram", "--opt-sdp-attention"]
    assert cfg.env["A"] == "1"


def test_bat_block_goes_right_before_call_webui(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.bat"
    original = A1111_BAT.replace("call webui.bat", "CALL Webui.bat %*") + "echo done\r\n"
    path.write_bytes(original.encode())
    apply_block(path, BAT_BLOCK)
    lines = path.read_bytes().decode().split("\r\n")
    call_idx = next(i for i, line in enumerate(lines) if line.startswith("CALL Webui.bat"))
    assert lines[call_idx - 1] == "@REM <<< sd-webui-optim <<<"
    assert lines[call_idx - len(BAT_BLOCK.splitlines())].startswith("@REM >>> sd-webui-optim")
    assert lines[call_idx + 1] == "echo done"


def test_sh_block_goes_at_the_end(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_text(MESSY_SH)
    result = apply_block(path, SH_BLOCK)
    assert result.new_text == MESSY_SH + SH_BLOCK


def test_replacing_block_changes_only_the_block(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.bat"
    path.write_bytes(FORGE_BAT.encode())
    apply_block(path, BAT_BLOCK)
    before = path.read_text()
    other = render_block("bat", "4gb-low", ["--lowvram"], {})
    result = apply_block(path, other)
    assert result.changed
    assert result.backup_path is not None and result.backup_path.read_text() == before
    info = find_block(path)
    assert info is not None and info.profile_name == "4gb-low"
    assert read_launch_config(path).commandline_args == ["--lowvram"]
    remove_block(path)
    assert path.read_bytes() == FORGE_BAT.encode()


def test_bat_block_after_call_is_moved_before_it(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.bat"
    stale = "@echo off\ncall webui.bat\n" + BAT_BLOCK
    path.write_text(stale)
    result = apply_block(path, BAT_BLOCK)
    assert result.changed
    assert result.new_text == "@echo off\n" + BAT_BLOCK + "call webui.bat\n"


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_text(A1111_SH)
    result = apply_block(path, SH_BLOCK, dry_run=True)
    assert result.changed
    assert result.backup_path is None
    assert result.new_text == A1111_SH + SH_BLOCK
    assert result.diff.startswith("--- ")
    assert path.read_text() == A1111_SH
    assert _backups(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webui-user.sh"]

    apply_block(path, SH_BLOCK)
    applied = path.read_bytes()
    backups = _backups(path)
    dry_remove = remove_block(path, dry_run=True)
    assert dry_remove.changed
    assert dry_remove.new_text == A1111_SH
    assert path.read_bytes() == applied
    assert _backups(path) == backups


def test_apply_creates_missing_files(tmp_path: Path) -> None:
    sh = tmp_path / "webui-user.sh"
    res = apply_block(sh, SH_BLOCK)
    assert res.changed and res.backup_path is None
    assert sh.read_text() == "#!/bin/bash\n" + SH_BLOCK
    assert os.access(sh, os.X_OK) or os.name == "nt"

    bat = tmp_path / "webui-user.bat"
    apply_block(bat, BAT_BLOCK)
    data = bat.read_bytes()
    assert data.startswith(b"@echo off\r\n")
    assert data.endswith(b"call webui.bat\r\n")
    assert read_launch_config(bat).commandline_args == ["--medvram", "--opt-sdp-attention"]
    assert _backups(sh) == [] and _backups(bat) == []


def test_backup_never_overwritten(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_text("export X=1\n")
    taken = path.with_name(path.name + ".optim-backup-20240101-000000")
    taken.write_text("old backup")

    class FixedDatetime:
        @staticmethod
        def now() -> object:
            class _Now:
                def strftime(self, _fmt: str) -> str:
                    return "20240101-000000"

            return _Now()

    monkeypatch.setattr(wu.block, "datetime", FixedDatetime)
    result = apply_block(path, SH_BLOCK)
    assert taken.read_text() == "old backup"
    assert result.backup_path is not None and result.backup_path != taken
    assert result.backup_path.read_text() == "export X=1\n"


def test_remove_without_block_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.bat"
    path.write_bytes(A1111_BAT.encode())
    result = remove_block(path)
    assert not result.changed
    assert result.backup_path is None
    assert _backups(path) == []
    assert path.read_bytes() == A1111_BAT.encode()


def test_apply_keeps_file_mode(tmp_path: Path) -> None:
    if os.name == "nt":
        pytest.skip("POSIX modes")
    path = tmp_path / "webui-user.sh"
    path.write_text(A1111_SH)
    path.chmod(0o750)
    apply_block(path, SH_BLOCK)
    assert path.stat().st_mode & 0o777 == 0o750


def test_apply_rejects_wrong_kind_and_non_block(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="another launcher kind"):
        apply_block(tmp_path / "webui-user.sh", BAT_BLOCK)
    with pytest.raises(ValueError, match="exactly one block"):
        apply_block(tmp_path / "webui-user.sh", "export X=1\n")
    assert list(tmp_path.iterdir()) == []


# --- Error cases: do not guess ------------------------------------------------------------------------


def test_two_blocks_is_error_naming_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    text = "#!/bin/bash\n" + SH_BLOCK + "export X=1\n" + SH_BLOCK
    path.write_text(text)
    second = 2 + len(SH_BLOCK.splitlines()) + 1
    with pytest.raises(WebuiUserError, match=rf"webui-user\.sh:{second}: second sd-webui-optim block"):
        apply_block(path, SH_BLOCK)
    with pytest.raises(WebuiUserError, match=rf":{second}:"):
        remove_block(path)
    assert path.read_text() == text
    assert _backups(path) == []


def test_unterminated_block_is_error(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.bat"
    text = "@echo off\r\n" + "\r\n".join(BAT_BLOCK.splitlines()[:-1]) + "\r\ncall webui.bat\r\n"
    path.write_bytes(text.encode())
    with pytest.raises(WebuiUserError, match=r"webui-user\.bat:2: .*never closed"):
        apply_block(path, BAT_BLOCK)
    with pytest.raises(WebuiUserError, match=r"webui-user\.bat:2:"):
        remove_block(path)
    assert path.read_bytes() == text.encode()


def test_end_marker_without_begin_is_error() -> None:
    with pytest.raises(WebuiUserError, match=r"<text>:2: .*without a begin"):
        find_block("export X=1\n# <<< sd-webui-optim <<<\n")


def test_nested_begin_is_error() -> None:
    begin = SH_BLOCK.splitlines()[0]
    with pytest.raises(WebuiUserError, match=r"<text>:2: .*begins again"):
        find_block(f"{begin}\n{begin}\n# <<< sd-webui-optim <<<\n")


def test_find_block_text_and_path(tmp_path: Path) -> None:
    text = "#!/bin/bash\nexport X=1\n" + SH_BLOCK
    info = find_block(text)
    assert info == wu.BlockInfo("8gb-medium", 3, 2 + len(SH_BLOCK.splitlines()))
    path = tmp_path / "webui-user.sh"
    path.write_text(text)
    assert find_block(path) == info
    assert find_block(tmp_path / "missing.sh") is None
    assert find_block("export X=1\n") is None


def test_tokens_as_host_sees_them() -> None:
    # The reader must agree with the host: paths_internal.py does sys.argv += shlex.split(value).
    value = "--a \"b c\" 'd e' f\\ g"
    cfg = parse_launch_config(f"export COMMANDLINE_ARGS={shlex.quote(value)}\n", "sh")
    assert cfg.commandline_args == shlex.split(value) == ["--a", "b c", "d e", "f g"]


# --- Issue 9: what bash and cmd really do with the file, and editing it safely ---------------------------

CRLF_SH = (
    '#!/bin/bash\r\nexport COMMANDLINE_ARGS="--xformers"\r\n'
    'python_cmd="python3"\r\nexport PYTORCH_CUDA_ALLOC_CONF=max_split_size_mb:128\r\n'
)


def test_crlf_sh_keeps_the_carriage_return_like_bash_and_warns() -> None:
    cfg = parse_launch_config(CRLF_SH, "sh", source="/x/webui-user.sh")
    # bash keeps the CR in every value; shlex (the host's split) treats it as whitespace in the arguments.
    assert cfg.env["python_cmd"] == "python3\r"
    assert cfg.env["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128\r"
    assert cfg.commandline_args == ["--xformers"]
    (note,) = [n for n in cfg.notes if n.subject == "line endings"]
    assert note.severity == "warning"
    assert "CRLF" in note.message
    assert "COMMANDLINE_ARGS, PYTORCH_CUDA_ALLOC_CONF, python_cmd end with it" in note.message
    assert "dos2unix webui-user.sh" in note.fix
    assert "sed -i 's/\\r$//' webui-user.sh" in note.fix
    assert not [n for n in parse_launch_config(CRLF_SH.replace("\r\n", "\n"), "sh").notes]


@pytest.mark.skipif(_bash() is None, reason="needs bash")
def test_crlf_sh_reader_and_block_match_real_bash(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_bytes(CRLF_SH.encode())
    cfg = read_launch_config(path)
    args, seen = _bash_truth(path, ["PYTORCH_CUDA_ALLOC_CONF"])
    assert cfg.commandline_args == args
    assert seen["PYTORCH_CUDA_ALLOC_CONF"] == cfg.process_env()["PYTORCH_CUDA_ALLOC_CONF"] == "max_split_size_mb:128\r"

    block = render_block(
        "sh", "8gb-low", ["--medvram"], {"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.6"}
    )
    apply_block(path, block)
    data = path.read_bytes()
    assert data.startswith(CRLF_SH.encode())  # the user's lines are untouched
    assert b"\r" not in data[len(CRLF_SH) :]  # our block has LF ends, which bash reads right in any file
    args, seen = _bash_truth(path, ["PYTORCH_CUDA_ALLOC_CONF"])
    assert args == ["--xformers", "--medvram"]
    assert seen["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6"
    assert read_launch_config(path).process_env()["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6"
    remove_block(path)
    assert path.read_bytes() == CRLF_SH.encode()


@pytest.mark.parametrize(
    "call",
    [
        'call "%~dp0webui.bat"',
        "call %~dp0webui.bat",
        'call "%~dp0\\webui.bat" %*',
        "CALL .\\webui.bat %*",
        "@call webui",
        "webui.bat",
        "cd /d %~dp0 && call webui.bat",
        'start "" webui.bat',
    ],
)
def test_bat_hand_over_forms(tmp_path: Path, call: str) -> None:
    assert wu.hands_over(call)
    text = f"@echo off\r\nset COMMANDLINE_ARGS=--api\r\n{call}\r\nset COMMANDLINE_ARGS=--after-the-webui-exits\r\n"
    path = tmp_path / "webui-user.bat"
    path.write_bytes(text.encode())
    assert read_launch_config(path).commandline_args == ["--api"]  # the line after the call does not count
    apply_block(path, BAT_BLOCK)
    lines = path.read_bytes().decode().split("\r\n")
    assert lines[lines.index(call) - 1] == "@REM <<< sd-webui-optim <<<"
    assert read_launch_config(path).commandline_args == ["--api", "--medvram", "--opt-sdp-attention"]


@pytest.mark.parametrize(
    "line",
    ["rem call webui.bat", "echo call webui.bat", "call webui-user.bat", "call my-webui.bat", "set X=webui.bat"],
)
def test_bat_hand_over_near_misses(line: str) -> None:
    assert not wu.hands_over(line)


def test_bat_delayed_expansion() -> None:
    text = (
        "@echo off\r\nsetlocal enabledelayedexpansion\r\nset ATT=--attention-pytorch\r\n"
        'set COMMANDLINE_ARGS=!ATT! --api !UNDEFINED!\r\nset "BANG=x^!"\r\ncall webui.bat\r\n'
    )
    cfg = parse_launch_config(text, "bat")
    assert cfg.commandline_args == ["--attention-pytorch", "--api"]
    assert cfg.env["BANG"] == "x!"
    # Without setlocal enabledelayedexpansion cmd leaves !ATT! as it is.
    plain = parse_launch_config(text.replace("setlocal enabledelayedexpansion", "setlocal"), "bat")
    assert plain.commandline_args == ["!ATT!", "--api", "!UNDEFINED!"]
    # endlocal throws away what was set since setlocal.
    scoped = parse_launch_config("setlocal\r\nset A=1\r\nendlocal\r\nset B=2\r\n", "bat")
    assert scoped.process_env() == {"B": "2"}


def test_sh_conditions_and_command_substitution_are_noted() -> None:
    text = (
        'export COMMANDLINE_ARGS="--api"\n'
        'export USER_DIR="/home/$(whoami)"\n'
        "if [ -d /opt/cuda ]; then\n"
        '    export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --xformers"\n'
        "    export CUDA_HOME=/opt/cuda\n"
        "fi\n"
        '[ -f ~/.lowvram ] && export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --lowvram"\n'
        "export A=1\n"
    )
    cfg = parse_launch_config(text, "sh", source="webui-user.sh")
    assert cfg.commandline_args == ["--api", "--xformers", "--lowvram"]  # counted, in file order
    assert cfg.conditional_flags == {"--xformers": 3, "--lowvram": 7}
    assert cfg.conditional_vars == {"CUDA_HOME": 3}
    by_subject = {n.subject: n for n in cfg.notes}
    assert by_subject["$(whoami)"].severity == "info"
    assert by_subject["$(whoami)"].line_no == 2
    assert "is not run by the checker" in by_subject["$(whoami)"].message
    assert "inside a condition (line 3)" in by_subject["CUDA_HOME"].message
    assert by_subject["--xformers --lowvram"].severity == "info"
    assert [a.conditional for a in cfg.assignments if a.name == "A"] == [False]


def test_bat_conditions_are_noted() -> None:
    text = (
        "@echo off\r\nset COMMANDLINE_ARGS=--api\r\nif exist C:\\cuda (\r\n"
        "  set COMMANDLINE_ARGS=%COMMANDLINE_ARGS% --xformers\r\n) else (\r\n  set B=2\r\n)\r\n"
        'if "%X%"=="" set C=3\r\nset D=4\r\ncall webui.bat\r\n'
    )
    cfg = parse_launch_config(text, "bat")
    assert cfg.commandline_args == ["--api", "--xformers"]
    assert cfg.conditional_flags == {"--xformers": 3}
    assert cfg.conditional_vars == {"B": 5, "C": 8}
    assert cfg.env["D"] == "4" and "D" not in cfg.conditional_vars


def test_read_only_file_is_refused_unless_forced(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_text(A1111_SH)
    path.chmod(0o444)
    with pytest.raises(wu.WriteRefused, match=r"is read-only \(mode -r--r--r--\).*--force"):
        apply_block(path, SH_BLOCK)
    assert path.read_text() == A1111_SH
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webui-user.sh"]  # no backup, no lock left
    result = apply_block(path, SH_BLOCK, force=True)
    assert result.changed
    assert path.stat().st_mode & 0o777 == 0o444
    assert find_block(path) is not None
    with pytest.raises(wu.WriteRefused, match="read-only"):
        remove_block(path)
    assert find_block(path) is not None
    remove_block(path, force=True)
    assert path.read_text() == A1111_SH


def test_hard_links_keep_sharing_the_text(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_text(A1111_SH)
    other = tmp_path / "shared-webui-user.sh"
    os.link(path, other)
    inode = path.stat().st_ino
    apply_block(path, SH_BLOCK)
    assert path.stat().st_ino == inode
    assert other.read_text() == path.read_text() == A1111_SH + SH_BLOCK


def test_owner_kept_when_it_cannot_be_given_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # As a user who may not chown, a renamed new file would change the owner: the file is rewritten in place.
    if not hasattr(os, "chown"):
        pytest.skip("POSIX owners")
    path = tmp_path / "webui-user.sh"
    path.write_text(A1111_SH)
    inode = path.stat().st_ino

    def refuse(*_args: object) -> None:
        raise PermissionError("not permitted")

    real_stat = os.stat

    def other_owner(target: object, *args: object, **kwargs: object) -> os.stat_result:
        st = real_stat(target, *args, **kwargs)  # type: ignore[arg-type]
        if str(target) == str(path):
            fields = list(st)
            fields[4] += 1  # st_uid: someone else's file
            return os.stat_result(fields)
        return st

    monkeypatch.setattr(os, "chown", refuse)
    monkeypatch.setattr(os, "stat", other_owner)
    apply_block(path, SH_BLOCK)
    monkeypatch.undo()
    assert path.stat().st_ino == inode
    assert path.read_text() == A1111_SH + SH_BLOCK


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to own files as others")
def test_root_keeps_owner_group_and_mode(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_text(A1111_SH)
    os.chown(path, 4321, 4322)
    path.chmod(0o640)
    result = apply_block(path, SH_BLOCK)
    for written in (path, result.backup_path):
        assert written is not None
        st = written.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (4321, 4322, 0o640), written
    removed = remove_block(path)
    assert removed.backup_path is not None
    assert (path.stat().st_uid, removed.backup_path.stat().st_uid) == (4321, 4321)


def test_a_second_edit_refuses_while_the_first_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_text(A1111_SH)
    outcome: list[object] = []
    with wu.edit_lock(path):
        assert (tmp_path / ("webui-user.sh" + wu.LOCK_SUFFIX)).exists()
        # Another thread is another edit: it may not go ahead while this one holds the file.
        worker = threading.Thread(target=lambda: outcome.append(_try_apply(path, timeout=0)))
        worker.start()
        worker.join()
        # The holder itself may edit (the lock is re-entrant in its thread).
        apply_block(path, SH_BLOCK)
    assert isinstance(outcome[0], wu.WriteRefused)
    assert "another edit of this file is still running" in str(outcome[0])
    assert path.read_text() == A1111_SH + SH_BLOCK
    assert not (tmp_path / ("webui-user.sh" + wu.LOCK_SUFFIX)).exists()


def test_a_second_edit_waits_for_the_first(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    path.write_text(A1111_SH)
    waiting = threading.Event()

    class Signal(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "waiting for another edit" in record.getMessage():
                waiting.set()

    handler = Signal()
    logging.getLogger("lib_optim").addHandler(handler)
    outcome: list[object] = []
    try:
        with wu.edit_lock(path):
            worker = threading.Thread(target=lambda: outcome.append(_try_apply(path, timeout=60)))
            worker.start()
            assert waiting.wait(60)  # it has seen the lock and waits: release it now
        worker.join(60)
    finally:
        logging.getLogger("lib_optim").removeHandler(handler)
    assert outcome and not isinstance(outcome[0], Exception), outcome
    assert path.read_text() == A1111_SH + SH_BLOCK


def _try_apply(path: Path, *, timeout: float) -> object:
    try:
        return apply_block(path, SH_BLOCK, lock_timeout=timeout)
    except wu.WriteRefused as exc:
        return exc


def test_huge_or_wrong_files_are_refused_without_reading_them(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    with path.open("wb") as fh:
        fh.truncate(50 * 1024 * 1024)  # sparse: 50 MB that cost nothing to make
    for call in (lambda: read_launch_config(path), lambda: apply_block(path, SH_BLOCK), lambda: find_block(path)):
        with pytest.raises(WebuiUserError, match=r"is 50\.0 MB, but a webui-user file is a few KB"):
            call()
    folder = tmp_path / "folder.sh"
    folder.mkdir()
    with pytest.raises(WebuiUserError, match="is a directory"):
        read_launch_config(folder)


# --- Windows launcher files as people write them (issue 15 §2) ---------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16-be"])
def test_a_utf16_file_is_refused_for_reading_and_editing(tmp_path: Path, encoding: str) -> None:
    # PowerShell 5.1's `>` writes UTF-16 LE with a BOM; it used to read as a file with no settings at all.
    path = tmp_path / "webui-user.bat"
    original = ("\ufeff" + A1111_BAT.replace("COMMANDLINE_ARGS=", "COMMANDLINE_ARGS=--xformers")).encode(encoding)
    path.write_bytes(original)
    label = encoding.replace("utf-16-", "UTF-16 ").upper()
    with pytest.raises(wu.BrokenLauncherFile, match=rf"webui-user\.bat: is saved as {label} .* cmd\.exe cannot run"):
        read_launch_config(path)
    with pytest.raises(wu.BrokenLauncherFile, match="Save it as ANSI or UTF-8"):
        apply_block(path, BAT_BLOCK)
    assert path.read_bytes() == original


def test_quotes_around_several_flags_are_a_note_with_the_unquoted_line() -> None:
    cfg = parse_launch_config(
        '@echo off\r\nset COMMANDLINE_ARGS="--xformers --medvram" --api\r\ncall webui.bat\r\n', "bat", source="w.bat"
    )
    # cmd keeps the quotes; shlex.split (paths_internal.py:13) then gives one word for the two flags.
    assert cfg.commandline_args == ["--xformers --medvram", "--api"]
    (note,) = cfg.notes
    assert (note.line_no, note.severity, note.subject) == (2, "warning", "COMMANDLINE_ARGS")
    assert "'--xformers --medvram' reaches it as one word" in note.message
    assert note.fix == "Remove the quotes around the flags: set COMMANDLINE_ARGS=--xformers --medvram --api"

    sh = parse_launch_config("export COMMANDLINE_ARGS=\"'--xformers --medvram'\"\n", "sh", source="w.sh")
    assert [n.fix for n in sh.notes] == [
        'Remove the quotes around the flags: export COMMANDLINE_ARGS="--xformers --medvram"'
    ]
    # One flag with its value, and a quoted value with a space, are no such thing.
    for value in ('"--ckpt=my model.safetensors"', '--ckpt "my model.safetensors"'):
        ok = parse_launch_config(f"set COMMANDLINE_ARGS={value}\r\ncall webui.bat\r\n", "bat")
        assert ok.notes == [], value


def test_set_lines_after_call_webui_bat_are_a_note() -> None:
    text = "@echo off\r\ncall webui.bat\r\nrem set X=1\r\n@set COMMANDLINE_ARGS=--medvram\r\npause\r\n"
    cfg = parse_launch_config(text, "bat", source="w.bat")
    assert cfg.commandline_args == []
    (note,) = cfg.notes
    assert (note.line_no, note.severity, note.subject) == (4, "warning", "call webui.bat")
    assert note.message.startswith("line 4 sets a variable after `call webui.bat` (line 2)")
    assert note.fix == "Move line 4 above `call webui.bat` (line 2), or delete it."
    # Only commands after it: `pause` or `echo` there are what people mean.
    assert parse_launch_config("call webui.bat\r\npause\r\n", "bat").notes == []


def test_bat_unbalanced_quote_in_commandline_args_names_line_and_fix() -> None:
    text = '@echo off\r\nset COMMANDLINE_ARGS="--xformers\r\ncall webui.bat\r\n'
    with pytest.raises(wu.BrokenLauncherFile, match=r"w\.bat:2: COMMANDLINE_ARGS cannot be split") as info:
        parse_launch_config(text, "bat", source="w.bat")
    assert 'Fix: remove the " characters (set COMMANDLINE_ARGS=--xformers)' in str(info.value)


def test_binary_files_and_the_webui_launchers_are_refused(tmp_path: Path) -> None:
    binary = tmp_path / "webui-user.sh"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00")
    with pytest.raises(WebuiUserError, match=r"contains NUL bytes \(the first at byte 7\): it is not a text file"):
        read_launch_config(binary)
    launcher = tmp_path / "webui.bat"
    launcher.write_bytes(b"@echo off\r\n")
    with pytest.raises(WebuiUserError, match=r"is the WebUI's own launcher, which reads your settings from webui-user"):
        read_launch_config(launcher)
    with pytest.raises(WebuiUserError, match="own launcher"):
        apply_block(launcher, BAT_BLOCK)
    assert launcher.read_bytes() == b"@echo off\r\n"
