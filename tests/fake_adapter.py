"""A host adapter for unit tests of the host-independent glue (runtime, benchmark): attention is a name."""

from __future__ import annotations

from typing import Any

from lib_optim.adapter import BackendInfo, EffectiveState, HostAdapter, Session
from lib_optim.host_specs.kinds import HostKind
from lib_optim.patching import Restorer
from lib_optim.settings import Attention, GenerationSettings

# What an A1111 started without --xformers lists (HOST and AUTO are ours).
BACKENDS = [
    BackendInfo(Attention.HOST, True, ""),
    BackendInfo(Attention.AUTO, True, ""),
    BackendInfo(Attention.SDP, True, "sdp - scaled dot product"),
    BackendInfo(Attention.SPLIT, True, "Doggettx"),
    BackendInfo(Attention.SUB_QUAD, True, "sub-quadratic"),
    BackendInfo(Attention.XFORMERS, False, "xformers", "start the WebUI with --xformers"),
]


class FakeAdapter(HostAdapter):
    """Applies attention by setting ``self.current`` (``host``/``auto`` leave it) and restores it on close;
    xformers is listed as unavailable, as on a WebUI started without ``--xformers``."""

    kind = HostKind.A1111

    def __init__(self, device: str = "cpu", dtype: str = "float32") -> None:
        self.current = "Doggettx"
        self.begun: list[GenerationSettings] = []
        self.device = device
        self.dtype = dtype

    def version(self) -> str:
        return "v1.10.1"

    def attention_backends(self) -> list[BackendInfo]:
        return list(BACKENDS)

    def supported_fields(self) -> tuple[str, ...]:
        return ("enabled", "attention", "channels_last", "vae_on_cpu")  # what A1111 applies

    def current_attention_name(self) -> str:
        return self.current

    def effective_state(self) -> EffectiveState:
        return EffectiveState(HostKind.A1111, self.current, False, self.device, self.dtype, None, True)

    def begin(self, p: Any, settings: GenerationSettings) -> Session:
        self.begun.append(settings)
        restorer = Restorer("fake")
        previous = self.current
        if settings.attention not in (Attention.HOST, Attention.AUTO):
            self.current = settings.attention.value
        restorer.callback(setattr, self, "current", previous, note=f"attention {settings.attention.value}")
        return Session(settings, restorer, attention_used=self.current)
