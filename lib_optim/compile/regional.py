"""Per-generation regional ``torch.compile`` of a diffusion model's repeated blocks.

Values of the lever: ``off`` (default), ``on`` (inductor, default mode) and ``max-autotune`` (inductor
mode ``max-autotune-no-cudagraphs``). CUDA graphs (``reduce-overhead``, plain ``max-autotune``) are
never used: a CUDA graph replays fixed memory addresses, and the hosts move and patch weights between
calls (Forge's patcher replaces parameters, its memory manager moves them between devices; A1111's
LoRA writes into them) — a replay would read freed or stale memory.

Why regional
    Compiling the whole UNet makes the first compile long (one huge graph), breaks on the hosts' Python
    around the blocks (ControlNet residuals, Forge's ``transformer_options`` patches, per-block hooks),
    and recompiles whenever any of that changes. Compiling only the repeated blocks keeps each graph
    small, lets same-shaped blocks share compiled code, and leaves everything between the blocks —
    where the hosts hook in — eager. Module hooks on a block still run: ``nn.Module.__call__`` runs
    them around the block's ``forward``, and only ``forward`` (an instance attribute) is replaced.

Which blocks (:func:`lib_optim.compile.blocks.default_block_names`)
    SD1.x/SD2.x/SDXL UNets (ldm ``openaimodel.py`` in A1111, sgm for SDXL, Forge ``backend/nn/unet.py``,
    ldm_patched in Forge previous/reForge) all build from ``ResBlock`` and ``SpatialTransformer`` (which
    holds ``BasicTransformerBlock`` s), grouped into ``TimestepEmbedSequential`` input/middle/output
    blocks. We compile ``ResBlock`` and ``SpatialTransformer``: they are where the time goes, they repeat
    with few distinct shapes (same class + same shapes share code), and GroupNorm + projections +
    attention + feed-forward fuse inside one SpatialTransformer graph. The ``TimestepEmbedSequential``
    containers are a bad unit: each of SD1.5's 25 is a different mix (conv / ResBlock+transformer /
    Downsample / Upsample), so none share code, and Forge's version iterates ``block_inner_modifiers``
    callables and counts ``transformer_index`` in the options dict (a new guard value per block).
    ``Downsample``/``Upsample`` are one convolution each: nothing to fuse. Flux and Chroma (Forge
    ``backend/nn/flux.py``, ``chroma.py``) repeat ``DoubleStreamBlock``/``SingleStreamBlock``; SD3
    (``backend/nn/mmditx.py``) repeats ``JointBlock``. :func:`select_blocks` keeps only the outermost
    matches, so a selected block never contains another (a compiled block would trace into the inner
    block's wrapper).

Sharing, weights and the cache-size limit — what differs between torch versions
    Since torch 2.5 dynamo inlines ``nn.Module`` s (``inline_inbuilt_nn_modules``): parameters are
    graph *inputs* read at every call, so instances of one class with the same shapes share one graph,
    and replaced parameters are picked up. We then give all instances of a class one compiled function
    ("shared" mode). Before 2.5 (A1111 v1.10.1 ships 2.1.2, Forge f2 2.3.1) every module instance is
    guarded by identity (one graph per instance anyway) and its parameters are captured when it is
    compiled: a parameter replaced afterwards by a new tensor (Forge ``backend/patcher/lora.py:441``)
    would be silently ignored — verified on 2.1.2 and 2.3.1. There we give each block its own compiled
    function ("per-instance" mode) and fingerprint its parameters/buffers/submodules (identity, device,
    dtype) on the first call of each application; a changed fingerprint rebuilds that block's compiled
    function. Changes *in place* (A1111's LoRA ``copy_`` into weights, ``.data`` swaps that keep the
    Parameter) need nothing: compiled code reads the live tensors.

    Dynamo keeps at most ``cache_size_limit``/``recompile_limit`` compiled entries per function (8 in
    2.3 and in 2.5+, where it counts all entries of a function whose guards match no object identity,
    i.e. our shared functions; 64 in 2.1) and falls back to eager for that function *silently* beyond
    it. SD1.5 has 22 ResBlocks, and Forge's options dict adds a guard per block position, so a shared
    function can need more. During an application we raise the limits (never lower them) to
    ``entries_per_block`` × the number of blocks sharing one function, and restore the exact previous
    values afterwards. If dynamo still reports the limit for one of our functions, the stats count it,
    one ``[Optim]`` line says so, that block runs eagerly for the rest of the generation and the next
    application allows twice as many.

Every compiled function has its own code object (a fresh copy of a two-line trampoline): dynamo caches
per code object, so our entries never mix with another user's ``torch.compile`` of the same forward,
with each other's modes/backends, or across keys, and its automatic-dynamic bookkeeping is per block
class (or per block).

Dynamic shapes
    ``dynamic=None`` (dynamo's automatic dynamic shapes, torch >= 2.1): the first size compiles static
    graphs; the first *change* of a dimension recompiles once with that dimension symbolic, and later
    sizes reuse it. So a new size or batch costs at most one recompile per distinct block setting, once.
    (Sizes 0 and 1 are always specialised: batch 1 after batch 2 is one more graph.)

Cache keys and lifetime
    A compiled function is keyed by the caller's ``key`` (which MUST identify the attention
    implementation — see below), the mode, backend, ``dynamic``, the blocks' dtype and device, and the
    sharing mode; it is stored under a weak reference to the root module (shared mode) or to the block
    (per-instance mode), so unloading the model frees it (and dynamo's cache on its code object).
    Failures are remembered under the same key for the life of the root module.

    The key must change whenever the attention implementation changes. Dynamo does not notice a
    rebound class attribute (A1111 switches attention by assigning ``CrossAttention.forward``) on any
    torch we tried (2.1.2, 2.3.1, 2.13), nor a rebound module global (Forge's ``attention_function``)
    on 2.1.2/2.3.1: the old compiled attention would keep running. A new key gets new compiled
    functions; switching back reuses the old ones (both variants stay cached).

First call of a block is eager when its weights may have changed
    Hosts apply some weight changes lazily in the first forward of a layer (A1111
    ``extensions-builtin/Lora/networks.py:578-590`` applies the selected LoRAs in place on the first
    forward after the selection changed, and may make a new bias Parameter). Running that first call
    eagerly lets such one-time edits finish outside the compiled code (so a trace never captures the edit
    itself); it is also where the weight fingerprint is checked. The host passes a ``weights_token`` (A1111:
    the LoRA selection as ``network_apply_weights`` compares it, and how many layers do not hold it, which a
    checkpoint loaded into the same model changes); a block whose token is unchanged since its last eager
    call runs compiled from its first call, so a repeated generation pays no eager step. The token is read
    once per application: a weight load in the middle of one (A1111's refiner loaded into the same model) is
    not seen. Without a token every application's first call of each block is eager;
    ``eager_first_call=False`` turns it off altogether.

What runs inside the compiled code (:mod:`lib_optim.compile.region`)
    While a block's compiled code runs (and is traced) our wrapper leaves the block's ``__dict__`` (before
    torch 2.5 dynamo traces a module with an instance ``forward`` unspecialised, and breaks on
    ``self.parameters()``), and the host's patches apply: what in its blocks dynamo cannot trace, swapped
    for equivalents it can (einops patterns as reshape/permute, a free-memory figure measured before the
    region, A1111's ``CondFunc`` resolved to the function it calls). One graph per block, no graph break.

Failure policy
    A compile error surfaces at the first *call* of a compiled function (no C++ compiler for inductor's
    CPU backend, no triton for CUDA, an unsupported op...). The wrapper catches it, restores the eager
    forwards of the whole application, reruns that call eagerly and logs ONE ``[Optim]`` line naming the
    fix; the failure is remembered for that model and key, so it is not retried in this process. If the
    eager rerun fails too, the error was not the compiler's: the eager error propagates and nothing is
    remembered. An out-of-memory error (:func:`lib_optim.telemetry.is_out_of_memory`) is never treated
    as a compile failure: it propagates unchanged for the extension's OOM retry. ``BaseException`` s
    that are not ``Exception`` s (interrupts) propagate untouched. :func:`compile_availability` checks
    the usual causes up front.

Where the parts live
    This module holds the compiler, its applications and their stats; :mod:`lib_optim.compile.blocks` the
    lever's values and the block selection, :mod:`lib_optim.compile.cache` what is kept per key, owner and
    block (with the weight fingerprint), :mod:`lib_optim.compile.dynamo` the trampolines and dynamo's
    counters, limits and log lines, :mod:`lib_optim.compile.availability` the up-front checks and the
    one-line failure reasons.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import threading
import time
import types
import weakref
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

from lib_optim.compile.availability import compile_availability, describe_compile_error
from lib_optim.compile.blocks import (
    _INDUCTOR_MODES,
    MIN_TORCH,
    _check_mode,
    _dtype_device,
    _is_module_list,
    _outermost,
    select_blocks,
    torch_version,
)
from lib_optim.compile.cache import (
    _MISSING,
    DEFAULT_ENTRIES_PER_BLOCK,
    _Compiled,
    _fingerprint,
    _KeyState,
    _owner_of,
    _RootState,
    _Slot,
)
from lib_optim.compile.dynamo import (
    _DYNAMO_LOGGERS,
    TRAMPOLINE_PREFIX,
    _call_bound,
    _call_unbound,
    _dynamo_counts,
    _fresh_function,
    _guard_failures,
    _limit_names,
    _LimitWatcher,
    _quiet_backend_change_warning,
    _reporting_guard_failures,
    _shares_across_instances,
)
from lib_optim.compile.persist import keep_precompiled_headers
from lib_optim.compile.region import RegionChange, patched, specialisable
from lib_optim.compile.sharing import SharedGraphBackend
from lib_optim.compile.stats import MAX_RECOMPILE_REASONS, CompileStats
from lib_optim.log import get_logger
from lib_optim.telemetry import is_out_of_memory

log = get_logger(__name__)

_name_counter = itertools.count(1)


# ------------------------------------------------------------------------------------------ internals


class Application:
    """One generation's compiled blocks. Use as a context manager; :meth:`close` restores the forwards."""

    def __init__(
        self,
        compiler: RegionalCompiler,
        root: Any,
        blocks: list[Any],
        *,
        key: Hashable,
        mode: str,
        dynamic: bool | None,
        patches: Sequence[RegionChange] = (),
        weights_token: Callable[[], Hashable] | None = None,
        weights_dirty: Callable[[Any], bool] | None = None,
        interrupt: Callable[[], None] | None = None,
        prepare: Callable[[], None] | None = None,
        lazy_weights: bool = True,
    ):
        self.compiler = compiler
        self.weights_dirty = weights_dirty
        self.prepare = prepare
        self.lazy_weights = lazy_weights
        self.patches = tuple(patches)
        self.weights_token = weights_token
        self.interrupt = interrupt
        self._token: Any = _MISSING
        self.root: Any = root
        self.blocks = blocks
        self.key = key
        self.mode = mode
        self.dynamic = dynamic
        self.stats = CompileStats(mode=mode, key=_short(key), blocks=len(blocks))
        self.failed = False
        self.closed = False
        self.entered = False
        self.installed = False
        self._slots: list[_Slot] = []
        self._full_key: tuple[Any, ...] | None = None
        self._limits: list[tuple[str, int]] = []
        self._watcher: _LimitWatcher | None = None
        self._warned_limit = False

    # -- context manager
    def __enter__(self) -> Application:
        self.compiler._install(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def active(self) -> bool:
        """Whether compiled forwards are in place right now."""
        return self.installed and not self.failed and not self.closed

    @property
    def compiled_blocks(self) -> int:
        """How many of the blocks have run their compiled code in this application so far."""
        return self.progress()[0]

    def progress(self, within: Any = None) -> tuple[int, int]:
        """(blocks that ran their compiled code so far, blocks) — all of them, or those inside the module
        ``within`` (the compile warm-up's progress, :mod:`lib_optim.compile.warmup`)."""
        if within is None:
            return sum(1 for slot in self._slots if slot.compiled_calls > 0), self.stats.blocks
        inside = {id(module) for module in within.modules()}
        slots = [slot for slot in self._slots if id(slot.block) in inside]
        return sum(1 for slot in slots if slot.compiled_calls > 0), len(slots)

    def close(self) -> None:
        """Restore every block's forward exactly and the dynamo limits (idempotent)."""
        if self.closed:
            return
        self.closed = True
        self._restore_forwards()
        self._restore_limits()
        self.compiler._closed(self)
        if self.stats.compiles:
            log.info(
                "[Optim] torch.compile: %d compiles (%d graphs) took %.1f s this generation",
                self.stats.compiles,
                self.stats.graphs,
                self.stats.compile_seconds,
            )
        self._slots = []
        self.root = None
        self.blocks = []

    # -- installation helpers (called by the compiler)
    def _restore_forwards(self) -> None:
        if not self.installed:
            return
        for slot in self._slots:
            current = vars(slot.block).get("forward", _MISSING)
            if current is not slot.wrapper:
                log.debug("%s.forward was replaced by someone else while compiled; restoring the original", slot.block)
            if slot.original is _MISSING:
                vars(slot.block).pop("forward", None)
            else:
                slot.block.forward = slot.original
        self.installed = False

    def _raise_limits(self, needed: int) -> None:
        from torch._dynamo import config

        for name in _limit_names():
            if name is None:
                continue
            old = int(getattr(config, name))
            if old < needed:
                setattr(config, name, needed)
                self._limits.append((name, old))
        self._watcher = _LimitWatcher()
        for logger_name in _DYNAMO_LOGGERS:
            logging.getLogger(logger_name).addHandler(self._watcher)

    def _restore_limits(self) -> None:
        from_torch = self._limits
        self._limits = []
        if from_torch:
            from torch._dynamo import config

            for name, old in reversed(from_torch):
                setattr(config, name, old)
        if self._watcher is not None:
            for logger_name in _DYNAMO_LOGGERS:
                logging.getLogger(logger_name).removeHandler(self._watcher)
            self._watcher = None

    # -- the call path
    def _call(self, slot: _Slot, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.failed or self.closed or slot.eager_only:
            self.stats.eager_calls += 1
            return slot.call_eager(args, kwargs)
        slot.calls += 1
        if slot.calls == 1:
            self.compiler._check_weights(self, slot)
            if self._needs_eager_first_call(slot):
                self.stats.eager_calls += 1
                out = slot.call_eager(args, kwargs)
                self.compiler._weights_seen[slot.block] = self._current_token()
                return out
        if self.prepare is not None:
            prepare, self.prepare = self.prepare, None
            prepare()  # once, outside the region: e.g. the free-memory figure the patches answer with
        if slot.compiled_calls == 0 and self.interrupt is not None:
            try:
                self.interrupt()  # the host's Interrupt/Skip, honoured before a call that may compile (between blocks)
            except BaseException:
                self.stats.interrupted = True
                raise
        compiled = slot.compiled
        state = slot.state
        assert compiled is not None and state is not None
        if not state.announced:
            state.announced = True
            self.compiler._announce(self)
        clock = self.compiler.clock
        hits_before = self._watcher.hits if self._watcher else 0
        failures_before = len(_guard_failures(compiled.code))
        before = (*_dynamo_counts(), self.compiler._shared_reuses())
        start = clock()
        try:
            with _reporting_guard_failures(), specialisable(slot.block), patched(self.patches):
                if slot.bound:
                    out = compiled.fn(slot.eager, *args, **kwargs)
                else:
                    out = compiled.fn(type(slot.block).forward, slot.block, *args, **kwargs)
        except Exception as exc:
            self._account(start, before)
            if is_out_of_memory(exc):
                raise  # not a compile problem: the extension's OOM retry handles it
            return self._fall_back(slot, exc, args, kwargs)
        self._account(start, before)
        self._note_recompiles(compiled.code, failures_before)
        self.stats.calls += 1
        slot.compiled_calls += 1
        if self._watcher is not None and self._watcher.hits > hits_before:
            self._limit_hit(slot, state)
        return out

    def _note_recompiles(self, code: types.CodeType, known: int) -> None:
        """Keep why a block recompiled (the first few distinct reasons of the application): a recompile of an
        identical generation is a bug to explain, and dynamo's reason names the guard that changed."""
        reasons = self.stats.recompile_reasons
        for reason in _guard_failures(code)[known:]:
            line = reason.splitlines()[0][:300] if reason else "?"
            if line not in reasons and len(reasons) < MAX_RECOMPILE_REASONS:
                reasons.append(line)
                log.info("[Optim] compile: a block recompiled because %s", line)

    def _current_token(self) -> Any:
        """The host's weights token, read once per application (at the first block call: during sampling, after
        the host has selected this generation's LoRAs)."""
        if self._token is _MISSING:
            self._token = self.weights_token() if self.weights_token is not None else _MISSING
        return self._token

    def _needs_eager_first_call(self, slot: _Slot) -> bool:
        """Whether this block's first call runs eagerly: only when its weights may have changed since its last
        compiled run (a host that applies weight edits lazily in the first forward, like A1111's LoRA, does so
        then, outside the compiled code). Without a token from the host: always."""
        if not self.compiler.eager_first_call or not self.lazy_weights:
            return False
        token = self._current_token()
        if token is _MISSING or (self.weights_dirty is not None and self.weights_dirty(slot.block)):
            return True  # (dirty: the host edits this block's weights in its next forward, whatever the token)
        return self.compiler._weights_seen.get(slot.block, _MISSING) != token

    def _account(self, start: float, before: tuple[int, ...]) -> None:
        elapsed = self.compiler.clock() - start
        ok0, total0, graphs0, breaks0, shared0 = before
        ok1, total1, graphs1, breaks1 = _dynamo_counts()
        self.stats.graph_breaks += breaks1 - breaks0
        self.stats.shared_graphs += self.compiler._shared_reuses() - shared0
        compiled = ok1 - ok0
        if compiled > 0:
            self.stats.compiles += compiled
            self.stats.graphs += graphs1 - graphs0
            self.stats.compile_seconds += elapsed
            self.compiler._add_process_compiles(compiled, elapsed)
        else:
            self.stats.run_seconds += elapsed
        self.stats.eager_frames += max(0, (total1 - total0) - compiled)
        self.stats.process_compiles = self.compiler.total_compiles

    def _limit_hit(self, slot: _Slot, state: _KeyState) -> None:
        self.stats.limit_hits += 1
        slot.eager_only = True
        # Dynamo compiles nothing more for that function now: the blocks sharing it that have not run
        # compiled yet would each meet the limit again (dynamo logs only the first time).
        for other in self._slots:
            if other.compiled is slot.compiled and other.compiled_calls == 0:
                other.eager_only = True
        state.budget *= 2
        if not self._warned_limit:
            self._warned_limit = True
            log.warning(
                "[Optim] torch.compile reached dynamo's recompile limit for the %s blocks; they run uncompiled "
                "for the rest of this generation (the next one allows more)",
                type(slot.block).__name__,
            )

    def _fall_back(self, slot: _Slot, exc: Exception, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        self.failed = True
        self._restore_forwards()
        reason = describe_compile_error(exc)
        self.stats.fell_back = True
        self.stats.fallback_reason = reason
        try:
            out = slot.call_eager(args, kwargs)
        except Exception:
            # The eager forward fails the same way: the model's error, not the compiler's. Remember nothing.
            log.debug("compiled call failed and the eager rerun failed too; not a compile error", exc_info=exc)
            self.stats.fallback_reason = f"the block failed eagerly too ({reason})"
            raise
        self.stats.eager_calls += 1
        self.compiler._remember_failure(self, reason)
        log.warning(
            "[Optim] torch.compile failed, this generation continues without it (not retried for this model "
            "and attention until restart): %s",
            reason,
        )
        log.debug("torch.compile failure", exc_info=exc)
        return out


def _short(key: Hashable) -> str:
    text = getattr(key, "__qualname__", None) or str(key)
    return text if len(text) <= 120 else text[:117] + "..."


class RegionalCompiler:
    """Applies compiled forwards to a model's blocks per generation and keeps the compiled code.

    ``backend``: ``"inductor"`` for real use; tests pass ``"eager"``/``"aot_eager"`` or a callable.
    ``clock``: seconds, for the compile/run accounting. ``on_compile(message)``: called once per model and
    key, just before its first compile (default: an ``[Optim]`` info line). ``entries_per_block``: the
    dynamo cache budget per block (see the module docstring). ``eager_first_call``: run a block's first call
    eagerly when its weights may have changed. ``share_graphs``: before torch 2.5, compile identical blocks
    once (:mod:`lib_optim.compile.sharing`; with the ``inductor`` and ``aot_eager`` backends).
    """

    def __init__(
        self,
        *,
        backend: str | Callable[..., Any] = "inductor",
        clock: Callable[[], float] = time.perf_counter,
        on_compile: Callable[[str], None] | None = None,
        entries_per_block: int = DEFAULT_ENTRIES_PER_BLOCK,
        eager_first_call: bool = True,
        share_graphs: bool = True,
    ):
        if entries_per_block < 1:
            raise ValueError(f"[Optim] regional compile: entries_per_block={entries_per_block!r} must be >= 1")
        self.backend = backend
        self.clock = clock
        self.on_compile = on_compile
        self.entries_per_block = entries_per_block
        self.eager_first_call = eager_first_call
        self.share_graphs = share_graphs
        self._sharing: dict[tuple[Any, ...], SharedGraphBackend] = {}
        self.total_compiles = 0
        self.total_compile_seconds = 0.0
        self._lock = threading.RLock()
        self._availability: dict[tuple[str, str], tuple[bool, str]] = {}
        self._roots: weakref.WeakKeyDictionary[Any, _RootState] = weakref.WeakKeyDictionary()
        self._per_block: weakref.WeakKeyDictionary[Any, dict[tuple[Any, ...], _KeyState]] = weakref.WeakKeyDictionary()
        self._active_by_block: weakref.WeakKeyDictionary[Any, Application] = weakref.WeakKeyDictionary()
        self._active_by_root: weakref.WeakKeyDictionary[Any, Application] = weakref.WeakKeyDictionary()
        # block → the host's weights token when its weights were last brought up to date by an eager call
        self._weights_seen: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()

    # -- public API
    def apply(
        self,
        root: Any,
        blocks: Sequence[Any] | Iterable[str] | Callable[[Any], bool],
        *,
        key: Hashable = None,
        mode: str = "on",
        dynamic: bool | None = None,
        patches: Sequence[RegionChange] = (),
        weights_token: Callable[[], Hashable] | None = None,
        weights_dirty: Callable[[Any], bool] | None = None,
        interrupt: Callable[[], None] | None = None,
        prepare: Callable[[], None] | None = None,
        lazy_weights: bool = True,
    ) -> Application:
        """An :class:`Application` (context manager) compiling ``blocks`` of ``root`` for one generation.

        ``blocks``: modules, class names, or a predicate (names and predicates go through
        :func:`select_blocks`). ``key``: must identify the attention implementation (and anything else the
        blocks read that dynamo does not guard, see the module docstring). ``mode``: one of :data:`MODES`;
        ``off`` changes nothing. Entering it first closes any application still active on ``root`` or on
        one of these blocks. ``patches``: what the host's code in the blocks would break dynamo's graph with,
        swapped while compiled code runs (:mod:`lib_optim.compile.region`). ``weights_token``: called once per
        application, at the first block call; a block whose token is unchanged since its last run skips the eager
        first call (see the module docstring); ``weights_dirty(block)``: True when the host will edit that block's
        weights in its next forward whatever the token says (A1111: LoRA weights an eager generation left applied):
        its first call runs eagerly. ``interrupt``: called before a block's first compiled call of the
        application; the host's Interrupt/Skip exception it raises propagates, and what compiled stays cached.
        ``prepare``: called once, before the application's first compiled call, outside the region.
        ``lazy_weights=False``: the host never edits these blocks' weights in a forward (the VAE): no eager first
        call at all.
        """
        _check_mode(mode)
        if dynamic not in (None, True, False):
            raise ValueError(f"[Optim] regional compile: dynamic={dynamic!r} must be None, True or False")
        if isinstance(blocks, str) or callable(blocks) or not _is_module_list(blocks):
            chosen = select_blocks(root, blocks)
        else:
            chosen = _outermost(list(blocks))
        return Application(
            self,
            root,
            chosen,
            key=key,
            mode=mode,
            dynamic=dynamic,
            patches=patches,
            weights_token=weights_token,
            weights_dirty=weights_dirty,
            interrupt=interrupt,
            prepare=prepare,
            lazy_weights=lazy_weights,
        )

    def availability(self, device: Any, mode: str = "on") -> tuple[bool, str]:
        """:func:`compile_availability` for the real backend, checked once per device and mode in this process
        (tests with another backend: always available)."""
        if self.backend != "inductor":
            return True, ""
        key = (str(device), mode)
        with self._lock:
            if key not in self._availability:
                self._availability[key] = compile_availability(device, mode=mode)
            return self._availability[key]

    def failure(self, root: Any, key: Hashable = None, mode: str = "on", dynamic: bool | None = None) -> str | None:
        """The remembered compile failure for ``root`` and this key (None if none)."""
        state = self._roots.get(root)
        if state is None:
            return None
        prefix = (key, mode, self._backend_key(), dynamic)
        for full_key, reason in state.failures.items():
            if full_key[:4] == prefix:
                return reason
        return None

    def forget(self, root: Any) -> None:
        """Drop everything cached for ``root`` and its blocks (compiled code and remembered failures)."""
        with self._lock:
            state = self._roots.pop(root, None)
            if state is not None:
                for key_state in state.keys.values():
                    for compiled in key_state.compiled.values():
                        compiled.discard()
            for block in list(root.modules()):
                for key_state in self._per_block.pop(block, {}).values():
                    for compiled in key_state.compiled.values():
                        compiled.discard()

    def clear(self) -> None:
        """Drop everything this compiler cached."""
        with self._lock:
            for root in list(self._roots.keys()):
                self.forget(root)
            for states in list(self._per_block.values()):
                for key_state in states.values():
                    for compiled in key_state.compiled.values():
                        compiled.discard()
            self._per_block.clear()

    # -- internals used by Application
    def _backend_key(self) -> Any:
        return self.backend

    def _install(self, app: Application) -> None:
        with self._lock:
            if app.closed or app.entered:
                raise RuntimeError("[Optim] regional compile: an application can be entered once")
            app.entered = True
            self._close_previous(app)
            if app.mode == "off" or not app.blocks:
                return
            import torch

            if torch_version(str(torch.__version__)) < MIN_TORCH or not hasattr(torch, "compile"):
                app.failed = True
                app.stats.fell_back = True
                app.stats.fallback_reason = f"torch >= 2.1 needed (found {torch.__version__})"
                log.warning("[Optim] torch.compile is off: %s", app.stats.fallback_reason)
                return
            shared = _shares_across_instances()
            app.stats.shared = shared
            dtype, device = _dtype_device(app.blocks)
            full_key = (app.key, app.mode, self._backend_key(), app.dynamic, dtype, device, shared)
            app._full_key = full_key
            root_state = self._roots.get(app.root)
            if root_state is None:
                root_state = self._roots[app.root] = _RootState()
            reason = root_state.failures.get(full_key)
            if reason is not None:
                app.failed = True
                app.stats.fell_back = True
                app.stats.fallback_reason = f"failed before: {reason}"
                log.debug("regional compile skipped: it failed before for this model and key: %s", reason)
                return
            needed = self._prepare_slots(app, root_state, full_key, shared)
            app._raise_limits(needed)
            for slot in app._slots:
                self._active_by_block[slot.block] = app
                slot.wrapper = self._make_wrapper(app, slot)
                slot.block.forward = slot.wrapper
            self._active_by_root[app.root] = app
            app.installed = True

    def _close_previous(self, app: Application) -> None:
        previous = {id(a): a for a in [self._active_by_root.get(app.root)] if a is not None}
        for block in app.blocks:
            other = self._active_by_block.get(block)
            if other is not None:
                previous[id(other)] = other
        for other in previous.values():
            if other is not app and not other.closed:
                log.debug("closing the previous regional compile application first")
                other.close()

    def _prepare_slots(self, app: Application, root_state: _RootState, full_key: tuple[Any, ...], shared: bool) -> int:
        per_class: dict[type, int] = {}
        for block in app.blocks:
            per_class[type(block)] = per_class.get(type(block), 0) + 1
        needed = 0
        for block in app.blocks:
            original = vars(block).get("forward", _MISSING)
            owner = _owner_of(original)
            if owner is not None:  # a wrapper of ours that was left behind: look through it
                original = owner.original
            bound = original is not _MISSING
            eager = original if bound else types.MethodType(type(block).forward, block)
            slot = _Slot(block, original, eager, bound)
            if shared:
                state = root_state.keys.get(full_key)
                if state is None:
                    state = root_state.keys[full_key] = _KeyState()
                    state.budget = self.entries_per_block
                function_key: Any = (type(block), bound)
                needed = max(needed, state.budget * per_class[type(block)])
            else:
                states = self._per_block.get(block)
                if states is None:
                    states = self._per_block[block] = {}
                state = states.get(full_key)
                if state is None:
                    state = states[full_key] = _KeyState()
                    state.budget = self.entries_per_block
                function_key = bound
                needed = max(needed, state.budget)
            compiled = state.compiled.get(function_key)
            if compiled is None:
                compiled = state.compiled[function_key] = self._compile(app, type(block), bound)
            slot.state = state
            slot.compiled = compiled
            app._slots.append(slot)
        return needed

    def _compile(self, app: Application, cls: type, bound: bool) -> _Compiled:
        import torch

        name = f"{TRAMPOLINE_PREFIX}{cls.__name__}_{next(_name_counter)}"
        fn = _fresh_function(_call_bound if bound else _call_unbound, name)
        kwargs: dict[str, Any] = {"backend": self.backend, "dynamic": app.dynamic}
        if self.share_graphs and not app.stats.shared and self.backend in ("inductor", "aot_eager"):
            kwargs["backend"] = self._shared_backend(app)  # torch < 2.5: identical blocks compile once
        elif self.backend == "inductor" and _INDUCTOR_MODES[app.mode] is not None:
            kwargs["mode"] = _INDUCTOR_MODES[app.mode]
        _quiet_backend_change_warning()
        if self.backend == "inductor":
            keep_precompiled_headers()  # torch 2.9+ would build them in the temp folder again after each restart
        compiled = torch.compile(fn, **kwargs)
        return _Compiled(compiled, fn.__code__, name)

    def _shared_reuses(self) -> int:
        return sum(backend.reused for backend in self._sharing.values())

    def _shared_backend(self, app: Application) -> SharedGraphBackend:
        key = (app.mode, app.dynamic, self.backend)
        if key not in self._sharing:
            inner = None if self.backend == "inductor" else self.backend
            self._sharing[key] = SharedGraphBackend(_INDUCTOR_MODES[app.mode], app.dynamic, inner=inner)
        return self._sharing[key]

    def _check_weights(self, app: Application, slot: _Slot) -> None:
        """Per-instance mode: rebuild a block's compiled function if its weights were replaced or a plain value
        it holds changed (:func:`lib_optim.compile.cache._fingerprint`)."""
        if app.stats.shared or slot.compiled is None or slot.state is None:
            return
        fingerprint = _fingerprint(slot.block)
        compiled = slot.compiled
        if compiled.fingerprint is None:
            compiled.fingerprint = fingerprint
            return
        if compiled.fingerprint == fingerprint:
            return
        log.debug(
            "%s: parameters or settings changed since it was compiled; compiling it again", type(slot.block).__name__
        )
        function_key = slot.bound
        compiled.discard()
        fresh = self._compile(app, type(slot.block), slot.bound)
        fresh.fingerprint = fingerprint
        slot.state.compiled[function_key] = fresh
        slot.compiled = fresh
        app.stats.rebuilt_for_weights += 1

    def _make_wrapper(self, app: Application, slot: _Slot) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            return app._call(slot, args, kwargs)

        with contextlib.suppress(AttributeError, TypeError):
            functools.update_wrapper(forward, slot.eager)  # signature introspection sees the real forward
        forward.__optim_slot__ = slot  # type: ignore[attr-defined]
        return forward

    def _announce(self, app: Application) -> None:
        for slot in app._slots:
            if slot.state is not None:
                slot.state.announced = True
        message = (
            f"[Optim] compiling the UNet blocks (torch.compile, mode {app.mode}), first run only "
            "— this can take a minute or two"
        )
        if self.on_compile is not None:
            self.on_compile(message)
        else:
            log.info("%s", message)

    def _remember_failure(self, app: Application, reason: str) -> None:
        if app._full_key is None or app.root is None:
            return
        with self._lock:
            state = self._roots.get(app.root)
            if state is None:
                state = self._roots[app.root] = _RootState()
            state.failures[app._full_key] = reason

    def _add_process_compiles(self, count: int, seconds: float) -> None:
        self.total_compiles += count
        self.total_compile_seconds += seconds

    def _closed(self, app: Application) -> None:
        with self._lock:
            if app.root is not None and self._active_by_root.get(app.root) is app:
                del self._active_by_root[app.root]
            for slot in app._slots:
                if self._active_by_block.get(slot.block) is app:
                    del self._active_by_block[slot.block]


@functools.cache
def get_compiler() -> RegionalCompiler:
    """The process-wide compiler the host adapters share (its caches live as long as the process)."""
    return RegionalCompiler()
