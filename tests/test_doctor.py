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


@needs_fake_smi
@pytest.mark.parametrize("pci", [True, None])  # None: not Linux, nothing else says a GPU is there
def test_a_hung_driver_is_an_error_and_a_gpu(tmp_path: Path, bare_python: None, pci: bool | None) -> None:
    write_fake_nvidia_smi(tmp_path, hang_s=60)
    access = DriverAccess(path=str(tmp_path), proc_version=tmp_path / "p" / "v", timeout_s=0.3)
    report = doctor(HostKind.A1111, probe_system(driver_access=access), env={}, pci=lambda: pci)
    (finding,) = [f for f in report.findings if f.rule == "no-nvidia-driver"]
    assert finding.severity.value == "error"
    assert "nvidia-smi did not answer within 0.3 s: the NVIDIA driver looks hung" in finding.message
    assert report.profile == UNKNOWN_SIZE_PROFILE
    assert report.profile_reason.startswith("the NVIDIA driver is hung")


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
    broken = TorchInfo("2.3.1", None, None, False, False, 0, error="DLL load failed")
    hint = exact_figures_hint(facts(torch=broken), None, root, extension)
    assert hint is not None
    assert "has no working torch" in hint
    if sys.platform != "win32":
        assert f'cd "{extension}" && "{root}/venv/bin/python" -m lib_optim doctor' in hint
    # A CPU torch where a GPU is present is not what the WebUI runs either; a CUDA torch is.
    assert exact_figures_hint(facts(torch=CPU_TORCH), True, root, extension) is not None
    assert exact_figures_hint(facts(torch=CPU_TORCH), False, root, extension) is None
    assert exact_figures_hint(facts(torch=CUDA_TORCH), True, root, extension) is None


# --- issue 15 §3: the GPU the WebUI will use, and which Python it runs ------------------------------------------


def test_this_python_has_no_torch_names_the_webuis_venv(tmp_path: Path) -> None:
    root = tmp_path / "stable-diffusion-webui"
    extension = root / "extensions" / "sd-webui-optim"
    here = sys.executable
    hint = exact_figures_hint(facts(), None, root, extension)  # torch=None: ModuleNotFoundError in this Python
    assert hint is not None
    assert "no working torch" not in hint
    assert hint.startswith(f"This Python ({here}) has no torch. The WebUI runs ")
    venv_python = webui_python(root)
    assert f"{venv_python} (its venv, not there yet: the WebUI creates it on its first start)" in hint
    assert f'"{venv_python}" -m lib_optim doctor' in hint
    # once the venv is there, it is named as such
    python = Path(f"{venv_python}.exe" if sys.platform == "win32" else venv_python)
    python.parent.mkdir(parents=True)
    python.write_text("")
    hint = exact_figures_hint(facts(), None, root, extension)
    assert hint is not None and f"{venv_python} (its venv), where its torch" in hint
    # the venv the webui-user file names (webui.sh's plain venv_dir, webui.bat's VENV_DIR)
    assert webui_python(root, windows=False, launcher_vars={"venv_dir": "/opt/sd-venv"}) == "/opt/sd-venv/bin/python"
    assert webui_python(root, windows=False, launcher_vars={"venv_dir": "venv310"}) == f"{root}/venv310/bin/python"
    assert (
        webui_python(root, windows=True, launcher_vars={"VENV_DIR": "D:\\venvs\\sd"})
        == "D:\\venvs\\sd\\Scripts\\python"
    )
    assert (
        webui_python(root, windows=False, launcher_vars={"venv_dir": "-", "python_cmd": "python3.10"}) == "python3.10"
    )
    hint = exact_figures_hint(facts(), None, root, extension, {"venv_dir": "/opt/sd-venv"})
    assert hint is not None and '"/opt/sd-venv/bin/python" -m lib_optim doctor' in hint


RTX_3060 = GpuInfo(
    0, "NVIDIA GeForce RTX 3060", "nvidia", 12288, 11000, (8, 6), "nvidia-smi", "GPU-3060aaaa-1", "00000000:01:00.0"
)
RTX_4090 = GpuInfo(
    1, "NVIDIA GeForce RTX 4090", "nvidia", 24564, 24000, (8, 9), "nvidia-smi", "GPU-4090bbbb-2", "00000000:02:00.0"
)
RTX_3090 = GpuInfo(
    1, "NVIDIA GeForce RTX 3090", "nvidia", 24576, 24000, (8, 6), "nvidia-smi", "GPU-3090cccc-3", "00000000:02:00.0"
)
# nvidia-smi lists the slower card first (PCI bus order); CUDA, fastest first, numbers the 4090 cuda:0.
TWO_GPUS = facts(torch=CUDA_TORCH, gpus=(RTX_3060, RTX_4090), driver="550.54.14")


def _doctor(host: HostKind, env: dict[str, str], args: tuple[str, ...] = (), system: SystemFacts = TWO_GPUS):
    return doctor(host, system, args=args, env=env, pci=lambda: True, probed_env={})


@pytest.mark.parametrize(
    ("host", "env", "args", "gpu", "profile"),
    [
        # CUDA numbers the fastest first unless CUDA_DEVICE_ORDER=PCI_BUS_ID (nvidia-smi's order)
        (HostKind.A1111, {}, (), RTX_4090, "24gb"),
        (HostKind.A1111, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, (), RTX_3060, "12gb"),
        (HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "1"}, (), RTX_3060, "12gb"),
        (HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, (), RTX_4090, "24gb"),
        (HostKind.FORGE, {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, (), RTX_3060, "12gb"),
        (HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "GPU-4090b"}, (), RTX_4090, "24gb"),  # a UUID prefix
        (HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "1,0"}, (), RTX_3060, "12gb"),
        # A1111's --device-id N runs on cuda:N among the GPUs CUDA shows
        (HostKind.A1111, {}, ("--device-id", "1"), RTX_3060, "12gb"),
        (HostKind.A1111, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, ("--device-id", "1"), RTX_4090, "24gb"),
        (HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "1,0"}, ("--device-id", "1"), RTX_4090, "24gb"),
        # Forge sets CUDA_VISIBLE_DEVICES from --gpu-device-id (replacing the user's); --device-id does nothing there
        (HostKind.FORGE, {"CUDA_VISIBLE_DEVICES": "0"}, ("--gpu-device-id", "1"), RTX_3060, "12gb"),
        (HostKind.FORGE_PREVIOUS, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, ("--gpu-device-id", "1"), RTX_4090, "24gb"),
        (HostKind.FORGE, {}, ("--device-id", "1"), RTX_4090, "24gb"),
        (HostKind.REFORGE, {}, ("--cuda-device", "1"), RTX_3060, "12gb"),
    ],
)
def test_the_recommendation_is_for_the_gpu_the_webui_uses(
    host: HostKind, env: dict[str, str], args: tuple[str, ...], gpu: GpuInfo, profile: str
) -> None:
    report = _doctor(host, env, args)
    assert report.gpu is not None and report.gpu.gpu == gpu
    assert report.profile == profile
    assert report.profile_reason == f"for the {gpu.name} ({gpu.total_mb} MB)"
    lines = report.gpu_lines()
    assert lines[0].startswith(f"WebUI will use: GPU {gpu.index} ({gpu.name}, {gpu.total_mb} MB) — because ")
    (other,) = [g for g in TWO_GPUS.gpus if g != gpu]
    assert lines[1].startswith(f"Other GPU:      GPU {other.index} ({other.name}, {other.total_mb} MB): ")
    assert report.to_dict()["gpu"]["index"] == gpu.index


def test_doctor_says_why_that_gpu() -> None:
    fastest = _doctor(HostKind.A1111, {}).gpu_lines()
    assert fastest == [
        "WebUI will use: GPU 1 (NVIDIA GeForce RTX 4090, 24564 MB) — because the WebUI runs on cuda:0, the first "
        "GPU CUDA shows; CUDA numbers the fastest GPU first unless CUDA_DEVICE_ORDER=PCI_BUS_ID: its device 0 is "
        "GPU 1 (sm 8.9), 1 is GPU 0 (sm 8.6), ranking by compute capability, then memory; set "
        "CUDA_DEVICE_ORDER=PCI_BUS_ID to number them as nvidia-smi does",
        "Other GPU:      GPU 0 (NVIDIA GeForce RTX 3060, 12288 MB): cuda:1, not used by the WebUI",
    ]
    hidden = _doctor(HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}).gpu_lines()
    assert "CUDA_VISIBLE_DEVICES=1 shows GPU 1 as cuda:0" in hidden[0]
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID numbers the GPUs as nvidia-smi does" in hidden[0]
    assert hidden[1].endswith(
        "GPU 0 (NVIDIA GeForce RTX 3060, 12288 MB): hidden from the WebUI by CUDA_VISIBLE_DEVICES=1"
    )
    forge = _doctor(HostKind.FORGE, {"CUDA_VISIBLE_DEVICES": "0"}, ("--gpu-device-id", "1")).gpu_lines()[0]
    assert (
        "--gpu-device-id 1 makes WebUI Forge f2 set CUDA_VISIBLE_DEVICES=1 (replacing your '0') and run on cuda:0"
        in forge
    )
    ignored = _doctor(HostKind.FORGE, {}, ("--device-id", "1")).gpu_lines()[0]
    assert (
        "WebUI Forge f2 does not use --device-id 1 to pick the GPU (its flag is --gpu-device-id); the WebUI runs on "
        "cuda:0, the first GPU CUDA shows; " in ignored
    )


def test_a_gpu_that_does_not_exist_or_is_hidden() -> None:
    none_visible = _doctor(HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "-1"})
    assert none_visible.gpu is not None and none_visible.gpu.gpu is None
    assert none_visible.gpu_lines()[0] == (
        "WebUI will use: no GPU — because the WebUI runs on cuda:0, the first GPU CUDA shows; "
        "CUDA_VISIBLE_DEVICES=-1 shows no GPU (CUDA stops at '-1' (not a device number or GPU UUID)); "
        "CUDA shows no GPU, so the WebUI cannot run on one"
    )
    # an invalid entry ends the list, as in CUDA
    stops = _doctor(HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "0,7,1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"})
    assert stops.gpu is not None and stops.gpu.gpu == RTX_3060
    assert "CUDA_VISIBLE_DEVICES=0,7,1 shows GPU 0 as cuda:0 (CUDA stops at '7' (there is no device 7))" in (
        stops.gpu.reason
    )
    mig = _doctor(HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "MIG-4090bbbb/1/0"})
    assert mig.gpu is not None and mig.gpu.gpu is None and "names a MIG instance" in mig.gpu.reason
    assert mig.profile == "24gb"  # which card is unknown: the old answer, the largest
    missing = _doctor(HostKind.A1111, {}, ("--device-id", "2"))
    assert missing.gpu is not None and missing.gpu.gpu is None
    assert "CUDA shows 2 GPU(s), so there is no cuda:2: torch fails with 'invalid device ordinal'" in missing.gpu.reason


def test_cards_cuda_may_rank_either_way_get_the_smaller_profile() -> None:
    # 3060 and 3090 are both sm 8.6: CUDA's speed heuristic decides, which the probe cannot read
    report = _doctor(HostKind.A1111, {}, system=facts(torch=CUDA_TORCH, gpus=(RTX_3060, RTX_3090)))
    assert report.gpu is not None and report.gpu.gpu == RTX_3090 and report.gpu.maybe == (RTX_3060,)
    assert report.profile == "12gb"
    assert report.profile_reason == "for the NVIDIA GeForce RTX 3060 (12288 MB) (the smallest the WebUI may run on)"
    assert "it may be GPU 0 (sm 8.6) instead" in report.gpu.reason
    assert report.gpu_lines()[1].endswith(": cuda:1, not used by the WebUI — unless CUDA ranks it the other way")
    hidden = _doctor(HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "1"}, system=report.system)
    assert hidden.gpu is not None and hidden.gpu.gpu == RTX_3060 and hidden.gpu.maybe == (RTX_3090,)
    assert hidden.profile == "12gb"
    assert hidden.gpu_lines()[1].endswith(
        "hidden from the WebUI by CUDA_VISIBLE_DEVICES=1 — unless CUDA ranks it the other way"
    )
    # with PCI_BUS_ID the numbering is nvidia-smi's, and certain
    sure = _doctor(HostKind.A1111, {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}, system=report.system)
    assert sure.gpu is not None and sure.gpu.gpu == RTX_3060 and sure.gpu.maybe == ()


def test_one_gpu_and_nothing_chosen_prints_nothing_more() -> None:
    one = facts(torch=CUDA_TORCH, gpus=(RTX_3060,))
    assert _doctor(HostKind.A1111, {}, system=one).gpu_lines() == []
    assert (
        _doctor(HostKind.A1111, {"CUDA_VISIBLE_DEVICES": "0"}, system=one)
        .gpu_lines()[0]
        .startswith("WebUI will use: GPU 0 (NVIDIA GeForce RTX 3060, 12288 MB) — because ")
    )


def test_gpus_listed_by_torch_follow_the_probes_own_variables() -> None:
    # Only torch could list the GPUs: its list is CUDA's numbering under the probing process's variables.
    a = dataclasses.replace(RTX_4090, index=0, source="torch", uuid=None, pci_bus_id=None)
    b = dataclasses.replace(RTX_3060, index=1, source="torch", uuid=None, pci_bus_id=None)
    system = dataclasses.replace(facts(torch=CUDA_TORCH, gpus=(a, b)), gpu_source="torch")
    report = doctor(HostKind.A1111, system, env={"CUDA_VISIBLE_DEVICES": "1"}, pci=lambda: True, probed_env={})
    assert report.gpu is not None and report.gpu.gpu == b
    same = doctor(
        HostKind.A1111,
        system,
        env={"CUDA_VISIBLE_DEVICES": "1"},
        pci=lambda: True,
        probed_env={"CUDA_VISIBLE_DEVICES": "1"},
    )
    assert same.gpu is not None and same.gpu.gpu == a  # torch already showed only that one, as cuda:0
    other = doctor(
        HostKind.A1111,
        system,
        env={"CUDA_VISIBLE_DEVICES": "1"},
        pci=lambda: True,
        probed_env={"CUDA_VISIBLE_DEVICES": "0"},
    )
    assert other.gpu is not None and other.gpu.gpu is None
    assert "run it with the WebUI's" in other.gpu.reason


@needs_fake_smi
def test_doctor_reads_the_gpu_choice_from_the_webui_user_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import lib_optim.launch
    from lib_optim import cli
    from lib_optim.gpu import nvidia_smi

    write_fake_nvidia_smi(
        tmp_path / "bin",
        [
            ("NVIDIA GeForce RTX 3060", 12288, 11893, "550.54.14", "8.6"),
            ("NVIDIA GeForce RTX 4090", 24564, 24000, "550.54.14", "8.9"),
        ],
    )
    monkeypatch.setitem(sys.modules, "pynvml", None)
    monkeypatch.setattr(
        nvidia_smi, "DEFAULT_DRIVER_ACCESS", DriverAccess(path=str(tmp_path / "bin"), proc_version=tmp_path / "p" / "v")
    )
    monkeypatch.setattr(lib_optim.launch, "nvidia_on_pci_bus", lambda *a, **k: True)
    for name in ("COMMANDLINE_ARGS", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER"):
        monkeypatch.delenv(name, raising=False)
    webui_user = tmp_path / "webui-user.sh"
    webui_user.write_text(
        '#!/bin/bash\nexport CUDA_VISIBLE_DEVICES=1\nexport COMMANDLINE_ARGS="--xformers"\n', encoding="utf-8"
    )
    cli.main(["doctor", "--host", "a1111", "--file", str(webui_user)])
    out = capsys.readouterr().out
    assert "WebUI will use: GPU 0 (NVIDIA GeForce RTX 3060, 12288 MB) — because " in out
    assert (
        "Other GPU:      GPU 1 (NVIDIA GeForce RTX 4090, 24564 MB): hidden from the WebUI by CUDA_VISIBLE_DEVICES=1"
        in out
    )
    assert "Recommended profile: 12gb (for the NVIDIA GeForce RTX 3060 (12288 MB))" in out


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
