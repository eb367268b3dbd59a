"""Tests for lib_optim.gpu.probe: real environment, missing/broken components, fakes for NVML, torch, xFormers."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from fake_nvidia_smi import FAILED_DRIVER, fake_bus_id, fake_uuid, skip_reason, write_fake_nvidia_smi
from fake_nvml import FakeMemory, FakeNVMLError, fake_pynvml, names, names_missing_from

from lib_optim.gpu import nvidia_smi
from lib_optim.gpu.probe import (
    DriverAccess,
    DriverReply,
    GpuInfo,
    SystemFacts,
    probe_nvidia_smi,
    probe_system,
    probe_xformers,
    read_proc_driver_version,
    torch_build_matches,
)

MB = 1024 * 1024

# --------------------------------------------------------------------------------------------- fakes


def make_fake_pynvml(
    *,
    name: str | bytes = "NVIDIA GeForce RTX 3070",
    total_mb: int = 8192,
    free_mb: int = 7000,
    driver: str | bytes = "550.54.14",
    fail: dict[str, Exception] | None = None,
) -> tuple[types.ModuleType, list[tuple[str, tuple[Any, ...]]]]:
    """A module imitating nvidia-ml-py's pynvml API for one GPU; returns it and its call log."""
    handle = object()
    api: dict[str, Callable[..., Any]] = {
        "nvmlSystemGetDriverVersion": lambda: driver,
        "nvmlDeviceGetCount": lambda: 1,
        "nvmlDeviceGetHandleByIndex": lambda index: handle,
        "nvmlDeviceGetName": lambda h: name,
        "nvmlDeviceGetMemoryInfo": lambda h: FakeMemory(total_mb * MB, (total_mb - free_mb) * MB),
        "nvmlDeviceGetCudaComputeCapability": lambda h: (8, 6),
    }
    return fake_pynvml(api, fail=fail)


def make_fake_torch(
    *, calls: list[str], hip: str | None = None, name: str = "NVIDIA GeForce RTX 4090"
) -> types.ModuleType:
    """A torch with one CUDA device whose CUDA-initialising calls are logged."""

    def get_device_properties(index: int) -> Any:
        calls.append("get_device_properties")
        return types.SimpleNamespace(name=name, total_memory=24564 * MB, major=8, minor=9)

    def mem_get_info(index: int) -> tuple[int, int]:
        calls.append("mem_get_info")
        return 20000 * MB, 24564 * MB

    module = types.ModuleType("torch")
    module.__version__ = "2.3.1+cu121"  # type: ignore[attr-defined]
    module.version = types.SimpleNamespace(cuda=None if hip else "12.1", hip=hip)  # type: ignore[attr-defined]
    module.cuda = types.SimpleNamespace(  # type: ignore[attr-defined]
        is_available=lambda: True,
        device_count=lambda: 1,
        is_initialized=lambda: False,
        get_device_properties=get_device_properties,
        mem_get_info=mem_get_info,
    )
    module.backends = types.SimpleNamespace(mps=types.SimpleNamespace(is_available=lambda: False))  # type: ignore[attr-defined]
    return module


def write_fake_xformers(root: Path, cpp_lib: dict[str, Any] | str | None, version: str = "0.0.27") -> Path:
    """An installed-looking xFormers whose import raises, proving the probe never imports it."""
    package = root / "xformers"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        'raise RuntimeError("xformers must not be imported by the probe")\n', encoding="utf-8"
    )
    if cpp_lib is not None:
        text = cpp_lib if isinstance(cpp_lib, str) else json.dumps(cpp_lib)
        (package / "cpp_lib.json").write_text(text, encoding="utf-8")
    dist_info = root / f"xformers-{version}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: xformers\nVersion: {version}\n", encoding="utf-8"
    )
    (dist_info / "RECORD").write_text("xformers/__init__.py,,\nxformers/cpp_lib.json,,\n", encoding="utf-8")
    return package


def cpp_lib_for(torch_version: str, cuda: int | None = 1201, python: str | None = None) -> dict[str, Any]:
    """The layout xFormers' setup.py writes: versions nested under "version", CUDA as major*100+minor."""
    return {
        "version": {
            "cuda": cuda,
            "hip": None,
            "torch": torch_version,
            "python": python or platform.python_version(),
            "flash": "v2.5.7",
        },
        "env": {"TORCH_CUDA_ARCH_LIST": "6.0+PTX 7.0 7.5 8.0+PTX 9.0a"},
    }


@pytest.fixture(autouse=True)
def no_driver_tools(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> DriverAccess:
    """No nvidia-smi and no /proc/driver unless a test brings fakes: the machine's own must not leak in."""
    access = DriverAccess(path="", proc_version=tmp_path / "no-proc" / "driver" / "nvidia" / "version")
    monkeypatch.setattr(nvidia_smi, "DEFAULT_DRIVER_ACCESS", access)
    return access


@pytest.fixture
def no_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)


@pytest.fixture
def no_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch", None)


@pytest.fixture
def xformers_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    return root


# ---------------------------------------------------------------------------------- real environment


def test_import_is_cheap() -> None:
    code = (
        "import sys, lib_optim.gpu.probe; "
        "heavy = [m for m in ('torch', 'pynvml', 'xformers', 'gradio') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_real_environment() -> None:
    facts = probe_system()
    assert facts.python == platform.python_version()
    assert facts.platform
    torch = pytest.importorskip("torch")
    assert facts.torch is not None
    assert facts.torch.error is None
    assert facts.torch.version == torch.__version__
    assert facts.torch.cuda == torch.version.cuda
    if torch.cuda.is_available():
        pytest.skip("this machine has a usable GPU; the CPU-only expectations below do not apply")
    assert facts.torch.cuda_available is False
    assert facts.torch.device_count == 0
    assert facts.gpus == ()
    assert facts.gpu_source == "none"
    assert facts.best_gpu_memory_mb() is None
    # No NVIDIA driver here: NVML is importable but cannot initialise, and says why.
    assert any(note.startswith("NVML unavailable: ") for note in facts.notes), facts.notes
    json.dumps(facts.to_dict())
    text = facts.format_text()
    assert "torch" in text
    assert "GPU      none found" in text
    assert "NVML unavailable" in text


# ------------------------------------------------------------------------------------- missing parts


def test_nvml_absent(no_nvml: None) -> None:
    facts = probe_system(use_torch=False)
    assert facts.gpu_source == "none"
    assert facts.nvidia_driver is None
    assert any(note.startswith("NVML unavailable: pynvml not importable") for note in facts.notes)
    assert "torch not probed (use_torch=False)" in facts.notes


def test_torch_absent(no_torch: None, no_nvml: None) -> None:
    facts = probe_system()
    assert facts.torch is None
    assert "torch not installed" in facts.notes
    assert facts.gpus == ()
    assert facts.gpu_source == "none"
    assert "torch    not installed in this Python" in facts.format_text()
    json.dumps(facts.to_dict())


def test_torch_broken_import(monkeypatch: pytest.MonkeyPatch, no_nvml: None) -> None:
    class BrokenFinder:
        """Makes `import torch` fail the way a missing DLL does."""

        @staticmethod
        def find_spec(name: str, path: Any = None, target: Any = None) -> Any:
            if name == "torch":
                raise OSError("[WinError 126] The specified module could not be found")
            return None

    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(sys, "meta_path", [BrokenFinder(), *sys.meta_path])
    facts = probe_system()
    assert facts.torch is not None
    assert facts.torch.error is not None
    assert "WinError 126" in facts.torch.error
    assert any(note.startswith("torch import failed: ") for note in facts.notes)
    assert facts.gpu_source == "none"


def test_xformers_absent(no_nvml: None) -> None:
    assert probe_xformers("2.3.1+cu121") is None
    assert probe_system(use_torch=False).xformers is None


# ------------------------------------------------------------------------------------------ fake NVML


def test_fake_pynvml_matches_real_api() -> None:
    """The fake must only use names the installed nvidia-ml-py really has."""
    real = pytest.importorskip("pynvml")
    fake, _ = make_fake_pynvml()
    assert names_missing_from(real, fake) == []


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 3070", b"NVIDIA GeForce RTX 3070"])
def test_fake_nvml_one_gpu(monkeypatch: pytest.MonkeyPatch, name: str | bytes) -> None:
    fake, calls = make_fake_pynvml(name=name, driver=b"550.54.14" if isinstance(name, bytes) else "550.54.14")
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = probe_system(use_torch=False)
    assert facts.gpu_source == "nvml"
    assert facts.nvidia_driver == "550.54.14"
    assert facts.gpus == (
        GpuInfo(
            index=0,
            name="NVIDIA GeForce RTX 3070",
            vendor="nvidia",
            total_mb=8192,
            free_mb=7000,
            compute_capability=(8, 6),
            source="nvml",
        ),
    )
    assert facts.best_gpu_memory_mb() == 8192
    assert names(calls)[0] == "nvmlInit"
    assert names(calls)[-1] == "nvmlShutdown"
    data = facts.to_dict()
    assert json.loads(json.dumps(data))["gpus"][0]["compute_capability"] == [8, 6]
    text = facts.format_text()
    assert "NVIDIA GeForce RTX 3070 [nvidia], 8192 MB (7000 MB free), sm 8.6, via nvml" in text
    assert "Driver   NVIDIA 550.54.14" in text


def test_nvml_raises_in_the_middle(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = make_fake_pynvml(fail={"nvmlDeviceGetHandleByIndex": FakeNVMLError("GPU is lost")})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = probe_system(use_torch=False)
    assert "nvmlShutdown" in names(calls)
    assert names(calls)[-1] == "nvmlShutdown"
    assert facts.gpus == ()
    assert facts.gpu_source == "none"
    assert "NVML query failed: GPU is lost" in facts.notes


def test_nvml_init_fails_no_shutdown(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = make_fake_pynvml(fail={"nvmlInit": FakeNVMLError("Driver Not Loaded")})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = probe_system(use_torch=False)
    assert names(calls) == ["nvmlInit"]  # shutting down an uninitialised NVML is itself an error
    assert "NVML unavailable: Driver Not Loaded" in facts.notes


def test_nvml_optional_fields_fail(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, calls = make_fake_pynvml(
        fail={
            "nvmlDeviceGetCudaComputeCapability": FakeNVMLError("Not Supported"),
            "nvmlSystemGetDriverVersion": FakeNVMLError("Unknown Error"),
        }
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = probe_system(use_torch=False)
    assert facts.gpu_source == "nvml"
    assert facts.gpus[0].compute_capability is None
    assert facts.gpus[0].total_mb == 8192
    assert facts.nvidia_driver is None
    assert "NVML could not read the compute capability of GPU 0: Not Supported" in facts.notes
    assert names(calls)[-1] == "nvmlShutdown"


def test_nvml_shutdown_failure_is_harmless(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, _ = make_fake_pynvml(fail={"nvmlShutdown": FakeNVMLError("Uninitialized")})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert probe_system(use_torch=False).best_gpu_memory_mb() == 8192


# ---------------------------------------------------------------------------------- torch fallback


def test_torch_fallback_reads_device(monkeypatch: pytest.MonkeyPatch, no_nvml: None) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "torch", make_fake_torch(calls=calls))
    facts = probe_system()
    assert facts.torch is not None
    assert facts.torch.cuda_available is True
    assert facts.torch.device_count == 1
    assert facts.gpu_source == "torch"
    (gpu,) = facts.gpus
    assert (gpu.name, gpu.vendor, gpu.total_mb, gpu.free_mb) == (
        "NVIDIA GeForce RTX 4090",
        "nvidia",
        24564,
        20000,
    )
    assert gpu.compute_capability == (8, 9)
    assert gpu.source == "torch"
    assert calls == ["get_device_properties", "mem_get_info"]


def test_torch_fallback_without_cuda_init(monkeypatch: pytest.MonkeyPatch, no_nvml: None) -> None:
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "torch", make_fake_torch(calls=calls))
    facts = probe_system(allow_cuda_init=False)
    assert calls == []
    assert facts.torch is not None
    assert facts.torch.cuda_available is True
    assert facts.gpus == ()
    assert facts.gpu_source == "none"
    assert any("allow_cuda_init=False" in note for note in facts.notes)


def test_torch_fallback_rocm(monkeypatch: pytest.MonkeyPatch, no_nvml: None) -> None:
    calls: list[str] = []
    fake = make_fake_torch(calls=calls, hip="6.0.32830", name="AMD Radeon RX 7900 XTX")
    monkeypatch.setitem(sys.modules, "torch", fake)
    facts = probe_system()
    (gpu,) = facts.gpus
    assert gpu.vendor == "amd"
    assert gpu.compute_capability is None  # ROCm's major/minor are gfx numbers, not CUDA capabilities
    assert facts.torch is not None
    assert facts.torch.hip == "6.0.32830"


# ------------------------------------------------------------------------------------------ xFormers


def test_xformers_matching(xformers_root: Path, no_nvml: None) -> None:
    torch = pytest.importorskip("torch")
    package = write_fake_xformers(xformers_root, cpp_lib_for(torch.__version__))
    facts = probe_system()
    info = facts.xformers
    assert info is not None
    assert info.version == "0.0.27"
    assert info.location == str(package)
    assert info.built_for_torch == torch.__version__
    assert info.built_for_cuda == "12.1"
    assert info.matches_torch is True
    assert info.matches_python is True
    assert info.reason is None
    assert "xformers" not in sys.modules
    assert "0.0.27" in facts.format_text()


def test_xformers_mismatching(xformers_root: Path, no_nvml: None) -> None:
    pytest.importorskip("torch")
    write_fake_xformers(xformers_root, cpp_lib_for("2.3.1+cu121", python="3.9.13"))
    facts = probe_system()
    info = facts.xformers
    assert info is not None
    assert info.built_for_torch == "2.3.1+cu121"
    assert info.matches_torch is False
    assert info.matches_python is False
    assert info.reason is not None
    assert "2.3.1+cu121" in info.reason
    assert "Python 3.9.13" in info.reason
    assert any(note.startswith("xFormers does not match torch: ") for note in facts.notes)
    assert "xformers" not in sys.modules
    json.dumps(facts.to_dict())


def test_xformers_mismatch_without_torch_import(xformers_root: Path, no_nvml: None) -> None:
    """With torch not probed, the installed torch version still comes from package metadata."""
    write_fake_xformers(xformers_root, cpp_lib_for("1.13.1+cu117"))
    info = probe_system(use_torch=False).xformers
    assert info is not None
    assert info.matches_torch is False


def test_xformers_flat_metadata_keys(xformers_root: Path) -> None:
    write_fake_xformers(
        xformers_root, {"torch_version": "2.3.1+cu121", "cuda_version": "12.1", "python_version": "3.10.11"}
    )
    info = probe_xformers("2.3.1+cu121", python_version="3.10.6")
    assert info is not None
    assert (info.built_for_torch, info.built_for_cuda, info.built_for_python) == (
        "2.3.1+cu121",
        "12.1",
        "3.10.11",
    )
    assert info.matches_torch is True
    assert info.matches_python is True


def test_xformers_without_cpp_lib(xformers_root: Path) -> None:
    write_fake_xformers(xformers_root, None)
    info = probe_xformers("2.3.1+cu121")
    assert info is not None
    assert info.version == "0.0.27"
    assert info.matches_torch is None
    assert info.reason is not None
    assert "cpp_lib.json" in info.reason


def test_xformers_corrupt_cpp_lib(xformers_root: Path) -> None:
    write_fake_xformers(xformers_root, "{not json")
    info = probe_xformers("2.3.1+cu121")
    assert info is not None
    assert info.matches_torch is None
    assert info.reason is not None
    assert info.reason.startswith("cannot read cpp_lib.json: ")


@pytest.mark.parametrize(
    ("built", "installed", "kwargs", "expected"),
    [
        ("2.3.1+cu121", "2.3.1+cu121", {}, True),
        ("2.3.1+cu121", "2.3.0+cu121", {}, False),
        ("2.3.1+cu121", "2.3.1+cu118", {}, False),
        ("2.3.1+cu121", "2.3.1+CU121", {}, True),
        # A plain PyPI torch has no local tag: fall back to comparing CUDA versions.
        ("2.3.1+cu121", "2.3.1", {"installed_cuda": "12.1"}, True),
        ("2.3.1+cu121", "2.3.1", {"installed_cuda": "11.8"}, False),
        ("2.3.1", "2.3.1+cu121", {"built_cuda": "12.1"}, True),
        ("2.3.1", "2.3.1", {}, True),
        (None, "2.3.1+cu121", {}, None),
        ("2.3.1+cu121", None, {}, None),
        ("garbage", "2.3.1", {}, None),
    ],
)
def test_torch_build_matches(
    built: str | None, installed: str | None, kwargs: dict[str, str], expected: bool | None
) -> None:
    matches, reason = torch_build_matches(built, installed, **kwargs)
    assert matches is expected
    assert (reason is None) == (expected is True)


# -------------------------------------------------------------------------------------------- facts


def test_best_gpu_memory_and_serialisation() -> None:
    def gpu(index: int, total: int | None) -> GpuInfo:
        return GpuInfo(index, f"GPU {index}", "nvidia", total, None, None, "nvml")

    facts = SystemFacts(
        python="3.10.11",
        platform="Windows-10",
        torch=None,
        xformers=None,
        directml=True,
        gradio="3.41.2",
        nvidia_driver=None,
        gpus=(gpu(0, 6144), gpu(1, None), gpu(2, 12288)),
        gpu_source="nvml",
        notes=("a note",),
    )
    assert facts.best_gpu_memory_mb() == 12288
    assert json.loads(json.dumps(facts.to_dict()))["gpus"][2]["total_mb"] == 12288
    text = facts.format_text()
    assert "DirectML" in text
    assert "gradio   3.41.2" in text
    assert "note     a note" in text
    assert text.count("\nGPU ") == 3


# ------------------------------------------------------------- the driver without pynvml (issue 9 row 2)

needs_fake_smi = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


@needs_fake_smi
def test_nvidia_smi_reads_gpus_and_driver(tmp_path: Path) -> None:
    write_fake_nvidia_smi(
        tmp_path / "bin",
        [
            ("NVIDIA GeForce RTX 3060", 12288, 11893, "550.54.14", "8.6"),
            ("NVIDIA A100-SXM4-80GB", 81920, 81000, "550.54.14", "8.0"),
        ],
    )
    notes: list[str] = []
    reply = probe_nvidia_smi(notes, DriverAccess(path=str(tmp_path / "bin")))
    assert reply == DriverReply(
        "550.54.14",
        (
            GpuInfo(
                0, "NVIDIA GeForce RTX 3060", "nvidia", 12288, 11893, (8, 6), "nvidia-smi", fake_uuid(0), fake_bus_id(0)
            ),
            GpuInfo(
                1, "NVIDIA A100-SXM4-80GB", "nvidia", 81920, 81000, (8, 0), "nvidia-smi", fake_uuid(1), fake_bus_id(1)
            ),
        ),
    )
    assert notes == []


@needs_fake_smi
def test_nvidia_smi_of_an_old_driver_without_compute_cap(tmp_path: Path) -> None:
    write_fake_nvidia_smi(tmp_path, [("Tesla P40", 24576, 24000, "470.82.01", "6.1")], old_driver=True)
    reply = probe_nvidia_smi([], DriverAccess(path=str(tmp_path)))
    assert reply is not None
    assert reply.driver == "470.82.01"
    assert [(g.name, g.total_mb, g.compute_capability) for g in reply.gpus] == [("Tesla P40", 24576, None)]


@needs_fake_smi
def test_nvidia_smi_asked_again_without_each_field_it_refuses(tmp_path: Path) -> None:
    # issue 15 §3: a refused field is asked again without it, whichever field it is, instead of "no GPU".
    write_fake_nvidia_smi(
        tmp_path, [("Tesla P40", 24576, 24000, "470.82.01", "6.1")], old_driver=True, unknown_fields=("pci.bus_id",)
    )
    notes: list[str] = []
    reply = probe_nvidia_smi(notes, DriverAccess(path=str(tmp_path)))
    assert reply is not None and reply.error is None
    (gpu,) = reply.gpus
    assert (gpu.name, gpu.total_mb, gpu.compute_capability, gpu.uuid, gpu.pci_bus_id) == (
        "Tesla P40",
        24576,
        None,
        fake_uuid(0),
        None,
    )
    assert notes == []


@needs_fake_smi
def test_a_hung_nvidia_smi_is_a_hung_driver_within_the_timeout(tmp_path: Path) -> None:
    # issue 15 §3: a wedged driver makes nvidia-smi hang; it is killed after the timeout, with that diagnosis.
    pid_file = tmp_path / "pid"
    write_fake_nvidia_smi(tmp_path / "bin", hang_s=60, pid_file=pid_file)
    notes: list[str] = []
    started = time.monotonic()
    reply = probe_nvidia_smi(notes, DriverAccess(path=str(tmp_path / "bin"), timeout_s=0.5))
    assert time.monotonic() - started < 30  # far below the fake's 60 s: it was not waited for
    diagnosis = "nvidia-smi did not answer within 0.5 s: the NVIDIA driver looks hung — reboot, or reinstall the driver"
    assert reply == DriverReply(error=diagnosis, hung=True)
    assert notes == [diagnosis]
    pid = int(pid_file.read_text())
    with pytest.raises(ProcessLookupError):  # killed and reaped, not left running
        os.kill(pid, 0)


def test_nvidia_smi_waits_a_few_seconds_by_default() -> None:
    assert DriverAccess().timeout_s <= 10


@needs_fake_smi
def test_nvidia_smi_that_cannot_reach_the_driver(tmp_path: Path) -> None:
    write_fake_nvidia_smi(tmp_path, fail=FAILED_DRIVER)
    notes: list[str] = []
    reply = probe_nvidia_smi(notes, DriverAccess(path=str(tmp_path)))
    assert reply == DriverReply(error=f"nvidia-smi: {FAILED_DRIVER}")
    assert notes == [f"nvidia-smi failed: {FAILED_DRIVER}"]


def test_no_nvidia_smi_is_not_an_answer(tmp_path: Path) -> None:
    notes: list[str] = []
    assert probe_nvidia_smi(notes, DriverAccess(path=str(tmp_path))) is None
    assert notes == ["nvidia-smi not found on the PATH"]


@needs_fake_smi
def test_system_without_pynvml_and_torch_asks_nvidia_smi(
    tmp_path: Path, no_nvml: None, no_torch: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fake_nvidia_smi(tmp_path / "bin")
    access = DriverAccess(path=str(tmp_path / "bin"), proc_version=tmp_path / "none" / "driver" / "nvidia" / "version")
    facts = probe_system(driver_access=access)
    assert facts.gpu_source == "nvidia-smi"
    assert facts.best_gpu_memory_mb() == 12288
    assert (facts.nvidia_driver, facts.nvidia_driver_source, facts.nvidia_driver_error) == (
        "550.54.14",
        "nvidia-smi",
        None,
    )
    text = facts.format_text()
    assert "NVIDIA GeForce RTX 3060 [nvidia], 12288 MB (11893 MB free), sm 8.6, via nvidia-smi" in text
    assert "Driver   NVIDIA 550.54.14 (via nvidia-smi)" in text


PROC_PROPRIETARY = (
    "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  Thu Feb 22 01:44:30 UTC 2024\n"
    "GCC version:  gcc version 12.2.0 (Debian 12.2.0-14)\n"
)
PROC_OPEN = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  560.35.03  Release Build  (dvs-builder@U16)\n"


@pytest.mark.parametrize(("text", "version"), [(PROC_PROPRIETARY, "550.54.14"), (PROC_OPEN, "560.35.03")])
def test_proc_driver_version(tmp_path: Path, text: str, version: str) -> None:
    path = tmp_path / "proc" / "driver" / "nvidia" / "version"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    assert read_proc_driver_version(DriverAccess(proc_version=path)) == DriverReply(driver=version)


def test_proc_without_the_nvidia_module(tmp_path: Path) -> None:
    (tmp_path / "proc" / "driver").mkdir(parents=True)  # Linux, but the nvidia module is not loaded
    path = tmp_path / "proc" / "driver" / "nvidia" / "version"
    reply = read_proc_driver_version(DriverAccess(proc_version=path))
    assert reply is not None and reply.driver is None
    assert reply.error == f"the nvidia kernel module is not loaded (no {path})"
    # No /proc/driver at all (not Linux): nothing to tell.
    assert read_proc_driver_version(DriverAccess(proc_version=tmp_path / "x" / "driver" / "nvidia" / "version")) is None


def test_system_asks_the_kernel_module_when_nothing_else_can(tmp_path: Path, no_nvml: None) -> None:
    path = tmp_path / "proc" / "driver" / "nvidia" / "version"
    path.parent.mkdir(parents=True)
    path.write_text(PROC_PROPRIETARY)
    facts = probe_system(use_torch=False, driver_access=DriverAccess(path="", proc_version=path))
    assert (facts.nvidia_driver, facts.nvidia_driver_source, facts.nvidia_driver_error) == ("550.54.14", "proc", None)
    assert facts.gpus == ()


def test_nvml_failure_is_the_driver_not_answering(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, _ = make_fake_pynvml(fail={"nvmlInit": FakeNVMLError("Driver Not Loaded")})
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    facts = probe_system(use_torch=False)
    assert facts.nvidia_driver is None
    assert facts.nvidia_driver_error == "NVML: Driver Not Loaded"
    assert "Driver   no NVIDIA driver answered (NVML: Driver Not Loaded)" in facts.format_text()


def test_nothing_to_ask_with_is_no_error(no_nvml: None) -> None:
    facts = probe_system(use_torch=False)
    assert (facts.nvidia_driver, facts.nvidia_driver_error) == (None, None)
