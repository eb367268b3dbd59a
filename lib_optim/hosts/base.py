"""What the host adapters share: host modules by name, the device the host generates on, and the
per-generation helpers every adapter uses (regional compile, tiled VAE, the ``auto`` attention request).

:class:`lib_optim.adapter.HostAdapter` is the interface; :class:`HostBase` is the implementation the four adapters
inherit (:mod:`lib_optim.hosts.a1111`, :mod:`~lib_optim.hosts.forge`, :mod:`~lib_optim.hosts.ldm_patched`).
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

from lib_optim import compile as regional_compile
from lib_optim import vae
from lib_optim.adapter import HostAdapter, NotSupportedHere, Session
from lib_optim.log import get_logger

log = get_logger(__name__)

# The attribute of the compile warm-up's stand-in for a generation (lib_optim.hosts.warmup.WarmupProcessing): its
# between-blocks check, which replaces the host's Interrupt/Skip check in the compile application it gets.
WARMUP_INTERRUPT = "optim_warmup_interrupt"


def unet_family(sd_model: Any) -> str | None:
    """``sdxl`` or ``sd`` (SD1.x/SD2.x) for the UNet models the compile warm-up runs, from the flags every host sets on
    its model (A1111 ``modules/sd_models.py`` ``set_model_type``, Forge f2's diffusion engines; docs/hosts.md §6.11);
    None for any other (Flux, SD3…)."""
    if getattr(sd_model, "is_sdxl", False):
        return "sdxl"
    if getattr(sd_model, "is_sd1", False) or getattr(sd_model, "is_sd2", False):
        return "sd"
    return None


def warmup_region(p: Any, region: Any) -> Any:
    """``region`` (a :class:`lib_optim.compile.CompileRegion` or None) with the compile warm-up's between-blocks
    check in place of the host's Interrupt/Skip check when ``p`` is the warm-up's stand-in (:data:`WARMUP_INTERRUPT`);
    else ``region`` as it is."""
    check = getattr(p, WARMUP_INTERRUPT, None)
    if check is None:
        return region
    return dataclasses.replace(region or regional_compile.CompileRegion(), interrupt=check)


class HostModules:
    """Host modules by name: injected ones first (tests), then ``sys.modules``, then an import.

    Adapters import host code lazily through this, so lib_optim imports without a WebUI present.
    """

    def __init__(self, modules: Mapping[str, Any] | None = None) -> None:
        self._injected = dict(modules or {})

    def get(self, name: str, *, import_: bool = True) -> Any:
        if name in self._injected:
            return self._injected[name]
        module = sys.modules.get(name)
        if module is not None or not import_:
            return module
        try:
            return importlib.import_module(name)
        except ImportError:
            return None

    def loaded(self, name: str) -> Any:
        """The module if it is already imported (never imports: importing host code can have effects)."""
        return self.get(name, import_=False)


class HostBase(HostAdapter):
    """The shared part of every real host adapter (tests' fakes implement :class:`HostAdapter` directly)."""

    def generation_device_type(self) -> str | None:
        """``cpu``/``cuda``/… of the host's ``modules.devices.device`` (every host has it), None before it is set."""
        device = getattr(sys.modules.get("modules.devices"), "device", None)
        return getattr(device, "type", None) if device is not None else None

    _modules: HostModules

    def compile_blocks(
        self,
        session: Session,
        root: Any,
        *,
        key: Any,
        device: Any,
        blocks: Any = None,
        label: str = "UNet",
        p: Any = None,
        region: Any = None,
    ) -> None:
        """:func:`lib_optim.compile.compile_blocks` for this adapter's ``apply_compile``, with the compiler and the
        ``auto`` planner the wing's face gives now, and the job of the generation ``p`` (:func:`compile_job`).
        ``region``: the host's :class:`lib_optim.compile.CompileRegion`. For the compile warm-up's stand-in ``p``
        (:data:`WARMUP_INTERRUPT`) its check replaces the host's Interrupt/Skip check and nothing is measured for
        ``auto`` (no job: the warm-up is no generation)."""
        job = None
        if getattr(p, WARMUP_INTERRUPT, None) is not None:
            region = warmup_region(p, region)
        elif p is not None:
            job = compile_job(
                p, session, self._modules.loaded("modules.devices"), self._modules.loaded("modules.shared")
            )
        regional_compile.compile_blocks(
            session,
            root,
            key=key,
            device=device,
            blocks=blocks,
            label=label,
            compiler=regional_compile.get_compiler(),
            job=job,
            planner=regional_compile.get_auto_planner(),
            region=region,
        )

    def compile_vae(self, session: Session, vae: Any, *, key: Any, region: Any = None, p: Any = None) -> None:
        """:func:`lib_optim.compile.compile_vae_blocks` for this adapter's ``apply_compile`` (after the UNet's); for
        the compile warm-up's stand-in ``p`` its check replaces the host's Interrupt/Skip check, as for the UNet."""
        regional_compile.compile_vae_blocks(
            session, vae, key=key, compiler=regional_compile.get_compiler(), region=warmup_region(p, region)
        )

    def decode_latents(
        self, sd_model: Any, width: int, height: int, batch: int, *, channels: int, grad_mode: Any
    ) -> Callable[[], None]:
        """The compile warm-up's decode (:meth:`lib_optim.adapter.HostAdapter.warmup_decode`): the host's own
        ``processing.decode_latent_batch`` — what its txt2img calls after sampling, which decodes one image at a time
        (A1111 ``modules/processing.py:625-632``) or the batch at once (Forge f2 ``:628-630``, Forge previous
        ``:634-636``, reForge ``:744-746``; docs/hosts.md §6.11) — on float32 zeros of the sampled batch's shape,
        under ``grad_mode()`` (the host's: A1111 ``torch.no_grad``, the Forges ``torch.inference_mode``)."""
        processing = self._modules.get("modules.processing")
        devices = self._modules.get("modules.devices")
        decode = getattr(processing, "decode_latent_batch", None)
        if decode is None or devices is None:
            raise NotSupportedHere("[Optim] compile warm-up: modules.processing.decode_latent_batch is missing")

        def run() -> None:
            import torch

            with grad_mode():
                x = torch.zeros((batch, channels, height // 8, width // 8), device=devices.device, dtype=torch.float32)
                decode(sd_model, x, target_device=getattr(devices, "cpu", torch.device("cpu")), check_for_nans=False)

        return run

    def tiled_vae_fits(self, p: Any) -> bool | None:
        """Whether the decode of ``p``'s largest image, in the smallest tiles, is predicted to fit in the free memory
        of the device the host generates on (the out-of-memory retry prefers tiling to the CPU then); None when
        that cannot be told (no torch, no device yet)."""
        try:
            import torch

            from lib_optim.attention import free_memory_bytes

            devices = sys.modules.get("modules.devices")
            request = auto_attention_request(p, devices)
            device = torch.device(getattr(devices, "device", None) or "cpu")
            return vae.tiled_vae_fits(request, free_memory_bytes(device))
        except (ImportError, RuntimeError, OSError, ValueError, AssertionError):
            log.debug("tiled VAE fit unknown", exc_info=True)
            return None


def hires_size(width: int, height: int, scale: float, resize_x: int, resize_y: int) -> tuple[int, int]:
    """The hires pass's size, as ``calculate_target_resolution`` computes it (docs/hosts.md
    §7.2): ``hr_scale`` when no resize is given; one
    resize side keeps the aspect ratio; both: the image is scaled to cover them (then cropped)."""
    if resize_x == 0 and resize_y == 0:
        return int(width * scale), int(height * scale)
    if resize_y == 0:
        return resize_x, resize_x * height // width
    if resize_x == 0:
        return resize_y * width // height, resize_y
    if width / height < resize_x / resize_y:
        return resize_x, resize_x * height // width
    return resize_y * width // height, resize_y


def auto_attention_request(p: Any, devices: Any, *, budget_mb: int | None = None) -> dict[str, Any]:
    """The keyword arguments of :func:`lib_optim.attention.planner.choose_auto_attention` for the generation ``p``.

    - size: the largest pass's — with hires fix :func:`hires_size` (the host computes ``hr_upscale_to_x/y``
      only in ``p.init()``, after the scripts' ``process``), and the batch size;
    - family: ``sdxl`` when ``p.sd_model.is_sdxl`` (docs/hosts.md §6.1, §6.3), else ``sd15``;
    - device and compute dtype: ``modules.devices.device`` and ``dtype_unet`` (docs/hosts.md §4.1,
      §4.2), so a CPU run is planned with the CPU formulas and speed table;
    - free memory on that device as the hosts count it (:func:`lib_optim.attention.impl.free_memory_bytes`),
      and ``budget_mb`` (Forge: its inference memory, what it keeps free for sampling).
    """
    import torch

    from lib_optim.attention import free_memory_bytes

    width = int(getattr(p, "width", 512) or 512)
    height = int(getattr(p, "height", 512) or 512)
    if getattr(p, "enable_hr", False):
        hires = hires_size(
            width,
            height,
            float(getattr(p, "hr_scale", 1) or 1),
            int(getattr(p, "hr_resize_x", 0) or 0),
            int(getattr(p, "hr_resize_y", 0) or 0),
        )
        width, height = max(width, hires[0]), max(height, hires[1])
    device = torch.device(getattr(devices, "device", None) or "cpu")
    dtype = getattr(devices, "dtype_unet", None)
    dtype_bytes = dtype.itemsize if isinstance(dtype, torch.dtype) else (4 if device.type == "cpu" else 2)
    free_mb: int | None = None
    try:
        free_mb = free_memory_bytes(device) // (1 << 20)
    except (RuntimeError, OSError, ValueError, AssertionError):  # torch without this device's support
        log.debug("free memory on %s unknown: auto plans without a memory limit", device, exc_info=True)
    return {
        "width": width,
        "height": height,
        "batch": int(getattr(p, "batch_size", 1) or 1),
        "family": "sdxl" if getattr(getattr(p, "sd_model", None), "is_sdxl", False) else "sd15",
        "device": "cpu" if device.type == "cpu" else "cuda",
        "dtype_bytes": dtype_bytes,
        "free_mb": free_mb,
        "budget_mb": budget_mb if device.type != "cpu" else None,
    }


def job_images(p: Any, state: Any) -> int:
    """The images the job ahead makes, as the hosts count jobs (one job = one batch of ``batch_size`` images; all
    four hosts alike, docs/hosts.md §7.7): ``state.job_count`` is -1 when our ``process`` hook runs for a single
    generation, or the whole X/Y/Z grid's (or img2img batch's) job count, of which ``state.job_no`` are done;
    a hires job counts twice once the first cell's ``init`` refined the count."""
    batch = max(1, int(getattr(p, "batch_size", 1) or 1))
    jobs = max(1, int(getattr(p, "n_iter", 1) or 1))
    count = getattr(state, "job_count", -1)
    done = getattr(state, "job_no", 0)
    if isinstance(count, int) and isinstance(done, int) and count > 0:
        left = count - done
        if getattr(p, "enable_hr", False) and getattr(state, "processing_has_refined_job_count", False):
            left //= 2
        jobs = max(jobs, left)
    return jobs * batch


def compile_job(p: Any, session: Session, devices: Any, shared: Any) -> Any:
    """The :class:`lib_optim.compile.AutoJob` of the generation ``p`` — its largest pass's size, batch, family,
    device and free memory (:func:`auto_attention_request`), steps (a hires job: the hires steps at the hires size
    plus the first pass's, docs/hosts.md §7.2), images (:func:`job_images`), the model's hash (``p.sd_model_hash``,
    set before the ``process`` hook, §7.7), the attention that runs and the UNet's dtype; None when it cannot be
    told (then ``auto`` runs eagerly)."""
    try:
        import torch

        request = auto_attention_request(p, devices)
        steps = max(1, int(getattr(p, "steps", 20) or 20))
        first_pass = None
        if getattr(p, "enable_hr", False):
            hires_steps = int(getattr(p, "hr_second_pass_steps", 0) or 0) or steps
            first_pass = (int(getattr(p, "width", 512) or 512), int(getattr(p, "height", 512) or 512), steps)
            steps = hires_steps
        model = getattr(p, "sd_model_hash", None) or getattr(getattr(p, "sd_model", None), "sd_model_hash", None)
        dtype = getattr(devices, "dtype_unet", None)
        return regional_compile.make_job(
            request,
            device=torch.device(getattr(devices, "device", None) or "cpu"),
            steps=steps,
            images=job_images(p, getattr(shared, "state", None)),
            model=str(model or ""),
            attention=session.attention_used,
            dtype=str(dtype).removeprefix("torch.") if dtype is not None else "",
            first_pass=first_pass,
        )
    except (ImportError, RuntimeError, OSError, ValueError, TypeError) as exc:
        log.debug("compile auto: the job is unknown (%s)", exc, exc_info=True)
        return None
