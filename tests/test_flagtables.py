"""lib_optim.launch.flagtables: facts from the host sources; tools/gen_flagtables.py reproduces the module."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from lib_optim.host_specs.kinds import HostKind, checked_hosts
from lib_optim.launch.flagspec import FlagSpec
from lib_optim.launch.flagtables import FLAGS, HOST_REVISIONS, flags_for

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "tools" / "gen_flagtables.py"
MODULE = ROOT / "lib_optim" / "launch" / "flagtables.py"

A1111, FORGE, PREVIOUS, REFORGE = HostKind.A1111, HostKind.FORGE, HostKind.FORGE_PREVIOUS, HostKind.REFORGE
FORGE_HOSTS = (FORGE, PREVIOUS)


def _load_generator() -> ModuleType:
    name = "gen_flagtables"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered while it executes
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def _mirror_missing(host: HostKind) -> str | None:
    path, _rev = gen.DEFAULT_SOURCES[host.name]
    return None if Path(path).is_dir() else f"host mirror {path} not present"


def _skip_without_mirror(*hosts: HostKind) -> None:
    for host in hosts:
        reason = _mirror_missing(host)
        if reason:
            pytest.skip(reason)


def _rows(specs: tuple[FlagSpec, ...]) -> list[tuple[object, ...]]:
    return [dataclasses.astuple(s) for s in specs]


def _group(host: HostKind, name: str) -> set[str]:
    return {s.option for s in FLAGS[host] if s.group == name}


# --------------------------------------------------------------------------------------------- shape


def test_tables_exist_for_every_host() -> None:
    assert set(FLAGS) == set(checked_hosts()) == set(HostKind)
    assert set(HOST_REVISIONS) == set(checked_hosts())


def test_reforge_table_is_its_own() -> None:
    """reForge ldm_patched/modules/args_parser.py: --reserve-vram (:147, a float in GB), --cuda-device (:54),
    sage/flash in the attention group (:123-129), --cuda-malloc/--disable-cuda-malloc exclusive (:167-169), --fast's
    choices from its Enum (:157-162); modules/cmd_args.py has no --opt-channelslast."""
    table = flags_for(REFORGE)
    assert table["--reserve-vram"].value_type == "float"
    assert "--cuda-device" in table and "--gpu-device-id" not in table and "--opt-channelslast" not in table
    attention = {s.option for s in FLAGS[REFORGE] if s.group == "attention"}
    assert {"--attention-split", "--use-sage-attention", "--use-sage-attention3", "--use-flash-attention"} <= attention
    assert table["--disable-cuda-malloc"].group == table["--cuda-malloc"].group == "cuda_malloc"
    assert table["--fast"].choices == ("fp16_accumulation", "fp8_matrix_mult", "cublas_ops")
    assert table["--fast"].takes_value == "many"
    assert "--reserve-vram" not in flags_for(PREVIOUS)


@pytest.mark.parametrize("host", checked_hosts())
def test_spec_invariants(host: HostKind) -> None:
    seen: set[str] = set()
    for spec in FLAGS[host]:
        assert spec.option.startswith("-"), spec
        assert spec.takes_value in {"none", "one", "optional", "many"}, spec
        assert spec.value_type in {"str", "int", "float", "path"}, spec
        assert spec.origin in {"webui", "backend"} or spec.origin.startswith("builtin-preload:"), spec
        assert re.fullmatch(r"[\w./-]+\.py:\d+", spec.source), spec
        assert spec.dest.isidentifier(), spec
        assert spec.const is None or spec.takes_value == "optional", spec
        assert spec.group is None or spec.group.isidentifier(), spec
        if spec.takes_value == "none":
            assert spec.choices is None and spec.value_type == "str", spec
        for opt in (spec.option, *spec.aliases):
            assert opt not in seen, f"{opt} twice on {host.value}"
            seen.add(opt)
        if any(o.startswith("--") for o in (spec.option, *spec.aliases)):
            assert spec.option.startswith("--"), f"{spec.option}: option must be the first long form"
    assert set(flags_for(host)) == seen


def test_flags_for_maps_aliases_and_returns_a_copy() -> None:
    table = flags_for(A1111)
    assert table["-h"] is table["--help"]
    table.pop("--medvram")
    assert "--medvram" in flags_for(A1111)


def test_group_names() -> None:
    assert {s.group for s in FLAGS[A1111]} == {None}  # A1111 has no mutually exclusive groups
    previous_groups = {"fp", "unet", "vae", "text_encoder", "attention", "vram"}
    assert {s.group for s in FLAGS[PREVIOUS]} - {None} == previous_groups
    assert {s.group for s in FLAGS[FORGE]} - {None} == previous_groups | {"upcast"}


# --------------------------------------------------------------------------------------------- facts


@pytest.mark.parametrize("host", checked_hosts())
def test_use_cuda_dsa_unknown_everywhere(host: HostKind) -> None:
    assert "--use-cuda-dsa" not in flags_for(host)


@pytest.mark.parametrize(
    "flag",
    [
        "--all-in-fp32",
        "--cuda-malloc",
        "--attention-split",
        "--vae-in-cpu",
        "--directml",
        "--always-low-vram",
        "--pin-shared-memory",
    ],
)
def test_forge_backend_flags(flag: str) -> None:
    assert flag not in flags_for(A1111)
    for host in FORGE_HOSTS:
        spec = flags_for(host)[flag]
        assert spec.origin == "backend"


def test_force_upcast_attention() -> None:
    assert "--force-upcast-attention" not in flags_for(PREVIOUS)
    assert "--force-upcast-attention" not in flags_for(A1111)
    assert flags_for(FORGE)["--force-upcast-attention"].group == "upcast"
    # previous has --disable-attention-upcast, but standalone
    assert flags_for(PREVIOUS)["--disable-attention-upcast"].group is None
    assert _group(FORGE, "upcast") == {"--force-upcast-attention", "--disable-attention-upcast"}


def test_attention_group() -> None:
    expected = {"--attention-split", "--attention-quad", "--attention-pytorch"}
    assert _group(FORGE, "attention") == expected
    assert _group(PREVIOUS, "attention") == expected


def test_vram_group() -> None:
    expected = {
        "--always-gpu",
        "--always-high-vram",
        "--always-normal-vram",
        "--always-low-vram",
        "--always-no-vram",
        "--always-cpu",
    }
    assert _group(FORGE, "vram") == expected
    assert _group(PREVIOUS, "vram") == expected
    assert "--always-offload-from-vram" in flags_for(FORGE)
    assert flags_for(FORGE)["--always-offload-from-vram"].group is None


def test_precision_choices() -> None:
    for host in (A1111, FORGE):
        spec = flags_for(host)["--precision"]
        assert spec.choices == ("full", "half", "autocast")
        assert spec.takes_value == "one"
    # Forge previous dropped "half": `--precision half` is an argparse error there.
    assert flags_for(PREVIOUS)["--precision"].choices == ("full", "autocast")


def test_value_shapes() -> None:
    for host in FORGE_HOSTS:
        directml = flags_for(host)["--directml"]
        assert (directml.takes_value, directml.value_type, directml.const) == ("optional", "int", "-1")
    for host in checked_hosts():
        table = flags_for(host)
        assert table["--medvram"].takes_value == "none"
        assert table["--medvram"].origin == "webui"
        assert table["--use-cpu"].takes_value == "many"
        assert table["--port"].value_type == "int"
        assert table["--ckpt-dir"].value_type == "path"
        assert table["-f"].help == ""  # argparse.SUPPRESS
        assert table["--disable-tls-verify"].takes_value == "none"  # store_false
    assert flags_for(PREVIOUS)["--preview-option"].choices == ("none", "auto", "fast", "taesd")
    assert flags_for(PREVIOUS)["--external-working-path"].takes_value == "many"


def test_builtin_preload_flags() -> None:
    assert flags_for(A1111)["--lora-dir"].origin == "builtin-preload:Lora"
    assert flags_for(PREVIOUS)["--lora-dir"].origin == "builtin-preload:Lora"
    assert flags_for(FORGE)["--lora-dir"].origin == "builtin-preload:sd_forge_lora"
    assert flags_for(A1111)["--ldsr-models-path"].origin == "builtin-preload:LDSR"
    assert "--ldsr-models-path" not in flags_for(FORGE)  # f2 ships no LDSR extension
    for host in FORGE_HOSTS:
        assert flags_for(host)["--controlnet-loglevel"].origin == "builtin-preload:sd_forge_controlnet"
    assert "--controlnet-dir" not in flags_for(A1111)


# ------------------------------------------------------------------------------------- against the mirrors


@pytest.mark.parametrize("host", checked_hosts())
def test_sources_point_at_option_lines(host: HostKind) -> None:
    _skip_without_mirror(host)
    path, rev = gen.DEFAULT_SOURCES[host.name]
    source = gen.GitSource(Path(path), rev)
    assert HOST_REVISIONS[host] == source.revision()
    for spec in FLAGS[host]:
        file, _, line = spec.source.rpartition(":")
        text = source.read(file)
        assert text is not None, spec.source
        content = text.splitlines()[int(line) - 1]
        if spec.option == "--help":  # argparse's implicit -h/--help: cited at the ArgumentParser() call
            assert "ArgumentParser(" in content, spec
        else:
            quoted = (f'"{spec.option}"', f"'{spec.option}'")
            assert any(q in content for q in quoted), f"{spec.source}: {content!r} lacks {spec.option}"


def test_generator_reproduces_committed_module() -> None:
    _skip_without_mirror(*checked_hosts())
    text, _tables = gen.build(gen.default_sources())
    assert text == MODULE.read_text(encoding="utf-8"), "run: python tools/gen_flagtables.py"


def test_generator_cli_check() -> None:
    _skip_without_mirror(*checked_hosts())
    res = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, check=False, cwd=ROOT
    )
    assert res.returncode == 0, res.stdout + res.stderr


def _export_checkout(host: HostKind, dest: Path) -> None:
    """A minimal checkout (the files the extractor reads) exported from the mirror."""
    path, rev = gen.DEFAULT_SOURCES[host.name]
    source = gen.GitSource(Path(path), rev)
    wanted = [
        "modules/cmd_args.py",
        "modules/shared_cmd_options.py",
        "backend/args.py",
        "ldm_patched/modules/args_parser.py",
        *(f for f in source.files("extensions-builtin") if f.endswith("/preload.py")),
    ]
    for name in wanted:
        text = source.read(name)
        if text is not None:
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_text(text, encoding="utf-8")


@pytest.mark.parametrize("host", checked_hosts())
def test_checkout_directory_extraction(host: HostKind, tmp_path: Path) -> None:
    _skip_without_mirror(host)
    _export_checkout(host, tmp_path)
    source = gen.open_source(str(tmp_path))
    assert isinstance(source, gen.DirSource)
    assert [f.astuple() for f in gen.extract_host(source)] == _rows(FLAGS[host])


# ------------------------------------------------------------------------------------- real checkouts


REAL_CHECKOUTS = {
    "OPTIM_A1111_DIR": A1111,
    "OPTIM_FORGE_DIR": FORGE,
    "OPTIM_FORGE_PREVIOUS_DIR": PREVIOUS,
    "OPTIM_REFORGE_DIR": REFORGE,
}


@pytest.mark.host
@pytest.mark.parametrize("variable", list(REAL_CHECKOUTS))
def test_real_checkout_matches_table(variable: str) -> None:
    from lib_optim.host_specs.detect import detect_kind

    value = os.environ.get(variable)
    if not value:
        pytest.skip(f"{variable} is not set (point it at a WebUI checkout to compare its flags)")
    root = Path(value)
    if not (root / "modules" / "cmd_args.py").is_file():
        pytest.skip(f"{variable}={value} is not a WebUI checkout (no modules/cmd_args.py)")
    kind = detect_kind(root).kind
    assert kind is REAL_CHECKOUTS[variable], f"{variable} points at a {kind.value} checkout"
    flags = gen.extract_host(gen.DirSource(root))
    assert [f.astuple() for f in flags] == _rows(FLAGS[kind]), (
        f"{root} ({gen.DirSource(root).revision()}) differs from the {kind.value} table "
        f"({HOST_REVISIONS[kind]}); regenerate with tools/gen_flagtables.py if the host moved on"
    )
