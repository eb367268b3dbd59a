"""lib_optim.host_specs: a host is one registered spec, and everything that lists hosts reads the registry.

A fake fifth host, registered from one spec here, is seen by ``python -m lib_optim``'s ``--host``, the checker's
rules, detection (the doctor's) and the adapter factory; unknown kinds are errors naming the known ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lib_optim import cli
from lib_optim.host_specs import (
    HostKind,
    Marker,
    checked_hosts,
    detect_kind,
    host_spec,
    parse_host,
    profiled_hosts,
    register_host,
    unregister_host,
)
from lib_optim.hosts import create_adapter
from lib_optim.launch import RULES, CheckInput, FlagSpec, rules_markdown, run_checks

FAKE_FLAGS = (
    FlagSpec("--fake-fast", (), "fake_fast", "none", "str", None, None, None, "webui", "fake.py:1", "go fast"),
    FlagSpec("--fake-port", (), "fake_port", "one", "int", None, None, None, "webui", "fake.py:2", "port"),
)


class FakeAdapter:
    def __init__(self, kind: HostKind) -> None:
        self.kind = kind


@pytest.fixture
def fake_host() -> Iterator[HostKind]:
    kind = register_host(
        "fakehost",
        "Fake WebUI",
        aliases=("fake-webui",),
        markers=((Marker("fakehost_marker.txt"),),),
        flag_table=lambda: FAKE_FLAGS,
        adapter=FakeAdapter,
        adapter_takes_kind=True,
    )
    try:
        yield kind
    finally:
        unregister_host(kind)
    assert "fakehost" not in HostKind and not hasattr(HostKind, "FAKEHOST")


def test_the_builtin_hosts_work_like_the_enum_they_were() -> None:
    assert [h.value for h in HostKind] == ["a1111", "forge", "forge-previous", "reforge"]
    assert HostKind("forge") is HostKind.FORGE and HostKind.FORGE == "forge"
    assert HostKind.REFORGE.is_forge_family and not HostKind.A1111.is_forge_family
    assert HostKind.FORGE_PREVIOUS.display_name == "WebUI Forge (previous)"
    assert checked_hosts() == tuple(HostKind)
    assert profiled_hosts() == tuple(HostKind)  # reForge too (issue 15 §4)
    assert parse_host(" Forge-F2 ") is HostKind.FORGE  # an alias, any case


def test_a_registered_host_is_everywhere(fake_host: HostKind, tmp_path: Path) -> None:
    assert HostKind.FAKEHOST is fake_host and HostKind("fakehost") is fake_host  # type: ignore[attr-defined]
    assert fake_host in list(HostKind) and parse_host("FAKE-WEBUI") is fake_host

    # python -m lib_optim: --host accepts it and every --host help lists it
    assert "fakehost" in cli.host_choices() and "fake-webui" in cli.host_choices()
    parser = cli.build_parser()
    subcommands = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("check", "doctor"):
        host = next(a for a in subcommands[command]._actions if a.dest == "host")
        assert "fakehost" in (host.help or "")
    assert cli.resolve_host("fakehost").kind is fake_host

    # the checker: its flag table decides what is unknown; "every host" rules include it, host-set rules do not
    findings = run_checks(CheckInput(fake_host, ["--fake-fast", "--fake-port", "7860", "--medvram"]))
    assert [(f.rule, f.subject) for f in findings] == [("unknown-flag", "--medvram")]
    assert "does not define --medvram" in findings[0].message and "Fake WebUI" in findings[0].message
    assert [f.rule for f in run_checks(CheckInput(fake_host, ["--fake-port"]))] == ["bad-flag-value"]
    assert fake_host in RULES["unknown-flag"].hosts and fake_host in RULES["duplicate-flag"].hosts
    assert fake_host not in RULES["exclusive-flags"].hosts and fake_host not in RULES["a1111-precision-conflict"].hosts
    assert "a1111, forge, forge-previous, reforge, fakehost | A flag the host does not define" in rules_markdown()

    # detection (the doctor's): a checkout with its marker is it; without, still A1111
    (tmp_path / "launch.py").write_text("", encoding="utf-8")
    (tmp_path / "modules").mkdir()
    assert detect_kind(tmp_path).kind is HostKind.A1111
    (tmp_path / "fakehost_marker.txt").write_text("", encoding="utf-8")
    assert detect_kind(tmp_path).kind is fake_host

    # the adapter factory builds its class with its kind
    adapter = create_adapter(fake_host)
    assert isinstance(adapter, FakeAdapter) and adapter.kind is fake_host


def test_detection_keeps_the_forge_family_apart(tmp_path: Path) -> None:
    """docs/hosts.md §8.1: the markers of each host, most specific first."""
    (tmp_path / "launch.py").write_text("", encoding="utf-8")
    (tmp_path / "modules").mkdir()
    (tmp_path / "modules_forge").mkdir()
    assert detect_kind(tmp_path).kind is HostKind.FORGE_PREVIOUS
    args = tmp_path / "ldm_patched" / "modules" / "args_parser.py"
    args.parent.mkdir(parents=True)
    args.write_text('parser.add_argument("--reserve-vram")', encoding="utf-8")
    assert detect_kind(tmp_path).kind is HostKind.REFORGE
    args.write_text('parser.add_argument("--gpu-device-id")', encoding="utf-8")
    (tmp_path / "modules_forge" / "forge_version.py").write_text("version = '1.0.0-reforge'", encoding="utf-8")
    assert detect_kind(tmp_path).kind is HostKind.REFORGE
    (tmp_path / "backend").mkdir()
    (tmp_path / "backend" / "memory_management.py").write_text("", encoding="utf-8")
    assert detect_kind(tmp_path).kind is HostKind.FORGE  # f2's backend wins over everything else


def test_unknown_kinds_are_errors_naming_the_known_ones() -> None:
    known = "a1111, forge, forge-previous, reforge"
    with pytest.raises(ValueError, match=rf"'nohost' is not a known WebUI; known: {known}$"):
        create_adapter("nohost")
    with pytest.raises(ValueError, match=r"'nohost' is not a known WebUI; allowed: a1111, forge, forge-previous"):
        parse_host("nohost")
    with pytest.raises(ValueError, match="known: a1111, forge"):
        HostKind("nohost")
    with pytest.raises(ValueError, match="known: a1111"):
        host_spec("nohost")


def test_a_host_without_a_flag_table_or_adapter_says_so() -> None:
    kind = register_host("bare", "Bare WebUI", markers=())
    try:
        assert kind not in checked_hosts()
        (finding,) = run_checks(CheckInput(kind, ["--anything"]))
        assert finding.rule == "host-not-covered"
        with pytest.raises(ValueError, match="'bare' has no adapter; hosts with one: a1111, forge"):
            create_adapter(kind)
    finally:
        unregister_host(kind)


def test_names_are_unique() -> None:
    with pytest.raises(ValueError, match="'forge' is registered already"):
        register_host("forge", "Another Forge")
    with pytest.raises(ValueError, match="'forge-f2' is registered already"):
        register_host("otherforge", "Another Forge", aliases=("forge-f2",))
    assert "otherforge" not in HostKind


def test_a_host_registered_later_gets_its_family_attention_bindings() -> None:
    """The attention entries were built before this host existed: it still gets what its binding family (the
    spec's ``attention``) runs, and the kernels we call ourselves."""
    from lib_optim.attention import Attention, backend, for_host

    kind = register_host("fakeforge", "Fake Forge fork", flag_table=lambda: FAKE_FLAGS, attention="forge")
    try:
        sdp, split = backend(Attention.SDP), backend(Attention("split"))
        assert sdp.binding(kind) is sdp.binding(HostKind.FORGE) is not None
        assert split.binding(kind) is split.binding(HostKind.FORGE)
        sage = backend(Attention("sage"))
        assert sage.binding(kind) is sage.kernel is not None
        # an A1111-only optimizer is not offered to a Forge-family host
        assert backend(Attention("invokeai")).binding(kind) is None
        assert Attention("invokeai") not in for_host(kind) and Attention.SDP in for_host(kind)
    finally:
        unregister_host(kind)
