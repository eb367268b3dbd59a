"""lib_optim.launch.doctor on machines with a GPU this Python cannot fully see (issue 9 row 2): not "broken"."""

from __future__ import annotations

import dataclasses
import re
import shlex
import sys
from pathlib import Path

import pytest
from fake_nvidia_smi import FAILED_DRIVER, skip_reason, write_fake_nvidia_smi

from lib_optim.gpu.probe import DriverAccess, GpuInfo, SystemFacts, TorchInfo, probe_system
from lib_optim.host_specs.kinds import HostKind
from lib_optim.launch.checker import Finding
from lib_optim.launch.doctor import UNKNOWN_SIZE_PROFILE, doctor, exact_figures_hint, recommend_profile, webui_python

needs_fake_smi = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")
CPU_TORCH = TorchInfo("2.3.1+cpu", None, None, False, False, 0)
CUDA_TORCH = TorchInfo("2.3.1+cu121", "12.1", None, True, False, 1)


def facts(
    *,
    torch: TorchInfo | None = None,
    gpus: tuple[GpuInfo, ...] = (),
    driver: str | None = None,
    error: str | None = None,
) -> SystemFacts:
    return SystemFacts(
        python="3.10.14",
        platform="Linux",
        torch=torch,
        xformers=None,
        directml=False,
        gradio=None,
        nvidia_driver=driver,
        gpus=gpus,
        gpu_source="nvidia-smi" if gpus else "none",
        notes=(),
        nvidia_driver_error=error,
    )


@pytest.fixture
def bare_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """This Python has neither pynvml nor torch (the system Python most people type first)."""
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setitem(sys.modules, "torch", None)


def _rules(findings: list[Finding]) -> dict[str, str]:
    return {f.rule: f.severity.value for f in findings}


@needs_fake_smi
def test_gpu_seen_through_nvidia_smi(tmp_path: Path, bare_python: None) -> None:
    write_fake_nvidia_smi(tmp_path / "bin")
    system = probe_system(driver_access=DriverAccess(path=str(tmp_path / "bin"), proc_version=tmp_path / "p" / "v"))
    report = doctor(HostKind.FORGE, system, env={}, pci=lambda: True)
    assert report.profile == "12gb"
    assert report.profile_reason == "for the NVIDIA GeForce RTX 3060 (12288 MB)"
    assert "no-nvidia-driver" not in _rules(report.findings)


def test_gpu_on_the_bus_that_this_python_cannot_ask(tmp_path: Path, bare_python: None) -> None:
    nothing = DriverAccess(path="", proc_version=tmp_path / "p" / "driver" / "nvidia" / "version")
    report = doctor(HostKind.A1111, probe_system(driver_access=nothing), env={}, pci=lambda: True)
    assert report.profile == UNKNOWN_SIZE_PROFILE != "cpu"
    assert "cannot read its memory" in report.profile_reason
    assert _rules(report.findings)["no-nvidia-driver"] == "info"  # unknown, not "missing or broken"
    assert report.hint is not None and "-m lib_optim doctor" in report.hint
    assert "--use-cpu" not in report.commandline


@needs_fake_smi
def test_a_driver_that_does_not_answer_is_an_error_but_still_no_cpu_profile(tmp_path: Path, bare_python: None) -> None:
    write_fake_nvidia_smi(tmp_path, fail=FAILED_DRIVER)
    system = probe_system(driver_access=DriverAccess(path=str(tmp_path), proc_version=tmp_path / "p" / "v"))
    report = doctor(HostKind.FORGE, system, env={}, pci=lambda: True)
    (finding,) = [f for f in report.findings if f.rule == "no-nvidia-driver"]
    assert finding.severity.value == "error"
    assert FAILED_DRIVER in finding.message
    assert report.profile != "cpu"


@pytest.mark.parametrize(
    ("system", "pci", "expected"),
    [
        (facts(), False, "cpu"),
        (facts(), None, "cpu"),  # not Linux and nothing seen: nothing says there is a GPU
        (facts(error="NVML: NVML Shared Library Not Found"), False, "cpu"),  # pynvml on a CPU-only box
        (facts(), True, UNKNOWN_SIZE_PROFILE),
        (facts(driver="550.54.14"), None, UNKNOWN_SIZE_PROFILE),  # /proc or nvidia-smi answered, size unknown
        (facts(gpus=(GpuInfo(0, "RTX 4090", "nvidia", 24564, None, (8, 9), "nvidia-smi"),)), None, "24gb"),
        (facts(gpus=(GpuInfo(0, "RTX 3070", "nvidia", 8192, None, None, "nvidia-smi"),)), True, "8gb-medium"),
    ],
)
def test_recommendation(system: SystemFacts, pci: bool | None, expected: str) -> None:
    assert recommend_profile(system, pci)[0] == expected


def test_which_python_to_run(tmp_path: Path) -> None:
    root = tmp_path / "stable-diffusion-webui"
    assert webui_python(root, windows=False) == f"{root}/venv/bin/python"
    assert webui_python(root, windows=True) == f"{root}\\venv\\Scripts\\python"
    assert webui_python(None, windows=False) == "<WebUI folder>/venv/bin/python"
    extension = root / "extensions" / "sd-webui-optim"
    hint = exact_figures_hint(facts(), None, root, extension)
    assert hint is not None
    assert "has no working torch" in hint
    if sys.platform != "win32":
        assert f'cd "{extension}" && "{root}/venv/bin/python" -m lib_optim doctor' in hint
    # A CPU torch where a GPU is present is not what the WebUI runs either; a CUDA torch is.
    assert exact_figures_hint(facts(torch=CPU_TORCH), True, root, extension) is not None
    assert exact_figures_hint(facts(torch=CPU_TORCH), False, root, extension) is None
    assert exact_figures_hint(facts(torch=CUDA_TORCH), True, root, extension) is None


# --- issue 15 §4: every command doctor prints runs ----------------------------------------------------------

_PLACEHOLDER = "<webui-user file>"
_COMMAND = re.compile(r"python -m lib_optim ([^()\n]*)")
_MACHINES = {
    "no-gpu": facts(torch=CPU_TORCH),
    "directml": dataclasses.replace(facts(torch=CPU_TORCH), directml=True),
    **{
        f"{gb}gb": facts(
            torch=CUDA_TORCH,
            gpus=(GpuInfo(0, f"GPU {gb} GB", "nvidia", gb * 1024, None, (8, 6), "nvidia-smi"),),
            driver="550.54",
        )
        for gb in (6, 8, 12, 16, 24)
    },
}


def _printed_commands(text: str, webui_user: Path) -> list[list[str]]:
    """Every ``python -m lib_optim …`` in doctor's output as argv, with the placeholder file replaced by
    ``webui_user``, one argv per alternative of ``--host a|b``, and --dry-run added where the command writes."""
    commands: list[list[str]] = []
    for match in _COMMAND.finditer(text):
        argv = shlex.split(match.group(1).rstrip(" .,;:").replace(_PLACEHOLDER, shlex.quote(str(webui_user))))
        variants = [argv]
        if "--host" in argv:
            i = argv.index("--host") + 1
            variants = [[*argv[:i], host, *argv[i + 1 :]] for host in argv[i].split("|")]
        for v in variants:
            writes = v[:2] in (["profile", "apply"], ["profile", "remove"])
            commands.append([*v, "--dry-run"] if writes and "--dry-run" not in v else v)
    return commands


@pytest.mark.parametrize("machine", list(_MACHINES))
@pytest.mark.parametrize("host", [*(h.value for h in HostKind), "auto"])
def test_every_command_doctor_prints_runs(
    host: str, machine: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # doctor on reForge used to recommend `profile apply …`, which then refused reForge (exit 64).
    import lib_optim.gpu
    import lib_optim.launch
    from lib_optim import cli

    monkeypatch.setattr(lib_optim.gpu, "probe_system", lambda *a, **k: _MACHINES[machine])
    monkeypatch.setattr(lib_optim.launch, "nvidia_on_pci_bus", lambda *a, **k: machine.endswith("gb"))
    for name in ("COMMANDLINE_ARGS", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)  # no WebUI checkout around: auto covers the fallback hosts
    webui_user = tmp_path / "webui-user.sh"
    webui_user.write_text("#!/bin/bash\n", encoding="utf-8")
    cli.main(["doctor", "--host", host])
    out = capsys.readouterr().out
    commands = _printed_commands(out, webui_user)
    # (none where the profile only sets per-generation defaults on this host)
    for argv in commands:
        rc = cli.main(argv)
        done = capsys.readouterr()
        assert rc == 0, (argv, done.out, done.err)
    assert webui_user.read_text(encoding="utf-8") == "#!/bin/bash\n"  # every write was a dry run
    if machine == "directml" and host not in ("a1111", "auto"):  # it writes the DirectML lines it showed
        assert any(argv[:2] == ["profile", "apply"] and "--directml" in argv for argv in commands), out


def test_doctor_reports_variables_from_the_generated_table() -> None:
    # Issue 15 §1: doctor runs the same checker; the probed torch decides which release's reads count
    env = {"TORCH_ALLOW_TF32": "1", "PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    report = doctor(HostKind.FORGE, facts(torch=CUDA_TORCH), env=env, pci=lambda: False)
    found = {f.subject: f for f in report.findings if f.rule == "no-effect-env"}
    assert set(found) == {"TORCH_ALLOW_TF32", "PYTORCH_ALLOC_CONF"}
    assert "torch 2.3.1+cu121 does not read PYTORCH_ALLOC_CONF" in found["PYTORCH_ALLOC_CONF"].message
    newer = TorchInfo("2.9.0+cu128", "12.8", None, True, False, 1)
    report = doctor(HostKind.FORGE, facts(torch=newer), env=env, pci=lambda: False)
    assert [f.subject for f in report.findings if f.rule == "no-effect-env"] == ["TORCH_ALLOW_TF32"]
