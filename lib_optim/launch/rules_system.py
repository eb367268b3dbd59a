"""Checker rules about the system: network exposure, environment variables, the allocator, the machine's torch,
xformers and driver, and the webui-user file itself."""

from __future__ import annotations

import functools
from collections.abc import Iterator

from lib_optim.launch import env_notes, env_readers
from lib_optim.launch.checks import A1111, EVERY_HOST, FORGE, CheckContext, Finding, RuleCheck, Severity, rule

# --- exposure ---------------------------------------------------------------------------------------------


@rule(
    "insecure-extension-access",
    Severity.WARNING,
    EVERY_HOST,
    "Reachable from the network with --enable-insecure-extension-access and no --gradio-auth.",
)
def _insecure_extensions(ctx: CheckContext) -> Iterator[Finding]:
    exposed = ctx.exposed
    if not exposed or not ctx.has("--enable-insecure-extension-access"):
        return
    if ctx.has("--gradio-auth") or ctx.has("--gradio-auth-path"):
        return
    yield Finding(
        "insecure-extension-access",
        Severity.WARNING,
        "--enable-insecure-extension-access",
        f"The UI is reachable from other machines ({exposed}) and anyone who reaches it can install "
        "extensions — i.e. run any code on this machine (modules/shared_cmd_options.py:17-18).",
        "Add --gradio-auth user:password, or drop --enable-insecure-extension-access.",
    )


@rule("api-without-auth", Severity.WARNING, EVERY_HOST, "--api reachable from the network without --api-auth.")
def _api_without_auth(ctx: CheckContext) -> Iterator[Finding]:
    exposed = ctx.exposed
    if not exposed or not (ctx.has("--api") or ctx.has("--nowebui")) or ctx.has("--api-auth"):
        return
    yield Finding(
        "api-without-auth",
        Severity.WARNING,
        "--api",
        f"The HTTP API is reachable from other machines ({exposed}) with no authentication: --gradio-auth "
        "does not cover /sdapi routes (modules/api/api.py).",
        "Add --api-auth user:password.",
    )


# --- environment ----------------------------------------------------------------------------------------


@rule("cuda-launch-blocking", Severity.WARNING, EVERY_HOST, "CUDA_LAUNCH_BLOCKING=1 left set.")
def _launch_blocking(ctx: CheckContext) -> Iterator[Finding]:
    value = ctx.env.get("CUDA_LAUNCH_BLOCKING", "").strip()
    if value and value != "0":
        yield Finding(
            "cuda-launch-blocking",
            Severity.WARNING,
            "CUDA_LAUNCH_BLOCKING",
            f"CUDA_LAUNCH_BLOCKING={value} makes every CUDA kernel launch wait for the previous one: "
            "generation is much slower. It is a debugging aid only.",
            "Unset it (remove it from webui-user).",
        )


# Keys and value checks of the CUDA caching allocator config (c10/cuda/CUDAAllocatorConfig.cpp).
_ALLOC_KEYS: dict[str, str] = {
    "backend": "native or cudaMallocAsync",
    "max_split_size_mb": "a whole number of MB above 20",
    "max_non_split_rounding_mb": "a whole number of MB",
    "garbage_collection_threshold": "a number between 0 and 1 (exclusive)",
    "roundup_power2_divisions": "a power of two, or a list like [256:1,512:2,>:4]",
    "expandable_segments": "True or False",
    "release_lock_on_cudamalloc": "True or False",
    "pinned_use_cuda_host_register": "True or False",
    "pinned_num_register_threads": "a power of two up to 128",
    "pinned_use_background_threads": "True or False",
}


def parse_alloc_conf(text: str) -> tuple[dict[str, str], list[str]]:
    """Split PYTORCH_CUDA_ALLOC_CONF into {key: value} and a list of problems (one sentence each)."""
    values: dict[str, str] = {}
    problems: list[str] = []
    # roundup_power2_divisions may hold a bracketed list with commas and colons inside.
    parts: list[str] = []
    depth = 0
    current = ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    for raw in parts:
        item = raw.strip()
        if not item:
            continue
        key, sep, value = item.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not value:
            problems.append(f"'{item}' is not key:value")
            continue
        if key not in _ALLOC_KEYS:
            problems.append(f"'{key}' is not an allocator option (known: {', '.join(_ALLOC_KEYS)})")
            continue
        if key in values and key != "backend":
            problems.append(f"'{key}' is given twice")
        values[key] = value if key != "backend" else values.get(key, "") + ("," if key in values else "") + value
        reason = _alloc_value_problem(key, value)
        if reason:
            problems.append(f"{key}:{value} — expected {reason}")
    return values, problems


def _alloc_value_problem(key: str, value: str) -> str | None:
    allowed = _ALLOC_KEYS[key]
    if key == "backend":
        return None if value in ("native", "cudaMallocAsync") else allowed
    if key in ("max_split_size_mb", "max_non_split_rounding_mb"):
        if not value.isdigit() or (key == "max_split_size_mb" and int(value) <= 20):
            return allowed
        return None
    if key == "garbage_collection_threshold":
        try:
            number = float(value)
        except ValueError:
            return allowed
        return None if 0 < number < 1 else allowed
    if key == "roundup_power2_divisions":
        if value.startswith("["):
            return None if value.endswith("]") else allowed
        return None if value.isdigit() and int(value) > 0 and int(value) & (int(value) - 1) == 0 else allowed
    if key == "pinned_num_register_threads":
        ok = value.isdigit() and 0 < int(value) <= 128 and int(value) & (int(value) - 1) == 0
        return None if ok else allowed
    return None if value in ("True", "False") else allowed


_ALLOC_VARS = ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")


@rule(
    "alloc-conf",
    Severity.ERROR,
    EVERY_HOST,
    "Malformed or conflicting PYTORCH_CUDA_ALLOC_CONF (unknown keys, bad values, backend vs --cuda-malloc).",
)
def _alloc_conf(ctx: CheckContext) -> Iterator[Finding]:
    for var in _ALLOC_VARS:
        text = ctx.env.get(var)
        if text is None or env_readers.torch_ignores(var, ctx):
            continue  # e.g. PYTORCH_ALLOC_CONF, which torch 2.1.2 and 2.3.1 do not read: no-effect-env says so
        values, problems = parse_alloc_conf(text)
        for problem in problems:
            yield Finding(
                "alloc-conf",
                Severity.ERROR,
                var,
                f"{var}={text!r}: {problem}. PyTorch rejects the whole setting with a RuntimeError at the first "
                "CUDA allocation, so the WebUI crashes when it loads the model.",
                "Fix the value (comma-separated key:value pairs) or unset it.",
            )
        backend = values.get("backend", "")
        if "," in backend and len(set(backend.split(","))) > 1:
            yield Finding(
                "alloc-conf",
                Severity.WARNING,
                var,
                f"{var} names two allocator backends ({backend}); the later one wins.",
                "Name one backend.",
            )
        async_backend = "cudaMallocAsync" in backend or (ctx.host is not A1111 and ctx.has("--cuda-malloc"))
        if "native" in backend and ctx.host is not A1111 and ctx.has("--cuda-malloc"):
            yield Finding(
                "alloc-conf",
                Severity.WARNING,
                f"{var} --cuda-malloc",
                f"{var} asks for backend:native, but --cuda-malloc appends ',backend:cudaMallocAsync' to it "
                "before torch loads (modules_forge/cuda_malloc.py:80-87), overriding your choice.",
                "Drop --cuda-malloc or the backend entry.",
            )
        if async_backend:
            for key in ("expandable_segments", "garbage_collection_threshold", "max_split_size_mb"):
                if key in values:
                    yield Finding(
                        "alloc-conf",
                        Severity.WARNING,
                        f"{var} {key}",
                        f"{key} configures PyTorch's native caching allocator; with the cudaMallocAsync backend "
                        "it has no effect.",
                        f"Drop {key}, or drop the cudaMallocAsync backend"
                        + (" (--cuda-malloc)." if ctx.has("--cuda-malloc") else "."),
                    )


@rule(
    "cuda-module-loading",
    Severity.WARNING,
    EVERY_HOST,
    "CUDA_MODULE_LOADING set to EAGER or an invalid value.",
)
def _module_loading(ctx: CheckContext) -> Iterator[Finding]:
    value = ctx.env.get("CUDA_MODULE_LOADING")
    if value is None:
        return
    if value.upper() == "EAGER":
        yield Finding(
            "cuda-module-loading",
            Severity.WARNING,
            "CUDA_MODULE_LOADING",
            "EAGER loads every CUDA kernel of torch at start-up: slower start and hundreds of MB more GPU "
            "memory. PyTorch sets LAZY by default.",
            "Unset it (or set LAZY).",
        )
    elif value.upper() != "LAZY":
        yield Finding(
            "cuda-module-loading",
            Severity.WARNING,
            "CUDA_MODULE_LOADING",
            f"{value!r} is not a value CUDA knows (LAZY or EAGER); it is ignored.",
            "Unset it.",
        )


# Variables that optimisation notes recommend, against what really reads them (lib_optim/launch/env_notes.py).
_ENV_RULE_TITLES = {
    "no-effect-env": "Environment variables that nothing in this WebUI reads (or not at these values); in the families "
    f"{env_readers.families_text()} any name that torch {env_readers.torch_releases_text()}, xformers, the host and "
    'the documented readers do not read, with "did you mean".',
    "redundant-env": "Environment variables set to what is already the default (documented, or torch's own literal "
    "default), or that the host replaces.",
    "costly-env": "Environment variables that slow generation down (debugging switches, malloc tuning, …).",
    "obsolete-env": "Environment variables read only by older versions of PyTorch, safetensors or glibc.",
}


def _env_note_rule(rule_id: str) -> RuleCheck:
    def check(ctx: CheckContext) -> Iterator[Finding]:
        for note, item in env_notes.applicable(rule_id, ctx):
            message = note.explain(item.shown, item.value, ctx)
            yield Finding(rule_id, Severity(note.severity), item.subject, message, note.fix)
        # then what the generated table says about the variables no row knows (lib_optim/launch/env_readers.py)
        if rule_id == "no-effect-env":
            for verdict in env_readers.unread(ctx, env_notes.researched):
                yield Finding(rule_id, Severity.WARNING, verdict.subject, verdict.message, verdict.fix)
        elif rule_id == "redundant-env":
            for verdict in env_readers.at_default(ctx, lambda name: env_notes.has_row(name, rule_id)):
                yield Finding(rule_id, Severity.INFO, verdict.subject, verdict.message, verdict.fix)

    return check


for _rule_id in env_notes.RULE_IDS:
    rule(
        _rule_id,
        Severity(env_notes.rule_severity(_rule_id)),
        functools.partial(env_notes.rule_hosts, _rule_id),
        _ENV_RULE_TITLES[_rule_id],
    )(_env_note_rule(_rule_id))


# --- runtime facts --------------------------------------------------------------------------------------


@rule("xformers-mismatch", Severity.WARNING, EVERY_HOST, "xformers installed but built for another torch.")
def _xformers_mismatch(ctx: CheckContext) -> Iterator[Finding]:
    f = ctx.facts
    if f.xformers_version is None or f.xformers_matches_torch is not False:
        return
    if ctx.host is A1111 and not ctx.has("--xformers"):
        return  # not imported at all without the flag (modules/import_hook.py:4-5)
    used = (
        "A1111 fails to use it and falls back to another optimizer"
        if ctx.host is A1111
        else "Forge imports it whenever it is installed, so its C++/CUDA parts fail to load"
    )
    yield Finding(
        "xformers-mismatch",
        Severity.WARNING,
        "xformers",
        f"xformers {f.xformers_version} was built for torch {f.xformers_built_for_torch or '?'}, but torch "
        f"{f.torch_version or '?'} is installed: {used}.",
        "Reinstall the xformers that matches your torch (launch once with --reinstall-xformers), "
        "or uninstall xformers and use sdp attention.",
    )


@rule("torch-without-cuda", Severity.ERROR, EVERY_HOST, "torch cannot use a GPU and the launcher's CUDA test is on.")
def _torch_without_cuda(ctx: CheckContext) -> Iterator[Finding]:
    f = ctx.facts
    if f.cuda_available is not False:
        return
    # --use-cpu/--always-cpu/--directml do not switch the launcher's CUDA test off; only --skip-torch-cuda-test
    # and --use-ipex do (A1111 modules/launch_utils.py:384-390, Forge f2 :431-439, Forge previous :428-434).
    intended = ctx.cpu_only or ctx.has("--directml") or bool(f.mps_available) or ctx.has("--use-ipex")
    # No NVIDIA card on the bus and no driver: a CPU-only machine, where a CUDA torch is not the problem.
    no_gpu = f.nvidia_gpu_expected is False and not f.nvidia_driver
    cpu_flags = "--use-cpu all --no-half" if ctx.host is A1111 else "--always-cpu"
    if ctx.has("--skip-torch-cuda-test") or ctx.has("--use-ipex"):
        if intended:
            return
        yield Finding(
            "torch-without-cuda",
            Severity.WARNING,
            "torch",
            "torch cannot use a CUDA GPU here, and --skip-torch-cuda-test hides that: generation will run "
            "on the CPU, very slowly.",
            f"This machine has no NVIDIA GPU: add {cpu_flags} to run on the CPU on purpose (the cpu profile)."
            if no_gpu
            else f"Install a CUDA build of torch (TORCH_COMMAND) or, for CPU on purpose, use {cpu_flags}.",
        )
        return
    if f.mps_available:
        return  # webui-macos-env.sh adds --skip-torch-cuda-test to COMMANDLINE_ARGS
    why = "torch is a CPU-only build" if f.torch_has_cuda is False else "torch cannot reach a CUDA GPU"
    says = (
        "'Your device does not support the current version of Torch/CUDA!'"
        if ctx.host is FORGE
        else "'Torch is not able to use GPU'"
    )
    if intended:
        mode = "--directml" if ctx.has("--directml") else ("--use-cpu" if ctx.host is A1111 else "--always-cpu")
        yield Finding(
            "torch-without-cuda",
            Severity.ERROR,
            "torch",
            f"{why}, and {mode} does not switch off the launcher's CUDA test: start-up stops with {says} "
            "(modules/launch_utils.py, prepare_environment).",
            "Add --skip-torch-cuda-test.",
        )
        return
    cpu_profile = (
        "run on the CPU with the cpu profile "
        f"(python -m lib_optim profile apply cpu --file <webui-user file> --host {ctx.host.value}), "
        f"which adds {cpu_flags} --skip-torch-cuda-test"
    )
    if no_gpu:
        fix = f"This machine has no NVIDIA GPU, so a CUDA torch cannot help: {cpu_profile}."
    elif f.torch_has_cuda is False:
        fix = (
            "Install a CUDA build of torch matching your driver; for AMD on Windows use Forge with --directml "
            f"(and --skip-torch-cuda-test). Without a GPU: {cpu_profile}."
        )
    else:
        fix = (
            "torch is a CUDA build: check that the NVIDIA driver works (nvidia-smi) and is new enough for torch's "
            f"CUDA. Without a GPU: {cpu_profile}."
        )
    yield Finding(
        "torch-without-cuda",
        Severity.ERROR,
        "torch",
        f"{why}: the launcher's CUDA test stops start-up with {says} (modules/launch_utils.py, prepare_environment).",
        fix,
    )


@rule("no-nvidia-driver", Severity.ERROR, EVERY_HOST, "An NVIDIA GPU is present but its driver does not answer.")
def _no_driver(ctx: CheckContext) -> Iterator[Finding]:
    f = ctx.facts
    if not f.nvidia_gpu_expected or f.nvidia_driver is not None or ctx.cpu_only:
        return
    if f.nvidia_driver_error is None:
        # Nothing here could ask the driver (no pynvml, no CUDA torch, no nvidia-smi): that says nothing about it.
        yield Finding(
            "no-nvidia-driver",
            Severity.INFO,
            "NVIDIA driver",
            "An NVIDIA GPU is present, but this Python cannot ask its driver (no pynvml, no nvidia-smi on the "
            "PATH): its memory and driver version are unknown here.",
            "Run the command with the WebUI's Python (<WebUI folder>/venv/bin/python, on Windows "
            "<WebUI folder>\\venv\\Scripts\\python) for exact figures.",
        )
        return
    yield Finding(
        "no-nvidia-driver",
        Severity.ERROR,
        "NVIDIA driver",
        f"An NVIDIA GPU is present but its driver does not answer ({f.nvidia_driver_error}): the driver is "
        "missing or broken, so CUDA cannot start.",
        "Install or repair the NVIDIA driver (nvidia-smi must work; after a driver update, reboot), then restart.",
    )


LAUNCHER_FILE_RULE = "launcher-file"


@rule(
    LAUNCHER_FILE_RULE,
    Severity.WARNING,
    EVERY_HOST,
    "webui-user.sh/.bat: what bash or cmd would read differently or the checker cannot follow (CRLF line endings, "
    "`$(…)`, lines after `call webui.bat`, …).",
)
def _launcher_file(ctx: CheckContext) -> Iterator[Finding]:
    for note in ctx.launcher_notes:
        if note.rule != LAUNCHER_FILE_RULE:
            raise ValueError(f"launcher_notes: {note.rule!r} is not allowed; allowed: {LAUNCHER_FILE_RULE!r}")
        yield note
