"""Facts about this machine: Python, torch, xFormers, GPUs.

Every probe here must survive a missing or broken component: the whole point is to explain a broken
install, so a failure becomes a readable note in the result instead of an exception. Heavy modules
(torch, pynvml) are imported inside the functions so that ``import lib_optim.gpu.probe`` stays cheap.

This module puts the probes together (:func:`probe_system`); each lives in its own module of the wing:
:mod:`lib_optim.gpu.facts` (what is found, as dataclasses), :mod:`lib_optim.gpu.torch_probe`,
:mod:`lib_optim.gpu.nvml`, :mod:`lib_optim.gpu.nvidia_smi` (nvidia-smi and ``/proc``) and
:mod:`lib_optim.gpu.xformers_build`.
"""

from __future__ import annotations

import platform
from typing import Literal

from lib_optim.gpu.facts import DriverReply, GpuInfo, SystemFacts, TorchInfo, XformersInfo, _dist_version
from lib_optim.gpu.nvidia_smi import DEFAULT_DRIVER_ACCESS, DriverAccess, probe_nvidia_smi, read_proc_driver_version
from lib_optim.gpu.nvml import _ask_nvml, probe_nvml
from lib_optim.gpu.torch_probe import _torch_gpus, probe_torch
from lib_optim.gpu.xformers_build import probe_xformers, torch_build_matches


def probe_system(
    *,
    use_nvml: bool = True,
    use_torch: bool = True,
    allow_cuda_init: bool = True,
    driver_access: DriverAccess | None = None,
) -> SystemFacts:
    """Gather everything; never raises for a missing or broken component.

    GPUs come from NVML first (no CUDA initialisation, exact driver view), then ``nvidia-smi`` (the same
    driver, for a Python without pynvml), then torch, then none. The driver version also comes from the
    kernel module (``/proc``) when nothing else can ask. ``allow_cuda_init=False`` keeps torch from
    initialising CUDA (A1111's preload runs before the host does); torch then reports only availability
    and device count. ``driver_access``: where nvidia-smi and /proc are (default
    :data:`lib_optim.gpu.nvidia_smi.DEFAULT_DRIVER_ACCESS`).
    """
    notes: list[str] = []
    torch_info: TorchInfo | None = None
    if use_torch:
        torch_info = probe_torch(notes)
    else:
        notes.append("torch not probed (use_torch=False)")

    gpus: list[GpuInfo] = []
    gpu_source: Literal["nvml", "nvidia-smi", "torch", "none"] = "none"
    replies: list[tuple[Literal["nvml", "nvidia-smi", "proc"], DriverReply]] = []
    if use_nvml:
        nvml = _ask_nvml(notes)
        if nvml is not None:
            replies.append(("nvml", nvml))
            if nvml.gpus:
                gpus, gpu_source = list(nvml.gpus), "nvml"
            elif nvml.error is None:
                notes.append("NVML found no GPU")
        if not gpus:
            smi = probe_nvidia_smi(notes, driver_access)
            if smi is not None:
                replies.append(("nvidia-smi", smi))
                if smi.gpus:
                    gpus, gpu_source = list(smi.gpus), "nvidia-smi"
        if not any(reply.driver for _, reply in replies) and not any(reply.error for _, reply in replies):
            # Nothing could ask the driver itself: the kernel module at least says whether it is loaded.
            proc = read_proc_driver_version(driver_access)
            if proc is not None:
                replies.append(("proc", proc))
    answered = next(((source, reply) for source, reply in replies if reply.driver), None)
    nvidia_driver = answered[1].driver if answered else None
    driver_source = answered[0] if answered else None
    driver_error = None if answered else next((reply.error for _, reply in replies if reply.error), None)
    if not gpus and use_torch:
        gpus = _torch_gpus(torch_info, notes, allow_cuda_init=allow_cuda_init)
        if gpus:
            gpu_source = "torch"

    if torch_info is not None and torch_info.error is None:
        installed_torch = torch_info.version
    else:
        # Without a usable torch import, the metadata still tells which torch xFormers must match.
        installed_torch = _dist_version("torch")
    xformers = probe_xformers(installed_torch, torch_cuda=torch_info.cuda if torch_info is not None else None)
    if xformers is not None and xformers.matches_torch is False:
        notes.append(f"xFormers does not match torch: {xformers.reason}")

    return SystemFacts(
        python=platform.python_version(),
        platform=platform.platform(),
        torch=torch_info,
        xformers=xformers,
        directml=_dist_version("torch-directml") is not None,
        gradio=_dist_version("gradio"),
        nvidia_driver=nvidia_driver,
        gpus=tuple(gpus),
        gpu_source=gpu_source,
        notes=tuple(notes),
        nvidia_driver_error=driver_error,
        nvidia_driver_source=driver_source,
        nvidia_driver_hung=any(reply.hung for _, reply in replies),
    )


__all__ = [
    "DEFAULT_DRIVER_ACCESS",
    "DriverAccess",
    "DriverReply",
    "GpuInfo",
    "SystemFacts",
    "TorchInfo",
    "XformersInfo",
    "probe_nvidia_smi",
    "probe_nvml",
    "probe_system",
    "probe_torch",
    "probe_xformers",
    "read_proc_driver_version",
    "torch_build_matches",
]
