"""The one interface every host adapter implements. This module itself imports no host code.

Lifecycle of one ``process_images(p)`` call, driven by the script (scripts/optim.py):

``begin(p, settings)``          from ``process`` (after the host's model (re)load, before ``p.init()``
                                encodes img2img inputs) — applies what holds for the whole generation and
                                returns a :class:`~lib_optim.patching.Restorer` holding every change;
``before_sampling(p, session)`` from ``process_before_every_sampling`` — re-applies what the host resets
                                before each sampler call (Forge rebuilds ``p.sd_model.forge_objects``);
                                must be idempotent (Forge calls it twice in the hires pass);
``session.restorer.close()``    from ``postprocess`` and from the ``p.close()`` wrapper — whichever
                                comes first restores, the other is a no-op.
"""

from __future__ import annotations

import abc
import importlib
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from lib_optim.hostkinds import HostKind
from lib_optim.patching import Restorer
from lib_optim.settings import Attention, GenerationSettings


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
    attention_used: str = ""  # the host's name of what ran, for infotext/status
    data: dict[str, Any] = field(default_factory=dict)  # adapter-private per-generation values


class HostAdapter(abc.ABC):
    kind: HostKind

    @abc.abstractmethod
    def version(self) -> str:
        """The host's version string (as its infotext shows it)."""

    @abc.abstractmethod
    def attention_backends(self) -> list[BackendInfo]:
        """Every attention name of :class:`Attention` this host understands, with availability."""

    @abc.abstractmethod
    def effective_state(self) -> EffectiveState: ...

    def supported_fields(self) -> tuple[str, ...]:
        """The GenerationSettings fields this host can apply (the UI hides the others)."""
        return ("enabled", "attention", "channels_last", "vae_on_cpu")

    def validate(self, settings: GenerationSettings) -> None:
        """Raise :class:`NotSupportedHere` for a setting that cannot be applied here; change nothing."""
        if settings.attention is not Attention.HOST and settings.attention is not Attention.AUTO:
            info = {b.attention: b for b in self.attention_backends()}.get(settings.attention)
            if info is None or not info.available:
                allowed = ", ".join(b.attention.value for b in self.attention_backends() if b.available)
                why = f" ({info.reason})" if info is not None and info.reason else ""
                raise NotSupportedHere(
                    f"[Optim] attention: {settings.attention.value!r} is not available here{why}; allowed: {allowed}"
                )

    @abc.abstractmethod
    def begin(self, p: Any, settings: GenerationSettings) -> Session:
        """Apply ``settings`` for the generation of ``p``. On failure, restore and re-raise."""

    def before_sampling(self, p: Any, session: Session) -> None:  # noqa: B027 - optional hook
        """Re-apply per-sampling changes; default: nothing to do."""
