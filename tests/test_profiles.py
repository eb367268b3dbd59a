"""Launch profiles: what each profile sets per host, the auto choice, DirectML, and writing webui-user files."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_optim.attention.registry import Attention
from lib_optim.host_specs.kinds import HostKind, profiled_hosts
from lib_optim.launch.checker import CheckInput, RuntimeFacts, Severity, parse_alloc_conf, run_checks
from lib_optim.launch.cmdline import parse_args
from lib_optim.launch.profiles import (
    PROFILES,
    Profile,
    ProfileError,
    apply_profile,
    choose_auto,
    get_profile,
    launch_line,
    profile_names,
    remove_profile,
    resolve,
)
from lib_optim.settings import Tri
from lib_optim.webui_user import BACKUP_INFIX, find_block, parse_launch_config, read_launch_config

A1111 = HostKind.A1111
FORGE = HostKind.FORGE
FORGE_PREVIOUS = HostKind.FORGE_PREVIOUS
FORGE_HOSTS = (FORGE, FORGE_PREVIOUS)
DIRECTML_PROFILES = ("8gb-low", "8gb-medium", "8gb-high", "8gb-xl")
NO_DIRECTML_PROFILES = tuple(name for name in PROFILES if name not in DIRECTML_PROFILES)
ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")

SH_ORIGINAL = (
    b"#!/bin/bash\n"
    b"#########################################################\n"
    b"# Uncomment and change the variables below to your need:#\n"
    b"#########################################################\n"
    b'#export COMMANDLINE_ARGS=""\n'
    b'export COMMANDLINE_ARGS="--api"\n'
    b'python_cmd="python3"\n'
)
BAT_ORIGINAL = (
    b"@echo off\r\n\r\nset PYTHON=\r\nset GIT=\r\nset VENV_DIR=\r\nset COMMANDLINE_ARGS=--api\r\n\r\ncall webui.bat\r\n"
)


def _resolved_cases() -> list[tuple[str, HostKind, bool]]:
    cases = [(name, host, False) for name in PROFILES for host in profiled_hosts()]
    cases += [(name, host, True) for name in DIRECTML_PROFILES for host in FORGE_HOSTS]
    return cases


def _case_id(case: tuple[str, HostKind, bool]) -> str:
    name, host, directml = case
    return f"{name}-{host.value}" + ("-directml" if directml else "")


def _backups(path: Path) -> list[Path]:
    return sorted(path.parent.glob(f"{path.name}{BACKUP_INFIX}*"))


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# --- the profile table -----------------------------------------------------------------------------------


def test_profile_table_is_consistent() -> None:
    assert set(PROFILES) >= {"8gb-low", "8gb-medium", "8gb-high", "8gb-xl", "12gb", "16gb", "24gb", "cpu"}
    for key, profile in PROFILES.items():
        assert profile.name == key
        assert profile.title and profile.description
        assert set(profile.hosts) == set(profiled_hosts()), key
    assert profile_names() == [*PROFILES, "auto"]


@pytest.mark.parametrize("case", _resolved_cases(), ids=_case_id)
def test_resolved_flags_are_known_to_the_host_and_start(case: tuple[str, HostKind, bool]) -> None:
    name, host, directml = case
    hp = resolve(PROFILES[name], host, directml=directml)
    parsed = parse_args(list(hp.flags), host)
    assert parsed.unknown == [], [f.option for f in parsed.unknown]
    assert parsed.problems == []
    findings = run_checks(CheckInput(host, list(hp.flags), dict(hp.env)))
    errors = [f for f in findings if f.severity is Severity.ERROR]
    assert errors == []
    # The same through the text a user would paste: appended to their own COMMANDLINE_ARGS, never replacing it.
    for kind in ("sh", "bat"):
        pasted = launch_line(hp, kind)
        if not hp.flags and not hp.env:
            assert pasted == ""
            continue
        config = parse_launch_config(pasted + "\n", kind, base_env={"COMMANDLINE_ARGS": "--api"})
        assert config.commandline_args == ["--api", *hp.flags]
        assert {k: config.process_env()[k.upper() if kind == "bat" else k] for k in hp.env} == dict(hp.env)


@pytest.mark.parametrize("case", _resolved_cases(), ids=_case_id)
def test_env_values_pass_the_allocator_rule(case: tuple[str, HostKind, bool]) -> None:
    name, host, directml = case
    hp = resolve(PROFILES[name], host, directml=directml)
    assert "COMMANDLINE_ARGS" not in hp.env
    for var, value in hp.env.items():
        if var in ALLOC_VARS:
            values, problems = parse_alloc_conf(value)
            assert problems == [], (var, value)
            assert values
    findings = run_checks(CheckInput(host, (), dict(hp.env)))
    assert [f for f in findings if f.rule == "alloc-conf"] == []


@pytest.mark.parametrize("name", list(PROFILES))
def test_no_profile_sets_the_allocator_backend(name: str) -> None:
    for host, hp in PROFILES[name].hosts.items():
        for var in ALLOC_VARS:
            value = hp.env.get(var)
            if value is None:
                continue
            values, _ = parse_alloc_conf(value)
            assert "backend" not in values, (name, host, value)
            assert "backend" not in value


@pytest.mark.parametrize("name", list(PROFILES))
def test_inference_memory_only_on_forge_f2(name: str) -> None:
    for host, hp in PROFILES[name].hosts.items():
        assert hp.generation.enabled
        if host is not FORGE:
            assert hp.generation.inference_memory_mb is None, (name, host)


def test_cpu_profile_runs_on_the_cpu() -> None:
    cpu = PROFILES["cpu"]
    assert cpu.vram_gb is None
    assert resolve(cpu, A1111).flags == ("--use-cpu", "all", "--no-half", "--skip-torch-cuda-test")
    for host in FORGE_HOSTS:
        assert "--always-cpu" in resolve(cpu, host).flags
    for host in profiled_hosts():
        assert resolve(cpu, host).env == {}


# --- auto ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("gpu_mb", "expected"),
    [
        (None, "cpu"),
        (2048, "8gb-low"),
        (4096, "8gb-low"),
        (6144, "8gb-low"),
        (8192, "8gb-medium"),
        (8188, "8gb-medium"),  # what NVML reports for an 8 GB card
        (12288, "12gb"),
        (11264, "12gb"),
        (16384, "16gb"),
        (16376, "16gb"),
        (24576, "24gb"),
        (24564, "24gb"),  # an RTX 4090 as NVML reports it
        (49152, "24gb"),
        (81920, "24gb"),
    ],
)
def test_choose_auto(gpu_mb: int | None, expected: str) -> None:
    assert choose_auto(gpu_mb) == expected
    assert expected in PROFILES
    assert get_profile("auto", gpu_mb).name == expected
    assert get_profile(" Auto ", gpu_mb).name == expected


def test_get_profile_normalises_the_name() -> None:
    assert get_profile("8GB-Low") is PROFILES["8gb-low"]
    assert get_profile(" 12gb ") is PROFILES["12gb"]


# --- DirectML --------------------------------------------------------------------------------------------


KNOWN_GOOD_LOW = "--directml 0 --always-low-vram --always-offload-from-vram --vae-in-cpu --attention-split"


@pytest.mark.parametrize("host", FORGE_HOSTS, ids=lambda h: h.value)
def test_directml_profiles_reproduce_the_known_good_rx6600xt_setup(host: HostKind) -> None:
    """Issue 11: Low = the known-good launch line (~1792 MB for computation), Medium = the same without
    --always-offload-from-vram (~2048 MB), High/XL = sub-quadratic with --always-low-vram --vae-in-cpu."""
    low = resolve(PROFILES["8gb-low"], host, directml=True)
    assert " ".join(low.flags).startswith("--directml 0") and set(KNOWN_GOOD_LOW.split()) <= set(low.flags)
    assert "--skip-torch-cuda-test" in low.flags
    assert (low.generation.attention, low.generation.inference_memory_mb) == (Attention.SPLIT, 1792)
    medium = resolve(PROFILES["8gb-medium"], host, directml=True)
    assert set(medium.flags) == set(low.flags) - {"--always-offload-from-vram"}
    assert (medium.generation.attention, medium.generation.inference_memory_mb) == (Attention.SPLIT, 2048)
    for name in ("8gb-high", "8gb-xl"):
        hp = resolve(PROFILES[name], host, directml=True)
        assert {"--attention-quad", "--always-low-vram", "--vae-in-cpu"} <= set(hp.flags)
        assert "--attention-split" not in hp.flags and hp.generation.attention is Attention.SUB_QUAD
    # the known-good line also had --precision full --no-half: Forge f2 parses and ignores them, the checker
    # says so; neither host refuses them (no error), so a user who keeps them still starts
    findings = run_checks(CheckInput(host, [*KNOWN_GOOD_LOW.split(), "--precision", "full", "--no-half"], {}))
    assert not [f for f in findings if f.severity is Severity.ERROR]
    if host is HostKind.FORGE:
        assert {f.subject for f in findings if f.rule == "ignored-by-host"} >= {"--no-half", "--precision"}


@pytest.mark.parametrize("host", FORGE_HOSTS, ids=lambda h: h.value)
@pytest.mark.parametrize("name", DIRECTML_PROFILES)
def test_directml_variant_on_forge(name: str, host: HostKind) -> None:
    hp = resolve(PROFILES[name], host, directml=True)
    assert "--directml" in hp.flags
    assert "--xformers" not in hp.flags
    assert hp.env == {}  # no CUDA allocator settings with DirectML
    assert not any(k.startswith(("PYTORCH_CUDA", "CUDA_")) for k in hp.env)
    assert "DirectML" in hp.note
    # the computation budget travels as the per-generation inference memory
    assert hp.generation.inference_memory_mb in (1792, 2048)
    # The plain (CUDA) variant is unchanged by asking for DirectML elsewhere.
    assert "--directml" not in resolve(PROFILES[name], host).flags


@pytest.mark.parametrize("host", profiled_hosts(), ids=lambda h: h.value)
@pytest.mark.parametrize("name", NO_DIRECTML_PROFILES)
def test_directml_refused_for_big_cards_and_cpu(name: str, host: HostKind) -> None:
    with pytest.raises(ProfileError) as exc:
        resolve(PROFILES[name], host, directml=True)
    message = str(exc.value)
    assert repr(name) in message
    assert "--directml" in message
    for allowed in DIRECTML_PROFILES:
        assert allowed in message


@pytest.mark.parametrize("name", DIRECTML_PROFILES)
def test_directml_refused_on_a1111(name: str) -> None:
    with pytest.raises(ProfileError) as exc:
        resolve(PROFILES[name], A1111, directml=True)
    message = str(exc.value)
    assert "--directml" in message
    assert "A1111" in message
    assert "DirectML" in message
    assert "forge" in message.lower()


def test_directml_apply_on_a1111_writes_nothing(tmp_path: Path) -> None:
    path = _write(tmp_path, "webui-user.bat", BAT_ORIGINAL)
    with pytest.raises(ProfileError, match="A1111"):
        apply_profile(path, PROFILES["8gb-low"], A1111, directml=True)
    assert path.read_bytes() == BAT_ORIGINAL
    assert _backups(path) == []


# --- apply_profile refuses a launch config that would not start -------------------------------------------


@pytest.mark.parametrize("dry_run", [False, True])
def test_apply_refuses_exclusive_attention_on_forge(tmp_path: Path, dry_run: bool) -> None:
    original = b'#!/bin/bash\nexport COMMANDLINE_ARGS="--attention-pytorch"\n'
    path = _write(tmp_path, "webui-user.sh", original)
    assert "--attention-quad" in resolve(PROFILES["8gb-low"], FORGE).flags
    with pytest.raises(ProfileError) as exc:
        apply_profile(path, PROFILES["8gb-low"], FORGE, dry_run=dry_run)
    message = str(exc.value)
    assert "'8gb-low'" in message
    assert "not written" in message
    assert "--attention-pytorch" in message
    assert "--attention-quad" in message
    assert path.read_bytes() == original
    assert _backups(path) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["webui-user.sh"]


def test_apply_refuses_exclusive_attention_in_bat(tmp_path: Path) -> None:
    original = b"@echo off\r\nset COMMANDLINE_ARGS=--attention-split\r\ncall webui.bat\r\n"
    path = _write(tmp_path, "webui-user.bat", original)
    with pytest.raises(ProfileError, match="--attention-split"):
        apply_profile(path, PROFILES["8gb-low"], FORGE_PREVIOUS)
    assert path.read_bytes() == original
    assert _backups(path) == []


def test_the_same_flags_are_fine_on_a1111(tmp_path: Path) -> None:
    # A1111 has no exclusive groups: its own attention flag next to the profile's is a warning at most.
    original = b'#!/bin/bash\nexport COMMANDLINE_ARGS="--opt-sdp-attention"\n'
    path = _write(tmp_path, "webui-user.sh", original)
    outcome = apply_profile(path, PROFILES["8gb-low"], A1111)
    assert outcome.edit.changed
    assert all(f.severity is not Severity.ERROR for f in outcome.findings)
    assert any(f.rule == "several-attention-flags" for f in outcome.findings)


def test_warnings_do_not_refuse(tmp_path: Path) -> None:
    original = b'#!/bin/bash\nexport COMMANDLINE_ARGS="--medvram"\n'
    path = _write(tmp_path, "webui-user.sh", original)
    outcome = apply_profile(path, PROFILES["8gb-medium"], FORGE)
    assert outcome.edit.changed
    assert [f.subject for f in outcome.findings if f.severity is Severity.WARNING] == ["--medvram"]
    config = read_launch_config(path)
    assert config.commandline_args == ["--medvram"]
    assert (
        config.process_env()["PYTORCH_CUDA_ALLOC_CONF"]
        == PROFILES["8gb-medium"].hosts[FORGE].env["PYTORCH_CUDA_ALLOC_CONF"]
    )


# --- apply / remove --------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", profiled_hosts(), ids=lambda h: h.value)
@pytest.mark.parametrize(
    ("name", "original"), [("webui-user.sh", SH_ORIGINAL), ("webui-user.bat", BAT_ORIGINAL)], ids=["sh", "bat"]
)
def test_apply_remove_round_trip(tmp_path: Path, name: str, original: bytes, host: HostKind) -> None:
    path = _write(tmp_path, name, original)
    profile = PROFILES["8gb-low"]
    hp = resolve(profile, host)

    first = apply_profile(path, profile, host)
    assert first.edit.changed
    assert first.edit.backup_path is not None
    assert first.edit.backup_path.read_bytes() == original
    assert all(f.severity is not Severity.ERROR for f in first.findings)
    written = path.read_bytes()
    assert written != original
    block = find_block(path)
    assert block is not None
    assert block.profile_name == "8gb-low"

    config = read_launch_config(path)
    assert config.commandline_args == ["--api", *hp.flags]
    for var, value in hp.env.items():
        assert config.process_env()[var] == value

    if name.endswith(".bat"):
        text = written.decode()
        assert text.count("\n") == text.count("\r\n"), "CRLF file got bare LF lines"
        assert text.index("sd-webui-optim") < text.index("call webui.bat")

    second = apply_profile(path, profile, host)
    assert not second.edit.changed
    assert second.edit.backup_path is None
    assert path.read_bytes() == written
    assert len(_backups(path)) == 1

    removed = remove_profile(path)
    assert removed.changed
    assert path.read_bytes() == original
    assert find_block(path) is None

    again = remove_profile(path)
    assert not again.changed
    assert again.backup_path is None
    assert path.read_bytes() == original


@pytest.mark.parametrize(
    "original",
    [
        b'#!/bin/bash\nexport COMMANDLINE_ARGS="--api"',  # no newline at the end
        b"",
        b'#!/bin/bash\r\nexport COMMANDLINE_ARGS="--api"\r\n',
    ],
    ids=["no-final-newline", "empty", "crlf-sh"],
)
def test_remove_restores_odd_files_byte_exact(tmp_path: Path, original: bytes) -> None:
    path = _write(tmp_path, "webui-user.sh", original)
    apply_profile(path, PROFILES["12gb"], A1111)
    assert find_block(path) is not None
    remove_profile(path)
    assert path.read_bytes() == original


def test_bat_without_call_line_round_trip(tmp_path: Path) -> None:
    original = b"@echo off\r\nset COMMANDLINE_ARGS=\r\n"
    path = _write(tmp_path, "webui-user.bat", original)
    apply_profile(path, PROFILES["8gb-xl"], FORGE)
    text = path.read_bytes().decode()
    assert text.count("\n") == text.count("\r\n")
    remove_profile(path)
    assert path.read_bytes() == original


def test_switching_profiles_replaces_the_block(tmp_path: Path) -> None:
    path = _write(tmp_path, "webui-user.sh", SH_ORIGINAL)
    apply_profile(path, PROFILES["8gb-low"], A1111)
    apply_profile(path, PROFILES["16gb"], A1111)
    block = find_block(path)
    assert block is not None
    assert block.profile_name == "16gb"
    text = path.read_text()
    assert text.count("sd-webui-optim profile") == 1
    config = read_launch_config(path)
    assert config.commandline_args == ["--api", "--opt-sdp-attention"]
    assert "PYTORCH_CUDA_ALLOC_CONF" not in config.process_env()
    assert len(_backups(path)) == 2
    remove_profile(path)
    assert path.read_bytes() == SH_ORIGINAL


def test_apply_creates_a_missing_file_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.sh"
    with pytest.raises(ProfileError, match=r"does not exist.*--create"):
        apply_profile(path, PROFILES["cpu"], FORGE)
    with pytest.raises(ProfileError, match=r"does not exist.*--create"):
        apply_profile(path, PROFILES["cpu"], FORGE, dry_run=True)
    assert list(tmp_path.iterdir()) == []
    outcome = apply_profile(path, PROFILES["cpu"], FORGE, create=True)
    assert outcome.edit.changed
    assert outcome.edit.backup_path is None
    assert read_launch_config(path).commandline_args == ["--always-cpu", "--skip-torch-cuda-test"]


def test_symlinked_file_stays_a_symlink(tmp_path: Path) -> None:
    target = _write(tmp_path, "real-webui-user.sh", SH_ORIGINAL)
    link = tmp_path / "webui-user.sh"
    try:
        link.symlink_to(target)
    except OSError:
        pytest.skip("no symlinks here")
    apply_profile(link, PROFILES["8gb-high"], A1111)
    assert link.is_symlink()
    assert find_block(target) is not None
    remove_profile(link)
    assert target.read_bytes() == SH_ORIGINAL


# --- dry run ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "original"), [("webui-user.sh", SH_ORIGINAL), ("webui-user.bat", BAT_ORIGINAL)], ids=["sh", "bat"]
)
def test_dry_run_writes_nothing(tmp_path: Path, name: str, original: bytes) -> None:
    path = _write(tmp_path, name, original)
    outcome = apply_profile(path, PROFILES["8gb-low"], FORGE, dry_run=True)
    assert outcome.edit.changed
    assert outcome.edit.backup_path is None
    assert "+" in outcome.edit.diff
    assert "--attention-quad" in outcome.edit.diff
    assert "--attention-quad" in outcome.edit.new_text
    assert path.read_bytes() == original
    assert _backups(path) == []

    apply_profile(path, PROFILES["8gb-low"], FORGE)
    written = path.read_bytes()
    n_backups = len(_backups(path))
    preview = remove_profile(path, dry_run=True)
    assert preview.changed
    assert preview.new_text.encode() == original
    assert path.read_bytes() == written
    assert len(_backups(path)) == n_backups


def test_dry_run_does_not_create_a_file(tmp_path: Path) -> None:
    path = tmp_path / "webui-user.bat"
    outcome = apply_profile(path, PROFILES["8gb-medium"], FORGE, dry_run=True, create=True)
    assert outcome.edit.changed
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


# --- errors name the field, the value and what is allowed -------------------------------------------------


def test_bad_profile_name() -> None:
    with pytest.raises(ProfileError) as exc:
        get_profile("9gb")
    message = str(exc.value)
    assert "profile" in message
    assert "'9gb'" in message
    assert "allowed" in message
    for name in profile_names():
        assert name in message
    assert isinstance(exc.value, ValueError)


def test_bad_host() -> None:
    partial = Profile("a1111-only", "Only A1111", 8, "test", {A1111: PROFILES["12gb"].hosts[A1111]})
    with pytest.raises(ProfileError) as exc:
        resolve(partial, HostKind.REFORGE)
    message = str(exc.value)
    assert "host" in message
    assert "'reforge'" in message
    assert "allowed: a1111, forge, forge-previous, reforge" in message


def test_profile_without_a_host_entry() -> None:
    partial = Profile("a1111-only", "Only A1111", 8, "test", {A1111: PROFILES["12gb"].hosts[A1111]})
    with pytest.raises(ProfileError, match="'forge'"):
        resolve(partial, FORGE)


@pytest.mark.parametrize("filename", ["webui-user.txt", "webui-user", "webui-user.ps1"])
def test_bad_file_suffix(tmp_path: Path, filename: str) -> None:
    path = tmp_path / filename
    for call in (
        lambda: apply_profile(path, PROFILES["8gb-low"], FORGE),
        lambda: apply_profile(path, PROFILES["8gb-low"], FORGE, dry_run=True),
        lambda: remove_profile(path),
    ):
        with pytest.raises(ProfileError) as exc:
            call()
        message = str(exc.value)
        assert "--file" in message
        assert repr(str(path)) in message
        assert "*.sh" in message
        assert "*.bat" in message
    assert not path.exists()


def test_cmd_files_count_as_bat(tmp_path: Path) -> None:
    path = _write(tmp_path, "webui-user.cmd", BAT_ORIGINAL)
    apply_profile(path, PROFILES["8gb-low"], FORGE)
    assert b"@REM >>> sd-webui-optim" in path.read_bytes()
    remove_profile(path)
    assert path.read_bytes() == BAT_ORIGINAL


# --- launch_line -----------------------------------------------------------------------------------------


def test_launch_line() -> None:
    hp = resolve(PROFILES["8gb-low"], FORGE)
    alloc = hp.env["PYTORCH_CUDA_ALLOC_CONF"]
    # What a user pastes keeps their own COMMANDLINE_ARGS (issue 9 row 13: it used to replace them).
    assert launch_line(hp, "sh").splitlines() == [
        'export COMMANDLINE_ARGS="$COMMANDLINE_ARGS --attention-quad --disable-xformers"',
        f'export PYTORCH_CUDA_ALLOC_CONF="{alloc}"',
    ]
    assert launch_line(hp, "bat").splitlines() == [
        "set COMMANDLINE_ARGS=%COMMANDLINE_ARGS% --attention-quad --disable-xformers",
        f"set PYTORCH_CUDA_ALLOC_CONF={alloc}",
    ]
    # Nothing before start-up on this host: nothing to paste at all, not an empty COMMANDLINE_ARGS.
    assert launch_line(resolve(PROFILES["8gb-medium"], FORGE), "sh") == 'export PYTORCH_CUDA_ALLOC_CONF="' + (
        resolve(PROFILES["8gb-medium"], FORGE).env["PYTORCH_CUDA_ALLOC_CONF"] + '"'
    )
    assert launch_line(resolve(PROFILES["12gb"], FORGE), "sh") == ""
    assert launch_line(resolve(PROFILES["12gb"], FORGE), "bat") == ""


# --- issue 9: nothing to write, hand edits ------------------------------------------------------------------


def test_profile_with_nothing_for_the_host_writes_no_block(tmp_path: Path) -> None:
    # 12gb on Forge sets only per-generation defaults: no empty block (row 13).
    path = _write(tmp_path, "webui-user.sh", SH_ORIGINAL)
    outcome = apply_profile(path, PROFILES["12gb"], FORGE)
    assert not outcome.edit.changed
    assert path.read_bytes() == SH_ORIGINAL
    assert _backups(path) == []
    assert outcome.notes == (
        "Profile 12gb sets no launch flags or environment variables on WebUI Forge f2: nothing to put in "
        "webui-user. Its per-generation defaults (attention=sdp, inference_memory_mb=1024) apply through the "
        "Optim accordion, or at start-up with --optim-profile 12gb.",
    )
    # Switching to it from a profile that wrote a block: that block no longer applies and goes.
    apply_profile(path, PROFILES["8gb-low"], FORGE)
    switched = apply_profile(path, PROFILES["12gb"], FORGE)
    assert switched.edit.changed
    assert find_block(path) is None
    assert path.read_bytes() == SH_ORIGINAL
    assert "The old block is removed: none of it applies to this profile." in switched.notes


def test_hand_edits_inside_the_block_are_named(tmp_path: Path) -> None:
    path = _write(tmp_path, "webui-user.sh", SH_ORIGINAL)
    apply_profile(path, PROFILES["8gb-low"], FORGE)
    # Switching profiles replaces a block as written: nothing to warn about.
    assert apply_profile(path, PROFILES["8gb-medium"], A1111).notes == ()
    edited = path.read_text().replace("# <<< sd-webui-optim", 'export MY_CKPT_DIR="/data/models"\n# <<< sd-webui-optim')
    path.write_text(edited)
    outcome = apply_profile(path, PROFILES["12gb"], A1111)
    (note,) = outcome.notes
    assert note.startswith(f"Warning: the sd-webui-optim block ({path}:8-12) has lines no profile writes")
    assert "'export MY_CKPT_DIR=\"/data/models\"'" in note
    assert "put your own lines outside the block" in note
    assert outcome.edit.backup_path is not None
    assert 'MY_CKPT_DIR="/data/models"' in outcome.edit.backup_path.read_text()  # the backup keeps them
    assert "MY_CKPT_DIR" not in path.read_text()


def test_lines_removed_from_the_block_are_noticed(tmp_path: Path) -> None:
    path = _write(tmp_path, "webui-user.sh", SH_ORIGINAL)
    apply_profile(path, PROFILES["8gb-low"], FORGE)
    text = path.read_text()
    path.write_text("\n".join(line for line in text.splitlines() if "ALLOC_CONF" not in line) + "\n")
    (note,) = apply_profile(path, PROFILES["8gb-low"], FORGE).notes
    assert "was changed by hand (lines removed or reordered)" in note


def _facts_for(profile: Profile, directml: bool) -> RuntimeFacts:
    """A machine the profile is for: its card size with a CUDA torch, a CPU torch for ``cpu``, DirectML."""
    if directml:
        return RuntimeFacts(
            torch_version="2.4.1+cpu", torch_has_cuda=False, cuda_available=False, directml_installed=True
        )
    if profile.vram_gb is None:
        return RuntimeFacts(torch_version="2.3.1+cpu", torch_has_cuda=False, cuda_available=False, gpu_total_mb=None)
    return RuntimeFacts(
        torch_version="2.3.1+cu121",
        torch_has_cuda=True,
        cuda_available=True,
        gpu_total_mb=profile.vram_gb * 1024,
        compute_capability=(8, 6),
    )


def _every_variant() -> list[tuple[str, HostKind, bool]]:
    cases = []
    for name, profile in PROFILES.items():
        for host in profiled_hosts():
            for directml in (False, True):
                try:
                    resolve(profile, host, directml=directml)
                except ProfileError:  # no DirectML variant of this profile, or none on this host (A1111)
                    continue
                cases.append((name, host, directml))
    return cases


@pytest.mark.parametrize(("name", "host", "directml"), _every_variant(), ids=str)
def test_no_profile_writes_what_the_checker_warns_about(name: str, host: HostKind, directml: bool) -> None:
    # Issue 15 §4: every flag and variable a profile writes passes the same host's checker, on no machine facts and
    # on the machine the profile is for.
    profile = PROFILES[name]
    hp = resolve(profile, host, directml=directml)
    for facts in (RuntimeFacts(), _facts_for(profile, directml)):
        findings = run_checks(CheckInput(host, list(hp.flags), dict(hp.env), facts))
        loud = [(f.rule, f.subject, f.message) for f in findings if f.severity is not Severity.INFO]
        assert loud == [], (name, host.value, directml, facts)


def test_every_host_has_profiles() -> None:
    # Issue 15 §4: doctor recommends a profile on every host, so every host has them (reForge its own).
    assert set(profiled_hosts()) == set(HostKind)
    hp = resolve(PROFILES["8gb-low"], HostKind.REFORGE)
    assert hp.flags == ("--attention-quad", "--disable-xformers")  # reForge args_parser.py:125, :130


@pytest.mark.parametrize("name", list(PROFILES))
def test_no_a1111_profile_asks_for_what_medvram_ignores(name: str) -> None:
    # Issue 15 §4 (8gb-xl): --medvram/--medvram-sdxl/--lowvram set sd_model.lowvram and move the VAE to the GPU when
    # it runs (A1111 v1.10.1 modules/lowvram.py:20-21, :38, :61-74), where apply_vae_on_cpu steps aside with a
    # warning (lib_optim/hosts/a1111.py): a profile asking for both would warn on every generation.
    hp = PROFILES[name].hosts[A1111]
    if {"--medvram", "--medvram-sdxl", "--lowvram"} & set(hp.flags):
        assert hp.generation.vae_on_cpu is not Tri.ON, name
