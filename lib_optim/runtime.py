"""The extension's state inside a running WebUI — in one place.

``preload.py`` fills the start-up part (host, findings, profile), the script drives generations through
:meth:`Runtime.begin` / :meth:`Runtime.end`, the API and the UI read :meth:`Runtime.status`. This module is
plain Python: the host adapter it holds is the only thing that touches host code.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from lib_optim import __version__
from lib_optim.adapter import HostAdapter, Session
from lib_optim.compile import WARMUP_MODES, CompileWarmup, WarmupState
from lib_optim.host_specs import HostKind
from lib_optim.launch import Finding, Severity
from lib_optim.log import get_logger
from lib_optim.oom import FallbackStep, is_out_of_memory, next_frugal
from lib_optim.patching import Restorer
from lib_optim.settings import Attention, GenerationSettings, format_infotext
from lib_optim.telemetry import GenerationMeter, Telemetry, format_status

if TYPE_CHECKING:  # only a type here: the benchmark's module is not needed to run a generation
    from lib_optim.bench import CandidateResult

log = get_logger(__name__)

HISTORY_LENGTH = 20
# the compile warm-up's size before any generation of the model's family: its native size, one image
DEFAULT_WARMUP_SIZES = {"sdxl": (1024, 1024, 1)}
DEFAULT_WARMUP_SIZE = (512, 512, 1)  # SD1.x/SD2.x
# session.data key of a generation's compile plan (lib_optim.compile.AUTO_DATA_KEY; named here, as ``compile`` is,
# so that the core need not import the compile wing)
AUTO_PLAN = "compile_auto"
VAE_DATA_KEY = "compile_vae"  # the VAE's compile application (lib_optim.compile.VAE_DATA_KEY)


@dataclass
class GenerationRecord:
    started: float
    settings: dict[str, Any]
    attention_used: str
    changes: list[str]
    finished: float | None = None
    restored: bool = False
    error: str | None = None
    telemetry: dict[str, Any] | None = None
    telemetry_text: str = ""
    fallback: str | None = None  # what an out-of-memory retry changed

    def to_dict(self) -> dict[str, Any]:
        return {
            "started": self.started,
            "finished": self.finished,
            "seconds": None if self.finished is None else round(self.finished - self.started, 3),
            "settings": self.settings,
            "attention_used": self.attention_used,
            "changes": self.changes,
            "restored": self.restored,
            "error": self.error,
            "telemetry": self.telemetry,
            "telemetry_text": self.telemetry_text,
            "fallback": self.fallback,
        }


@dataclass
class Runtime:
    host: HostKind | None = None
    host_version: str = ""
    adapter: HostAdapter | None = None
    startup_findings: list[Finding] = field(default_factory=list)
    startup_profile: str | None = None
    startup_notes: list[str] = field(default_factory=list)
    defaults: GenerationSettings = field(default_factory=GenerationSettings)
    _sessions: dict[int, Session] = field(default_factory=dict)
    _records: dict[int, GenerationRecord] = field(default_factory=dict)
    _meters: dict[int, GenerationMeter] = field(default_factory=dict)
    _retried: set[int] = field(default_factory=set)  # generations already retried after OOM: never loop
    history: deque[GenerationRecord] = field(default_factory=lambda: deque(maxlen=HISTORY_LENGTH))
    # the in-WebUI benchmark's latest winner, for "make the winner my default" without arguments
    last_bench_winner: CandidateResult | None = None
    # the compile warm-up (lib_optim.compile.warmup) and the last generation's size per model family, its size
    warmup: CompileWarmup = field(default_factory=CompileWarmup)
    last_sizes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- generations --------------------------------------------------------------------------------

    def generation_starts(
        self,
        p: Any,
        settings: GenerationSettings | None,
        *,
        family: str | None = None,
        report: Callable[[WarmupState], None] | None = None,
    ) -> str:
        """A generation begins (the script's ``process``, for every generation, Optim on or off): remember its size
        for the compile warm-up of its model ``family``, and keep the warm-up off the model until :meth:`end` — one
        running now is waited for when this generation compiles (``on``/``max-autotune``), else stopped between
        blocks (:meth:`lib_optim.compile.CompileWarmup.generation_starts`)."""
        if family:
            size = (int(getattr(p, "width", 0) or 0), int(getattr(p, "height", 0) or 0))
            batch = int(getattr(p, "batch_size", 1) or 1)
            if size[0] > 0 and size[1] > 0:
                with self._lock:
                    self.last_sizes[family] = (*size, batch)
        compiles = settings is not None and settings.enabled and settings.compile.value in WARMUP_MODES
        return self.warmup.generation_starts(id(p), wait=compiles, report=report)

    def warmup_size(self, family: str) -> tuple[int, int, int]:
        """Width, height and batch size the warm-up compiles ``family`` for: its last generation's, else its
        native size (1024² for SDXL, 512² for SD1.x/SD2.x) with one image."""
        with self._lock:
            last = self.last_sizes.get(family)
        return last if last is not None else DEFAULT_WARMUP_SIZES.get(family, DEFAULT_WARMUP_SIZE)

    def begin(
        self, p: Any, settings: GenerationSettings, *, device: str | None = None, measure: bool = True
    ) -> Session | None:
        """Apply ``settings`` to the generation ``p`` (keyed by identity: X/Y/Z runs copies of ``p``).

        Returns None — changing and measuring nothing — when the accordion is off. On with nothing to change,
        the generation is only measured. Applying twice for the same ``p`` first restores the earlier
        application (like tomesd's apply_patch).
        """
        if self.adapter is None or not settings.enabled:
            return None
        self.end(p)
        if settings.changes_anything:
            session = self.adapter.begin(p, settings)
        else:
            session = Session(settings, Restorer(f"{self.host.display_name if self.host else 'host'} generation"))
        record = GenerationRecord(
            time.time(), settings.non_default(), session.attention_used, list(session.restorer.notes)
        )
        meter = None
        if measure:
            # Peaks are reset so they are this generation's; the host's own "A:/R:" line then also counts
            # from here, which is where its job starts anyway (A1111 modules/memmon.py resets at job start).
            meter = GenerationMeter(device, reset_peak_stats=True).start()
        with self._lock:
            self._sessions[id(p)] = session
            self._records[id(p)] = record
            if meter is not None:
                self._meters[id(p)] = meter
            self.history.append(record)
        if session.restorer.notes:
            log.info("this generation: %s", "; ".join(session.restorer.notes))
        return session

    def step(self) -> None:
        """One sampling step of the running generation(s) (the host's per-step callback)."""
        with self._lock:
            meters = list(self._meters.values())
            plans = [s.data[AUTO_PLAN] for s in self._sessions.values() if AUTO_PLAN in s.data]
        for meter in meters:
            meter.step()
        for plan in plans:  # compile auto times the steps (lib_optim.compile.auto.AutoRun)
            plan.step()

    def telemetry_now(self, p: Any) -> Telemetry | None:
        with self._lock:
            meter = self._meters.get(id(p))
        return meter.snapshot() if meter is not None else None

    def record_for(self, p: Any) -> GenerationRecord | None:
        with self._lock:
            return self._records.get(id(p))

    # --- out-of-memory fallback ---------------------------------------------------------------------

    def fallback_for(self, p: Any, exc: BaseException) -> FallbackStep | None:
        """The one retry for an out-of-memory error in ``p`` — None when Optim is off for it, the error is
        not out of memory, it was already retried, or nothing is more frugal."""
        session = self.session_for(p)
        if session is None or self.adapter is None or id(p) in self._retried or not is_out_of_memory(exc):
            return None
        available = [b.attention for b in self.adapter.attention_backends() if b.available]
        memory = None
        try:
            memory = self.adapter.effective_state().inference_memory_mb
        except Exception:  # the retry does not need it; Forge's default is assumed then
            log.debug("inference memory unknown for the fallback", exc_info=True)
        current = session.settings.attention
        step = next_frugal(
            session.settings,
            available=available,
            supports_inference_memory="inference_memory_mb" in self.adapter.supported_fields(),
            current_attention=None if current in (Attention.HOST, Attention.AUTO) else current,
            current_inference_memory_mb=memory,
            supports_vae_tiling="vae_tiling" in self.adapter.supported_fields(),
            tiled_vae_fits=self.adapter.tiled_vae_fits(p),
        )
        if step is not None:
            with self._lock:
                self._retried.add(id(p))
                record = self._records.get(id(p))
            if record is not None:
                record.fallback = ", ".join(step.changes)
        return step

    def forbid_retry(self, p: Any) -> None:
        """No out-of-memory retry for ``p`` (a benchmark measures the settings it was given); undo with
        :meth:`forget_retry` once ``p`` is done."""
        with self._lock:
            self._retried.add(id(p))

    def forget_retry(self, p: Any) -> None:
        with self._lock:
            self._retried.discard(id(p))

    def session_for(self, p: Any) -> Session | None:
        with self._lock:
            return self._sessions.get(id(p))

    def before_sampling(self, p: Any) -> None:
        session = self.session_for(p)
        if session is not None and self.adapter is not None:
            self.adapter.before_sampling(p, session)

    def end(self, p: Any, error: BaseException | None = None) -> bool:
        """Restore everything ``begin`` changed for ``p``; safe to call any number of times. The model is free for
        the compile warm-up again."""
        self.warmup.generation_ends(id(p))
        with self._lock:
            present = id(p) in self._sessions
            record = self._records.get(id(p))
        if not present:
            return False
        if error is not None and record is not None:
            record.error = f"{type(error).__name__}: {error}"
        self._end_key(id(p))
        return True

    def end_others(self, p: Any) -> int:
        """Restore every open generation except ``p``'s (left open by a generation that raised)."""
        with self._lock:
            stale = [key for key in self._sessions if key != id(p)]
        for key in stale:
            self._end_key(key)
        return len(stale)

    def end_all(self) -> int:
        with self._lock:
            keys = list(self._sessions)
        for key in keys:
            self.warmup.generation_ends(key)
            self._end_key(key)
        return len(keys)

    def _end_key(self, key: int) -> None:
        with self._lock:
            session = self._sessions.pop(key, None)
            record = self._records.pop(key, None)
            meter = self._meters.pop(key, None)
        if session is None:
            return
        try:
            session.restorer.close()
        finally:
            if record is not None:
                record.finished = time.time()
                record.restored = session.restorer.closed
            if meter is not None:
                result = meter.stop()
                if record is not None:
                    record.telemetry = result.to_dict()
                    record.telemetry_text = format_status(result)
            plan = session.data.get(AUTO_PLAN)
            if plan is not None:
                try:
                    plan.finish()  # remembers what compile auto measured
                except Exception:  # a measurement must never fail the generation's end
                    log.warning("[Optim] compile auto: this generation's figures were not remembered", exc_info=True)
            if record is not None:
                compiled = compile_summary(session)
                if compiled is not None:
                    record.telemetry = {**(record.telemetry or {}), "compile": compiled}
                    text = compiled_text(compiled)
                    record.telemetry_text = f"{record.telemetry_text} · {text}" if record.telemetry_text else text
                tiling = vae_tiling_summary(session)
                if tiling is not None:
                    record.telemetry = {**(record.telemetry or {}), "vae_tiling": tiling}
                    text = tiling["text"]
                    record.telemetry_text = f"{record.telemetry_text} · {text}" if record.telemetry_text else text

    def active_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    @staticmethod
    def infotext(settings: GenerationSettings) -> str | None:
        return format_infotext(settings)

    # --- status -------------------------------------------------------------------------------------

    def findings_summary(self) -> str:
        counts = {s: sum(1 for f in self.startup_findings if f.severity is s) for s in Severity}
        parts = [f"{n} {s.value}{'s' if n != 1 else ''}" for s, n in counts.items() if n]
        return ", ".join(parts) if parts else "no findings"

    def status(self, system: Callable[[], dict[str, Any]] | None = None) -> dict[str, Any]:
        """What ``GET /optim/v1/status`` returns."""
        state: dict[str, Any] | None = None
        backends: list[dict[str, Any]] = []
        if self.adapter is not None:
            try:
                state = self.adapter.effective_state().to_dict()
                backends = [
                    {
                        "attention": b.attention.value,
                        "available": b.available,
                        "host_name": b.host_name,
                        "reason": b.reason,
                    }
                    for b in self.adapter.attention_backends()
                ]
            except Exception as exc:  # status must answer even when the host is half-initialised
                log.warning("could not read the host's state: %s", exc, exc_info=True)
                state = {"error": f"{type(exc).__name__}: {exc}"}
        return {
            "extension_version": __version__,
            "host": self.host.value if self.host else None,
            "host_version": self.host_version,
            "startup_profile": self.startup_profile,
            "startup_notes": list(self.startup_notes),
            "effective": state,
            "attention_backends": backends,
            "active_generations": self.active_sessions(),
            "findings": [f.to_dict() for f in self.startup_findings],
            "findings_summary": self.findings_summary(),
            "last_generations": [r.to_dict() for r in self.history],
            "compile": {**(compiler_totals() or ZERO_TOTALS), "warmup": self.warmup.snapshot().to_dict()},
            "system": system() if system else None,
        }


def compile_summary(session: Session) -> dict[str, Any] | None:
    """What regional compile did in ``session`` (its stats), or why it did not run; None when not asked for. With
    ``compile=auto``, ``auto`` holds the decision and its figures."""
    if session.settings.compile.value == "off":
        return None
    application = session.data.get("compile")
    plan = session.data.get(AUTO_PLAN)
    auto = plan.summary() if plan is not None and plan.auto else None
    stats: dict[str, Any]
    if application is not None:
        stats = application.stats.to_dict()
    elif auto is not None and not auto["unavailable"]:
        stats = {"compiles": 0, "fell_back": False}
    else:
        stats = {"fell_back": True, "fallback_reason": session.data.get("compile_unavailable", "not applied")}
    if auto is not None:
        stats["auto"] = auto
    vae = session.data.get(VAE_DATA_KEY)
    if vae is not None:
        stats["vae"] = vae.stats.to_dict()
    return stats


def vae_tiling_summary(session: Session) -> dict[str, Any] | None:
    """What ``vae_tiling`` on/auto did in ``session``: every decode/encode (tiled or not, and why) and a short text
    (``VAE decode 1024x1024 tiled (tiles of 64)``); None when not asked for or before any decode."""
    if session.settings.vae_tiling.value not in ("on", "auto"):
        return None
    events = list(session.data.get("vae_tiling_events", ()))
    unavailable = session.data.get("vae_tiling_unavailable")
    if not events and not unavailable:
        return None
    texts = list(dict.fromkeys(event.text() for event in events))  # one per distinct size and outcome
    text = "VAE " + "; ".join(texts) if texts else f"VAE tiling not applied: {unavailable}"
    return {"events": [event.to_dict() for event in events], "unavailable": unavailable, "text": text}


def compiled_text(summary: dict[str, Any]) -> str:
    """``compiled: 14 graphs in 52.0 s`` / ``compiled (cached)`` / ``compile failed, ran eagerly: …`` —
    compile seconds apart from sampling, as telemetry and infotext show them. ``compile=auto`` says first what it
    decided and why: ``auto→eager (compile ≈ 120 s cold, …)`` / ``auto→compile (…) · compiled: …``."""
    auto = summary.get("auto")
    if auto is not None and not auto.get("compile"):
        return str(auto.get("text", "auto→eager"))
    if summary.get("fell_back"):
        text = f"compile failed, ran eagerly ({summary.get('fallback_reason') or 'see the console'})"
    elif summary.get("compiles"):
        text = f"compiled: {summary.get('graphs', 0)} graphs in {summary.get('compile_seconds', 0.0):.1f} s"
    else:
        text = "compiled (reused)"
    return f"{auto.get('text')} · {text}" if auto is not None else text


ZERO_TOTALS = {"total_compiles": 0, "total_compile_seconds": 0.0}


def compiler_totals() -> dict[str, Any] | None:
    """The process's compile counters for ``/optim/v1/status`` (None before anything was compiled)."""
    import sys

    module = sys.modules.get("lib_optim.compile.regional")
    if module is None:
        return None
    compiler = module.get_compiler()
    return {
        "total_compiles": compiler.total_compiles,
        "total_compile_seconds": round(compiler.total_compile_seconds, 3),
    }


_runtime = Runtime()


def get_runtime() -> Runtime:
    return _runtime
