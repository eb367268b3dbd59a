"""The one interface every host adapter implements. Host-free: this module imports no host code (adapters live
in :mod:`lib_optim.hosts`; the runtime, the UI and the benchmark only know this interface).

Lifecycle of one ``process_images(p)`` call, driven by the script (scripts/optim.py):

``begin(p, settings)``          from ``process`` (after the host's model (re)load, before ``p.init()``
                                encodes img2img inputs) — validates once, then applies what holds for the
                                whole generation, field by field in :data:`~lib_optim.settings.FIELDS` order
                                (``apply_<field>`` methods), into one :class:`~lib_optim.patching.Restorer`;
``before_sampling(p, session)`` from ``process_before_every_sampling`` — re-applies what the host resets
                                before each sampler call (Forge rebuilds ``p.sd_model.forge_objects``);
                                must be idempotent (Forge calls it twice in the hires pass);
``session.restorer.close()``    from ``postprocess`` and from the ``p.close()`` wrapper — whichever
                                comes first restores, the other is a no-op.
"""

from __future__ import annotations

import abc
import contextlib
import importlib
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lib_optim.attention import Attention
from lib_optim.host_specs import HostKind
from lib_optim.log import get_logger
from lib_optim.patching import Restorer, patched_attr
from lib_optim.settings import SETTING_FIELDS, GenerationSettings, VaeTiling

log = get_logger(__name__)


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


class NotSupportedHere(ValueError):
    """A setting this host or install cannot do; the message names the field, value and what is allowed."""


@dataclass(frozen=True)
class BackendInfo:
    attention: Attention
    available: bool
    host_name: str  # what the host calls it ("Doggettx", "attention_split", ...); "" if none
    reason: str = ""  # why it is unavailable (and how to fix that), or a note when available


@dataclass(frozen=True)
class EffectiveState:
    """What the host is doing right now (between generations: the host's own state)."""

    host: HostKind
    attention: str  # the host's name of the active attention implementation
    unet_channels_last: bool | None  # None when no model is loaded
    vae_device: str | None
    vae_dtype: str | None
    inference_memory_mb: int | None  # Forge only
    model_loaded: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "host": self.host.value,
            "attention": self.attention,
            "unet_channels_last": self.unet_channels_last,
            "vae_device": self.vae_device,
            "vae_dtype": self.vae_dtype,
            "inference_memory_mb": self.inference_memory_mb,
            "model_loaded": self.model_loaded,
            **self.extra,
        }


@dataclass
class Session:
    """One generation's applied settings."""

    settings: GenerationSettings
    restorer: Restorer
    attention_used: str = ""  # what ran, in our names where we know it ("sdp"), for infotext/status
    data: dict[str, Any] = field(default_factory=dict)  # adapter-private per-generation values


Applier = Callable[[Any, GenerationSettings, "Session"], None]


class HostAdapter(abc.ABC):
    """A host's way of applying the settings. Subclasses implement the readers below and one
    ``apply_<field>(p, settings, session)`` method per field they support; :meth:`begin` does the rest."""

    kind: HostKind

    @abc.abstractmethod
    def version(self) -> str:
        """The host's version string (as its infotext shows it)."""

    @abc.abstractmethod
    def attention_backends(self) -> list[BackendInfo]:
        """Every attention name of :class:`Attention` this host understands, with availability."""

    @abc.abstractmethod
    def effective_state(self) -> EffectiveState: ...

    @abc.abstractmethod
    def current_attention_name(self) -> str:
        """What the host calls the attention it runs now (before anything of ours is applied)."""

    def supported_fields(self) -> tuple[str, ...]:
        """The GenerationSettings fields this host can apply here (the UI hides the others): ``enabled`` and
        every field with an ``apply_<field>`` method."""
        return ("enabled", *(spec.name for spec in SETTING_FIELDS if self._applier(spec.name) is not None))

    # Fields that only move things off or around a GPU: on a CPU-only host they can change nothing.
    gpu_only_fields: tuple[str, ...] = ()

    def meaningful_fields(self) -> tuple[str, ...]:
        """The supported fields that can change anything on the device this host generates on: the UI shows
        these and the benchmark varies them (on the CPU, VAE placement and GPU memory budgets cannot)."""
        on_cpu = self.generation_device_type() == "cpu"
        return tuple(f for f in self.supported_fields() if not (on_cpu and f in self.gpu_only_fields))

    def generation_device_type(self) -> str | None:
        """``cpu``/``cuda``/… of the host's ``modules.devices.device`` (every host has it), None before it is set."""
        device = getattr(sys.modules.get("modules.devices"), "device", None)
        return getattr(device, "type", None) if device is not None else None

    def _applier(self, name: str) -> Applier | None:
        fn = getattr(self, f"apply_{name}", None)
        return fn if callable(fn) else None

    def total_memory_mb(self) -> int | None:
        """The GPU memory the host generates with, when it has one (sizes the UI's memory sliders)."""
        return None

    def attention_label(self, host_name: str) -> str:
        """Our name for what the host calls ``host_name`` (``attention_pytorch``, ``Doggettx``, ``sdp - scaled dot
        product`` → ``sdp``/``split``), so the UI speaks one vocabulary; the host's name when we have none."""
        low = host_name.strip().lower()
        if not low:
            return host_name
        for b in self.attention_backends():
            if b.attention in (Attention.HOST, Attention.AUTO) or not b.host_name:
                continue
            names = {b.host_name.lower(), b.host_name.split(" - ")[0].lower(), b.attention.value}
            if low in names:
                return b.attention.value
        return host_name

    def available_attention(self) -> list[Attention]:
        return [b.attention for b in self.attention_backends() if b.available]

    def validate(self, settings: GenerationSettings) -> None:
        """Raise :class:`NotSupportedHere` for a setting that cannot be applied here; change nothing."""
        if settings.attention is not Attention.HOST and settings.attention is not Attention.AUTO:
            backends = self.attention_backends()
            info = {b.attention: b for b in backends}.get(settings.attention)
            if info is None or not info.available:
                allowed = ", ".join(b.attention.value for b in backends if b.available)
                why = f" ({info.reason})" if info is not None and info.reason else ""
                raise NotSupportedHere(
                    f"[Optim] attention: {settings.attention.value!r} is not available here{why}; allowed: {allowed}"
                )

    def begin(self, p: Any, settings: GenerationSettings) -> Session:
        """Apply ``settings`` for the generation of ``p``: validate once (everything that can refuse does so
        before anything changes), then each changed field's ``apply_<field>``, in :data:`FIELDS` order, into
        one Restorer. On failure everything applied so far is restored and the error re-raised. A field this
        host cannot apply is reported and skipped."""
        session = Session(settings=settings, restorer=Restorer(f"{self.kind.display_name} generation"))
        session.attention_used = self.attention_label(self.current_attention_name())
        if not settings.changes_anything:
            return session
        self.validate(settings)
        try:
            for spec in SETTING_FIELDS:
                if getattr(settings, spec.name) == spec.default:
                    continue
                apply = self._applier(spec.name)
                if apply is None:
                    log.warning("%s: not supported on %s; ignored", spec.name, self.kind.display_name)
                    continue
                apply(p, settings, session)
        except BaseException:
            with contextlib.suppress(Exception):  # Restorer.close logs its own failures
                session.restorer.close()
            raise
        return session

    def compile_blocks(
        self, session: Session, root: Any, *, key: Any, device: Any, blocks: Any = None, label: str = "UNet"
    ) -> None:
        """Regional ``torch.compile`` of ``root``'s repeated blocks for this generation (lib_optim.compile.regional;
        what it relies on in each host: docs/hosts.md §6.9),
        shared by every adapter: ``key`` must identify what the blocks read that torch does not guard — the
        attention implementation above all. Cannot compile here (no C++ compiler, no triton, DirectML…): one
        line naming the fix, the generation runs eagerly, and the reason goes to ``session.data``."""
        from lib_optim.compile import default_block_names, get_compiler

        mode = session.settings.compile.value
        compiler = get_compiler()
        ok, why = compiler.availability(device, mode)
        if not ok:
            session.data["compile_unavailable"] = why
            log.warning("compile: not available here, this generation runs without it: %s", why)
            return
        known = compiler.failure(root, key, mode)
        if known:
            session.data["compile_unavailable"] = f"failed before for this model and attention: {known}"
            log.info("compile: skipped (it %s)", session.data["compile_unavailable"])
            return
        names = blocks if blocks is not None else (*default_block_names("sd"), *default_block_names("flux"))
        application = session.restorer.enter(compiler.apply(root, names, key=key, mode=mode))
        session.data["compile"] = application
        session.restorer.notes.append(f"{label} blocks compiled ({mode}, {application.stats.blocks} blocks)")

    def tile_vae(self, session: Session, first_stage_model: Any) -> None:
        """Tiled VAE for this generation, shared by every adapter: the ``decoder``/``encoder`` of
        ``first_stage_model`` (the ldm/sgm layout all four hosts use, docs/hosts.md §5.6) get
        :func:`lib_optim.vae.tiling.tiling_forward` as an instance ``forward`` — ``on``: always tiled, ``auto``: tiled
        exactly when :func:`lib_optim.vae.planner.needs_tiling` says the whole image will not fit in free memory —
        removed again when the session's restorer closes. Every decode/encode is reported to
        ``session.data["vae_tiling_events"]`` (the infotext and telemetry read it)."""
        from lib_optim.attention import free_memory_bytes
        from lib_optim.vae import tiling as vae_tiling

        mode = session.settings.vae_tiling
        if mode not in (VaeTiling.ON, VaeTiling.AUTO):
            return
        if first_stage_model is None:
            session.data["vae_tiling_unavailable"] = "no VAE loaded"
            log.warning("vae_tiling: no VAE loaded; nothing changed")
            return
        events: list[Any] = session.data.setdefault("vae_tiling_events", [])
        max_tile = vae_max_tile()
        # The VAE's attention block follows the UNet's choice on every host (docs/hosts.md §3): the memory-efficient
        # kernels hold no positions × positions matrix, the others do (lib_optim.vae.planner's "math").
        efficient = session.attention_used in (Attention.SDP.value, Attention.XFORMERS.value)
        patched = []
        for part in ("decoder", "encoder"):
            module = getattr(first_stage_model, part, None)
            if module is None:
                continue
            try:
                forward = vae_tiling.tiling_forward(
                    module,
                    part,
                    module.forward,
                    free_bytes=free_memory_bytes,
                    always=mode is VaeTiling.ON,
                    attention="sdpa" if efficient else "math",
                    report=events.append,
                    max_tile=max_tile,
                )
            except (TypeError, ValueError) as exc:  # a VAE of another layout (not SD/SDXL): left as it is
                session.data["vae_tiling_unavailable"] = str(exc).removeprefix("[Optim] ")
                log.warning("vae_tiling: %s; the %s runs untiled", session.data["vae_tiling_unavailable"], part)
                continue
            session.restorer.enter(patched_attr(module, "forward", forward))
            patched.append(part)
        if patched:
            session.restorer.notes.append(f"VAE {'/'.join(patched)} tiling {mode.value}")

    def tiled_vae_fits(self, p: Any) -> bool | None:
        """Whether the decode of ``p``'s largest image, in the smallest tiles, is predicted to fit in the free memory
        of the device the host generates on (the out-of-memory retry prefers tiling to the CPU then); None when
        that cannot be told (no torch, no device yet)."""
        try:
            import torch

            from lib_optim.attention import free_memory_bytes
            from lib_optim.vae import planner as vae_planner

            request = auto_attention_request(p, sys.modules.get("modules.devices"))
            device = torch.device(getattr(sys.modules.get("modules.devices"), "device", None) or "cpu")
            height, width = request["height"] // 8 * 8, request["width"] // 8 * 8
            need = vae_planner.predict_tiled_peak_bytes(
                max(8, height),
                max(8, width),
                tile=32,
                overlap=8,
                dtype_bytes=request["dtype_bytes"],
                device=request["device"],
            )
            return need <= free_memory_bytes(device)
        except (ImportError, RuntimeError, OSError, ValueError, AssertionError):
            log.debug("tiled VAE fit unknown", exc_info=True)
            return None

    def before_sampling(self, p: Any, session: Session) -> None:  # noqa: B027 - optional hook
        """Re-apply per-sampling changes; default: nothing to do."""


VAE_MAX_TILE_ENV = "OPTIM_VAE_MAX_TILE"
VAE_TILE_RANGE = (32, 256)  # at least twice the overlap (lib_optim.vae.tiling.MODULE_OVERLAP)


def vae_max_tile(environ: Mapping[str, str] | None = None) -> int:
    """The largest VAE tile in latent pixels (8 image pixels each): ``OPTIM_VAE_MAX_TILE`` when set to a multiple of
    8 from 32 to 256, else 256 (the tile is chosen from free memory below that). A bad value is reported and
    ignored: it must not fail a generation."""
    import os

    raw = (os.environ if environ is None else environ).get(VAE_MAX_TILE_ENV, "").strip()
    low, high = VAE_TILE_RANGE
    if not raw:
        return high
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value % 8 or not low <= value <= high:
        log.warning(
            "%s: %r is not allowed; allowed: a multiple of 8 from %d to %d (latent pixels); using %d",
            VAE_MAX_TILE_ENV,
            raw,
            low,
            high,
            high,
        )
        return high
    return value


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
