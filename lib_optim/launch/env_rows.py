"""The environment notes' rows: what the variables that optimisation notes recommend really do on each WebUI.

One :class:`EnvNote` per variable (or family of variables) and situation: the hosts, the checker rule it
belongs to, the values it applies to, what the variable does there, the fix, and the source that makes it
so. ``lib_optim.launch.checker`` turns the rows into findings (rules ``no-effect-env``, ``redundant-env``,
``costly-env``, ``obsolete-env``); README.md's environment table is :func:`env_notes_markdown`.

:data:`QUIET_NOTES` lists variables that were looked at and deliberately produce no finding (useful, or
set by the host itself so that a finding could not tell the user's value from the host's).

How the sources were read. PyTorch: the PyPI wheels torch 2.1.2 (A1111 v1.10.1 and Forge ``previous``
install it, modules/launch_utils.py:320 and :364), torch 2.3.1 (Forge f2, modules/launch_utils.py:365) and
torch 2.9.0 (reForge, modules/launch_utils.py:372): their Python files, and the names in ``torch/lib/*.so`` (a
variable whose name is not in a library is read by nothing in it); ``tools/gen_envtables.py`` makes that reading
a table (:mod:`lib_optim.launch.envtables`), which also answers for the variables no row here names
(:mod:`lib_optim.launch.env_readers`). PyTorch's C++ file names are from its repository; line numbers for C++ could not
be pinned to a tag (the repository snapshot is too large to fetch). glibc: mallopt(3), the glibc manual
("Memory Allocation Tunables") and glibc 2.34 NEWS; the MALLOC_* behaviour was also measured with
glibc 2.36. CUDA: the CUDA Programming Guide, "CUDA Environment Variables". Hosts: the mirrors named in
each row.
"""

from __future__ import annotations

import re

from lib_optim.launch.env_model import (
    A1111,
    EVERY_HOST,
    FORGE,
    FORGE_HOSTS,
    FORGE_PREVIOUS,
    Condition,
    EnvContext,
    EnvNote,
    QuietNote,
    glibc_number,
    torch_release,
)


def _int(value: str) -> int | None:
    try:
        return int(value.strip())
    except ValueError:
        return None


def _any(_value: str, _ctx: EnvContext) -> bool:
    return True


def _is(*accepted: str) -> Condition:
    def check(value: str, _ctx: EnvContext) -> bool:
        return value.strip().lower() in accepted

    return check


def _cublas_workspace_kib(value: str) -> int | None:
    """Total KiB of a CUBLAS_WORKSPACE_CONFIG (:SIZE_KiB:COUNT pairs), None when PyTorch cannot parse it."""
    pairs = re.findall(r":([0-9]+):([0-9]+)", value)
    return sum(int(size) * int(count) for size, count in pairs) if pairs else None


# PyTorch's own cuBLAS workspace when the variable is unset: ":4096:2:16:8" (8 MiB + 128 KiB; 32 MiB on
# Hopper), aten/src/ATen/cuda/CublasHandlePool.cpp parseChosenWorkspaceSize.
_CUBLAS_DEFAULT_KIB = 4096 * 2 + 16 * 8

# glibc's M_MMAP_THRESHOLD default is 128 KiB, adjusted upwards at run time (mallopt(3)); below a page
# every mmap'd chunk wastes most of its page, and at 0 the heap never grows (measured: 8 KiB allocations
# 25x slower with glibc 2.36).
_PAGE = 4096


def _hides_all_gpus(value: str) -> bool:
    # An empty list, or an invalid first entry, leaves no device visible (CUDA Programming Guide,
    # CUDA_VISIBLE_DEVICES: "only devices with indices that appear before the invalid index are visible").
    first = value.split(",", maxsplit=1)[0].strip()
    if not first:
        return True
    if first.upper().startswith(("GPU-", "MIG-")):
        return False
    return not first.isdigit()


def _uses_gpu(ctx: EnvContext) -> bool:
    return not (ctx.cpu_only or ctx.has("--directml") or ctx.facts.mps_available)


def _cudnn_logging_on(name: str) -> Condition:
    def check(value: str, ctx: EnvContext) -> bool:
        if not any(k.upper() == "CUDNN_LOGDEST_DBG" for k in ctx.env):
            return False  # cuDNN logs only when a destination is set too
        if name == "CUDNN_LOGINFO_DBG":
            return value.strip() == "1"
        level = _int(value)
        return level is not None and level >= 3  # 3 = info: every call; higher values are clipped to 3

    return check


# --- the rows -----------------------------------------------------------------------------------------

_TORCH_WHEELS = (
    "the Python files and torch/lib libraries of the torch 2.1.2, 2.3.1 and 2.9.0 PyPI wheels "
    "(lib_optim/launch/envtables.py)"
)
_XFORMERS_VARS = (
    "XFORMERS_FORCE_DISABLE_TRITON",
    "XFORMERS_ENABLE_TRITON",
    "XFORMERS_MORE_DETAILS",
    "XFORMERS_IGNORE_FLASH_VERSION_CHECK",
)


def _gpu_device_id_message(name: str, value: str, ctx: EnvContext) -> str:
    return (
        f"--gpu-device-id {ctx.value('--gpu-device-id')} makes {ctx.host.display_name} set {name} itself before "
        f"torch starts (modules_forge/initialization.py:51 in f2, :43 in previous), replacing your '{value}'."
    )


def _xformers_package_message(name: str, value: str, ctx: EnvContext) -> str:
    if not ctx.has("--xformers"):
        why = "only with --xformers"
    else:
        why = (
            "only when xformers is missing or with --reinstall-xformers; "
            f"xformers {ctx.facts.xformers_version} is installed"
        )
    return (
        f"The launcher installs {name} ({value}) {why} (modules/launch_utils.py, prepare_environment), so it "
        "changes nothing now."
    )


def _xformers_package_applies(_value: str, ctx: EnvContext) -> bool:
    if not ctx.has("--xformers"):
        return True
    installed = ctx.facts.xformers_known and ctx.facts.xformers_version is not None
    return installed and not ctx.has("--reinstall-xformers")


def _torch_command_applies(_value: str, ctx: EnvContext) -> bool:
    version = ctx.facts.torch_version
    # webui.sh and webui-macos-env.sh export TORCH_COMMAND themselves for AMD and Mac: inside the WebUI
    # the checker could not tell their value from the user's, so those machines get no finding.
    if not version or "rocm" in version or ctx.facts.mps_available:
        return False
    return not ctx.has("--reinstall-torch")


ENV_NOTES: tuple[EnvNote, ...] = (
    # --- variables nothing reads -----------------------------------------------------------------------
    EnvNote(
        "inference_memory",
        ("INFERENCE_MEMORY", "FORGE_INFERENCE_MEMORY"),
        (A1111, *FORGE_HOSTS),
        "no-effect-env",
        "warning",
        _any,
        "any value",
        "Nothing: Forge's inference memory is a Python setting.",
        "No code reads an environment variable of that name: Forge's inference memory is a Python setting "
        "(backend/memory_management.py:544-549, printed as 'Environment vars changed' but not an environment "
        "variable).",
        "Use the 'GPU Weights' slider, the forge_inference_memory option, or this extension's inference memory.",
        "Forge f2 backend/memory_management.py:544-549; no os.environ read of it in any host",
    ),
    EnvNote(
        "ATTN_PRECISION:forge",
        ("ATTN_PRECISION",),
        (FORGE,),
        "no-effect-env",
        "warning",
        _any,
        "any value",
        "Read only by the original ldm attention, which Forge's UNet does not use.",
        "Read only by the original ldm attention code (repositories/stable-diffusion-stability-ai "
        "ldm/modules/attention.py:21), which Forge f2 does not use; Forge upcasts attention by its own flags.",
        "Use --force-upcast-attention or --disable-attention-upcast.",
        "Forge f2 backend/args.py:35-37; stablediffusion ldm/modules/attention.py:21",
    ),
    EnvNote(
        "ATTN_PRECISION:forge-previous",
        ("ATTN_PRECISION",),
        (FORGE_PREVIOUS,),
        "no-effect-env",
        "warning",
        _any,
        "any value",
        "Read only by the original ldm attention, which Forge's UNet does not use.",
        "Read only by the original ldm attention code, but Forge builds the UNet from ldm_patched "
        "(modules_forge/forge_loader.py:91), whose attention precision comes from a flag "
        "(ldm_patched/ldm/modules/attention.py:29-33).",
        "Use --disable-attention-upcast to skip the fp32 upcast; without it attention is already upcast.",
        "Forge previous ldm_patched/ldm/modules/attention.py:29-33, modules_forge/forge_loader.py:91",
    ),
    EnvNote(
        "TORCH_CUDNN_BENCHMARK",
        ("TORCH_CUDNN_BENCHMARK",),
        EVERY_HOST,
        "no-effect-env",
        "warning",
        _any,
        "any value",
        "Nothing: cuDNN benchmarking is the Python setting torch.backends.cudnn.benchmark.",
        "No code reads {name}: PyTorch has no such variable (the name is in none of the files of torch {torch}). "
        "cuDNN benchmarking is the Python setting torch.backends.cudnn.benchmark, which only code can change.",
        "Remove it; it changes nothing.",
        _TORCH_WHEELS,
    ),
    EnvNote(
        "TORCH_USE_CUDA_DSA",
        ("TORCH_USE_CUDA_DSA",),
        EVERY_HOST,
        "no-effect-env",
        "warning",
        _any,
        "any value",
        "Nothing at run time: it is an option for building PyTorch from source.",
        "{name} is an option for compiling PyTorch from source; the error text 'Compile with "
        "`TORCH_USE_CUDA_DSA` to enable device-side assertions' means rebuilding PyTorch. The released torch "
        "{torch} never reads it.",
        "Remove it. To locate a CUDA error, run once with CUDA_LAUNCH_BLOCKING=1, then remove that too.",
        _TORCH_WHEELS,
    ),
    EnvNote(
        "NCCL_*",
        ("NCCL_*", "TORCH_NCCL_*"),
        EVERY_HOST,
        "no-effect-env",
        "warning",
        _any,
        "any value",
        "Nothing: NCCL is only used by multi-GPU training (torch.distributed).",
        "{name} configures NCCL, the multi-GPU communication library that only torch.distributed uses; the "
        "WebUI is one process on one GPU and never starts it.",
        "Remove it (it is advice for multi-GPU training).",
        "no init_process_group in the hosts' own code (A1111 v1.10.1, Forge f2 and previous, reForge); the "
        "ControlNet preprocessors' vendored mmcv has one for training, which the WebUI never calls",
    ),
    EnvNote(
        "build-only",
        ("FORCE_CUDA", "TORCH_CUDA_ARCH_LIST"),
        EVERY_HOST,
        "no-effect-env",
        "info",
        _any,
        "any value",
        "Read only when a CUDA extension is compiled from source.",
        "{name} is read only when a CUDA extension is compiled from source (setup.py scripts, "
        "torch/utils/cpp_extension.py). The WebUI installs prebuilt wheels and compiles nothing at start-up.",
        "Remove it, unless you are building an extension (e.g. xformers) from source.",
        "torch 2.1.2/2.3.1: only torch/utils/cpp_extension.py reads TORCH_CUDA_ARCH_LIST",
    ),
    EnvNote(
        "XFORMERS_*:a1111",
        _XFORMERS_VARS,
        (A1111,),
        "no-effect-env",
        "warning",
        lambda _v, ctx: not ctx.has("--xformers"),
        "without --xformers",
        "Read by xformers, which A1111 does not import without --xformers.",
        "{name} is read by the xformers package, which A1111 does not even import without --xformers "
        "(modules/import_hook.py:4-5 blocks it).",
        "Remove it, or add --xformers if you meant to use xformers.",
        "A1111 v1.10.1 modules/import_hook.py:4-5; xformers 0.0.23.post1/0.0.27 xformers/__init__.py",
    ),
    EnvNote(
        "XFORMERS_*:forge",
        _XFORMERS_VARS,
        FORGE_HOSTS,
        "no-effect-env",
        "warning",
        lambda _v, ctx: ctx.has("--disable-xformers"),
        "with --disable-xformers",
        "Read by xformers, which Forge does not import with --disable-xformers.",
        "{name} is read by the xformers package, which --disable-xformers stops Forge from importing "
        "(backend/memory_management.py:152 in f2, ldm_patched/modules/model_management.py:140 in previous).",
        "Remove it, or drop --disable-xformers if you meant to use xformers.",
        "Forge f2 backend/memory_management.py:152; Forge previous ldm_patched/modules/model_management.py:140",
    ),
    EnvNote(
        "PYTORCH_TUNABLEOP_*",
        ("PYTORCH_TUNABLEOP_*",),
        EVERY_HOST,
        "no-effect-env",
        "warning",
        lambda _v, ctx: torch_release(ctx) < (2, 3),
        "torch older than 2.3",
        "TunableOp arrived in PyTorch 2.3; older torch ignores it.",
        "TunableOp first appeared in PyTorch 2.3; torch {torch} has no code that reads {name}.",
        "Remove it, or upgrade torch first.",
        "PYTORCH_TUNABLEOP_ENABLED is in torch 2.3.1's libtorch_cuda.so, not in 2.1.2's",
    ),
    EnvNote(
        "CUBLAS_WORKSPACE_CONFIG:unparsed",
        ("CUBLAS_WORKSPACE_CONFIG",),
        EVERY_HOST,
        "no-effect-env",
        "warning",
        lambda value, _ctx: _cublas_workspace_kib(value) is None,
        "not :SIZE:COUNT pairs",
        "PyTorch cannot parse it, warns and uses its default.",
        "PyTorch cannot parse '{value}' (it expects :SIZE_KiB:COUNT pairs such as :4096:8), warns 'Could not "
        "parse CUBLAS_WORKSPACE_CONFIG' and uses its default workspace.",
        "Remove it.",
        "aten/src/ATen/cuda/CublasHandlePool.cpp parseChosenWorkspaceSize",
    ),
    EnvNote(
        "TF32 override:a1111",
        ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",),
        (A1111,),
        "redundant-env",
        "info",
        _is("1"),
        "1",
        "A1111 already allows TF32 for matrix multiplies and cuDNN at start-up.",
        "A1111 already allows TF32 for matrix multiplies and cuDNN at start-up (modules/devices.py:101-110); "
        "{name}=1 asks for the same thing.",
        "Remove it.",
        "A1111 v1.10.1 modules/devices.py:101-110; aten/src/ATen/Context.cpp reads it with check_env",
    ),
    EnvNote(
        "CUDA_VISIBLE_DEVICES:gpu-device-id",
        ("CUDA_VISIBLE_DEVICES",),
        FORGE_HOSTS,
        "redundant-env",
        "warning",
        lambda value, ctx: (gpu := ctx.value("--gpu-device-id")) is not None and value.strip() != gpu.strip(),
        "differs from --gpu-device-id",
        "--gpu-device-id sets it itself and replaces the value.",
        _gpu_device_id_message,
        "Choose the GPU in one place: drop CUDA_VISIBLE_DEVICES or --gpu-device-id.",
        "Forge f2 modules_forge/initialization.py:50-51; Forge previous :42-43",
    ),
    EnvNote(
        "CUDA_DEVICE_MAX_CONNECTIONS:default",
        ("CUDA_DEVICE_MAX_CONNECTIONS",),
        EVERY_HOST,
        "redundant-env",
        "info",
        _is("8"),
        "8",
        "8 is the driver's default.",
        "8 is the CUDA driver's default number of work queues; setting it changes nothing.",
        "Remove it.",
        "CUDA Programming Guide, CUDA Environment Variables (CUDA_DEVICE_MAX_CONNECTIONS: 1 to 32, default 8)",
    ),
    EnvNote(
        "TORCH_COMMAND",
        ("TORCH_COMMAND",),
        EVERY_HOST,
        "no-effect-env",
        "info",
        _torch_command_applies,
        "torch installed, no --reinstall-torch",
        "Run only when torch is missing or with --reinstall-torch.",
        "The launcher runs {name} only when torch or torchvision is missing or with --reinstall-torch "
        "(modules/launch_utils.py, prepare_environment); torch {torch} is installed, so it changes nothing now.",
        "To switch torch, launch once with --reinstall-torch (then remove that flag).",
        "A1111 v1.10.1 modules/launch_utils.py:380-381; Forge f2 :427-428; Forge previous :424-425; reForge :432-433",
    ),
    EnvNote(
        "XFORMERS_PACKAGE",
        ("XFORMERS_PACKAGE",),
        EVERY_HOST,
        "no-effect-env",
        "info",
        _xformers_package_applies,
        "no --xformers, or xformers installed and no --reinstall-xformers",
        "Installed only with --xformers when xformers is missing or with --reinstall-xformers.",
        _xformers_package_message,
        "To switch xformers, launch once with --xformers --reinstall-xformers.",
        "A1111 v1.10.1 modules/launch_utils.py:401-402; Forge f2 :450-451; Forge previous :445-446; reForge :469-470",
    ),
    # --- costly --------------------------------------------------------------------------------------
    EnvNote(
        "PYTORCH_NO_CUDA_MEMORY_CACHING",
        ("PYTORCH_NO_CUDA_MEMORY_CACHING",),
        EVERY_HOST,
        "costly-env",
        "warning",
        lambda value, ctx: torch_release(ctx) <= (2, 3) or value.strip().lower() not in ("0", "false", ""),
        "any value on torch 2.1–2.3 (even 0); a true value on newer torch",
        "Turns PyTorch's GPU memory cache off: every tensor is a cudaMalloc/cudaFree.",
        "PyTorch stops caching GPU memory: every tensor becomes a cudaMalloc and every free a cudaFree that "
        "waits for the GPU, so generation slows down badly (a debugging aid for memory checkers, "
        "c10/cuda/CUDACachingAllocator.cpp forceUncachedAllocator). torch 2.1–2.3 switch it on when the "
        "variable exists at all, even as '0'.",
        "Unset it (not =0: remove the line).",
        "c10/cuda/CUDACachingAllocator.cpp; libc10_cuda.so of torch 2.1.2/2.3.1 reads it with plain getenv",
    ),
    EnvNote(
        "TORCH_CUDA_SANITIZER",
        ("TORCH_CUDA_SANITIZER",),
        EVERY_HOST,
        "costly-env",
        "warning",
        _any,
        "any value",
        "Turns on PyTorch's CUDA sanitizer: every operation is checked in Python.",
        "When {name} exists, 'import torch' turns on PyTorch's CUDA sanitizer (torch/__init__.py:1753 in "
        "2.1.2, :1924 in 2.3.1, :2683 in 2.9.0): every tensor operation is intercepted and checked for stream "
        "races in Python, a large slowdown meant for debugging.",
        "Unset it.",
        "torch 2.1.2 torch/__init__.py:1753, torch 2.3.1 :1924, torch 2.9.0 :2683",
    ),
    EnvNote(
        "CUBLAS_WORKSPACE_CONFIG:small",
        ("CUBLAS_WORKSPACE_CONFIG",),
        EVERY_HOST,
        "costly-env",
        "warning",
        lambda value, _ctx: (kib := _cublas_workspace_kib(value)) is not None and kib < _CUBLAS_DEFAULT_KIB,
        "less than PyTorch's default (e.g. :16:8)",
        "Gives cuBLAS less workspace than PyTorch's default; it may pick slower kernels.",
        "{name}={value} gives cuBLAS less workspace than PyTorch's own default (:4096:2:16:8, about 8 MiB; "
        "32 MiB on Hopper), so it may have to pick slower kernels. The small setting is for bit-exact "
        "reproducibility, where it 'may limit overall performance'.",
        "Unset it (or use :4096:8 if you need deterministic cuBLAS).",
        "aten/src/ATen/cuda/CublasHandlePool.cpp parseChosenWorkspaceSize; PyTorch notes 'Reproducibility'",
    ),
    EnvNote(
        "NVIDIA_TF32_OVERRIDE",
        ("NVIDIA_TF32_OVERRIDE",),
        EVERY_HOST,
        "costly-env",
        "info",
        _is("0"),
        "0",
        "Forbids TF32 in cuBLAS and cuDNN: float32 math runs without TF32 tensor cores.",
        "{name}=0 makes cuBLAS and cuDNN ignore PyTorch's TF32 permission (A1111 grants it, "
        "modules/devices.py:101-110; cuDNN convolutions have it by default): on RTX 30xx and newer the parts "
        "that run in float32 (a float32 VAE, --no-half) lose TF32 tensor cores and run slower; how much "
        "depends on the card. It is a debugging switch for exact float32 results.",
        "Unset it, unless you need exact float32 results.",
        "NVIDIA TF32 documentation (NVIDIA_TF32_OVERRIDE=0 disables TF32 in NVIDIA libraries)",
    ),
    EnvNote(
        "CUDA_VISIBLE_DEVICES:hidden",
        ("CUDA_VISIBLE_DEVICES",),
        EVERY_HOST,
        "costly-env",
        "warning",
        lambda value, ctx: _hides_all_gpus(value) and _uses_gpu(ctx),
        "empty, -1 or another invalid first entry",
        "Hides every GPU: start-up stops, or everything runs on the CPU.",
        "{name}='{value}' hides every GPU from CUDA (an empty list or an invalid first entry such as -1 makes "
        "no device visible): the launcher's GPU test stops start-up ('Torch is not able to use GPU') unless "
        "--skip-torch-cuda-test, and then everything runs on the CPU.",
        "Unset it, or list the GPU to use (e.g. 0).",
        "CUDA Programming Guide, CUDA Environment Variables (CUDA_VISIBLE_DEVICES)",
    ),
    EnvNote(
        "CUDA_FORCE_PTX_JIT",
        ("CUDA_FORCE_PTX_JIT",),
        EVERY_HOST,
        "costly-env",
        "warning",
        _is("1"),
        "1",
        "Ignores the compiled GPU code in torch and JIT-compiles PTX instead.",
        "{name}=1 makes the driver ignore the compiled GPU code shipped in torch and xformers and JIT-compile "
        "their PTX instead: long stalls when kernels are first used, and kernels shipped without PTX fail to "
        "load. It is a switch for testing PTX compatibility.",
        "Unset it.",
        "CUDA Programming Guide, CUDA Environment Variables (CUDA_FORCE_PTX_JIT)",
    ),
    EnvNote(
        "CUDA_CACHE_DISABLE",
        ("CUDA_CACHE_DISABLE",),
        EVERY_HOST,
        "costly-env",
        "info",
        _is("1"),
        "1",
        "Turns off the driver's cache of JIT-compiled kernels.",
        "{name}=1 turns off the driver's cache of JIT-compiled kernels. Kernels are JIT-compiled only when "
        "the GPU is newer than the code torch ships, but then they are compiled again at every start.",
        "Unset it.",
        "CUDA Programming Guide, CUDA Environment Variables (CUDA_CACHE_DISABLE)",
    ),
    EnvNote(
        "CUDA_CACHE_MAXSIZE",
        ("CUDA_CACHE_MAXSIZE",),
        EVERY_HOST,
        "costly-env",
        "info",
        lambda value, _ctx: (size := _int(value)) is not None and size < 1024 * 1024,
        "below 1 MiB",
        "The JIT cache size is in bytes; a tiny value keeps nothing.",
        "{name} is in bytes: {value} bytes cannot hold JIT-compiled kernels (binaries larger than the cache "
        "are not cached), so kernels that need JIT compilation are compiled again at every start.",
        "Unset it, or give the size in bytes (e.g. 1073741824 for 1 GiB).",
        "CUDA Programming Guide, CUDA Environment Variables (CUDA_CACHE_MAXSIZE)",
    ),
    EnvNote(
        "CUDA_DEVICE_MAX_CONNECTIONS:one",
        ("CUDA_DEVICE_MAX_CONNECTIONS",),
        FORGE_HOSTS,
        "costly-env",
        "info",
        lambda value, ctx: value.strip() == "1" and ctx.has("--cuda-stream"),
        "1, with --cuda-stream",
        "One hardware work queue: Forge's transfer stream cannot overlap with computation.",
        "With one hardware work queue, work on Forge's separate weight-transfer stream (--cuda-stream) waits "
        "behind the computation instead of overlapping with it. The value 1 is a training recipe and buys "
        "nothing for generation.",
        "Unset it (the driver's default is 8).",
        "CUDA Programming Guide (CUDA_DEVICE_MAX_CONNECTIONS: concurrent compute and copy work queues); "
        "Forge f2 backend/stream.py:55-61",
    ),
    EnvNote(
        "cuDNN API logging",
        ("CUDNN_LOGINFO_DBG",),
        EVERY_HOST,
        "costly-env",
        "warning",
        _cudnn_logging_on("CUDNN_LOGINFO_DBG"),
        "1, with CUDNN_LOGDEST_DBG set",
        "cuDNN writes every API call with all its parameters to the log.",
        "With CUDNN_LOGDEST_DBG set, {name}={value} makes cuDNN write every API call with all its parameters "
        "to the log: every convolution call slows down and the log grows quickly. It is a debugging aid.",
        "Unset it (and CUDNN_LOGDEST_DBG).",
        "cuDNN documentation, 'Error Reporting and API Logging' (cuDNN 8 switch; deprecated in cuDNN 9)",
    ),
    EnvNote(
        "cuDNN API logging (cuDNN 9)",
        ("CUDNN_LOGLEVEL_DBG",),
        EVERY_HOST,
        "costly-env",
        "warning",
        _cudnn_logging_on("CUDNN_LOGLEVEL_DBG"),
        "3 or more, with CUDNN_LOGDEST_DBG set",
        "cuDNN 9 writes every API call with all its parameters to the log.",
        "With CUDNN_LOGDEST_DBG set, {name}={value} (info level) makes cuDNN 9 (torch 2.4 and newer) write "
        "every API call with all its parameters to the log: every convolution call slows down. torch 2.1 and "
        "2.3 ship cuDNN 8.9, which reads CUDNN_LOGINFO_DBG instead.",
        "Unset it, or use level 1 (errors only).",
        "cuDNN documentation, 'Error Reporting and API Logging'; torch 2.1.2/2.3.1 require nvidia-cudnn-cu12 8.9.2",
    ),
    EnvNote(
        "MALLOC_MMAP_THRESHOLD_",
        ("MALLOC_MMAP_THRESHOLD_",),
        EVERY_HOST,
        "costly-env",
        "warning",
        lambda value, _ctx: (n := glibc_number(value)) is not None and n < _PAGE,
        "below 4096 (0, or anything glibc reads as 0)",
        "glibc serves (nearly) every allocation with its own mmap.",
        "glibc reads {name}='{value}' as a threshold below one memory page: allocations at or above it that do "
        "not fit in free heap space each get their own mmap, rounded up to whole 4 KiB pages and zeroed by the "
        "kernel. At 0 (and a value that is not a number, which glibc reads as 0) the heap never grows and every "
        "malloc is an mmap/munmap pair: 8 KiB allocations measured 25 times slower.",
        "Unset it (glibc's default is 128 KiB, raised automatically); to return memory to the system sooner "
        "use 65536 or more.",
        "mallopt(3) M_MMAP_THRESHOLD; measured with glibc 2.36",
    ),
    EnvNote(
        "MALLOC_PERTURB_",
        ("MALLOC_PERTURB_",),
        EVERY_HOST,
        "costly-env",
        "warning",
        lambda value, _ctx: (n := glibc_number(value)) is not None and n & 0xFF != 0,
        "not 0",
        "glibc fills every allocated and freed block with a byte pattern.",
        "{name}={value} makes glibc fill every block it hands out and every block that is freed with a byte "
        "pattern: all memory is written twice more (measured about 1.5 times slower for 8 KiB allocations). "
        "It is a debugging aid for use-after-free bugs.",
        "Unset it.",
        "mallopt(3) M_PERTURB; measured with glibc 2.36",
    ),
    EnvNote(
        "OMP_NUM_THREADS",
        ("OMP_NUM_THREADS", "MKL_NUM_THREADS"),
        EVERY_HOST,
        "costly-env",
        "warning",
        lambda value, ctx: _int(value) == 1 and ctx.cpu_only,
        "1, when generating on the CPU",
        "Limits PyTorch's CPU thread pool; 1 means one core.",
        "torch sizes its CPU thread pool from OMP_NUM_THREADS, and MKL_NUM_THREADS overrides it "
        "(aten/src/ATen/ParallelCommon.cpp, intraop_default_num_threads): with {name}=1 CPU generation uses "
        "one core.",
        "Unset it (torch then picks the thread count from the CPU) or set it to your number of cores.",
        "aten/src/ATen/ParallelCommon.cpp intraop_default_num_threads",
    ),
    EnvNote(
        "TORCH_COMPILE_DEBUG",
        ("TORCH_COMPILE_DEBUG",),
        EVERY_HOST,
        "costly-env",
        "info",
        _is("1"),
        "1",
        "Every torch.compile logs at DEBUG level and writes its graphs and generated code to disk.",
        "{name}=1 makes every torch.compile (this extension's 'Compile UNet blocks') log dynamo, AOT and "
        "inductor at DEBUG level and write a torch_compile_debug/ folder with every graph, the inductor IR and "
        "the generated code (torch {torch}: torch/_dynamo/utils.py setup_compile_debug, torch/_inductor/config.py "
        "trace.enabled): compiling takes longer and the folder grows with each compile. It is a debugging switch.",
        "Unset it (0 is the default).",
        "torch 2.1.2 torch/_dynamo/utils.py:288, torch/_inductor/config.py:406; torch 2.3.1 :361, :688; "
        "torch 2.9.0 :886, :1829",
    ),
    EnvNote(
        "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT:no-cache",
        ("TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT",),
        EVERY_HOST,
        "costly-env",
        "warning",
        lambda value, ctx: (n := _int(value)) is not None and n < 0 and _uses_gpu(ctx),
        "a negative value",
        "A negative limit turns off the cache of cuDNN execution plans.",
        "A negative {name} turns off PyTorch's cache of cuDNN v8 execution plans: every convolution of a new "
        "call builds its plan again (heuristics and plan finalisation on the CPU), which slows the UNet's and "
        "the VAE's convolutions.",
        "Unset it (the default keeps 10000 plans, about 2 GiB by PyTorch's estimate), or use 0 for no limit.",
        "PyTorch documentation, 'CUDA Environment Variables' (TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT); present in "
        "libtorch_cuda.so of torch 2.1.2, 2.3.1 and 2.9.0",
    ),
    # --- obsolete ------------------------------------------------------------------------------------
    EnvNote(
        "SAFETENSORS_FAST_GPU",
        ("SAFETENSORS_FAST_GPU",),
        EVERY_HOST,
        "obsolete-env",
        "info",
        _any,
        "any value",
        "Read only by safetensors 0.2.x; the hosts install 0.4.2 or 0.5.2.",
        "Only safetensors 0.2.x read {name} (a direct-to-GPU copy in its Rust core). A1111 and the Forges install "
        "safetensors 0.4.2 and reForge 0.5.2 (requirements_versions.txt); neither reads an environment variable.",
        "Remove it.",
        "safetensors 0.2.8, 0.4.2 and 0.5.2 wheels (the name is in 0.2.8's library only); requirements_versions.txt",
    ),
    EnvNote(
        "TORCH_CUDNN_V8_API_ENABLED",
        ("TORCH_CUDNN_V8_API_ENABLED",),
        EVERY_HOST,
        "obsolete-env",
        "info",
        _any,
        "any value",
        "PyTorch 1.x's opt-in to the cuDNN v8 API, which is now the default.",
        "PyTorch 1.x read {name} to opt into cuDNN's v8 API (aten/src/ATen/native/ConvUtils.h); it is the "
        "default now, and torch {torch} reads only TORCH_CUDNN_V8_API_DISABLED.",
        "Remove it.",
        _TORCH_WHEELS + "; ConvUtils.h cudnnv8_enabled_check_debug in PyTorch 1.x",
    ),
    EnvNote(
        "MALLOC_CHECK_",
        ("MALLOC_CHECK_",),
        EVERY_HOST,
        "obsolete-env",
        "info",
        _any,
        "any value",
        "Ignored by glibc 2.34 and newer unless libc_malloc_debug.so is preloaded.",
        "Since glibc 2.34 {name} works only when libc_malloc_debug.so is preloaded (LD_PRELOAD); current "
        "distributions ignore it, and on older glibc it checks every malloc and free (slower).",
        "Remove it.",
        "glibc 2.34 NEWS (malloc debugging moved to libc_malloc_debug.so)",
    ),
)


QUIET_NOTES: tuple[QuietNote, ...] = (
    QuietNote(
        ("TORCHINDUCTOR_*",),
        "Configures TorchInductor, the code generator behind torch.compile (e.g. TORCHINDUCTOR_CACHE_DIR).",
        "This extension's 'Compile UNet blocks' uses torch.compile, so these apply whenever it is on. At start-up "
        "the extension sets TORCHINDUCTOR_CACHE_DIR to its compile cache (and TORCHINDUCTOR_FX_GRAPH_CACHE=1 on "
        "torch 2.3-2.4), never over a value you set.",
        "torch/_inductor/config.py; lib_optim/compile/regional.py, persist.py",
    ),
    QuietNote(
        ("OPTIM_COMPILE_CACHE", "TRITON_CACHE_DIR"),
        "The folder of this extension's compile cache; where triton keeps its compiled GPU kernels.",
        "Default <data dir>/cache/optim-compile, triton's kernels inside it; python -m lib_optim compile-cache "
        "show says where they are.",
        "lib_optim/compile/persist.py; torch 2.1.2 _inductor/triton_heuristics.py:148-153",
    ),
    QuietNote(
        ("PYTORCH_CUDA_ALLOC_CONF", "CUDA_LAUNCH_BLOCKING", "CUDA_MODULE_LOADING"),
        "The caching allocator's options; synchronous launches; lazy kernel loading.",
        "Checked by their own rules (alloc-conf, cuda-launch-blocking, cuda-module-loading).",
        "c10/cuda/CUDAAllocatorConfig.cpp; CUDA Programming Guide",
    ),
    QuietNote(
        ("LD_PRELOAD",),
        "Preloads an allocator such as tcmalloc or jemalloc.",
        "webui.sh preloads tcmalloc itself on Linux when LD_PRELOAD is empty and NO_TCMALLOC is unset, so "
        "inside the WebUI a user's tcmalloc cannot be told from the host's, and both are fine.",
        "A1111 v1.10.1 and Forge f2 webui.sh:239-282",
    ),
    QuietNote(
        ("PYTORCH_ENABLE_MPS_FALLBACK",),
        "On a Mac, runs operations that MPS lacks on the CPU.",
        "webui-macos-env.sh exports it as 1 itself (webui-user.sh, read later, can override it).",
        "A1111 v1.10.1 webui-macos-env.sh, webui.sh:10-23",
    ),
    QuietNote(
        ("MALLOC_ARENA_MAX", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_"),
        "glibc heap tuning: arenas, when freed memory goes back to the system.",
        "Real memory-for-speed trade-offs; no value is wrong for every machine.",
        "mallopt(3)",
    ),
    QuietNote(
        ("MALLOC_MMAP_THRESHOLD_",),
        "4096 or more: a fixed mmap threshold (the dynamic adjustment is off).",
        "Returns big freed blocks to the system sooner; not a measurable slowdown.",
        "mallopt(3); measured with glibc 2.36",
    ),
    QuietNote(
        ("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE",),
        "On Forge: allows TF32 for float32 matrix multiplies (Forge does not set it itself).",
        "Useful on Forge, whose modules/devices.py enable_tf32 does nothing.",
        "Forge f2 modules/devices.py:46-47; aten/src/ATen/Context.cpp",
    ),
    QuietNote(
        ("PYTORCH_TUNABLEOP_*",),
        "torch 2.3 and newer: tunes matrix-multiply kernels on first use of each shape.",
        "A real trade-off (slower first generation at each size).",
        "torch 2.3.1 libtorch_cuda.so",
    ),
    QuietNote(
        ("OMP_NUM_THREADS", "MKL_NUM_THREADS"),
        "With a GPU: only the few CPU-side operations use these threads.",
        "The right count depends on the machine, which the checker cannot know.",
        "aten/src/ATen/ParallelCommon.cpp",
    ),
    QuietNote(
        ("CUDA_DEVICE_ORDER", "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT", "XFORMERS_FORCE_DISABLE_TRITON"),
        "GPU numbering; cuDNN plan cache size; xformers without Triton kernels.",
        "Do what they say and cost nothing for generation (a negative plan cache size is a costly-env row; "
        "the documented defaults are redundant-env).",
        "CUDA Programming Guide; torch 2.1.2/2.3.1 libraries; xformers/__init__.py",
    ),
)
