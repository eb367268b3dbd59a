"""lib_optim.launch.env_notes through the checker: every researched variable fires where its row says, and stays quiet
on the near miss next to it (a useful value, a host that does read it, a flag that changes the story)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pytest

from lib_optim.host_specs.kinds import HostKind
from lib_optim.launch.checker import RULES, CheckInput, Finding, RuntimeFacts, Severity, run_checks
from lib_optim.launch.env_notes import ENV_NOTES, QUIET_NOTES, RULE_IDS, env_items, glibc_number

A1111, FORGE, PREVIOUS = HostKind.A1111, HostKind.FORGE, HostKind.FORGE_PREVIOUS
NOTES = {n.key: n for n in ENV_NOTES}
CPU_A1111 = ("--use-cpu", "all", "--no-half", "--skip-torch-cuda-test")


@dataclass(frozen=True)
class EnvCase:
    key: str  # the ENV_NOTES row
    host: HostKind
    env: Mapping[str, str]
    argv: tuple[str, ...] = ()
    facts: RuntimeFacts = field(default_factory=RuntimeFacts)
    name: str = ""
    # a near miss that another environment rule rightly reports (a value at its documented default)
    others: tuple[str, ...] = ()

    def findings(self) -> list[Finding]:
        return run_checks(CheckInput(self.host, list(self.argv), dict(self.env), self.facts))

    def env_findings(self) -> list[Finding]:
        return [f for f in self.findings() if f.rule in RULE_IDS]

    def __str__(self) -> str:
        return self.name or f"{self.key}-{self.host.value}-{','.join(f'{k}={v}' for k, v in self.env.items())}"


FIRES: list[EnvCase] = [
    EnvCase("inference_memory", A1111, {"inference_memory": "1024"}),
    EnvCase("inference_memory", FORGE, {"FORGE_INFERENCE_MEMORY": "1024"}),
    EnvCase("ATTN_PRECISION:forge", FORGE, {"ATTN_PRECISION": "fp16"}),
    EnvCase("ATTN_PRECISION:forge-previous", PREVIOUS, {"ATTN_PRECISION": "fp16"}),
    EnvCase("TORCH_CUDNN_BENCHMARK", A1111, {"TORCH_CUDNN_BENCHMARK": "1"}),
    EnvCase("TORCH_USE_CUDA_DSA", FORGE, {"TORCH_USE_CUDA_DSA": "1"}),
    EnvCase("NCCL_*", A1111, {"NCCL_P2P_DISABLE": "1"}),
    EnvCase("NCCL_*", PREVIOUS, {"TORCH_NCCL_BLOCKING_WAIT": "1"}),
    EnvCase("build-only", A1111, {"TORCH_CUDA_ARCH_LIST": "8.6"}),
    EnvCase("build-only", FORGE, {"FORCE_CUDA": "1"}),
    EnvCase("XFORMERS_*:a1111", A1111, {"XFORMERS_FORCE_DISABLE_TRITON": "1"}, ("--opt-sdp-attention",)),
    EnvCase("XFORMERS_*:forge", FORGE, {"XFORMERS_MORE_DETAILS": "1"}, ("--disable-xformers",)),
    EnvCase("PYTORCH_TUNABLEOP_*", A1111, {"PYTORCH_TUNABLEOP_ENABLED": "1"}),
    EnvCase(
        "PYTORCH_TUNABLEOP_*",
        FORGE,
        {"PYTORCH_TUNABLEOP_ENABLED": "1"},
        facts=RuntimeFacts(torch_version="2.1.2+cu121"),
        name="tunableop-forge-with-old-torch",
    ),
    EnvCase("CUBLAS_WORKSPACE_CONFIG:unparsed", A1111, {"CUBLAS_WORKSPACE_CONFIG": "4096:8"}),
    EnvCase("TF32 override:a1111", A1111, {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}),
    EnvCase("CUDA_VISIBLE_DEVICES:gpu-device-id", FORGE, {"CUDA_VISIBLE_DEVICES": "1"}, ("--gpu-device-id", "0")),
    EnvCase("CUDA_VISIBLE_DEVICES:gpu-device-id", PREVIOUS, {"CUDA_VISIBLE_DEVICES": "0,1"}, ("--gpu-device-id", "1")),
    EnvCase("CUDA_DEVICE_MAX_CONNECTIONS:default", A1111, {"CUDA_DEVICE_MAX_CONNECTIONS": "8"}),
    EnvCase(
        "TORCH_COMMAND",
        A1111,
        {"TORCH_COMMAND": "pip install torch==2.3.1 torchvision==0.18.1"},
        facts=RuntimeFacts(torch_version="2.1.2+cu121"),
    ),
    EnvCase("XFORMERS_PACKAGE", A1111, {"XFORMERS_PACKAGE": "xformers==0.0.27"}, name="xformers-package-no-flag"),
    EnvCase(
        "XFORMERS_PACKAGE",
        FORGE,
        {"XFORMERS_PACKAGE": "xformers==0.0.28"},
        ("--xformers",),
        RuntimeFacts(xformers_known=True, xformers_version="0.0.27"),
        name="xformers-package-already-installed",
    ),
    EnvCase("PYTORCH_NO_CUDA_MEMORY_CACHING", A1111, {"PYTORCH_NO_CUDA_MEMORY_CACHING": "0"}, name="nocache-0-old"),
    EnvCase(
        "PYTORCH_NO_CUDA_MEMORY_CACHING",
        FORGE,
        {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
        facts=RuntimeFacts(torch_version="2.6.0+cu124"),
        name="nocache-1-new",
    ),
    EnvCase("TORCH_CUDA_SANITIZER", FORGE, {"TORCH_CUDA_SANITIZER": "1"}),
    EnvCase("CUBLAS_WORKSPACE_CONFIG:small", A1111, {"CUBLAS_WORKSPACE_CONFIG": ":16:8"}),
    EnvCase("NVIDIA_TF32_OVERRIDE", A1111, {"NVIDIA_TF32_OVERRIDE": "0"}),
    EnvCase("CUDA_VISIBLE_DEVICES:hidden", A1111, {"CUDA_VISIBLE_DEVICES": "-1"}),
    EnvCase("CUDA_VISIBLE_DEVICES:hidden", FORGE, {"CUDA_VISIBLE_DEVICES": ""}, name="visible-devices-empty"),
    EnvCase("CUDA_FORCE_PTX_JIT", A1111, {"CUDA_FORCE_PTX_JIT": "1"}),
    EnvCase("CUDA_CACHE_DISABLE", PREVIOUS, {"CUDA_CACHE_DISABLE": "1"}),
    EnvCase("CUDA_CACHE_MAXSIZE", A1111, {"CUDA_CACHE_MAXSIZE": "4096"}),
    EnvCase("CUDA_DEVICE_MAX_CONNECTIONS:one", FORGE, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}, ("--cuda-stream",)),
    EnvCase("cuDNN API logging", A1111, {"CUDNN_LOGINFO_DBG": "1", "CUDNN_LOGDEST_DBG": "stdout"}),
    EnvCase("cuDNN API logging (cuDNN 9)", FORGE, {"CUDNN_LOGLEVEL_DBG": "3", "CUDNN_LOGDEST_DBG": "stderr"}),
    EnvCase("MALLOC_MMAP_THRESHOLD_", A1111, {"MALLOC_MMAP_THRESHOLD_": "0"}),
    EnvCase("MALLOC_MMAP_THRESHOLD_", FORGE, {"MALLOC_MMAP_THRESHOLD_": "1e9"}, name="mmap-threshold-1e9-reads-as-1"),
    EnvCase("MALLOC_MMAP_THRESHOLD_", PREVIOUS, {"MALLOC_MMAP_THRESHOLD_": "abc"}, name="mmap-threshold-word-is-0"),
    EnvCase(
        "MALLOC_MMAP_THRESHOLD_",
        A1111,
        {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1:glibc.malloc.mmap_threshold=0"},
        name="mmap-threshold-via-glibc-tunables",
    ),
    EnvCase("MALLOC_PERTURB_", A1111, {"MALLOC_PERTURB_": "85"}),
    EnvCase("OMP_NUM_THREADS", A1111, {"OMP_NUM_THREADS": "1"}, CPU_A1111),
    EnvCase("OMP_NUM_THREADS", FORGE, {"MKL_NUM_THREADS": "1"}, ("--always-cpu",), name="mkl-threads-forge-cpu"),
    EnvCase("SAFETENSORS_FAST_GPU", FORGE, {"SAFETENSORS_FAST_GPU": "1"}),
    EnvCase("TORCH_CUDNN_V8_API_ENABLED", A1111, {"TORCH_CUDNN_V8_API_ENABLED": "1"}),
    EnvCase("MALLOC_CHECK_", A1111, {"MALLOC_CHECK_": "3"}),
    EnvCase("TORCH_COMPILE_DEBUG", A1111, {"TORCH_COMPILE_DEBUG": "1"}),
    EnvCase(
        "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT:no-cache", HostKind.REFORGE, {"TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT": "-1"}
    ),
]

NEAR_MISSES: list[EnvCase] = [
    EnvCase("inference_memory", FORGE, {"SD_WEBUI_LOG_LEVEL": "INFO"}),
    EnvCase("ATTN_PRECISION:forge", A1111, {"ATTN_PRECISION": "fp16"}, name="attn-precision-read-by-a1111-ldm"),
    EnvCase("ATTN_PRECISION:forge-previous", A1111, {"ATTN_PRECISION": "fp32"}),
    EnvCase("TORCH_CUDNN_BENCHMARK", A1111, {"TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT": "10000"}),
    EnvCase("TORCH_USE_CUDA_DSA", FORGE, {"PYTORCH_USE_CUDA_DSA": "1"}),
    EnvCase("NCCL_*", A1111, {"PYTORCH_NVML_BASED_CUDA_CHECK": "1"}),
    EnvCase("build-only", A1111, {"TORCH_INDEX_URL": "https://download.pytorch.org/whl/cu121"}),
    EnvCase("XFORMERS_*:a1111", A1111, {"XFORMERS_FORCE_DISABLE_TRITON": "1"}, ("--xformers",)),
    EnvCase("XFORMERS_*:forge", FORGE, {"XFORMERS_FORCE_DISABLE_TRITON": "1"}),
    EnvCase("PYTORCH_TUNABLEOP_*", FORGE, {"PYTORCH_TUNABLEOP_ENABLED": "1"}),
    EnvCase(
        "PYTORCH_TUNABLEOP_*",
        A1111,
        {"PYTORCH_TUNABLEOP_ENABLED": "1"},
        facts=RuntimeFacts(torch_version="2.3.1+cu121"),
        name="tunableop-a1111-upgraded-torch",
    ),
    EnvCase("CUBLAS_WORKSPACE_CONFIG:unparsed", A1111, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}),
    EnvCase(
        "TF32 override:a1111", FORGE, {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}, name="tf32-override-useful-on-forge"
    ),
    EnvCase("TF32 override:a1111", A1111, {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "0"}),
    EnvCase(
        "CUDA_VISIBLE_DEVICES:gpu-device-id",
        FORGE,
        {"CUDA_VISIBLE_DEVICES": "0"},
        ("--gpu-device-id", "0"),
        name="visible-devices-as-forge-sets-it",
    ),
    EnvCase("CUDA_DEVICE_MAX_CONNECTIONS:default", A1111, {"CUDA_DEVICE_MAX_CONNECTIONS": "32"}),
    EnvCase("TORCH_COMMAND", A1111, {"TORCH_COMMAND": "pip install torch==2.3.1"}, name="torch-command-torch-unknown"),
    EnvCase(
        "TORCH_COMMAND",
        A1111,
        {"TORCH_COMMAND": "pip install torch==2.3.1"},
        ("--reinstall-torch",),
        RuntimeFacts(torch_version="2.1.2+cu121"),
        name="torch-command-with-reinstall",
    ),
    EnvCase(
        "TORCH_COMMAND",
        FORGE,
        {"TORCH_COMMAND": "pip install torch torchvision --index-url https://download.pytorch.org/whl/rocm5.7"},
        facts=RuntimeFacts(torch_version="2.3.1+rocm5.7"),
        name="torch-command-set-by-webui-sh-for-amd",
    ),
    EnvCase(
        "XFORMERS_PACKAGE",
        A1111,
        {"XFORMERS_PACKAGE": "xformers==0.0.27"},
        ("--xformers",),
        RuntimeFacts(xformers_known=True, xformers_version=None),
        name="xformers-package-will-install",
    ),
    EnvCase(
        "PYTORCH_NO_CUDA_MEMORY_CACHING",
        FORGE,
        {"PYTORCH_NO_CUDA_MEMORY_CACHING": "0"},
        facts=RuntimeFacts(torch_version="2.6.0+cu124"),
        name="nocache-0-read-by-newer-torch",
    ),
    EnvCase("TORCH_CUDA_SANITIZER", FORGE, {"TORCH_SHOW_CPP_STACKTRACES": "1"}),
    EnvCase("CUBLAS_WORKSPACE_CONFIG:small", A1111, {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}),
    EnvCase("NVIDIA_TF32_OVERRIDE", A1111, {"NVIDIA_TF32_OVERRIDE": "1"}),
    EnvCase("CUDA_VISIBLE_DEVICES:hidden", A1111, {"CUDA_VISIBLE_DEVICES": "1,0"}),
    EnvCase("CUDA_VISIBLE_DEVICES:hidden", FORGE, {"CUDA_VISIBLE_DEVICES": "GPU-8932f937"}, name="visible-by-uuid"),
    EnvCase("CUDA_VISIBLE_DEVICES:hidden", A1111, {"CUDA_VISIBLE_DEVICES": "-1"}, CPU_A1111, name="hidden-on-purpose"),
    EnvCase("CUDA_FORCE_PTX_JIT", A1111, {"CUDA_FORCE_PTX_JIT": "0"}, others=("redundant-env",)),
    EnvCase("CUDA_CACHE_DISABLE", PREVIOUS, {"CUDA_CACHE_DISABLE": "0"}, others=("redundant-env",)),
    EnvCase("CUDA_CACHE_MAXSIZE", A1111, {"CUDA_CACHE_MAXSIZE": "4294967296"}),
    EnvCase("CUDA_DEVICE_MAX_CONNECTIONS:one", FORGE, {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}, name="one-queue-no-stream"),
    EnvCase("cuDNN API logging", A1111, {"CUDNN_LOGINFO_DBG": "1"}, name="cudnn-log-without-destination"),
    EnvCase("cuDNN API logging (cuDNN 9)", FORGE, {"CUDNN_LOGLEVEL_DBG": "1", "CUDNN_LOGDEST_DBG": "stderr"}),
    EnvCase("MALLOC_MMAP_THRESHOLD_", A1111, {"MALLOC_MMAP_THRESHOLD_": "65536"}),
    EnvCase("MALLOC_MMAP_THRESHOLD_", FORGE, {"MALLOC_MMAP_THRESHOLD_": "-1"}, name="mmap-threshold-negative-ignored"),
    EnvCase("MALLOC_PERTURB_", A1111, {"MALLOC_PERTURB_": "0"}, others=("redundant-env",)),
    EnvCase("MALLOC_PERTURB_", A1111, {"MALLOC_PERTURB_": "256"}, name="perturb-low-byte-zero"),
    EnvCase("OMP_NUM_THREADS", A1111, {"OMP_NUM_THREADS": "1"}, name="omp-one-thread-gpu"),
    EnvCase("OMP_NUM_THREADS", A1111, {"OMP_NUM_THREADS": "8"}, CPU_A1111, name="omp-eight-threads-cpu"),
    EnvCase("SAFETENSORS_FAST_GPU", FORGE, {"HF_HUB_OFFLINE": "1"}),
    EnvCase("TORCH_CUDNN_V8_API_ENABLED", A1111, {"TORCH_CUDNN_V8_API_DISABLED": "1"}),
    EnvCase("MALLOC_CHECK_", A1111, {"MALLOC_ARENA_MAX": "2"}),
    EnvCase("TORCH_COMPILE_DEBUG", A1111, {"TORCH_COMPILE_DEBUG": "0"}, others=("redundant-env",)),
    EnvCase("TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT:no-cache", FORGE, {"TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT": "0"}),
    EnvCase(
        "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT:no-cache",
        A1111,
        {"TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT": "-1"},
        CPU_A1111,
        name="no-plan-cache-on-cpu",
    ),
]


@pytest.mark.parametrize("case", FIRES, ids=str)
def test_row_fires(case: EnvCase) -> None:
    note = NOTES[case.key]
    assert case.host in note.hosts, case
    hits = [f for f in case.env_findings() if f.rule == note.rule]
    assert hits, f"{case.key} did not fire: {case.findings()}"
    finding = hits[0]
    assert finding.severity is Severity(note.severity)
    assert finding.fix == note.fix
    assert finding.subject.split(" ")[0] in case.env
    assert "{" not in finding.message, finding.message  # every placeholder was filled


@pytest.mark.parametrize("case", NEAR_MISSES, ids=str)
def test_near_miss_is_quiet(case: EnvCase) -> None:
    assert sorted(f.rule for f in case.env_findings()) == sorted(case.others), case.env_findings()


def test_every_row_has_a_firing_case_and_a_near_miss() -> None:
    assert {c.key for c in FIRES} == set(NOTES)
    assert {c.key for c in NEAR_MISSES} == set(NOTES)
    assert len(NOTES) == len(ENV_NOTES), "row keys must be unique"


def test_rows_are_well_formed() -> None:
    for note in ENV_NOTES:
        assert note.rule in RULE_IDS and note.rule in RULES, note.key
        assert note.severity in ("warning", "info"), note.key
        assert RULES[note.rule].severity.rank >= Severity(note.severity).rank
        assert set(note.hosts) <= set(RULES[note.rule].hosts)
        assert note.names and all(name == name.upper() for name in note.names), note.key
        assert note.summary and note.fix and note.source and note.fires_on, note.key


def test_the_issues_two_examples() -> None:
    (benchmark,) = run_checks(CheckInput(A1111, [], {"TORCH_CUDNN_BENCHMARK": "1"}))
    assert benchmark.rule == "no-effect-env" and "torch.backends.cudnn.benchmark" in benchmark.message
    (mmap,) = run_checks(CheckInput(FORGE, [], {"MALLOC_MMAP_THRESHOLD_": "0"}))
    assert mmap.rule == "costly-env" and mmap.severity is Severity.WARNING and "mmap" in mmap.message


def test_glibc_reads_numbers_like_strtoul() -> None:
    # Measured with glibc 2.36 (8 KiB allocation loop): these values behaved as the numbers below.
    assert glibc_number("0") == 0
    assert glibc_number("") == 0
    assert glibc_number("abc") == 0
    assert glibc_number("1e9") == 1
    assert glibc_number("100k") == 100
    assert glibc_number("0x10") == 16
    assert glibc_number("65536") == 65536
    assert glibc_number("-1") is None


def test_glibc_tunables_are_split_into_their_malloc_aliases() -> None:
    items = list(env_items({"GLIBC_TUNABLES": "glibc.malloc.perturb=85:glibc.malloc.tcache_count=0", "A": "1"}))
    assert [(i.lookup, i.shown, i.value, i.subject) for i in items] == [
        ("MALLOC_PERTURB_", "glibc.malloc.perturb", "85", "GLIBC_TUNABLES glibc.malloc.perturb"),
        ("A", "A", "1", "A"),
    ]
    findings = run_checks(CheckInput(A1111, [], {"GLIBC_TUNABLES": "glibc.malloc.perturb=85"}))
    assert [(f.rule, f.subject) for f in findings] == [("costly-env", "GLIBC_TUNABLES glibc.malloc.perturb")]
    assert "glibc.malloc.perturb=85" in findings[0].message


def test_probed_torch_version_is_named() -> None:
    facts = RuntimeFacts(torch_version="2.1.2+cu118")
    (finding,) = run_checks(CheckInput(FORGE, [], {"PYTORCH_TUNABLEOP_ENABLED": "1"}, facts))
    assert "torch 2.1.2+cu118" in finding.message
    (default,) = run_checks(CheckInput(A1111, [], {"PYTORCH_TUNABLEOP_ENABLED": "1"}))
    assert "2.1.2 (what AUTOMATIC1111 WebUI v1.10 installs)" in default.message


def test_forge_gpu_device_id_message_names_both_values() -> None:
    (finding,) = run_checks(CheckInput(FORGE, ["--gpu-device-id", "0"], {"CUDA_VISIBLE_DEVICES": "1"}))
    assert finding.rule == "redundant-env" and "--gpu-device-id 0" in finding.message and "'1'" in finding.message


# Examples for QUIET_NOTES: variables that were researched and must never produce an environment finding.
QUIET_EXAMPLES: list[tuple[HostKind, tuple[str, ...], dict[str, str]]] = [
    (FORGE, (), {"TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor_root", "TORCHINDUCTOR_MAX_AUTOTUNE": "1"}),
    # CUDA_LAUNCH_BLOCKING=1 is the cuda-launch-blocking rule's (and =0 redundant-env's: the driver's default)
    (A1111, (), {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True", "CUDA_LAUNCH_BLOCKING": "1"}),
    (A1111, (), {"OPTIM_COMPILE_CACHE": "/srv/compile-cache", "TRITON_CACHE_DIR": "/srv/triton"}),
    (FORGE, (), {"CUDA_MODULE_LOADING": "LAZY"}),
    (A1111, (), {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}),
    (FORGE, (), {"LD_PRELOAD": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2"}),
    (A1111, (), {"PYTORCH_ENABLE_MPS_FALLBACK": "1"}),
    (
        PREVIOUS,
        (),
        {"MALLOC_ARENA_MAX": "2", "MALLOC_TRIM_THRESHOLD_": "100000", "MALLOC_TOP_PAD_": "0", "MALLOC_MMAP_MAX_": "0"},
    ),
    (A1111, (), {"MALLOC_MMAP_THRESHOLD_": "131072"}),
    (FORGE, (), {"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}),
    (FORGE, (), {"PYTORCH_TUNABLEOP_ENABLED": "1"}),
    (A1111, (), {"OMP_NUM_THREADS": "4", "MKL_NUM_THREADS": "1"}),
    (
        FORGE,
        (),
        {
            "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
            "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT": "10000",
            "XFORMERS_FORCE_DISABLE_TRITON": "1",
        },
    ),
]


@pytest.mark.parametrize(("host", "argv", "env"), QUIET_EXAMPLES)
def test_quiet_notes_stay_quiet(host: HostKind, argv: tuple[str, ...], env: dict[str, str]) -> None:
    findings = run_checks(CheckInput(host, list(argv), env))
    assert not [f for f in findings if f.rule in RULE_IDS], findings


def test_every_quiet_note_has_an_example() -> None:
    example_names = {name.upper() for _, _, env in QUIET_EXAMPLES for name in env}
    for note in QUIET_NOTES:
        for name in note.names:
            assert name.rstrip("*") in {n[: len(name.rstrip("*"))] for n in example_names}, name
