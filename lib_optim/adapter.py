"""The one interface every host adapter implements. Host-free: this module imports no host code (adapters live
in :mod:`lib_optim.hosts`; the runtime, the UI and the benchmark only know this interface).

Lifecycle of one ``process_images(p)`` call, driven by the script (scripts/optim.py):

``begin(p, settings)``          from ``process`` (after the host's model (re)load, before ``p.init()``
                                encodes img2img inputs) — validates once, then applies what holds for the
                                whole generation, field by field in :data:`~lib_optim.settings.FIELDS` order
                                (the method :data:`APPLIERS` names for each), into one
                                :class:`~lib_optim.patching.Restorer`;
``before_sampling(p, session)`` from ``process_before_every_sampling`` — re-applies what the host resets
                                before each sampler call (Forge rebuilds ``p.sd_model.forge_objects``);
                                must be idempotent (Forge calls it twice in the hires pass);
``session.restorer.close()``    from ``postprocess`` and from the ``p.close()`` wrapper — whichever
                                comes first restores, the other is a no-op.

Only the interface lives here; what the adapters share (host modules, tiled VAE, regional compile, the ``auto``
request) is :class:`lib_optim.hosts.base.HostBase` and the ``vae``/``compile`` wings.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lib_optim.attention import Attention
from lib_optim.host_specs import HostKind
from lib_optim.log import get_logger
from lib_optim.patching import Restorer
from lib_optim.settings import FIELDS_BY_NAME, SETTING_FIELDS, GenerationSettings

log = get_logger(__name__)


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

    @property
    def current(self) -> dict[str, Any]:
        """What the host does now for each setting field of :data:`~lib_optim.settings.FIELDS` (its ``state``
        reader; else ``extra[name]``; None = unknown): the benchmark's "a change is a real change"."""
        return {
            spec.name: spec.state(self) if spec.state is not None else self.extra.get(spec.name)
            for spec in SETTING_FIELDS
        }

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


class HostAdapter(abc.ABC):
    """A host's way of applying the settings. Subclasses implement the readers below and, for each field they
    support, the ``apply_…`` method :data:`APPLIERS` names for it; :meth:`begin` does the rest."""

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

    # --- one method per setting field (APPLIERS below); a host overrides those it supports ---------------------

    def apply_attention(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        self._unsupported("attention")

    def apply_channels_last(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        self._unsupported("channels_last")

    def apply_vae_on_cpu(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        self._unsupported("vae_on_cpu")

    def apply_inference_memory_mb(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        self._unsupported("inference_memory_mb")

    def apply_compile(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        self._unsupported("compile")

    def apply_vae_tiling(self, p: Any, settings: GenerationSettings, session: Session) -> None:
        self._unsupported("vae_tiling")

    def _unsupported(self, name: str) -> None:
        raise NotSupportedHere(f"[Optim] {name}: not supported on {self.kind.display_name}")

    def applier(self, name: str) -> Applier | None:
        """This adapter's method for the field ``name`` (:data:`APPLIERS`), None when it does not override it."""
        method = APPLIERS.get(name)
        if method is None or getattr(type(self), method.__name__) is method:
            return None
        bound: Applier = getattr(self, method.__name__)
        return bound

    def supported_fields(self) -> tuple[str, ...]:
        """The GenerationSettings fields this host can apply here (the UI hides the others): ``enabled`` and
        every field whose :data:`APPLIERS` method this adapter implements."""
        return ("enabled", *(spec.name for spec in SETTING_FIELDS if self.applier(spec.name) is not None))

    def meaningful_fields(self) -> tuple[str, ...]:
        """The supported fields that can change anything on the device this host generates on: the UI shows
        these and the benchmark varies them (on the CPU, the fields marked ``gpu_only`` in FIELDS cannot)."""
        on_cpu = self.generation_device_type() == "cpu"
        return tuple(f for f in self.supported_fields() if not (on_cpu and FIELDS_BY_NAME[f].gpu_only))

    def generation_device_type(self) -> str | None:
        """``cpu``/``cuda``/… of the device the host generates on, None when not known (yet)."""
        return None

    def tiled_vae_fits(self, p: Any) -> bool | None:
        """Whether the decode of ``p``'s largest image, in the smallest tiles, is predicted to fit in free memory
        (the out-of-memory retry prefers tiling to the CPU then); None when that cannot be told."""
        return None

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
        before anything changes), then each changed field's :data:`APPLIERS` method, in :data:`FIELDS` order, into
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
                apply = self.applier(spec.name)
                if apply is None:
                    log.warning("%s: not supported on %s; ignored", spec.name, self.kind.display_name)
                    continue
                apply(p, settings, session)
        except BaseException:
            with contextlib.suppress(Exception):  # Restorer.close logs its own failures
                session.restorer.close()
            raise
        return session

    def before_sampling(self, p: Any, session: Session) -> None:  # noqa: B027 - optional hook
        """Re-apply per-sampling changes; default: nothing to do."""

    # --- the compile warm-up (lib_optim.hosts.warmup) -------------------------------------------------------------

    def model_family(self, sd_model: Any) -> str | None:
        """``sd`` (SD1.x/SD2.x) or ``sdxl`` for a loaded model the compile warm-up can run; None: no warm-up for it."""
        return None

    def warmup_forward(self, sd_model: Any, width: int, height: int, batch: int) -> Callable[[], None]:
        """One UNet call of ``sd_model`` as a sampling step of a ``width``×``height`` generation of ``batch`` images
        makes it (cond and uncond batched as this host batches them, the host's grad and autocast modes), with
        dummy latents and empty prompts; :class:`NotSupportedHere` where this host or model has none."""
        raise NotSupportedHere(f"[Optim] compile warm-up: not supported on {self.kind.display_name}")

    def warmup_decode(self, sd_model: Any, width: int, height: int, batch: int) -> Callable[[], None]:
        """The host's decode of a sampled ``batch`` of ``width``×``height`` latents (zeros), as its txt2img decodes
        them after sampling (its grad mode, its batching of the decode); :class:`NotSupportedHere` where it has
        none."""
        raise NotSupportedHere(f"[Optim] compile warm-up: no VAE decode on {self.kind.display_name}")


Applier = Callable[[Any, GenerationSettings, Session], None]

# Field → the HostAdapter method that applies it (``enabled`` is the switch: it applies nothing itself).
# tests/test_fields_everywhere.py checks that every setting field has exactly one and that none is stale.
APPLIERS: Mapping[str, Callable[[HostAdapter, Any, GenerationSettings, Session], None]] = {
    "attention": HostAdapter.apply_attention,
    "channels_last": HostAdapter.apply_channels_last,
    "vae_on_cpu": HostAdapter.apply_vae_on_cpu,
    "inference_memory_mb": HostAdapter.apply_inference_memory_mb,
    "compile": HostAdapter.apply_compile,
    "vae_tiling": HostAdapter.apply_vae_tiling,
}
