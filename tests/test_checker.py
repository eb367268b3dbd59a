"""lib_optim.launch.checker: every rule fires where the host code says it should, and stays quiet on near misses."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pytest

from lib_optim.host_specs.kinds import HostKind
from lib_optim.launch.checker import (
    FLAG_NOTES,
    RULES,
    CheckInput,
    Finding,
    RuntimeFacts,
    Severity,
    exit_code,
    parse_alloc_conf,
    run_checks,
    worst_severity,
)

A1111, FORGE, PREVIOUS = HostKind.A1111, HostKind.FORGE, HostKind.FORGE_PREVIOUS
FORGE_HOSTS = (FORGE, PREVIOUS)
ERROR, WARNING, INFO = Severity.ERROR, Severity.WARNING, Severity.INFO

NVIDIA_86 = RuntimeFacts(
    torch_version="2.3.1+cu121",
    torch_has_cuda=True,
    cuda_available=True,
    nvidia_driver="550.54",
    nvidia_gpu_expected=True,
    gpu_total_mb=12288,
    compute_capability=(8, 6),
    xformers_known=True,
    xformers_version="0.0.27",
    xformers_built_for_torch="2.3.1+cu121",
    xformers_matches_torch=True,
)


def check(
    host: HostKind,
    argv: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    facts: RuntimeFacts | None = None,
    launcher_notes: Sequence[Finding] = (),
) -> list[Finding]:
    return run_checks(
        CheckInput(host, list(argv), dict(env or {}), facts or RuntimeFacts(), launcher_notes=launcher_notes)
    )


@dataclass(frozen=True)
class Case:
    rule: str
    host: HostKind
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    facts: RuntimeFacts = field(default_factory=RuntimeFacts)
    # expected when firing: severity, subject, and words the message (or fix) must contain
    severity: Severity | None = None
    subject: str | None = None
    mentions: tuple[str, ...] = ()
    fix_mentions: tuple[str, ...] = ()
    name: str = ""
    launcher_notes: tuple[Finding, ...] = ()

    def run(self) -> list[Finding]:
        return check(self.host, self.argv, self.env, self.facts, self.launcher_notes)

    def hits(self) -> list[Finding]:
        return [f for f in self.run() if f.rule == self.rule]

    def __str__(self) -> str:
        return self.name or f"{self.rule}-{self.host.value}-{' '.join(self.argv) or ','.join(self.env)}"


def fires(rule: str, host: HostKind, *argv: str, **kw: object) -> Case:
    return Case(rule, host, tuple(argv), **kw)  # type: ignore[arg-type]


CRLF_NOTE = Finding(
    "launcher-file",
    WARNING,
    "line endings",
    "webui-user.sh:1: CRLF line endings: bash keeps the CR in every value",
    "convert the file to LF line endings",
)

FIRES: list[Case] = [
    fires(
        "launcher-file",
        A1111,
        launcher_notes=(CRLF_NOTE,),
        severity=WARNING,
        subject="line endings",
        mentions=("webui-user.sh:1", "CRLF"),
        name="launcher-file-note-reported",
    ),
    # --- start-up exits
    fires(
        "unknown-flag",
        A1111,
        "--all-in-fp32",
        severity=ERROR,
        subject="--all-in-fp32",
        mentions=("unrecognized arguments", "shared_cmd_options.py"),
        fix_mentions=("--no-half",),
        name="all-in-fp32-unknown-on-a1111",
    ),
    *(
        fires(
            "unknown-flag",
            host,
            "--use-cuda-dsa",
            severity=ERROR,
            subject="--use-cuda-dsa",
            mentions=(host.display_name,),
            fix_mentions=("PyTorch *build* option", "CUDA_LAUNCH_BLOCKING=1"),
            name=f"use-cuda-dsa-unknown-{host.value}",
        )
        for host in (A1111, FORGE, PREVIOUS)
    ),
    fires(
        "unknown-flag",
        A1111,
        "--attention-quad",
        severity=ERROR,
        subject="--attention-quad",
        fix_mentions=("--opt-sub-quad-attention",),
        name="forge-attention-flag-on-a1111",
    ),
    fires(
        "unknown-flag",
        A1111,
        "--directml",
        severity=ERROR,
        subject="--directml",
        fix_mentions=("DirectML",),
        name="directml-unknown-on-a1111",
    ),
    fires(
        "bad-flag-value",
        A1111,
        "--medvr",
        severity=ERROR,
        subject="--medvr",
        mentions=("abbreviation", "--medvram", "--medvram-sdxl"),
        name="ambiguous-abbreviation",
    ),
    fires(
        "bad-flag-value",
        PREVIOUS,
        "--precision",
        "half",
        severity=ERROR,
        subject="--precision",
        mentions=("'half'", "full, autocast"),
        name="precision-half-on-forge-previous",
    ),
    fires(
        "exclusive-flags",
        FORGE,
        "--attention-split",
        "--attention-pytorch",
        severity=ERROR,
        subject="--attention-split --attention-pytorch",
        mentions=("'attention'", "not allowed with argument"),
    ),
    fires(
        "exclusive-flags",
        PREVIOUS,
        "--always-cpu",
        "--always-low-vram",
        severity=ERROR,
        subject="--always-cpu --always-low-vram",
        mentions=("'vram'",),
    ),
    fires(
        "a1111-precision-conflict",
        A1111,
        "--precision",
        "half",
        "--no-half",
        severity=ERROR,
        subject="--precision half --no-half",
        mentions=("shared_init.py:34-38",),
    ),
    # --- per-flag notes
    fires(
        "ignored-by-host",
        FORGE,
        "--medvram",
        severity=WARNING,
        subject="--medvram",
        mentions=("WebUI Forge f2 ignores --medvram", "removed in Forge"),
        fix_mentions=("GPU Weights", "--always-offload-from-vram"),
        name="medvram-on-forge",
    ),
    fires(
        "ignored-by-host",
        PREVIOUS,
        "--lowvram",
        severity=WARNING,
        subject="--lowvram",
        mentions=("removed in Forge",),
        fix_mentions=("--always-low-vram",),
    ),
    fires(
        "ignored-by-host",
        FORGE,
        "--opt-sub-quad-attention",
        severity=WARNING,
        subject="--opt-sub-quad-attention",
        mentions=("no code reads it",),
        fix_mentions=("--attention-quad",),
    ),
    fires(
        "ignored-by-host",
        PREVIOUS,
        "--opt-split-attention",
        severity=WARNING,
        subject="--opt-split-attention",
        fix_mentions=("--attention-split",),
    ),
    fires(
        "ignored-by-host",
        FORGE,
        "--opt-sdp-attention",
        severity=WARNING,
        subject="--opt-sdp-attention",
        mentions=("SDPA",),
        fix_mentions=("--attention-pytorch",),
    ),
    fires(
        "ignored-by-host",
        FORGE,
        "--opt-channelslast",
        severity=WARNING,
        subject="--opt-channelslast",
        mentions=("channels-last",),
    ),
    fires(
        "ignored-by-host",
        FORGE,
        "--disable-nan-check",
        severity=WARNING,
        subject="--disable-nan-check",
        mentions=("no-op", "modules/devices.py:97-98"),
    ),
    fires(
        "ignored-by-host",
        FORGE,
        "--no-half",
        severity=WARNING,
        subject="--no-half",
        mentions=("upscaler",),
        fix_mentions=("--all-in-fp32",),
    ),
    fires(
        "ignored-by-host",
        FORGE,
        "--use-cpu",
        "all",
        severity=WARNING,
        subject="--use-cpu",
        fix_mentions=("--always-cpu",),
    ),
    fires(
        "xformers-flag-semantics",
        FORGE,
        "--xformers",
        severity=INFO,
        subject="--xformers",
        mentions=("only makes the launcher install xformers", "whenever it can import it"),
        fix_mentions=("--disable-xformers",),
    ),
    fires(
        "obsolete-flag",
        A1111,
        "--force-enable-xformers",
        severity=WARNING,
        subject="--force-enable-xformers",
        mentions=("import_hook.py",),
        fix_mentions=("--xformers",),
    ),
    fires(
        "obsolete-flag",
        FORGE,
        "--max-batch-count",
        "4",
        severity=INFO,
        subject="--max-batch-count",
        mentions=("does not do anything",),
    ),
    fires(
        "costly-flag",
        A1111,
        "--no-half",
        severity=WARNING,
        subject="--no-half",
        mentions=("fp32", "twice the VRAM"),
        fix_mentions=("--upcast-sampling",),
    ),
    fires(
        "costly-flag",
        A1111,
        "--precision=full",
        severity=WARNING,
        subject="--precision",
        mentions=("--precision full", "autocast"),
    ),
    fires(
        "costly-flag",
        FORGE,
        "--all-in-fp32",
        severity=WARNING,
        subject="--all-in-fp32",
        mentions=("FORCE_FP32", "double the memory"),
        name="all-in-fp32-costly-on-forge",
    ),
    fires(
        "costly-flag",
        A1111,
        "--lowvram",
        facts=RuntimeFacts(gpu_total_mb=12288),
        severity=WARNING,
        subject="--lowvram",
        mentions=("4 GB",),
    ),
    fires(
        "costly-flag",
        A1111,
        "--medvram",
        facts=RuntimeFacts(gpu_total_mb=24576),
        severity=WARNING,
        subject="--medvram",
        fix_mentions=("--medvram-sdxl",),
    ),
    fires(
        "redundant-flag",
        A1111,
        "--medvram",
        "--medvram-sdxl",
        severity=INFO,
        subject="--medvram-sdxl",
        mentions=("lowvram.py",),
    ),
    fires(
        "redundant-flag",
        A1111,
        "--no-half",
        "--no-half-vae",
        severity=INFO,
        subject="--no-half-vae",
        mentions=("--no-half already keeps the VAE in fp32",),
    ),
    fires(
        "duplicate-flag",
        A1111,
        "--port",
        "7860",
        "--port=7861",
        severity=INFO,
        subject="--port",
        mentions=("2 times", "'7861' wins"),
    ),
    # --- attention
    fires(
        "several-attention-flags",
        A1111,
        "--xformers",
        "--opt-sdp-attention",
        facts=NVIDIA_86,
        severity=WARNING,
        subject="--xformers --opt-sdp-attention",
        mentions=("it uses xformers", "sd_hijack.py"),
        name="a1111-two-attention-flags-xformers-importable",
    ),
    fires(
        "several-attention-flags",
        A1111,
        "--xformers",
        "--opt-sdp-attention",
        facts=RuntimeFacts(
            cuda_available=True,
            compute_capability=(8, 6),
            xformers_known=True,
            xformers_version="0.0.20",
            xformers_matches_torch=False,
        ),
        severity=WARNING,
        subject="--xformers --opt-sdp-attention",
        mentions=("it uses sdp ",),
        name="a1111-two-attention-flags-xformers-broken",
    ),
    fires(
        "several-attention-flags",
        A1111,
        "--xformers",
        "--opt-sdp-attention",
        facts=RuntimeFacts(cuda_available=True, compute_capability=(5, 2)),
        severity=WARNING,
        subject="--xformers --opt-sdp-attention",
        mentions=("it uses sdp ",),
        name="a1111-two-attention-flags-old-gpu",
    ),
    fires(
        "several-attention-flags",
        A1111,
        "--xformers",
        "--opt-split-attention",
        "--use-cpu",
        "all",
        severity=WARNING,
        subject="--xformers --opt-split-attention",
        mentions=("it uses Doggettx",),
        name="a1111-two-attention-flags-on-cpu",
    ),
    fires(
        "several-attention-flags",
        A1111,
        "--opt-sdp-attention",
        "--disable-opt-split-attention",
        severity=WARNING,
        subject="--opt-sdp-attention --disable-opt-split-attention",
        mentions=("it uses none",),
    ),
    fires(
        "attention-flag-overridden",
        FORGE,
        "--attention-split",
        facts=NVIDIA_86,
        severity=WARNING,
        subject="--attention-split",
        mentions=("xformers is installed", "backend/attention.py"),
        fix_mentions=("--disable-xformers",),
        name="forge-attention-split-loses-to-xformers",
    ),
    fires(
        "attention-flag-overridden",
        PREVIOUS,
        "--attention-quad",
        severity=INFO,  # without --probe nobody knows whether xformers is installed: a note, not a warning
        subject="--attention-quad",
        mentions=("if xformers is installed",),
        name="forge-attention-quad-xformers-unknown",
    ),
    fires(
        "directml-xformers",
        FORGE,
        "--directml",
        "--xformers",
        severity=WARNING,
        subject="--directml --xformers",
        mentions=("CUDA kernels only",),
    ),
    # --- exposure
    fires(
        "insecure-extension-access",
        A1111,
        "--listen",
        "--enable-insecure-extension-access",
        severity=WARNING,
        subject="--enable-insecure-extension-access",
        mentions=("--listen", "install extensions"),
        fix_mentions=("--gradio-auth",),
    ),
    fires(
        "insecure-extension-access",
        FORGE,
        "--server-name",
        "0.0.0.0",
        "--enable-insecure-extension-access",
        severity=WARNING,
        subject="--enable-insecure-extension-access",
        mentions=("--server-name 0.0.0.0",),
    ),
    fires(
        "api-without-auth",
        A1111,
        "--share",
        "--api",
        severity=WARNING,
        subject="--api",
        mentions=("--share", "/sdapi"),
        fix_mentions=("--api-auth",),
    ),
    fires(
        "api-without-auth",
        PREVIOUS,
        "--nowebui",
        "--listen",
        "--gradio-auth",
        "u:p",
        severity=WARNING,
        subject="--api",
        mentions=("--listen",),
    ),
    # --- environment
    fires(
        "cuda-launch-blocking",
        A1111,
        env={"CUDA_LAUNCH_BLOCKING": "1"},
        severity=WARNING,
        subject="CUDA_LAUNCH_BLOCKING",
        mentions=("CUDA_LAUNCH_BLOCKING=1", "slower"),
    ),
    fires(
        "alloc-conf",
        A1111,
        env={"PYTORCH_CUDA_ALLOC_CONF": "max_split_size:128"},
        severity=ERROR,
        subject="PYTORCH_CUDA_ALLOC_CONF",
        mentions=("'max_split_size' is not an allocator option", "RuntimeError"),
        name="alloc-conf-unknown-key",
    ),
    fires(
        "alloc-conf",
        FORGE,
        env={"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:1.5"},
        severity=ERROR,
        subject="PYTORCH_CUDA_ALLOC_CONF",
        mentions=("garbage_collection_threshold:1.5", "between 0 and 1"),
        name="alloc-conf-bad-value",
    ),
    fires(
        "alloc-conf",
        FORGE,
        "--cuda-malloc",
        env={"PYTORCH_CUDA_ALLOC_CONF": "backend:native"},
        severity=WARNING,
        subject="PYTORCH_CUDA_ALLOC_CONF --cuda-malloc",
        mentions=("backend:native", "cuda_malloc.py"),
        name="alloc-conf-native-with-cuda-malloc",
    ),
    fires(
        "alloc-conf",
        A1111,
        env={"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync,expandable_segments:True"},
        severity=WARNING,
        subject="PYTORCH_CUDA_ALLOC_CONF expandable_segments",
        mentions=("no effect", "cudaMallocAsync"),
        name="alloc-conf-expandable-with-async",
    ),
    fires(
        "cuda-module-loading",
        A1111,
        env={"CUDA_MODULE_LOADING": "EAGER"},
        severity=WARNING,
        subject="CUDA_MODULE_LOADING",
        mentions=("EAGER", "LAZY by default"),
    ),
    fires(
        "cuda-module-loading",
        FORGE,
        env={"CUDA_MODULE_LOADING": "bogus"},
        severity=WARNING,
        subject="CUDA_MODULE_LOADING",
        mentions=("'bogus' is not a value",),
    ),
    fires(
        "no-effect-env",
        FORGE,
        env={"inference_memory": "1024"},
        severity=WARNING,
        subject="inference_memory",
        mentions=("No code reads an environment variable", "memory_management.py"),
        fix_mentions=("GPU Weights",),
    ),
    fires(
        "no-effect-env",
        A1111,
        env={"TORCH_CUDNN_BENCHMARK": "1"},
        severity=WARNING,
        subject="TORCH_CUDNN_BENCHMARK",
        mentions=("torch.backends.cudnn.benchmark",),
    ),
    fires(
        "redundant-env",
        A1111,
        env={"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"},
        severity=INFO,
        subject="TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",
        mentions=("modules/devices.py",),
    ),
    fires(
        "costly-env",
        FORGE,
        env={"MALLOC_MMAP_THRESHOLD_": "0"},
        severity=WARNING,
        subject="MALLOC_MMAP_THRESHOLD_",
        mentions=("mmap",),
    ),
    fires(
        "obsolete-env",
        A1111,
        env={"SAFETENSORS_FAST_GPU": "1"},
        severity=INFO,
        subject="SAFETENSORS_FAST_GPU",
        mentions=("safetensors 0.4.2",),
    ),
    # --- runtime facts
    fires(
        "xformers-mismatch",
        A1111,
        "--xformers",
        facts=RuntimeFacts(
            torch_version="2.4.0+cu121",
            xformers_known=True,
            xformers_version="0.0.27",
            xformers_built_for_torch="2.3.1+cu121",
            xformers_matches_torch=False,
        ),
        severity=WARNING,
        subject="xformers",
        mentions=("0.0.27", "2.3.1+cu121", "2.4.0+cu121", "falls back"),
        fix_mentions=("--reinstall-xformers",),
    ),
    fires(
        "xformers-mismatch",
        FORGE,
        facts=RuntimeFacts(xformers_known=True, xformers_version="0.0.27", xformers_matches_torch=False),
        severity=WARNING,
        subject="xformers",
        mentions=("Forge imports it whenever it is installed",),
    ),
    fires(
        "torch-without-cuda",
        A1111,
        facts=RuntimeFacts(torch_version="2.3.1+cpu", torch_has_cuda=False, cuda_available=False),
        severity=ERROR,
        subject="torch",
        mentions=("CPU-only build", "Torch is not able to use GPU"),
    ),
    fires(
        "torch-without-cuda",
        FORGE,
        facts=RuntimeFacts(torch_has_cuda=True, cuda_available=False),
        severity=ERROR,
        subject="torch",
        mentions=("cannot reach a CUDA GPU", "does not support the current version of Torch/CUDA"),
    ),
    fires(
        "torch-without-cuda",
        A1111,
        "--use-cpu",
        "all",
        facts=RuntimeFacts(torch_has_cuda=False, cuda_available=False),
        severity=ERROR,
        subject="torch",
        mentions=("--use-cpu does not switch off the launcher's CUDA test",),
        fix_mentions=("--skip-torch-cuda-test",),
        name="torch-without-cuda-cpu-mode-without-skip",
    ),
    fires(
        "torch-without-cuda",
        A1111,
        "--skip-torch-cuda-test",
        facts=RuntimeFacts(torch_has_cuda=False, cuda_available=False),
        severity=WARNING,
        subject="torch",
        mentions=("--skip-torch-cuda-test hides that",),
        fix_mentions=("--use-cpu all",),
    ),
    fires(
        "no-nvidia-driver",
        FORGE,
        facts=RuntimeFacts(
            nvidia_gpu_expected=True,
            nvidia_driver_error="nvidia-smi: NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA "
            "driver.",
        ),
        severity=ERROR,
        subject="NVIDIA driver",
        mentions=("its driver does not answer (nvidia-smi: NVIDIA-SMI has failed", "missing or broken"),
    ),
    # Issue 9 row 2: a Python without pynvml, CUDA torch or nvidia-smi cannot ask; that says nothing of the driver.
    fires(
        "no-nvidia-driver",
        A1111,
        facts=RuntimeFacts(nvidia_gpu_expected=True),
        severity=INFO,
        subject="NVIDIA driver",
        mentions=("this Python cannot ask its driver",),
        fix_mentions=("venv/bin/python", "venv\\Scripts\\python"),
        name="no-nvidia-driver-cannot-ask",
    ),
    # Issue 9 row 17: a CUDA torch on a machine without an NVIDIA GPU needs the CPU flags, not another torch.
    fires(
        "torch-without-cuda",
        FORGE,
        facts=RuntimeFacts(torch_has_cuda=True, cuda_available=False, nvidia_gpu_expected=False),
        severity=ERROR,
        subject="torch",
        mentions=("torch cannot reach a CUDA GPU",),
        fix_mentions=("no NVIDIA GPU", "profile apply cpu", "--always-cpu --skip-torch-cuda-test"),
        name="torch-without-cuda-cpu-only-box",
    ),
    fires(
        "torch-without-cuda",
        A1111,
        "--skip-torch-cuda-test",
        facts=RuntimeFacts(torch_has_cuda=True, cuda_available=False, nvidia_gpu_expected=False),
        severity=WARNING,
        subject="torch",
        fix_mentions=("no NVIDIA GPU", "--use-cpu all --no-half"),
        name="torch-without-cuda-cpu-only-box-skipped-test",
    ),
    fires(
        "torch-without-cuda",
        FORGE,
        facts=RuntimeFacts(torch_has_cuda=True, cuda_available=False, nvidia_gpu_expected=True, nvidia_driver="550.54"),
        severity=ERROR,
        subject="torch",
        fix_mentions=("check that the NVIDIA driver works",),
        name="torch-without-cuda-gpu-present",
    ),
]


NEAR_MISSES: list[Case] = [
    Case("launcher-file", FORGE, ("--attention-split",), name="no-file-no-launcher-notes"),
    Case("unknown-flag", A1111, ("--no-half", "--lowvr"), name="a1111-known-and-abbreviated"),
    Case("unknown-flag", FORGE, ("--all-in-fp32",), name="all-in-fp32-known-on-forge"),
    Case("bad-flag-value", A1111, ("--lowvr", "--precision", "half"), name="unique-prefix-and-half-on-a1111"),
    Case("bad-flag-value", FORGE, ("--directml",), name="directml-without-value"),
    Case("exclusive-flags", FORGE, ("--attention-split", "--disable-xformers"), name="forge-split-no-xformers"),
    Case("exclusive-flags", FORGE, ("--all-in-fp32", "--vae-in-fp32"), name="different-groups"),
    Case("a1111-precision-conflict", A1111, ("--precision", "full", "--no-half")),
    Case("ignored-by-host", FORGE, ("--attention-quad", "--always-low-vram"), name="forge-native-flags"),
    Case("xformers-flag-semantics", A1111, ("--xformers",)),
    Case("obsolete-flag", A1111, ("--xformers",)),
    Case("costly-flag", A1111, ("--no-half", "--use-cpu", "all"), name="no-half-with-cpu-is-not-costly"),
    Case("costly-flag", A1111, ("--no-half", "--use-cpu", "ALL"), name="use-cpu-is-lowercased-by-a1111"),
    Case("costly-flag", A1111, ("--precision", "autocast")),
    Case("costly-flag", FORGE, ("--all-in-fp32", "--always-cpu"), name="all-in-fp32-on-cpu"),
    Case("costly-flag", A1111, ("--lowvram",), facts=RuntimeFacts(gpu_total_mb=4096), name="lowvram-4gb"),
    Case("costly-flag", A1111, ("--lowvram",), name="lowvram-unknown-vram"),
    Case("costly-flag", A1111, ("--medvram",), facts=RuntimeFacts(gpu_total_mb=8192), name="medvram-8gb"),
    Case("redundant-flag", A1111, ("--medvram-sdxl",)),
    Case("redundant-flag", A1111, ("--no-half-vae", "--upcast-sampling")),
    Case("duplicate-flag", A1111, ("--port", "7860", "--listen")),
    Case("several-attention-flags", A1111, ("--xformers",), facts=NVIDIA_86, name="one-attention-flag"),
    Case("several-attention-flags", A1111, ("--opt-sdp-attention",), name="one-sdp-flag"),
    Case("attention-flag-overridden", FORGE, ("--attention-split", "--disable-xformers"), facts=NVIDIA_86),
    Case("attention-flag-overridden", FORGE, ("--attention-pytorch",), facts=NVIDIA_86),
    Case("attention-flag-overridden", FORGE, ("--attention-split", "--always-cpu"), name="forge-split-on-cpu"),
    Case(
        "attention-flag-overridden",
        FORGE,
        ("--attention-quad",),
        facts=RuntimeFacts(xformers_known=True, xformers_version=None),
        name="forge-quad-without-xformers",
    ),
    Case("directml-xformers", FORGE, ("--directml", "--attention-split")),
    Case(
        "insecure-extension-access",
        A1111,
        ("--listen", "--enable-insecure-extension-access", "--gradio-auth", "u:p"),
        name="exposed-with-auth",
    ),
    Case(
        "insecure-extension-access",
        A1111,
        ("--server-name", "127.0.0.1", "--enable-insecure-extension-access"),
        name="server-name-loopback",
    ),
    Case(
        "insecure-extension-access",
        FORGE,
        ("--server-name", "localhost", "--enable-insecure-extension-access"),
        name="server-name-localhost",
    ),
    Case("api-without-auth", A1111, ("--listen", "--api", "--api-auth", "u:p")),
    Case("api-without-auth", A1111, ("--api",), name="api-local-only"),
    Case("cuda-launch-blocking", A1111, env={"CUDA_LAUNCH_BLOCKING": "0"}),
    Case(
        "alloc-conf",
        A1111,
        env={"PYTORCH_CUDA_ALLOC_CONF": "garbage_collection_threshold:0.6,max_split_size_mb:128"},
        name="alloc-conf-gc-and-split",
    ),
    Case(
        "alloc-conf",
        FORGE,
        env={"PYTORCH_CUDA_ALLOC_CONF": "roundup_power2_divisions:[256:1,512:2,>:4]"},
        name="alloc-conf-roundup-list",
    ),
    Case("alloc-conf", FORGE, ("--cuda-malloc",), env={"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}),
    Case("alloc-conf", A1111, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    Case("cuda-module-loading", A1111, env={"CUDA_MODULE_LOADING": "LAZY"}),
    Case("no-effect-env", A1111, env={"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}),
    Case("no-effect-env", A1111, env={"ATTN_PRECISION": "fp16"}, name="attn-precision-read-by-a1111"),
    Case("redundant-env", FORGE, env={"TORCH_ALLOW_TF32_CUBLAS_OVERRIDE": "1"}, name="tf32-override-forge"),
    Case("costly-env", A1111, env={"MALLOC_MMAP_THRESHOLD_": "65536"}),
    Case("obsolete-env", A1111, env={"TORCH_CUDNN_V8_API_DISABLED": "1"}),
    Case("xformers-mismatch", A1111, ("--xformers",), facts=NVIDIA_86, name="xformers-matches-torch"),
    Case(
        "xformers-mismatch",
        A1111,
        (),
        facts=RuntimeFacts(xformers_known=True, xformers_version="0.0.27", xformers_matches_torch=False),
        name="a1111-does-not-import-xformers-without-flag",
    ),
    Case("torch-without-cuda", A1111, facts=NVIDIA_86),
    Case(
        "torch-without-cuda",
        A1111,
        ("--use-cpu", "all", "--no-half", "--skip-torch-cuda-test"),
        facts=RuntimeFacts(torch_has_cuda=False, cuda_available=False),
        name="cpu-on-purpose",
    ),
    Case(
        "torch-without-cuda",
        FORGE,
        ("--directml", "--skip-torch-cuda-test"),
        facts=RuntimeFacts(cuda_available=False),
        name="directml-on-purpose",
    ),
    Case("no-nvidia-driver", A1111, facts=NVIDIA_86),
    Case("no-nvidia-driver", A1111, facts=RuntimeFacts(nvidia_gpu_expected=False), name="no-nvidia-gpu"),
    Case(
        "no-nvidia-driver",
        A1111,
        facts=RuntimeFacts(nvidia_gpu_expected=True, nvidia_driver="550.54"),
        name="driver-answered-without-pynvml",  # e.g. through nvidia-smi or the kernel module
    ),
    Case(
        "no-nvidia-driver",
        FORGE,
        ("--always-cpu",),
        facts=RuntimeFacts(nvidia_gpu_expected=True, nvidia_driver_error="NVML: Driver Not Loaded"),
        name="cpu-on-purpose-with-a-broken-driver",
    ),
]


@pytest.mark.parametrize("case", FIRES, ids=str)
def test_rule_fires(case: Case) -> None:
    hits = case.hits()
    assert hits, f"{case.rule} did not fire: {case.run()}"
    matching = [f for f in hits if case.subject is None or f.subject == case.subject]
    assert matching, [f.subject for f in hits]
    finding = matching[0]
    assert finding.severity is case.severity
    assert RULES[case.rule].severity.rank >= finding.severity.rank
    for words in case.mentions:
        assert words in finding.message, (words, finding.message)
    for words in case.fix_mentions:
        assert words in finding.fix, (words, finding.fix)
    assert finding.fix.strip()


@pytest.mark.parametrize("case", NEAR_MISSES, ids=str)
def test_rule_stays_quiet(case: Case) -> None:
    assert not case.hits(), case.hits()


def test_every_rule_has_a_firing_case_and_a_near_miss() -> None:
    assert {c.rule for c in FIRES} == set(RULES)
    assert {c.rule for c in NEAR_MISSES} == set(RULES)


def test_cases_only_use_hosts_the_rule_covers() -> None:
    for case in FIRES:
        assert case.host in RULES[case.rule].hosts, case


def test_every_flag_note_fires_on_its_hosts() -> None:
    for note in FLAG_NOTES:
        for host in note.hosts:
            argv = [note.option]
            spec_value = {"--precision": "full", "--use-cpu": "all", "--max-batch-count": "4"}.get(note.option)
            if spec_value:
                argv.append(spec_value)
            facts = RuntimeFacts(gpu_total_mb=24576)
            # redundant notes need their partner flag
            partner = {"--medvram-sdxl": "--medvram", "--no-half-vae": "--no-half", "--upcast-sampling": "--no-half"}
            if note.rule == "redundant-flag":
                argv.append("--lowvram" if note.option == "--medvram" else partner[note.option])
            findings = check(host, argv, facts=facts)
            assert any(f.rule == note.rule and f.subject == note.option for f in findings), (note, host, findings)


# --- the issue's named cases, spelled out ---------------------------------------------------------------


def _by_rule(findings: list[Finding], rule: str) -> list[Finding]:
    return [f for f in findings if f.rule == rule]


def test_all_in_fp32_differs_per_host() -> None:
    (a1111,) = _by_rule(check(A1111, ["--all-in-fp32"]), "unknown-flag")
    assert a1111.severity is ERROR and "--no-half" in a1111.fix
    for host in FORGE_HOSTS:
        findings = check(host, ["--all-in-fp32"])
        assert not _by_rule(findings, "unknown-flag")
        (costly,) = _by_rule(findings, "costly-flag")
        assert costly.severity is WARNING and costly.subject == "--all-in-fp32"


def test_xformers_semantics_per_host() -> None:
    assert not check(A1111, ["--xformers"], facts=NVIDIA_86)
    for host in FORGE_HOSTS:
        (finding,) = check(host, ["--xformers"], facts=NVIDIA_86)
        assert finding.rule == "xformers-flag-semantics" and finding.severity is INFO


def test_a1111_attention_without_flags_on_cpu_is_quiet() -> None:
    findings = check(A1111, ["--use-cpu", "all", "--no-half", "--skip-torch-cuda-test"])
    assert not _by_rule(findings, "several-attention-flags")


def test_a1111_three_attention_flags_names_the_winner() -> None:
    (finding,) = _by_rule(
        check(A1111, ["--opt-sub-quad-attention", "--opt-split-attention", "--opt-sdp-no-mem-attention"]),
        "several-attention-flags",
    )
    assert "it uses Doggettx" in finding.message


def test_one_forge_attention_flag_is_not_several() -> None:
    """Issue 9 row 16: `check --host forge -- --attention-split` warned "several-attention-flags" for one flag."""
    findings = check(FORGE, ["--attention-split"])
    assert not _by_rule(findings, "several-attention-flags")
    (finding,) = _by_rule(findings, "attention-flag-overridden")
    assert finding.severity is INFO and "if xformers is installed" in finding.message
    assert exit_code(findings) == 0


def test_alloc_conf_parser() -> None:
    values, problems = parse_alloc_conf("roundup_power2_divisions:[256:1,512:2,>:4], max_split_size_mb:128")
    assert values == {"roundup_power2_divisions": "[256:1,512:2,>:4]", "max_split_size_mb": "128"}
    assert problems == []
    _, problems = parse_alloc_conf("max_split_size_mb:10,expandable_segments:yes,oops")
    assert len(problems) == 3
    _, problems = parse_alloc_conf("max_split_size_mb:128,max_split_size_mb:256")
    assert any("given twice" in p for p in problems)


def test_alloc_conf_two_backends() -> None:
    findings = check(A1111, env={"PYTORCH_CUDA_ALLOC_CONF": "backend:native,backend:cudaMallocAsync"})
    assert [(f.rule, f.severity, f.subject) for f in findings] == [("alloc-conf", WARNING, "PYTORCH_CUDA_ALLOC_CONF")]
    assert "two allocator backends" in findings[0].message


def test_alloc_conf_new_variable_name_is_checked() -> None:
    # torch 2.9.0 reads PYTORCH_ALLOC_CONF (libc10.so); reForge installs it (lib_optim/launch/envtables.py)
    (finding,) = check(HostKind.REFORGE, env={"PYTORCH_ALLOC_CONF": "nonsense:1"})
    assert finding.subject == "PYTORCH_ALLOC_CONF" and finding.severity is ERROR
    newer = RuntimeFacts(torch_version="2.9.0+cu128")
    (finding,) = check(FORGE, env={"PYTORCH_ALLOC_CONF": "nonsense:1"}, facts=newer)
    assert finding.rule == "alloc-conf" and finding.severity is ERROR


def test_alloc_conf_new_variable_name_on_a_torch_that_does_not_read_it() -> None:
    # torch 2.3.1 (Forge f2) has no PYTORCH_ALLOC_CONF in any file: its value cannot crash it, and it does nothing
    (finding,) = check(FORGE, env={"PYTORCH_ALLOC_CONF": "nonsense:1"})
    assert (finding.rule, finding.severity, finding.subject) == ("no-effect-env", WARNING, "PYTORCH_ALLOC_CONF")
    assert "torch 2.3.1" in finding.message and "2.9.0" in finding.message
    assert "PYTORCH_CUDA_ALLOC_CONF" in finding.fix


def test_forge_prefixed_inference_memory_variable() -> None:
    (finding,) = check(FORGE, env={"FORGE_INFERENCE_MEMORY": "1024"})
    assert finding.rule == "no-effect-env" and finding.subject == "FORGE_INFERENCE_MEMORY"


# --- ordering, identity, exit codes --------------------------------------------------------------------


def test_sorted_most_severe_first() -> None:
    findings = check(
        A1111,
        ["--xformers", "--max-batch-count", "4", "--no-half", "--all-in-fp32"],
        env={"CUDA_LAUNCH_BLOCKING": "1"},
    )
    ranks = [f.severity.rank for f in findings]
    assert ranks == sorted(ranks, reverse=True)
    assert {f.severity for f in findings} == {ERROR, WARNING, INFO}
    assert worst_severity(findings) is ERROR


def test_each_rule_and_subject_once() -> None:
    findings = check(FORGE, ["--medvram", "--medvram", "--lowvram", "--medvram"])
    keys = [f.key for f in findings]
    assert len(keys) == len(set(keys))
    assert "ignored-by-host:--medvram" in keys and "duplicate-flag:--medvram" in keys


def test_exit_codes() -> None:
    assert exit_code([]) == 0
    assert exit_code(check(A1111, ["--max-batch-count", "4"])) == 0
    assert exit_code(check(A1111, ["--no-half"])) == 1
    assert exit_code(check(A1111, ["--use-cuda-dsa", "--no-half"])) == 2
    assert worst_severity([]) is None


def test_ignore_cmd_args_errors_downgrades_unknown_flags() -> None:
    (finding,) = check(A1111, ["--use-cuda-dsa"], env={"IGNORE_CMD_ARGS_ERRORS": "1"})
    assert finding.rule == "unknown-flag" and finding.severity is WARNING
    assert "silently ignored" in finding.message
    assert exit_code([finding]) == 1
    # it does not cover values argparse rejects for known flags
    findings = check(PREVIOUS, ["--precision", "half"], env={"IGNORE_CMD_ARGS_ERRORS": "1"})
    assert [(f.rule, f.severity) for f in findings] == [("bad-flag-value", ERROR)]


def test_finding_to_dict_is_json() -> None:
    findings = check(
        FORGE,
        ["--medvram", "--listen", "--enable-insecure-extension-access"],
        env={"CUDA_MODULE_LOADING": "EAGER"},
        facts=NVIDIA_86,
    )
    assert findings
    data = json.loads(json.dumps([f.to_dict() for f in findings]))
    for item, finding in zip(data, findings, strict=True):
        assert set(item) == {"rule", "severity", "subject", "message", "fix", "key"}
        assert item["severity"] == finding.severity.value
        assert item["key"] == f"{finding.rule}:{finding.subject}"


def test_reforge_is_covered_by_its_own_table() -> None:
    """reForge's own parser (generated from reForge ldm_patched/modules/args_parser.py and modules/cmd_args.py)."""
    findings = check(HostKind.REFORGE, ["--all-in-fp32", "--use-cuda-dsa"], env={"CUDA_LAUNCH_BLOCKING": "1"})
    assert {f.key for f in findings} == {
        "unknown-flag:--use-cuda-dsa",
        "costly-flag:--all-in-fp32",
        "cuda-launch-blocking:CUDA_LAUNCH_BLOCKING",
    }
    # its own flags are known (reForge args_parser.py:54, :58, :127, :147, :162); Forge previous's are not
    own = ["--reserve-vram", "1.5", "--use-sage-attention", "--force-channels-last", "--cuda-device", "0"]
    assert check(HostKind.REFORGE, [*own, "--fast", "fp16_accumulation"], facts=NVIDIA_86) == []
    unknown = {f.key for f in check(HostKind.REFORGE, ["--gpu-device-id", "--opt-channelslast"])}
    assert unknown == {"unknown-flag:--gpu-device-id", "unknown-flag:--opt-channelslast"}
    assert {f.key for f in check(PREVIOUS, ["--reserve-vram"])} == {"unknown-flag:--reserve-vram"}
    [bad] = check(HostKind.REFORGE, ["--fast", "turbo"])
    assert (bad.rule, bad.severity) == ("bad-flag-value", ERROR)


def test_reforge_attention_group_has_sage_and_flash() -> None:
    # reForge args_parser.py:123-129: one mutually exclusive group
    [finding] = check(HostKind.REFORGE, ["--attention-split", "--use-sage-attention"])
    assert (finding.rule, finding.severity) == ("exclusive-flags", ERROR)


def test_reforge_uses_xformers_only_with_the_flag() -> None:
    """reForge keeps A1111's import hook (modules/import_hook.py:4-5) and xformers_enabled() is false when the
    hook blocked the import (ldm_patched/modules/model_management.py:1095-1098): the notes saying Forge uses an
    installed xformers regardless do not apply there."""
    installed = check(HostKind.REFORGE, ["--attention-split", "--xformers"], facts=NVIDIA_86)
    assert not [f for f in installed if f.rule in ("attention-flag-overridden", "xformers-flag-semantics")]
    assert [f.rule for f in check(PREVIOUS, ["--attention-split"], facts=NVIDIA_86)] == ["attention-flag-overridden"]
    # the memory flags: reForge prints its own hint, not Forge's "removed" (modules_forge/initialization.py:28-35)
    assert check(HostKind.REFORGE, ["--medvram"]) == []


def test_clean_command_lines_are_clean() -> None:
    assert check(A1111, ["--xformers", "--medvram-sdxl", "--api"], facts=NVIDIA_86) == []
    assert check(FORGE, ["--attention-pytorch", "--cuda-malloc"], facts=NVIDIA_86) == []
    assert check(PREVIOUS, ["--always-offload-from-vram", "--precision", "autocast"], facts=NVIDIA_86) == []


def test_launcher_notes_must_be_launcher_file_findings() -> None:
    stray = Finding("unknown-flag", WARNING, "--x", "not from a file", "fix")
    with pytest.raises(ValueError, match="launcher_notes: 'unknown-flag' is not allowed"):
        check(A1111, launcher_notes=(stray,))


def test_hosts_defining_picks_the_hosts_whose_tables_have_the_flags() -> None:
    # With no WebUI checkout found, check/doctor show A1111 and Forge f2; a flag only some hosts define narrows that.
    from lib_optim.host_specs import FALLBACK_HOSTS
    from lib_optim.launch import hosts_defining

    assert hosts_defining(["--api"], FALLBACK_HOSTS) == (FALLBACK_HOSTS, "")  # both know it
    assert hosts_defining(["--no-such-flag"], FALLBACK_HOSTS) == (FALLBACK_HOSTS, "")  # none does: findings say so
    hosts, why = hosts_defining(["--directml", "--api"], FALLBACK_HOSTS)  # flagtables.py: Forge f2 has it
    assert hosts == (HostKind.FORGE,)
    assert why == "--directml is not a flag of AUTOMATIC1111 WebUI v1.10, so showing WebUI Forge f2 (which defines it)"
    # Neither of the two has it: the checked hosts that do (Forge previous's own launcher flags).
    hosts, why = hosts_defining(["--is-windows-embedded-python"], FALLBACK_HOSTS)
    assert HostKind.A1111 not in hosts and HostKind.FORGE not in hosts and HostKind("forge-previous") in hosts
    assert why.startswith("--is-windows-embedded-python is not a flag of AUTOMATIC1111 WebUI v1.10 and WebUI Forge f2")
