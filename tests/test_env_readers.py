"""lib_optim.launch.env_readers: the generated table of who reads which variable, and what the checker says from it.

The table (lib_optim/launch/envtables.py) is made by tools/gen_envtables.py from the installed torch wheels, the
xformers and host sources and documented lists. These tests check the checker's answers, that the names the
table marks as read in a torch release really are in that torch's files, and that the generator reproduces the
committed table where the wheels it was made from are installed.
"""

from __future__ import annotations

import importlib.util
import mmap
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType

import pytest

from lib_optim.host_specs.kinds import HostKind
from lib_optim.launch import env_readers, envtables
from lib_optim.launch.checker import CheckInput, Finding, RuntimeFacts, Severity, run_checks

ROOT = Path(__file__).resolve().parent.parent
GENERATOR = ROOT / "tools" / "gen_envtables.py"
A1111, FORGE, PREVIOUS, REFORGE = HostKind.A1111, HostKind.FORGE, HostKind.FORGE_PREVIOUS, HostKind.REFORGE


def _load_generator() -> ModuleType:
    name = "gen_envtables"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered while it executes
    spec.loader.exec_module(module)
    return module


gen = _load_generator()


def check(host: HostKind, env: Mapping[str, str], facts: RuntimeFacts | None = None) -> list[Finding]:
    return run_checks(CheckInput(host, [], dict(env), facts or RuntimeFacts()))


def only(findings: list[Finding], rule: str) -> Finding:
    hits = [f for f in findings if f.rule == rule]
    assert len(hits) == 1, findings
    return hits[0]


# --------------------------------------------------------------------------------------------- no-effect-env


@pytest.mark.parametrize("host", list(HostKind))
def test_torch_allow_tf32_is_read_by_nothing_and_names_the_real_switch(host: HostKind) -> None:
    # The example: no torch reads TORCH_ALLOW_TF32 (not in 2.1.2, 2.3.1, 2.9.0 or the current wheel).
    finding = only(check(host, {"TORCH_ALLOW_TF32": "1"}), "no-effect-env")
    assert finding.severity is Severity.WARNING and finding.subject == "TORCH_ALLOW_TF32"
    assert finding.message.startswith("Nothing reads TORCH_ALLOW_TF32")
    assert "torch.backends.cuda.matmul.allow_tf32" in finding.message
    assert "set_float32_matmul_precision" in finding.message
    if host is A1111:  # A1111 switches TF32 on itself (modules/devices.py:109-110)
        assert "modules/devices.py" in finding.message and "on already" in finding.fix
    else:  # the Forges and reForge do not: the one variable torch reads for it
        assert "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1" in finding.fix


def test_a_misspelt_allocator_variable_gets_did_you_mean() -> None:
    finding = only(check(FORGE, {"PYTORCH_CUDA_ALOC_CONF": "expandable_segments:True"}), "no-effect-env")
    assert "Did you mean PYTORCH_CUDA_ALLOC_CONF" in finding.message
    assert finding.fix.startswith("Rename it to PYTORCH_CUDA_ALLOC_CONF")
    # torch 2.3.1 (Forge f2) does not read PYTORCH_ALLOC_CONF, so it is not offered there; 2.9.0 (reForge) does
    assert "PYTORCH_ALLOC_CONF?" not in finding.message
    glibc = only(check(A1111, {"MALLOC_TRIM_THRESHOLD": "0"}), "no-effect-env")
    assert "Did you mean MALLOC_TRIM_THRESHOLD_?" in glibc.message  # glibc's names end in "_"


def test_memory_cap_and_compile_mode_name_what_does_the_job() -> None:
    memory = only(check(FORGE, {"PYTORCH_CUDA_MEMORY_FRACTION": "0.8"}), "no-effect-env")
    assert "set_per_process_memory_fraction" in memory.message and "Inference memory (MB)" in memory.message
    assert "--medvram" in only(check(A1111, {"PYTORCH_CUDA_MEMORY_FRACTION": "0.8"}), "no-effect-env").message
    compile_mode = only(check(A1111, {"TORCH_COMPILE_MODE": "max-autotune"}), "no-effect-env")
    assert "Compile UNet blocks" in compile_mode.message and "Did you mean" not in compile_mode.message


def test_a_name_read_only_by_another_torch_release() -> None:
    # PYTORCH_ALLOC_CONF is in torch 2.9.0's libc10.so, in no file of 2.1.2 (A1111's torch)
    finding = only(check(A1111, {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}), "no-effect-env")
    assert finding.message.startswith("torch 2.1.2 (what AUTOMATIC1111 WebUI v1.10 installs) does not read")
    assert "2.9.0" in finding.message and "libc10.so" in finding.message
    # the torch in use reads it: nothing to say
    newer = RuntimeFacts(torch_version="2.9.0+cu128")
    assert not [
        f for f in check(A1111, {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, newer) if f.rule != "alloc-conf"
    ]
    # a torch that was not scanned proves nothing
    unknown = RuntimeFacts(torch_version="2.5.1+cu124")
    assert check(A1111, {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}, unknown) == []


def test_real_names_stay_quiet() -> None:
    env = {
        "TORCH_HOME": "/models/torch",  # torch/hub.py
        "XFORMERS_MORE_DETAILS": "1",  # xformers/_cpp_lib.py (Forge imports xformers when it is installed)
        "CUDA_CACHE_PATH": "/cache/nv",  # the CUDA driver, documented
        "NVIDIA_VISIBLE_DEVICES": "all",  # the container toolkit, documented
        "PYTORCH_MPS_HIGH_WATERMARK_RATIO": "0.0",  # macOS wheels only, documented
        "MALLOC_CONF": "background_thread:true",  # jemalloc
        "TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu121",  # every host's launcher
        "SOME_OTHER_VARIABLE": "1",  # not a family the checker covers
        "torch_allow_tf32": "1",  # Linux names are case-sensitive: not ours to judge
    }
    assert check(FORGE, env) == []


def test_a_variable_the_host_or_torch_sets_itself_is_not_judged() -> None:
    # torch 2.9.0 sets TORCH_WARM_POOL itself (torch/_inductor/async_compile.py): reForge's value cannot be told
    assert env_readers._set_in_process("TORCH_WARM_POOL", REFORGE, "2.9.0")
    assert not [f for f in check(REFORGE, {"TORCH_WARM_POOL": "1"}) if f.rule == "redundant-env"]
    # Forge sets PYTORCH_CUDA_ALLOC_CONF itself with --cuda-malloc (modules_forge/cuda_malloc.py)
    assert env_readers._set_in_process("PYTORCH_CUDA_ALLOC_CONF", FORGE, None)


def test_a_cpu_only_scan_proves_absence_only_for_that_build() -> None:
    # PYTORCH_CUDA_DSA_STACKTRACING is in libc10_cuda.so of 2.1.2 and 2.3.1; the 2.13.0 wheel read is a CPU build
    assert envtables.TORCH_SOURCES["2.13.0"]["cuda_libraries"] is False
    assert set(env_readers.readers("PYTORCH_CUDA_DSA_STACKTRACING").torch) == {"2.1.2", "2.3.1"}
    env = {"PYTORCH_CUDA_DSA_STACKTRACING": "1"}
    same_build = only(check(A1111, env, RuntimeFacts(torch_version="2.13.0+cpu")), "no-effect-env")
    assert same_build.message.startswith("torch 2.13.0+cpu does not read PYTORCH_CUDA_DSA_STACKTRACING")
    # a CUDA build of 2.13 has a libc10_cuda.so that was not read: nothing can be said
    assert check(A1111, env, RuntimeFacts(torch_version="2.13.0+cu130")) == []


def test_a_rocm_or_mac_torch_is_not_judged_by_cuda_and_cpu_wheels() -> None:
    # their own libraries (libc10_hip.so, MPS) were not read: names only they read would look unread
    env = {"PYTORCH_SOMETHING_HIP_ONLY": "1"}
    assert only(check(FORGE, env), "no-effect-env")
    assert check(FORGE, env, RuntimeFacts(torch_version="2.3.1+rocm5.7")) == []
    assert check(A1111, env, RuntimeFacts(torch_version="2.1.2", mps_available=True)) == []


# --------------------------------------------------------------------------------------------- redundant-env


def test_a_read_variable_at_its_default_is_redundant() -> None:
    # the CUDA driver's documented default
    finding = only(check(A1111, {"CUDA_LAUNCH_BLOCKING": "0"}), "redundant-env")
    assert finding.severity is Severity.INFO and "CUDA Environment Variables" in finding.message
    # torch's own literal default: os.environ.get("TORCH_COMPILE_DEBUG", "0") in every Python read of 2.1.2
    finding = only(check(A1111, {"TORCH_COMPILE_DEBUG": "0"}), "redundant-env")
    assert "torch/_dynamo/config.py:116" in finding.message
    # glibc's documented default
    assert only(check(FORGE, {"MALLOC_PERTURB_": "0"}), "redundant-env").subject == "MALLOC_PERTURB_"
    # any other value is not the default
    assert not [f for f in check(A1111, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}) if f.rule == "redundant-env"]
    assert only(check(A1111, {"CUDA_DEVICE_ORDER": "FASTEST_FIRST"}), "redundant-env")


def test_no_default_is_claimed_for_a_c_plus_plus_reader() -> None:
    # PYTORCH_NO_CUDA_MEMORY_CACHING is read in libc10_cuda.so: its default is not in the table
    assert "PYTORCH_NO_CUDA_MEMORY_CACHING" not in envtables.TORCH_DEFAULTS
    findings = check(REFORGE, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "0"})
    assert not [f for f in findings if f.rule == "redundant-env"]


# --------------------------------------------------------------------------------------------- costly-env


def test_a_value_that_costs_speed_is_a_costly_finding() -> None:
    debug = only(check(FORGE, {"TORCH_COMPILE_DEBUG": "1"}), "costly-env")
    assert "torch_compile_debug" in debug.message and "Unset it" in debug.fix
    no_cache = only(check(REFORGE, {"TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT": "-1"}), "costly-env")
    assert no_cache.severity is Severity.WARNING and "execution plan" in no_cache.message


# --------------------------------------------------------------------------------------------- the table


def test_table_shape() -> None:
    assert envtables.FAMILIES == ("TORCH_", "PYTORCH_", "CUDA_", "CUDNN_", "NVIDIA_", "NCCL_", "MALLOC_", "XFORMERS_")
    assert list(envtables.TORCH_SOURCES) == ["2.1.2", "2.3.1", "2.9.0", "2.13.0"]
    hosts_torch = {h.value: env_readers.host_torch(h) for h in HostKind}
    assert hosts_torch == {"a1111": "2.1.2", "forge": "2.3.1", "forge-previous": "2.1.2", "reforge": "2.9.0"}
    assert set(hosts_torch.values()) <= set(envtables.TORCH_SOURCES)
    assert set(envtables.HOST_REVISIONS) == {h.value for h in HostKind}
    for name, where in envtables.TORCH_READS.items():
        assert name.endswith("*") or env_readers.in_family(name), name
        assert set(where) <= set(envtables.TORCH_SOURCES), name
    for name in ("TORCH_ALLOW_TF32", "TORCH_CUDNN_BENCHMARK", "TORCH_USE_CUDA_DSA", "PYTORCH_CUDA_ALOC_CONF"):
        assert not env_readers.readers(name).torch, name
    assert set(envtables.TORCH_READS["PYTORCH_CUDA_ALLOC_CONF"]) == set(envtables.TORCH_SOURCES)
    assert envtables.HOST_READS["TORCH_COMMAND"]["reforge"] == "modules/launch_utils.py:372"


def _torch_dirs() -> dict[str, Path]:
    """Installed torch packages by release: the host venvs the table was made from, and this Python's torch."""
    dirs: dict[str, Path] = {}
    for pattern in gen.DEFAULT_TORCH:
        hit = gen._resolve(pattern)
        if hit is not None:
            dirs[gen.torch_version(hit)[0].split("+", 1)[0]] = hit
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        here = Path(spec.origin).parent
        dirs.setdefault(gen.torch_version(here)[0].split("+", 1)[0], here)
    return {release: path for release, path in dirs.items() if release in envtables.TORCH_SOURCES}


TORCH_DIRS = _torch_dirs()


def _sample(release: str) -> list[str]:
    names = sorted(n for n, where in envtables.TORCH_READS.items() if release in where and not n.endswith("*"))
    return names[:: max(1, len(names) // 30)]


def _present_in_library(path: Path, name: str) -> bool:
    with path.open("rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
        return data.find(b"\0" + name.encode() + b"\0") >= 0


@pytest.mark.parametrize("release", list(envtables.TORCH_SOURCES))
def test_names_marked_read_are_in_that_torch(release: str) -> None:
    if release not in TORCH_DIRS:
        pytest.skip(f"torch {release} is not installed here (the CI venv has only the current wheel)")
    root = TORCH_DIRS[release]
    version = gen.torch_version(root)[0]
    if version != envtables.TORCH_SOURCES[release]["version"]:
        pytest.skip(f"installed torch is {version}, the table read {envtables.TORCH_SOURCES[release]['version']}")
    for name in _sample(release):
        where = envtables.TORCH_READS[name][release]
        path, _, line = where.partition(":")
        file = root.parent / path
        if not line:
            assert _present_in_library(file, name), f"{name} not in {file}"
            continue
        text = file.read_text(encoding="utf-8")
        assert f'"{name}"' in text or f"'{name}'" in text, f"{name} not in {file}"
        code = text.splitlines()[int(line) - 1]
        assert name in code or "env" in code.lower(), f"{where}: {code!r} does not read {name}"


def test_a_name_marked_unread_is_in_no_file_of_the_installed_torch() -> None:
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        pytest.skip("no torch in this Python")
    root = Path(spec.origin).parent
    release = gen.torch_version(root)[0].split("+", 1)[0]
    if release not in envtables.TORCH_SOURCES:
        pytest.skip(f"torch {release} is not in the table")
    absent = ("TORCH_ALLOW_TF32", "TORCH_CUDNN_BENCHMARK")
    for name in absent:
        assert release not in env_readers.readers(name).torch
    for py in root.rglob("*.py"):
        text = py.read_text(encoding="utf-8", errors="replace")
        for name in absent:
            assert f'"{name}"' not in text and f"'{name}'" not in text, (name, py)
    for lib in sorted((root / "lib").glob("*.so*")):
        if gen._own_library(lib.name):
            for name in absent:
                assert not _present_in_library(lib, name), (name, lib)


# --------------------------------------------------------------------------------------------- the generator


def test_python_reads_are_found_with_their_defaults() -> None:
    source = """
import os
from os import environ
LOG_VAR = "TORCH_LOGS"
a = os.environ.get("TORCH_A", "0")
b = os.getenv("PYTORCH_B")
c = os.environ["CUDA_C"]
if "NCCL_D" in os.environ: pass
e = environ.get(LOG_VAR)
f = _get_env("TORCH_F", True)
g = Config(env_name_default="TORCH_G", env_name_force=["TORCH_H"])
h = os.environ.get(f"TORCH_NCCL_{x}")
os.environ["CUDA_MODULE_LOADING"] = "LAZY"
os.environ.setdefault("TORCH_SET", "1")
set_env("TORCH_NOT_A_READ", "1")
other = os.environ.get("HOME")
"""
    reads = gen.scan_python(source, "m.py")
    got = {(r.name, r.default, r.write) for r in reads}
    assert got == {
        ("TORCH_A", "0", False),
        ("PYTORCH_B", None, False),
        ("CUDA_C", None, False),
        ("NCCL_D", None, False),
        ("TORCH_LOGS", None, False),
        ("TORCH_F", None, False),
        ("TORCH_G", None, False),
        ("TORCH_H", None, False),
        ("TORCH_NCCL_*", None, False),
        ("CUDA_MODULE_LOADING", None, True),
        ("TORCH_SET", None, True),
    }
    assert {r.where for r in reads if r.name == "TORCH_A"} == {"m.py:5"}


def test_shell_reads_and_writes() -> None:
    reads = gen.scan_shell(
        '# ${IGNORED}\nif [[ -z "${NO_TCMALLOC}" ]]; then\n  export TORCH_COMMAND="pip"\nfi\n', "webui.sh"
    )
    assert {(r.name, r.write) for r in reads} == {("NO_TCMALLOC", False), ("TORCH_COMMAND", True)}
    bat = gen.scan_shell("if not defined PYTHON (set PYTHON=python)\n%PYTHON% -V\n", "webui.bat")
    assert ("PYTHON", False) in {(r.name, r.write) for r in bat}


def test_binary_strings_of_the_installed_torch() -> None:
    if not TORCH_DIRS:
        pytest.skip("no torch installed here")
    root = next(iter(TORCH_DIRS.values()))
    names = gen.scan_binary(root / "lib" / "libc10.so")
    assert "TORCH_CPP_LOG_LEVEL" in names  # c10/util/Logging.cpp reads it with getenv
    assert not [n for n in names if gen.NOT_VARIABLES.match(n)]


def test_date_is_ignored_by_the_check() -> None:
    text = (ROOT / "lib_optim" / "launch" / "envtables.py").read_text(encoding="utf-8")
    assert "# Generated on: " in text
    assert gen.strip_date(text) == gen.strip_date(text.replace("# Generated on: ", "# Generated on: 1999-01-01 ", 1))


def _generator_inputs_missing() -> str | None:
    for pattern in gen.DEFAULT_TORCH:
        if gen._resolve(pattern) is None:
            return f"torch not installed at {pattern}"
    for path in [gen.XFORMERS_MIRROR, *(p for p, _rev in gen.HOST_SOURCES.values())]:
        if not Path(path).is_dir():
            return f"mirror {path} not present"
    return None


def test_generator_reproduces_committed_table() -> None:
    reason = _generator_inputs_missing()
    if reason:
        pytest.skip(reason)
    res = subprocess.run(
        [sys.executable, str(GENERATOR), "--check"], capture_output=True, text=True, timeout=600, check=False
    )
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
