"""Doctor's compile section (issue 16 §4): whether compile can work here and how to get it, its cache folder, and
the TORCH_COMMAND upgrade path for hosts that pin a torch older than 2.5.

The launchers' pins it states are A1111 v1.10.1 modules/launch_utils.py:319-320,344 (torch 2.1.2, torchvision
0.16.2, xformers==0.0.23.post1, cu121) and Forge f2 :364-365,389 (2.3.1, 0.18.1, xformers==0.0.27).
"""

from __future__ import annotations

import json
from pathlib import Path

from test_cli import _base_env, _install, run_cli

from lib_optim.compile import CompileProbe, compile_advice, compile_section_text
from lib_optim.gpu.facts import GpuInfo, SystemFacts, TorchInfo
from lib_optim.host_specs.kinds import HostKind
from lib_optim.launch.doctor import doctor


def facts(
    torch: TorchInfo | None, *, directml: bool = False, gpus: tuple[GpuInfo, ...] = (), python: str = "3.10.14"
) -> SystemFacts:
    return SystemFacts(
        python=python,
        platform="test",
        torch=torch,
        xformers=None,
        directml=directml,
        gradio=None,
        nvidia_driver=None,
        gpus=gpus,
        gpu_source="none",
        notes=(),
    )


def probe(
    platform: str = "linux",
    compiler: str | None = "/usr/bin/g++",
    triton: bool = True,
    triton_windows: str | None = None,
) -> CompileProbe:
    return CompileProbe(
        platform=platform,
        which=lambda name: compiler if name in ("g++", "c++", "clang++", "cl") else None,
        has_module=lambda name: triton and name == "triton",
        dist_version=lambda name: triton_windows if name == "triton-windows" else None,
        python_headers=lambda: True,
    )


CPU_25 = TorchInfo("2.5.1+cpu", None, None, False, False, 0)
CUDA_212 = TorchInfo("2.1.2+cu121", "12.1", None, True, False, 1)
CUDA_251 = TorchInfo("2.5.1+cu121", "12.1", None, True, False, 1)
CPU_212 = TorchInfo("2.1.2+cpu", None, None, False, False, 0)


def test_cpu_with_a_compiler_works(tmp_path: Path) -> None:
    advice = compile_advice(HostKind.FORGE, facts(CPU_25), environ={}, webui_root=tmp_path, probe=probe())
    assert (advice.device, advice.available, advice.reason) == ("cpu", True, "")
    assert advice.upgrade is None and advice.older_torch == ""
    assert advice.cache["folder"].startswith(str(tmp_path / "cache" / "optim-compile" / "torch-2.5.1+cpu-py"))
    text = compile_section_text([advice])
    assert "here (cpu, torch 2.5.1+cpu): works" in text
    assert "TORCH_COMMAND" not in text


def test_cpu_without_a_compiler_names_the_fix() -> None:
    advice = compile_advice(HostKind.FORGE, facts(CPU_25), environ={}, probe=probe(compiler=None))
    assert advice.available is False and advice.reason == "no C++ compiler"
    assert "g++" in advice.fix
    assert "cannot work: no C++ compiler; fix: install g++" in compile_section_text([advice])
    # CXX names the compiler inductor runs: it must be found, whatever else is on the PATH
    missing = compile_advice(HostKind.FORGE, facts(CPU_25), environ={"CXX": "/nonexistent/g++"}, probe=probe())
    assert missing.available is False
    named = CompileProbe(platform="linux", which=lambda n: "/opt/bin/g++-13" if n == "g++-13" else None)
    found = compile_advice(HostKind.FORGE, facts(CPU_25), environ={"CXX": "g++-13"}, probe=named)
    assert found.available is True or found.reason == "the Python headers (Python.h) are missing"


def test_windows_with_an_old_torch_gets_the_upgrade_path() -> None:
    advice = compile_advice(HostKind.A1111, facts(CUDA_212), environ={}, probe=probe(platform="win32", triton=False))
    assert advice.device == "cuda" and advice.available is False
    assert "before torch 2.4" in advice.reason
    up = advice.upgrade
    assert up is not None and up["file"] == "webui-user.bat"
    assert up["line"] == (
        "set TORCH_COMMAND=pip install torch==2.5.1 torchvision==0.20.1 "
        "--extra-index-url https://download.pytorch.org/whl/cu121"
    )
    assert "--reinstall-torch" in up["then"]
    assert up["windows_triton"].startswith('pip install -U "triton-windows<3.2"')
    risks = " ".join(up["risks"])
    assert "A1111 v1.10.1 was tested with torch 2.1.2" in risks
    assert "xformers==0.0.23.post1" in risks and "XFORMERS_PACKAGE=xformers==0.0.28.post3" in risks
    text = compile_section_text([advice])
    assert "older than 2.5" in text and "only the generated kernels are reused" in text
    assert up["line"] in text and "triton-windows<3.2" in text


def test_linux_old_torch_upgrade_line_is_for_webui_user_sh() -> None:
    advice = compile_advice(
        HostKind.FORGE, facts(TorchInfo("2.3.1+cu121", "12.1", None, True, False, 1)), environ={}, probe=probe()
    )
    assert advice.available is True
    assert advice.upgrade is not None and advice.upgrade["file"] == "webui-user.sh"
    assert advice.upgrade["line"].startswith('export TORCH_COMMAND="pip install torch==2.5.1 torchvision==0.20.1')
    assert "xformers==0.0.27" in " ".join(advice.upgrade["risks"])
    assert "compiled graphs are reused" in advice.older_torch  # 2.3: the FX graph cache we turn on


def test_directml_and_mps_are_not_supported() -> None:
    dml = compile_advice(HostKind.FORGE_PREVIOUS, facts(CPU_212, directml=True), environ={}, probe=probe())
    assert dml.device == "directml" and dml.available is False
    assert "not supported on DirectML" in dml.reason and "runs uncompiled" in dml.fix
    mps = compile_advice(
        HostKind.A1111, facts(TorchInfo("2.5.1", None, None, False, True, 0)), environ={}, probe=probe()
    )
    assert mps.device == "mps" and "not supported on MPS" in mps.reason
    assert "cannot work: not supported on DirectML" in compile_section_text([dml])


def test_gpu_checks() -> None:
    no_triton = compile_advice(HostKind.FORGE, facts(CUDA_251), environ={}, probe=probe(triton=False))
    assert no_triton.reason == "triton is not installed" and "pip install triton" in no_triton.fix
    old = (GpuInfo(0, "GTX 1080", "nvidia", 8192, None, (6, 1), "nvml"),)
    pascal = compile_advice(HostKind.FORGE, facts(CUDA_251, gpus=old), environ={}, probe=probe())
    assert pascal.available is False and "compute capability 6.1" in pascal.reason
    windows = compile_advice(HostKind.FORGE, facts(CUDA_251), environ={}, probe=probe(platform="win32", triton=False))
    assert '"triton-windows<3.2"' in windows.fix
    mismatch = compile_advice(
        HostKind.FORGE, facts(CUDA_251), environ={}, probe=probe(platform="win32", triton_windows="3.3.0.post19")
    )
    assert any("triton-windows 3.3.0.post19 is not the one for torch 2.5.1" in n for n in mismatch.notes)
    py312 = compile_advice(HostKind.A1111, facts(CUDA_212, python="3.12.3"), environ={}, probe=probe())
    assert py312.available is False and "Python 3.12" in py312.reason


def test_no_torch_here_reads_the_hosts_pin() -> None:
    advice = compile_advice(HostKind.A1111, facts(None), environ={}, probe=probe())
    assert advice.available is None and "WebUI's Python" in advice.fix
    assert "what AUTOMATIC1111 WebUI v1.10 installs" in advice.older_torch and advice.upgrade is not None
    reforge = compile_advice(HostKind.REFORGE, facts(None), environ={}, probe=probe())
    assert reforge.upgrade is None and reforge.older_torch == ""  # it pins 2.9.0


def test_the_users_own_inductor_folder_is_reported(tmp_path: Path) -> None:
    advice = compile_advice(
        HostKind.FORGE, facts(CPU_25), environ={"TORCHINDUCTOR_CACHE_DIR": str(tmp_path)}, probe=probe()
    )
    assert advice.cache["yours"] is True and advice.cache["folder"] == str(tmp_path)
    assert f"cache: your TORCHINDUCTOR_CACHE_DIR={tmp_path}" in compile_section_text([advice])


def test_doctor_report_carries_the_section(tmp_path: Path) -> None:
    report = doctor(
        HostKind.A1111,
        facts(CUDA_212),
        args=["--data-dir", str(tmp_path / "data")],
        env={},
        pci=lambda: True,
        webui_root=tmp_path / "webui",
        compile_probe=probe(platform="win32", triton=False),
    )
    data = json.loads(json.dumps(report.to_dict()))["compile"]
    assert data["available"] is False and data["device"] == "cuda"
    assert data["cache"]["root"] == str(tmp_path / "data" / "cache" / "optim-compile")  # --data-dir followed
    assert [u["host"] for u in data["upgrade"]] == ["a1111"]
    assert data["upgrade"][0]["line"].startswith("set TORCH_COMMAND=pip install torch==2.5.1")


def test_doctor_command_prints_it(tmp_path: Path) -> None:
    ext = _install(tmp_path / "sd-webui-optim")
    as_json = run_cli("doctor", "--host", "forge", "--json", cwd=ext, env=_base_env())
    section = as_json.json()["compile"]
    assert {"device", "available", "reason", "fix", "torch", "cache", "upgrade", "notes"} <= set(section)
    both = run_cli("doctor", "--json", cwd=ext, env=_base_env()).json()
    assert both["host"] is None and "cache" in both["compile"]
    text = run_cli("doctor", "--host", "forge", cwd=ext, env=_base_env())
    assert "Compile (Compile UNet blocks, regional torch.compile):" in text.out
    assert "python -m lib_optim compile-cache show" in text.out
