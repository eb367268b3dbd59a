"""Compile warm-up: a model's blocks compiled in the background after it loads, off the first generation's path.

When Settings → Optim → compile is ``on`` (or ``max-autotune``) the host glue (:mod:`lib_optim.hosts.warmup`) hands
:meth:`CompileWarmup.start` a :class:`WarmupTarget` for each model the WebUI loads. A thread then

1. takes the host's job lock (``hold``: the WebUI's queue lock, which its generations and model loads take), so it
   runs only between the host's jobs, and waits until no generation of ours is in flight (:meth:`~CompileWarmup.
   generation_starts`);
2. enters the generation's own compile applications (``enter``: the host adapter's ``begin`` with the default
   attention, channels-last and compile — the same compiler, key, region patches, block set and mode a generation
   uses: the UNet's, and the VAE's where the host compiles its blocks too) and runs the UNet ``calls`` times
   (``forward``: one call at the last used size, cond and uncond batched as the host batches them; the first call
   of a block may run eagerly — the weights check, :mod:`lib_optim.compile.regional` — the second compiles it),
   then the host's decode of that size once (``decode``: the VAE's blocks compile on their first call). Without
   the decode the first generation would still compile the VAE: a third of its time at 64×64;
3. between blocks (the application's ``interrupt``) it stops when a host job waits for the lock (``busy``) or a
   generation starts: the blocks compiled so far stay cached, and what remains compiles in the next compiled
   generation as it would have without a warm-up.

A generation never runs on the model while the warm-up does: the host's lock keeps them apart, and
:meth:`~CompileWarmup.generation_starts` (called from the script's ``process``) stops the warm-up — or, when the
generation compiles, waits for it — should one ever arrive outside that lock.

:class:`WarmupState` is the one record of it (``GET /optim/v1/status`` → ``compile.warmup``, the accordion's status
line). Plain Python: no host imports, no torch (the host's callables bring both).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from lib_optim.log import get_logger

log = get_logger(__name__)

WARMUP_STATES = ("idle", "running", "done", "failed")
# compile values (the Settings → Optim default) that warm up; ``auto`` decides per job whether compiling pays, so a
# warm-up that compiles regardless would overrule it: it does not warm up
WARMUP_MODES = ("on", "max-autotune")
# how often a generation that waits for the warm-up reports its progress (seconds)
PROGRESS_EVERY = 1.0


@dataclass(frozen=True)
class WarmupState:
    """Where the compile warm-up stands: ``state`` ∈ :data:`WARMUP_STATES`, blocks compiled of the total, seconds
    (running: so far; done/failed/stopped: in all), ``reason`` (failed: why; idle: why it did not run or stopped),
    and the size it compiles for (``batch``: images per batch; the UNet sees cond and uncond, twice that where the
    host batches them together)."""

    state: str = "idle"
    blocks_done: int = 0
    blocks_total: int = 0
    seconds: float | None = None
    reason: str = ""
    family: str = ""
    width: int | None = None
    height: int | None = None
    batch: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["seconds"] = None if self.seconds is None else round(self.seconds, 1)
        return data

    def text(self) -> str:
        """The status line's words: ``compile warm-up: running 12/38 blocks`` / ``done in 74 s`` / ``failed: …``;
        idle: why, or "" when there is nothing to say."""
        if self.state == "running":
            return f"compile warm-up: running {self.blocks_done}/{self.blocks_total} blocks"
        if self.state == "done":
            return f"compile warm-up: done in {self.seconds or 0.0:.0f} s"
        if self.state == "failed":
            return f"compile warm-up: failed: {self.reason}"
        return f"compile warm-up: {self.reason}" if self.reason else ""


@dataclass(frozen=True)
class WarmupPart:
    """A compile application as the warm-up runs and counts it: all its blocks, or only those inside the module
    ``within`` — the VAE's decoder, which the warm-up's decode runs (its encoder compiles in the first img2img)."""

    application: Any
    within: Any = None

    def progress(self) -> tuple[int, int]:
        """(blocks compiled, blocks counted)."""
        return self.application.progress(self.within)

    @property
    def stats(self) -> Any:
        return self.application.stats


class WarmupStopped(Exception):
    """Raised between blocks when the model is wanted: the warm-up ends there, what compiled stays cached."""


@dataclass(frozen=True)
class WarmupTarget:
    """What a host hands the warm-up for one loaded model (:mod:`lib_optim.hosts.warmup` builds it).

    ``enter(interrupt)``: a context manager that applies what a generation with the default settings applies and
    yields its compile :class:`~lib_optim.compile.regional.Application` s as :class:`WarmupPart` s, the UNet's
    first, then the VAE's where it compiles (``interrupt`` must reach each: it is called between blocks); it raises
    with the reason when nothing compiles. ``forward()``: one UNet call at the size, as the host's sampling makes
    it. ``decode()``: the host's decode of a sampled batch of that size (None: the host has none, the VAE compiles
    in the first generation). ``hold()``: the host's job lock (entered before anything runs). ``busy()``: whether
    a host job waits for that lock. ``current()``: whether the model is still the loaded one."""

    enter: Callable[[Callable[[], None]], AbstractContextManager[Sequence[WarmupPart]]]
    forward: Callable[[], None]
    decode: Callable[[], None] | None = None
    family: str = ""
    width: int = 512
    height: int = 512
    batch: int = 1
    hold: Callable[[], AbstractContextManager[Any]] = contextlib.nullcontext
    busy: Callable[[], bool] = lambda: False
    current: Callable[[], bool] = lambda: True
    calls: int = 2


def spawn_thread(run: Callable[[], None]) -> None:
    threading.Thread(target=run, name="optim-compile-warmup", daemon=True).start()


@dataclass
class CompileWarmup:
    """The process's compile warm-up and its :class:`WarmupState` (held by :class:`lib_optim.runtime.Runtime`).

    ``clock``: seconds (injected in tests); ``spawn(run)``: runs ``run`` in the background (a daemon thread)."""

    clock: Callable[[], float] = time.monotonic
    spawn: Callable[[Callable[[], None]], None] = spawn_thread
    _state: WarmupState = field(default_factory=WarmupState)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _running: bool = False
    _stop: str = ""
    _serial: int = 0
    _generations: set[Hashable] = field(default_factory=set)

    # --- what the status reads ---------------------------------------------------------------------------

    def snapshot(self) -> WarmupState:
        with self._cond:
            return self._state

    @property
    def running(self) -> bool:
        with self._cond:
            return self._running

    @property
    def stopping(self) -> bool:
        """A running warm-up was asked to stop (it does at its next block)."""
        with self._cond:
            return self._running and bool(self._stop)

    def note(self, reason: str, **size: Any) -> None:
        """Idle with ``reason`` (why no warm-up runs for the model just loaded), unless one is running."""
        with self._cond:
            if not self._running:
                self._state = WarmupState(reason=reason, **size)

    # --- the model side ----------------------------------------------------------------------------------

    def start(self, target: WarmupTarget) -> None:
        """Warm ``target`` up in the background. A warm-up still running for an earlier model stops between blocks
        first; one still waiting for the host is superseded."""
        with self._cond:
            self._serial += 1
            serial = self._serial
            if self._running:
                self._stop = "a newer model was loaded"
            else:
                self._state = WarmupState(reason="waiting for the WebUI's current job", **_size(target))
            self._cond.notify_all()

        def run() -> None:
            self.run(target, serial)

        self.spawn(run)

    def run(self, target: WarmupTarget, serial: int | None = None) -> WarmupState:
        """The warm-up itself (:meth:`start` runs it in the background); returns how it ended."""
        if serial is None:
            with self._cond:
                self._serial += 1
                serial = self._serial
        try:
            with target.hold():
                if not self._claim(target, serial):
                    return self.snapshot()
                try:
                    return self._warm(target)
                finally:
                    with self._cond:
                        self._running = False
                        self._cond.notify_all()
        except Exception as exc:  # the host's lock or its model check failed: say so, never kill the thread silently
            log.warning("[Optim] compile warm-up failed: %s: %s", type(exc).__name__, exc)
            log.debug("compile warm-up failure", exc_info=True)
            with self._cond:
                self._state = replace(self._state, state="failed", reason=_first_line(exc))
                return self._state

    def _claim(self, target: WarmupTarget, serial: int) -> bool:
        """Under the host's lock: wait until no generation of ours is in flight and no earlier warm-up runs, then
        mark this one running. Never waits on a host job that wants the lock held here (``busy``): it gives up."""
        with self._cond:
            while (self._generations or self._running) and self._serial == serial:
                if target.busy():
                    self._state = WarmupState(reason="not run: a WebUI job came first", **_size(target))
                    return False
                self._cond.wait(PROGRESS_EVERY)
            if self._serial != serial:
                return False  # a newer model load took over
            if not target.current():
                self._state = WarmupState(reason="not run: the model changed before it could start")
                return False
            self._running = True
            self._stop = ""
            self._state = WarmupState("running", **_size(target))
            return True

    def _warm(self, target: WarmupTarget) -> WarmupState:
        started = self.clock()
        apps: Sequence[WarmupPart] = ()

        def interrupt() -> None:
            self._progress(apps, started)
            why = self._stop or ("a WebUI job is waiting" if target.busy() else "")
            if why:
                raise WarmupStopped(why)

        try:
            with target.enter(interrupt) as entered:
                apps = tuple(entered)
                fell_back = self._compile(target, apps, interrupt)
                self._progress(apps, started)
            end = self._finish(
                "failed" if fell_back is not None else "done",
                started,
                reason=fell_back.stats.fallback_reason if fell_back is not None else "",
            )
            if end.state == "done":
                log.info("[Optim] compile warm-up done: %d blocks in %.0f s", end.blocks_done, end.seconds or 0.0)
            else:
                log.warning("[Optim] compile warm-up failed: %s", end.reason)
            return end
        except WarmupStopped as stop:
            now = self.snapshot()
            log.info("[Optim] compile warm-up stopped after %d/%d blocks: %s", now.blocks_done, now.blocks_total, stop)
            return self._finish(
                "idle",
                started,
                reason=f"stopped after {now.blocks_done}/{now.blocks_total} blocks ({stop}); those stay compiled",
            )
        except Exception as exc:
            log.warning("[Optim] compile warm-up failed: %s: %s", type(exc).__name__, exc)
            log.debug("compile warm-up failure", exc_info=True)
            return self._finish("failed", started, reason=_first_line(exc))

    @staticmethod
    def _compile(target: WarmupTarget, apps: Sequence[WarmupPart], interrupt: Callable[[], None]) -> Any:
        """The UNet calls, then the decode (when the host has one and its VAE compiles); returns the application
        that fell back (the warm-up failed), or None."""
        if not apps:
            raise RuntimeError("nothing to compile")
        unet = apps[0]
        for _ in range(target.calls):
            interrupt()
            target.forward()
            if unet.stats.fell_back:
                return unet
        if target.decode is not None and len(apps) > 1:
            interrupt()
            target.decode()
        return next((app for app in apps if app.stats.fell_back), None)

    def _progress(self, apps: Sequence[WarmupPart], started: float) -> None:
        counts = [app.progress() for app in apps]
        done, total = sum(c[0] for c in counts), sum(c[1] for c in counts)
        with self._cond:
            self._state = replace(self._state, blocks_done=done, blocks_total=total, seconds=self.clock() - started)
            self._cond.notify_all()

    def _finish(self, state: str, started: float, *, reason: str = "") -> WarmupState:
        with self._cond:
            self._state = replace(self._state, state=state, seconds=self.clock() - started, reason=reason)
            return self._state

    # --- the generation side -----------------------------------------------------------------------------

    def generation_starts(
        self, key: Hashable, *, wait: bool, report: Callable[[WarmupState], None] | None = None
    ) -> str:
        """A generation is about to use the model (the script's ``process``): until :meth:`generation_ends` no
        warm-up starts. One running now is waited for when ``wait`` (the generation compiles: the warm-up does
        that compile for it; ``report`` gets its progress every :data:`PROGRESS_EVERY` s), else stopped between
        blocks. Returns ``"waited"``, ``"stopped"`` or ``""`` (none was running)."""
        with self._cond:
            # the hosts run one generation at a time: a key still here is one whose end never came (it raised)
            self._generations = {key}
            if not self._running:
                return ""
            if wait:
                log.info("[Optim] this generation waits for the compile warm-up (%s)", self._state.text())
                while self._running:
                    if report is not None:
                        report(self._state)
                    self._cond.wait(PROGRESS_EVERY)
                return "waited"
            self._stop = "a generation started"
            while self._running:
                self._cond.wait()
            return "stopped"

    def generation_ends(self, key: Hashable) -> None:
        with self._cond:
            self._generations.discard(key)
            self._cond.notify_all()


def _size(target: WarmupTarget) -> dict[str, Any]:
    return {"family": target.family, "width": target.width, "height": target.height, "batch": target.batch}


def _first_line(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).strip().splitlines() or [""])[0][:limit]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
