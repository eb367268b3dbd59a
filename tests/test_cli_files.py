"""``python -m lib_optim`` with real webui-user files and a new user's mistakes (issue 9), in subprocesses.

Same setting as test_cli.py: a copy of the package alone, outside any WebUI unless a test makes one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_cli import EX_USAGE, _backups, _base_env, _fake_webui, _install, run_cli

from lib_optim.webui_user import LOCK_SUFFIX, edit_lock, find_block

SH = b'#!/bin/bash\nexport COMMANDLINE_ARGS="--api"\n'


@pytest.fixture(scope="module")
def ext(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _install(tmp_path_factory.mktemp("clone") / "sd-webui-optim")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return tmp_path / "work"


# --- what bash / cmd really do with the file ---------------------------------------------------------------


def test_crlf_sh_is_a_warning_and_apply_writes_lf(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    original = b'#!/bin/bash\r\nexport COMMANDLINE_ARGS="--xformers"\r\n'
    path.write_bytes(original)
    result = run_cli("check", "--host", "a1111", "--no-env", "--json", "--file", path, cwd=ext)
    assert result.rc == 1, result  # it was "No problems found"
    (finding,) = result.json()["findings"]
    assert (finding["rule"], finding["severity"], finding["subject"]) == ("launcher-file", "warning", "line endings")
    assert "CRLF" in finding["message"]
    assert "dos2unix webui-user.sh" in finding["fix"]

    applied = run_cli("profile", "apply", "8gb-high", "--host", "a1111", "--file", path, cwd=ext)
    assert applied.rc == 0, applied
    data = path.read_bytes()
    assert data.startswith(original)
    assert b"\r" not in data[len(original) :]


def test_bat_call_with_dp0_gets_the_block_before_it(ext: Path, work: Path) -> None:
    path = work / "webui-user.bat"
    path.write_bytes(
        b'@echo off\r\nset COMMANDLINE_ARGS=--api\r\ncall "%~dp0webui.bat"\r\nset COMMANDLINE_ARGS=--use-cuda-dsa\r\n'
    )
    check = run_cli("check", "--host", "a1111", "--no-env", "--json", "--file", path, cwd=ext)
    assert check.rc == 1, check  # the line after the call runs only after the WebUI exits: a warning says so
    assert check.json()["argv"] == ["--api"]
    (late,) = check.json()["findings"]
    assert (late["rule"], late["severity"]) == ("launcher-file", "warning")
    assert late["message"].startswith(f"{path}:4: line 4 sets a variable after `call webui.bat` (line 3)")
    assert run_cli("profile", "apply", "8gb-high", "--host", "a1111", "--file", path, cwd=ext).rc == 0
    lines = path.read_bytes().decode().split("\r\n")
    assert lines[lines.index('call "%~dp0webui.bat"') - 1] == "@REM <<< sd-webui-optim <<<"
    again = run_cli("check", "--host", "a1111", "--no-env", "--json", "--file", path, cwd=ext)
    assert again.json()["argv"] == ["--api", "--opt-sdp-attention"]


def test_bat_delayed_expansion_is_no_false_error(ext: Path, work: Path) -> None:
    path = work / "webui-user.bat"
    path.write_bytes(
        b"@echo off\r\nsetlocal enabledelayedexpansion\r\nset ATT=--attention-pytorch\r\n"
        b"set COMMANDLINE_ARGS=!ATT!\r\ncall webui.bat\r\n"
    )
    result = run_cli("check", "--host", "forge", "--no-env", "--json", "--file", path, cwd=ext)
    assert result.rc == 0, result  # it was a false bad-flag-value error, exit 2
    assert result.json()["argv"] == ["--attention-pytorch"]


def test_conditions_and_command_substitutions_are_shown(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_text(
        'export COMMANDLINE_ARGS="--api"\nexport HF_HOME="/home/$(whoami)/hf"\n'
        'if [ -d /opt/cuda ]; then\n    export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --medvram"\nfi\n'
    )
    result = run_cli("check", "--host", "forge", "--no-env", "--json", "--file", path, cwd=ext)
    assert result.rc == 1, result
    findings = {(f["rule"], f["subject"]): f for f in result.json()["findings"]}
    whoami = findings[("launcher-file", "$(whoami)")]
    assert whoami["severity"] == "info"
    assert whoami["message"].startswith(f"{path}:2: ")
    condition = findings[("launcher-file", "--medvram")]
    assert condition["severity"] == "info"
    assert condition["message"].startswith(f"{path}:3: --medvram is set inside a condition (line 3)")
    medvram = findings[("ignored-by-host", "--medvram")]
    assert f"This may apply: it is set inside a condition at {path}:3." in medvram["message"]


# --- Windows launcher files as people write them (issue 15 §2) ----------------------------------------------

BAT_TEXT = "@echo off\r\nset COMMANDLINE_ARGS=--xformers\r\ncall webui.bat\r\n"


@pytest.mark.parametrize(("encoding", "name"), [("utf-16-le", "UTF-16 LE"), ("utf-16-be", "UTF-16 BE")])
def test_a_utf16_bat_names_the_encoding_and_how_to_save_it(ext: Path, work: Path, encoding: str, name: str) -> None:
    # PowerShell 5.1's `>` writes UTF-16 LE with a BOM; cmd.exe cannot run such a file. It read as empty.
    path = work / "webui-user.bat"
    original = "\ufeff".encode(encoding) + BAT_TEXT.encode(encoding)
    path.write_bytes(original)
    for command in ("check", "doctor"):
        result = run_cli(command, "--host", "a1111", "--file", path, cwd=ext)
        assert result.rc == 2, result  # it was 0, "No problems found"
        assert f"{path}: is saved as {name}" in result.err
        assert "cmd.exe cannot run" in result.err
        assert "Save it as ANSI or UTF-8: in Notepad, File > Save as > Encoding: UTF-8" in result.err
    refused = run_cli("profile", "apply", "8gb-high", "--host", "a1111", "--file", path, cwd=ext)
    assert refused.rc == EX_USAGE, refused
    assert path.read_bytes() == original


def test_quotes_around_commandline_args_in_a_bat_are_named_with_the_right_fix(ext: Path, work: Path) -> None:
    # cmd keeps the quotes in the value; paths_internal.py:13 shlex-splits it into ONE word, which argparse
    # takes for a positional (it has a space) and rejects: "unrecognized arguments".
    path = work / "webui-user.bat"
    path.write_bytes(b'@echo off\r\nset COMMANDLINE_ARGS="--xformers --medvram"\r\ncall webui.bat\r\n')
    result = run_cli("check", "--host", "a1111", "--no-env", "--json", "--file", path, cwd=ext)
    assert result.rc == 2, result
    assert result.json()["argv"] == ["--xformers --medvram"]
    findings = {f["rule"]: f for f in result.json()["findings"]}
    word = findings["bad-flag-value"]
    assert "several flags in one word" in word["message"]
    assert "quote values that contain spaces" not in word["fix"]  # the old advice made it worse
    assert "in webui-user.bat set COMMANDLINE_ARGS=--xformers --medvram (no quotes)" in word["fix"]
    note = findings["launcher-file"]
    assert (note["subject"], note["severity"]) == ("COMMANDLINE_ARGS", "warning")
    assert note["message"].startswith(f"{path}:2: COMMANDLINE_ARGS has quotes around several flags")
    assert note["fix"] == "Remove the quotes around the flags: set COMMANDLINE_ARGS=--xformers --medvram"

    path.write_bytes(b'@echo off\r\nset COMMANDLINE_ARGS=--ckpt "my model.safetensors"\r\ncall webui.bat\r\n')
    fine = run_cli("check", "--host", "a1111", "--no-env", "--json", "--file", path, cwd=ext)
    assert fine.rc == 0, fine  # quotes around one value with a space are right


def test_set_lines_after_call_webui_bat_are_named_in_check_output(ext: Path, work: Path) -> None:
    path = work / "webui-user.bat"
    path.write_bytes(
        b"@echo off\r\nset COMMANDLINE_ARGS=--api\r\ncall webui.bat\r\nset COMMANDLINE_ARGS=--medvram\r\n"
        b"echo done\r\nset CUDA_VISIBLE_DEVICES=1\r\npause\r\n"
    )
    result = run_cli("check", "--host", "a1111", "--no-env", "--file", path, cwd=ext)
    assert result.rc == 1, result  # it was 0, "No problems found"
    assert "[warning] call webui.bat  (launcher-file)" in result.out
    assert (
        f"{path}:4: lines 4, 6 set variables after `call webui.bat` (line 3): cmd runs them only after the WebUI "
        "has exited, so they never take effect for the WebUI"
    ) in result.out
    assert "fix: Move lines 4, 6 above `call webui.bat` (line 3), or delete them." in result.out


@pytest.mark.parametrize(
    ("name", "data", "line"),
    [
        ("webui-user.sh", b'#!/bin/bash\nexport COMMANDLINE_ARGS="--xformers\n', 2),
        ("webui-user.bat", b'@echo off\r\n\r\nset COMMANDLINE_ARGS="--xformers\r\ncall webui.bat\r\n', 3),
    ],
    ids=["sh", "bat"],
)
def test_an_unterminated_quote_exits_2_naming_file_and_line(
    ext: Path, work: Path, name: str, data: bytes, line: int
) -> None:
    path = work / name
    path.write_bytes(data)
    result = run_cli("check", "--host", "forge", "--no-env", "--file", path, cwd=ext)
    assert result.rc == 2, result  # it was 64, a usage error: the command was right, the file is broken
    assert f"{path}:{line}: " in result.err
    as_json = run_cli("check", "--host", "forge", "--no-env", "--json", "--file", path, cwd=ext)
    assert as_json.json()["exit_code"] == 2


def test_an_unbalanced_quote_in_sh_commandline_args_names_the_variable(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_text("export COMMANDLINE_ARGS='--ckpt \"my model.safetensors'\n")  # bash is fine; shlex is not
    result = run_cli("check", "--host", "forge", "--no-env", "--file", path, cwd=ext)
    assert result.rc == 2, result
    assert f'{path}:1: COMMANDLINE_ARGS cannot be split as the host does: it has an unbalanced " quote' in result.err
    assert 'Fix: close the " quote' in result.err


def test_a_binary_file_and_the_webui_launcher_itself_are_refused(ext: Path, work: Path) -> None:
    binary = work / "webui-user.bat"
    binary.write_bytes(b"MZ\x90\x00\x03\x00\x00\x00")
    result = run_cli("check", "--host", "a1111", "--file", binary, cwd=ext)
    assert result.rc == EX_USAGE, result
    assert f"{binary}: contains NUL bytes (the first at byte 3): it is not a text file" in result.err
    for launcher, user_file in (("webui.sh", "webui-user.sh"), ("webui.bat", "webui-user.bat")):
        (work / launcher).write_bytes(b"#!/usr/bin/env bash\n")
        result = run_cli("check", "--host", "a1111", "--file", work / launcher, cwd=ext)
        assert result.rc == EX_USAGE, result
        assert f"{work / launcher}: is the WebUI's own launcher" in result.err
        assert f"pass --file {work / user_file}" in result.err


def test_directml_is_checked_against_a_host_that_has_it(ext: Path, work: Path) -> None:
    # flagtables.py: --directml is a Forge f2, Forge previous and reForge flag, not an A1111 v1.10 one.
    path = work / "webui-user.bat"
    path.write_bytes(b"@echo off\r\nset COMMANDLINE_ARGS=--directml --api\r\ncall webui.bat\r\n")
    auto = run_cli("check", "--no-env", "--json", "--file", path, cwd=ext)  # no WebUI checkout around
    assert auto.rc == 0, auto  # it was 2: A1111's "unknown flag" for a file that cannot be for A1111
    data = auto.json()
    assert data["hosts"] == ["forge"]
    assert "--directml is not a flag of AUTOMATIC1111 WebUI v1.10, so showing WebUI Forge f2" in data["note"]
    text = run_cli("check", "--no-env", "--file", path, cwd=ext)
    assert "showing WebUI Forge f2 (which defines it)" in text.out
    assert "for AUTOMATIC1111" not in text.out

    given = run_cli("check", "--host", "a1111", "--no-env", "--json", "--file", path, cwd=ext)
    assert given.rc == 2, given
    (unknown,) = [f for f in given.json()["findings"] if f["rule"] == "unknown-flag"]
    assert "check with --host forge, --host forge-previous or --host reforge" in unknown["fix"]


# --- files that are not there, not files, too big, read-only, busy -----------------------------------------


def test_apply_to_a_misspelt_file_is_refused_unless_create(ext: Path, work: Path) -> None:
    (work / "webui-user.sh").write_bytes(SH)
    typo = work / "webui-users.sh"
    result = run_cli("profile", "apply", "12gb", "--host", "a1111", "--file", typo, cwd=ext)
    assert result.rc == EX_USAGE, result
    assert f"--file: {str(typo)!r} does not exist (did you mean {str(work / 'webui-user.sh')!r}?)" in result.err
    assert not typo.exists()
    created = run_cli("profile", "apply", "12gb", "--host", "a1111", "--file", typo, "--create", cwd=ext)
    assert created.rc == 0, created
    assert find_block(typo) is not None

    removed = run_cli("profile", "remove", "--file", work / "nope.sh", cwd=ext)
    assert removed.rc == EX_USAGE, removed
    assert "does not exist" in removed.err


def test_a_directory_is_named_as_one(ext: Path, work: Path) -> None:
    folder = work / "some-directory"
    folder.mkdir()
    for argv in (("check", "--host", "forge"), ("doctor", "--host", "forge"), ("profile", "remove")):
        result = run_cli(*argv, "--file", folder, cwd=ext)
        assert result.rc == EX_USAGE, result
        assert "is a directory" in result.err
        assert "does not exist" not in result.err


def test_a_huge_file_is_refused_at_once(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    with path.open("wb") as fh:
        fh.truncate(50 * 1024 * 1024)
    result = run_cli("check", "--host", "forge", "--file", path, cwd=ext)
    assert result.rc == EX_USAGE, result
    assert "is 50.0 MB, but a webui-user file is a few KB" in result.err


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes")
def test_read_only_file_needs_force(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_bytes(SH)
    path.chmod(0o444)
    refused = run_cli("profile", "apply", "12gb", "--host", "a1111", "--file", path, cwd=ext)
    assert refused.rc == 1, refused
    assert "is read-only" in refused.err
    assert "--force" in refused.err
    assert path.read_bytes() == SH
    assert _backups(path) == []
    forced = run_cli("profile", "apply", "12gb", "--host", "a1111", "--file", path, "--force", cwd=ext)
    assert forced.rc == 0, forced
    assert find_block(path) is not None
    assert path.stat().st_mode & 0o777 == 0o444


def test_a_second_apply_waits_for_the_first(ext: Path, work: Path) -> None:
    # Two real processes: this one holds the file's edit lock as a running apply would; the CLI must wait
    # (and say so) rather than write over it, then do its work once the lock is free.
    path = work / "webui-user.sh"
    path.write_bytes(SH)
    with edit_lock(path):
        proc = subprocess.Popen(
            [sys.executable, "-m", "lib_optim", "profile", "apply", "12gb", "--host", "a1111", "--file", str(path)],
            cwd=ext,
            env=_base_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stderr is not None
        line = proc.stderr.readline()  # blocks until the CLI has seen the lock
        assert line.startswith("[Optim] waiting for another edit of"), line
        assert path.read_bytes() == SH  # nothing written while we hold it
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, (out, err)
    assert "profile 12gb written" in out
    assert find_block(path) is not None
    assert not (work / f"webui-user.sh{LOCK_SUFFIX}").exists()


# --- profile show / apply: what to paste, nothing to write, hand edits, no host -----------------------------


def test_profile_show_never_wipes_the_users_arguments(ext: Path) -> None:
    result = run_cli("profile", "show", "8gb-medium", "--host", "forge", cwd=ext)
    assert result.rc == 0, result
    assert 'COMMANDLINE_ARGS=""' not in result.out
    assert "COMMANDLINE_ARGS" not in result.out  # 8gb-medium has no Forge flags, only the allocator setting
    assert "PYTORCH_CUDA_ALLOC_CONF" in result.out
    nothing = run_cli("profile", "show", "12gb", "--host", "forge", cwd=ext)
    assert "sets no launch flags or environment variables on WebUI Forge f2: nothing to put in webui-user" in (
        nothing.out
    )
    flags = run_cli("profile", "show", "12gb", "--host", "a1111", cwd=ext)
    assert 'export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --opt-sdp-attention"' in flags.out or sys.platform == "win32"


def test_apply_with_nothing_for_the_host_writes_no_block(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_bytes(SH)
    result = run_cli("profile", "apply", "12gb", "--host", "forge", "--file", path, cwd=ext)
    assert result.rc == 0, result
    assert "nothing to put in webui-user" in result.out
    assert "Nothing to change." in result.out
    assert path.read_bytes() == SH


def test_hand_edits_are_named_before_they_are_replaced(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_bytes(SH)
    assert run_cli("profile", "apply", "8gb-high", "--host", "a1111", "--file", path, cwd=ext).rc == 0
    path.write_text(path.read_text().replace("# <<< sd-webui-optim", "export MINE=1\n# <<< sd-webui-optim"))
    result = run_cli("profile", "apply", "12gb", "--host", "a1111", "--file", path, cwd=ext)
    assert result.rc == 0, result
    assert "has lines no profile writes, edited by hand: 'export MINE=1'" in result.out


def test_profile_show_outside_a_webui_covers_both_hosts(ext: Path) -> None:
    result = run_cli("profile", "show", "8gb-low", cwd=ext)
    assert result.rc == 0, result
    assert result.out.startswith("No WebUI checkout found around")
    assert "on AUTOMATIC1111 WebUI v1.10" in result.out
    assert "on WebUI Forge f2" in result.out
    data = run_cli("profile", "show", "8gb-low", "--json", cwd=ext).json()
    assert data["host"] is None
    assert data["by_host"]["a1111"]["flags"] == ["--medvram", "--opt-sub-quad-attention"]
    assert data["by_host"]["forge"]["flags"] == ["--attention-quad", "--disable-xformers"]


def test_profile_apply_outside_a_webui_asks_for_the_host(ext: Path, work: Path) -> None:
    path = work / "webui-user.sh"
    path.write_bytes(SH)
    result = run_cli("profile", "apply", "8gb-low", "--file", path, cwd=ext)
    assert result.rc == EX_USAGE, result
    assert f"--host: no WebUI checkout around {work.resolve()}" in result.err
    assert "pass --host a1111, --host forge, --host forge-previous or --host reforge" in result.err
    assert path.read_bytes() == SH
    # Inside a WebUI the file's folder says which host it is (test_cli covers that).
    root = _fake_webui(work / "webui", "a1111")
    inside = root / "webui-user.sh"
    inside.write_bytes(SH)
    assert run_cli("profile", "apply", "8gb-low", "--file", inside, "--dry-run", cwd=ext).rc == 0


# --- bench: usage errors before any work --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (("bench", "--shapes", ","), "--shapes: no shape in ','; allowed: sd15-512, sd15-768, sdxl-1024"),
        (("bench", "--plot", "chart.png"), "--plot: matplotlib is not installed in this Python"),
        (("bench",), "bench needs torch, which this Python"),
        (("bench", "--vae", "--compile"), "--compile and --vae: choose one"),
    ],
    ids=["no-shapes", "plot-without-matplotlib", "no-torch", "vae-and-compile"],
)
def test_bench_usage_errors(ext: Path, argv: tuple[str, ...], message: str) -> None:
    # -S: this interpreter without its site-packages, so without torch and matplotlib.
    proc = subprocess.run(
        [sys.executable, "-S", "-m", "lib_optim", *argv],
        cwd=ext,
        env=_base_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == EX_USAGE, proc
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


# --- issue 15 §4: --force on read-only, hard-linked files, or files this user may not fully write --------------


@pytest.mark.skipif(os.name == "nt", reason="POSIX modes and hard links")
def test_force_on_a_read_only_hard_linked_file_keeps_mode_and_links(ext: Path, work: Path) -> None:
    # --force writes a read-only file and it stays read-only; with another name on the same inode the file is
    # written in place (a renamed-in copy would leave the other name with the old text).
    path = work / "webui-user.sh"
    path.write_bytes(SH)
    other = work / "launcher-copy.sh"
    os.link(path, other)
    path.chmod(0o444)
    before = path.stat()
    result = run_cli("profile", "apply", "8gb-low", "--host", "forge", "--file", path, "--force", cwd=ext)
    assert result.rc == 0, result
    after = path.stat()
    assert (after.st_ino, after.st_nlink, after.st_mode & 0o777) == (before.st_ino, 2, 0o444)
    assert (after.st_uid, after.st_gid) == (before.st_uid, before.st_gid)
    assert other.read_bytes() == path.read_bytes() != SH
    assert [b.read_bytes() for b in _backups(path)] == [SH]


def test_a_failed_write_leaves_nothing_behind(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The write itself fails (e.g. a read-only file of another user, EACCES): the file is as it was, so its
    # backup goes too, and the error says so — a refusal (exit 1), not a usage error with a stray backup.
    from lib_optim.webui_user import WriteRefused, apply_block, block

    path = work / "webui-user.sh"
    path.write_bytes(SH)

    def refuse(target: Path, data: bytes) -> None:
        raise PermissionError(13, "Permission denied", str(target))

    monkeypatch.setattr(block, "_write_file", refuse)
    text = block.render_block("sh", "8gb-low", ["--attention-quad"], {})
    with pytest.raises(WriteRefused) as exc:
        apply_block(path, text, force=True)
    assert "nothing written, the file is as it was" in str(exc.value)
    assert str(path) in str(exc.value)
    assert path.read_bytes() == SH
    assert _backups(path) == []


def test_a_half_written_file_keeps_its_backup(work: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lib_optim.webui_user import WebuiUserError, apply_block, block

    path = work / "webui-user.sh"
    path.write_bytes(SH)

    def half(target: Path, data: bytes) -> None:
        target.write_bytes(data[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(block, "_write_file", half)
    with pytest.raises(WebuiUserError) as exc:
        apply_block(path, block.render_block("sh", "8gb-low", ["--attention-quad"], {}))
    (backup,) = _backups(path)
    assert backup.read_bytes() == SH
    assert f"restore it from {backup}" in str(exc.value)


def _as_nobody() -> list[str] | None:
    """A command prefix that runs as an unprivileged user, where this root test machine has setpriv."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    prefix = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], capture_output=True, check=False)
    return prefix if probe.returncode == 0 else None


@pytest.mark.skipif(_as_nobody() is None, reason="needs root, setpriv and a Python an unprivileged user may run")
@pytest.mark.parametrize("owner", ["self", "root"])
def test_force_as_an_ordinary_user(owner: str) -> None:
    # Not root, the mode bites: the owner's read-only hard-linked file is made writable for the write and gets
    # its mode back; someone else's read-only file is refused with nothing left behind.
    top = Path(tempfile.mkdtemp(prefix="optim-nobody-"))  # pytest's tmp_path is root's alone (0700 above it)
    try:
        _run_as_nobody(top, owner)
    finally:
        shutil.rmtree(top)


def _run_as_nobody(tmp_path: Path, owner: str) -> None:
    base = tmp_path / "shared"
    _install(base)
    folder = base / "w"
    folder.mkdir()
    path = folder / "webui-user.sh"
    path.write_bytes(SH)
    os.link(path, folder / "copy.sh")
    for p in (base, tmp_path):
        p.chmod(0o755)
    os.chown(folder, 65534, 65534)
    if owner == "self":
        os.chown(path, 65534, 65534)
    path.chmod(0o444)
    argv = [sys.executable, "-m", "lib_optim", "profile", "apply", "8gb-low", "--host", "forge"]
    proc = subprocess.run(
        [*(_as_nobody() or []), *argv, "--file", str(path), "--force"],
        cwd=base,
        env=_base_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert path.stat().st_mode & 0o777 == 0o444
    if owner == "self":
        assert proc.returncode == 0, proc
        assert (folder / "copy.sh").read_bytes() == path.read_bytes() != SH
        assert len(_backups(path)) == 1
    else:
        assert proc.returncode == 1, proc
        assert "nothing written, the file is as it was" in proc.stderr
        assert path.read_bytes() == SH and _backups(path) == []
