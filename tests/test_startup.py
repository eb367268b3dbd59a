"""preload: our flags, the start-up check over the real argv/environment, and the start-up profile.

The fake ``modules.paths_internal`` imitates what preload may use (docs/hosts.md §1.2: it only computes paths,
A1111 v1.10.1 modules/paths_internal.py:15-34).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import pytest

from lib_optim.host_specs.kinds import HostKind
from lib_optim.hosts import startup
from lib_optim.runtime import Runtime
from lib_optim.settings import Attention


@pytest.fixture
def a1111(tmp_path, monkeypatch):
    root = tmp_path / "webui"
    (root / "modules").mkdir(parents=True)
    (root / "launch.py").write_text("")
    (root / "extensions" / "other-ext").mkdir(parents=True)
    (root / "extensions" / "other-ext" / "preload.py").write_text(
        "def preload(parser):\n    parser.add_argument('--other-ext-dir', type=str)\n"
    )
    paths = types.ModuleType("modules.paths_internal")
    paths.script_path = str(root)
    paths.data_path = str(root)
    paths.extensions_dir = str(root / "extensions")
    paths.extensions_builtin_dir = str(root / "extensions-builtin")
    modules = types.ModuleType("modules")
    modules.paths_internal = paths
    monkeypatch.setitem(sys.modules, "modules", modules)
    monkeypatch.setitem(sys.modules, "modules.paths_internal", paths)
    runtime = Runtime()
    monkeypatch.setattr("lib_optim.runtime._runtime", runtime)
    monkeypatch.setattr(startup, "get_runtime", lambda: runtime)
    monkeypatch.setattr(startup, "_facts", startup.RuntimeFacts)
    for name in ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "OPTIM_COMPILE_CACHE"):
        monkeypatch.delenv(name, raising=False)  # preload sets the compile cache up: undone after each test
    monkeypatch.setattr("lib_optim.compile.persist._DONE", {})
    return root, runtime


def host_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    for flag in ("--medvram", "--medvram-sdxl", "--opt-sdp-attention", "--xformers", "--api"):
        parser.add_argument(flag, action="store_true")
    parser.add_argument("--use-cpu", nargs="+", type=str.lower, default=[])
    return parser


def test_add_flags_is_idempotent_and_parses():
    parser = host_parser()
    startup.add_flags(parser)
    startup.add_flags(parser)  # a preload that runs twice must not raise argparse's duplicate error
    args = parser.parse_args(["--optim-profile", "8gb-low", "--optim-no-check"])
    assert args.optim_profile == "8gb-low" and args.optim_no_check


def test_our_options_ignore_host_flags():
    ns = startup.our_options(["--medvram", "--optim-log-level", "DEBUG", "--ckpt", "x.safetensors"])
    assert ns.optim_log_level == "DEBUG" and ns.optim_profile is None


def test_preload_checks_real_argv_and_knows_other_extensions_flags(a1111, monkeypatch, capsys):
    _root, runtime = a1111
    monkeypatch.setattr(sys, "argv", ["launch.py", "--use-cuda-dsa", "--other-ext-dir", "x", "--medvram"])
    monkeypatch.setenv("CUDA_LAUNCH_BLOCKING", "1")
    startup.preload(host_parser())
    keys = {f.key for f in runtime.startup_findings}
    assert "unknown-flag:--use-cuda-dsa" in keys
    assert "cuda-launch-blocking:CUDA_LAUNCH_BLOCKING" in keys
    assert not any("--other-ext-dir" in k for k in keys)  # another extension's preload defines it
    assert runtime.host is HostKind.A1111
    assert "[Optim] checked launch flags and environment" in capsys.readouterr().err


def test_preload_puts_the_compile_cache_in_the_data_folder(a1111):
    import os

    root, _runtime = a1111
    startup.preload(host_parser())
    folder = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    assert folder.parent == root / "cache" / "optim-compile" and folder.name.startswith("torch-")


def test_saved_setting_turns_the_check_off(a1111, monkeypatch):
    root, runtime = a1111
    (root / "config.json").write_text(json.dumps({"optim_check_at_startup": False}))
    monkeypatch.setattr(sys, "argv", ["launch.py", "--use-cuda-dsa"])
    startup.preload(host_parser())
    assert runtime.startup_findings == []


def test_no_check_flag(a1111, monkeypatch):
    _, runtime = a1111
    monkeypatch.setattr(sys, "argv", ["launch.py", "--use-cuda-dsa", "--optim-no-check"])
    startup.preload(host_parser())
    assert runtime.startup_findings == []


def test_a1111_profile_sets_parser_defaults_and_allocator_env(a1111, monkeypatch, capsys):
    _, runtime = a1111
    monkeypatch.setattr(sys, "argv", ["launch.py", "--optim-profile", "8gb-medium", "--optim-no-check"])
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    parser = host_parser()
    startup.add_flags(parser)
    startup.preload(parser)
    args = parser.parse_args([])
    # A1111 reads these after preload (sd_hijack.py:81, lowvram.py:20-21), so defaults are enough
    assert args.medvram_sdxl and args.opt_sdp_attention and not args.medvram
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "garbage_collection_threshold:0.6,max_split_size_mb:128"
    assert runtime.startup_profile == "8gb-medium"
    assert runtime.defaults.attention is Attention.SDP and runtime.defaults.enabled
    assert "[Optim] profile 8gb-medium applied at start-up" in capsys.readouterr().err


def test_a1111_profile_keeps_the_users_allocator_setting(a1111, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["launch.py", "--optim-profile", "8gb-low", "--optim-no-check"])
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    startup.preload(host_parser())
    import os

    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def test_auto_profile_is_for_the_gpu_this_webui_runs_on(a1111, monkeypatch, capsys):
    # issue 15 §3: --device-id 1 runs A1111 on cuda:1, here the 12 GB card (CUDA numbers the 4090 first)
    import lib_optim.gpu
    import lib_optim.launch
    from lib_optim.gpu import GpuInfo, SystemFacts

    _, runtime = a1111
    gpus = (
        GpuInfo(0, "NVIDIA GeForce RTX 3060", "nvidia", 12288, None, (8, 6), "nvml", "GPU-a", "00000000:01:00.0"),
        GpuInfo(1, "NVIDIA GeForce RTX 4090", "nvidia", 24564, None, (8, 9), "nvml", "GPU-b", "00000000:02:00.0"),
    )
    system = SystemFacts("3.10.14", "Linux", None, None, False, None, "550.54.14", gpus, "nvml", ())
    monkeypatch.setattr(lib_optim.gpu, "probe_system", lambda *a, **k: system)
    monkeypatch.setattr(lib_optim.launch, "nvidia_on_pci_bus", lambda *a, **k: True)
    for name in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(sys, "argv", ["launch.py", "--device-id", "1", "--optim-profile", "auto", "--optim-no-check"])
    startup.preload(host_parser())
    assert runtime.startup_profile == "12gb"
    assert "--optim-profile auto: 12gb (for the NVIDIA GeForce RTX 3060 (12288 MB))" in capsys.readouterr().err


def test_bad_profile_name_is_reported_not_raised(a1111, monkeypatch, capsys):
    _, runtime = a1111
    monkeypatch.setattr(sys, "argv", ["launch.py", "--optim-profile", "9gb", "--optim-no-check"])
    startup.preload(host_parser())
    err = capsys.readouterr().err
    assert "[Optim] profile: '9gb' is not a profile; allowed:" in err
    assert "[Optim] [Optim]" not in err
    assert runtime.startup_profile is None


def test_forge_profile_sets_live_backend_state(monkeypatch):
    """Forge decided its backend before preload; the profile sets what is read later (docs/hosts.md §1.3, §4.3):
    memory_management.current_inference_memory (bytes, backend/memory_management.py:544-549) and
    args.vae_in_cpu (read by vae_device() when the VAE is built, :827-830)."""
    mm = types.ModuleType("backend.memory_management")
    mm.current_inference_memory = 1024 * 1024 * 1024
    mm.VAE_DTYPES = ["bf16", "fp32"]
    args = types.SimpleNamespace(vae_in_cpu=False, attention_split=False, attention_quad=False, attention_pytorch=False)
    backend = types.ModuleType("backend")
    backend.memory_management = mm
    backend_args = types.ModuleType("backend.args")
    backend_args.args = args
    for name, module in {"backend": backend, "backend.memory_management": mm, "backend.args": backend_args}.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setitem(sys.modules, "backend.attention", types.ModuleType("backend.attention"))  # already chosen
    runtime = Runtime()
    monkeypatch.setattr(startup, "get_runtime", lambda: runtime)
    startup.apply_startup_profile(host_parser(), "8gb-low", HostKind.FORGE)
    assert mm.current_inference_memory == 2048 * 1024 * 1024
    assert args.vae_in_cpu is True
    assert args.attention_quad is False  # backend.attention was imported already: no half-switch
    assert runtime.defaults.attention is Attention.SUB_QUAD  # ...so it applies per generation instead


def test_format_block_names_every_finding():
    from lib_optim.launch.checker import CheckInput, run_checks

    findings = run_checks(CheckInput(HostKind.FORGE, ["--medvram", "--all-in-fp32"]))
    block = startup.format_block(findings, HostKind.FORGE)
    for f in findings:
        assert f.subject in block


def ldm_backend(monkeypatch, attention_imported: bool, **args):
    """What exists at preload in Forge previous / reForge (docs/hosts.md §1.2): the re-parsed back-end flags
    (modules_forge/initialization.py FP :38-39, RF :37-38) and model_management, imported right after."""
    flags = {"vae_in_cpu": False, "vae_in_fp16": False, "vae_in_bf16": False, "vae_in_fp32": False}
    flags |= {"attention_split": False, "attention_quad": False, "attention_pytorch": False, **args}
    parser_module = types.ModuleType("ldm_patched.modules.args_parser")
    parser_module.args = types.SimpleNamespace(**flags)
    mm = types.ModuleType("ldm_patched.modules.model_management")
    mm.ENABLE_PYTORCH_ATTENTION = True  # NVIDIA + torch 2 (FP model_management.py:180-184)
    mm.XFORMERS_IS_AVAILABLE = True
    mm.VAE_DTYPE = "bf16"  # FP :177-205

    def minimum_inference_memory():
        return 1024 * 1024 * 1024

    mm.minimum_inference_memory = minimum_inference_memory
    package = types.ModuleType("ldm_patched.modules")
    package.args_parser, package.model_management = parser_module, mm
    modules = {
        "ldm_patched": types.ModuleType("ldm_patched"),
        "ldm_patched.modules": package,
        "ldm_patched.modules.args_parser": parser_module,
        "ldm_patched.modules.model_management": mm,
    }
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    if attention_imported:
        monkeypatch.setitem(sys.modules, "ldm_patched.ldm.modules.attention", types.ModuleType("attention"))
    else:
        monkeypatch.delitem(sys.modules, "ldm_patched.ldm.modules.attention", raising=False)
    runtime = Runtime()
    monkeypatch.setattr(startup, "get_runtime", lambda: runtime)
    return parser_module.args, mm, runtime


def test_forge_previous_profile_sets_what_is_read_after_preload(monkeypatch, capsys):
    """The attention module chooses at its import, after preload (FP ldm_patched/ldm/modules/attention.py:339-355,
    from args.attention_* and ENABLE_PYTORCH_ATTENTION, model_management.py:172-190); vae_device() reads
    args.vae_in_cpu when a VAE is built (:622-625) and vae_dtype() the import-time VAE_DTYPE (:633-635)."""
    import torch

    args, mm, runtime = ldm_backend(monkeypatch, attention_imported=False, use_sage_attention=False)
    startup.apply_startup_profile(host_parser(), "8gb-low", HostKind.FORGE_PREVIOUS)
    assert (args.attention_quad, args.attention_split, args.attention_pytorch) == (True, False, False)
    assert mm.ENABLE_PYTORCH_ATTENTION is False and mm.XFORMERS_IS_AVAILABLE is False
    assert args.vae_in_cpu is True and mm.VAE_DTYPE is torch.float32
    assert runtime.startup_profile == "8gb-low" and runtime.defaults.attention is Attention.SUB_QUAD
    err = capsys.readouterr().err
    assert "attention sub-quad" in err and "VAE on CPU (float32)" in err
    assert "--attention-quad --disable-xformers" in err  # its flags only take effect from the launch line


def test_ldm_patched_profile_leaves_attention_once_chosen_and_sets_the_reserve(monkeypatch):
    from lib_optim.launch import profiles
    from lib_optim.settings import GenerationSettings

    args, mm, runtime = ldm_backend(monkeypatch, attention_imported=True, vae_in_fp16=True)
    hp = profiles.HostProfile(
        (), {}, GenerationSettings(enabled=True, attention=Attention.SPLIT, inference_memory_mb=1792)
    )
    monkeypatch.setattr(startup, "resolve", lambda profile, host: hp)
    startup.apply_startup_profile(host_parser(), "8gb-low", HostKind.FORGE_PREVIOUS)
    assert args.attention_split is False and mm.ENABLE_PYTORCH_ATTENTION is True  # chosen already: per generation
    assert mm.minimum_inference_memory() == 1792 * 1024 * 1024  # load_models_gpu looks it up by name (FP :426, :478)
    assert runtime.defaults.inference_memory_mb == 1792


def test_reforge_profile_sets_what_forge_previous_does(monkeypatch):
    """reForge has its own profiles (issue 15 §4), applied like Forge previous's: same ldm_patched back end, same
    flags (reForge ldm_patched/modules/args_parser.py:123-130, :138-144)."""
    args, _mm, runtime = ldm_backend(monkeypatch, attention_imported=False)
    monkeypatch.setattr(sys, "argv", ["launch.py", "--optim-profile", "8gb-low", "--optim-no-check"])
    startup.apply_startup_profile(host_parser(), "8gb-low", HostKind.REFORGE)
    assert (args.attention_quad, args.attention_split, args.attention_pytorch) == (True, False, False)
    assert runtime.startup_profile == "8gb-low" and runtime.defaults.attention is Attention.SUB_QUAD
