"""The compile warm-up's host side; :mod:`lib_optim.compile.warmup` does the work.

When the WebUI has loaded a model (``script_callbacks.on_model_loaded``, docs/hosts.md §6.11) and Settings → Optim
→ compile is ``on`` or ``max-autotune``, the runtime's warm-up gets a :class:`lib_optim.compile.WarmupTarget`:

- ``enter``: the adapter's own ``begin`` on :class:`WarmupProcessing`, a stand-in for a generation, with the default
  attention, channels-last and compile — so the key, the region patches, the blocks and the mode are the ones a
  generation with the defaults gets, by construction;
- ``forward``: the adapter's UNet call of one sampling step (:meth:`lib_optim.adapter.HostAdapter.warmup_forward`)
  at the size of the family's last generation (:meth:`lib_optim.runtime.Runtime.warmup_size`), and ``decode``: the
  host's decode of the sampled batch (:meth:`~lib_optim.adapter.HostAdapter.warmup_decode`), which compiles the
  VAE's blocks (img2img's encoder still compiles in the first img2img);
- ``hold``/``busy``: the WebUI's queue lock, which its generations, model loads and VAE changes take (§1.8), and
  whether a job waits for it — so the warm-up runs between the WebUI's jobs and yields to the next one.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lib_optim.adapter import NotSupportedHere
from lib_optim.compile import VAE_DATA_KEY, WARMUP_MODES, WarmupPart, WarmupState, WarmupTarget, get_compiler
from lib_optim.hosts import common
from lib_optim.log import get_logger
from lib_optim.runtime import Runtime
from lib_optim.settings import GenerationSettings

log = get_logger(__name__)

FAMILIES = "SD1.x/SD2.x/SDXL"


@dataclass
class WarmupProcessing:
    """Stands in for a generation's ``p`` in the adapter's ``begin``: what its attention (``auto`` plans for the
    size), channels-last and compile appliers read, and the warm-up's between-blocks check under the name
    :data:`lib_optim.hosts.base.WARMUP_INTERRUPT` (the compile application gets it instead of Interrupt/Skip)."""

    sd_model: Any
    width: int
    height: int
    batch_size: int
    optim_warmup_interrupt: Callable[[], None]
    n_iter: int = 1
    steps: int = 20
    enable_hr: bool = False
    sd_model_hash: str = ""
    extra_generation_params: dict[str, Any] = field(default_factory=dict)


def warmup_settings(defaults: GenerationSettings) -> GenerationSettings | None:
    """What the warm-up applies: the defaults' attention, channels-last and compile — what shapes the compiled code
    (the attention is part of its key, the memory format of its guards). None when the default compile does not
    warm up (``off``; ``auto``, which decides per job whether compiling pays)."""
    if defaults.compile.value not in WARMUP_MODES:
        return None
    return GenerationSettings(
        enabled=True, attention=defaults.attention, channels_last=defaults.channels_last, compile=defaults.compile
    )


def still_loaded(sd_model: Any) -> bool:
    """Whether ``sd_model`` is still the WebUI's loaded model, read without loading one (``shared.sd_model`` would,
    §6.11); True outside a WebUI."""
    sd_models = sys.modules.get("modules.sd_models")
    if sd_models is None:
        return True
    return getattr(getattr(sd_models, "model_data", None), "sd_model", None) is sd_model


def _queue_lock() -> Any:
    return getattr(sys.modules.get("modules.call_queue"), "queue_lock", None)


@contextlib.contextmanager
def host_job_lock() -> Iterator[None]:
    """The WebUI's queue lock (§1.8), then past A1111's start-up load (it holds ``model_data.lock`` while it loads
    outside the queue, §6.11): the warm-up starts once the host's job that loaded the model is over."""
    lock = _queue_lock()
    with lock if lock is not None else contextlib.nullcontext():
        loading = getattr(getattr(sys.modules.get("modules.sd_models"), "model_data", None), "lock", None)
        if loading is not None:
            with loading:
                pass
        yield


def host_jobs_waiting() -> bool:
    """Whether a WebUI job waits for the queue lock: its FIFO lock queues each waiter's event (§1.8)."""
    return bool(getattr(_queue_lock(), "_pending_threads", None))


def on_model_loaded(sd_model: Any) -> None:
    """``script_callbacks.on_model_loaded``: start the compile warm-up for ``sd_model`` when Settings → Optim →
    compile asks for it. Never raises (the host reports callback errors as its own)."""
    try:
        start(common.ensure_runtime(), sd_model, common.defaults_from_options())
    except Exception as exc:  # a warm-up that cannot start must not disturb the model load
        log.warning("[Optim] compile warm-up not started: %s", common.first_line(exc))
        log.debug("compile warm-up start", exc_info=True)


def start(rt: Runtime, sd_model: Any, defaults: GenerationSettings, device: str | None = None) -> bool:
    """Hand the runtime's warm-up a target for ``sd_model`` (see the module doc); False, with the reason in its
    state, when none runs for it."""
    adapter = rt.adapter
    settings = warmup_settings(defaults)
    if adapter is None or settings is None:
        rt.warmup.note("")
        return False
    family = adapter.model_family(sd_model)
    if family is None:
        rt.warmup.note(f"not run: the loaded model is no {FAMILIES} UNet")
        return False
    device = device if device is not None else common.generation_device() or "cpu"
    available, why = get_compiler().availability(device, settings.compile.value)
    if not available:
        rt.warmup.note(f"not run: compile is not available here ({why})")
        return False
    width, height, batch = rt.warmup_size(family)
    try:
        forward = adapter.warmup_forward(sd_model, width, height, batch)
    except NotSupportedHere as exc:
        rt.warmup.note(f"not run: {str(exc).removeprefix('[Optim] compile warm-up: ')}")
        return False
    decode = _decode_or_none(adapter, sd_model, width, height, batch)

    @contextlib.contextmanager
    def enter(interrupt: Callable[[], None]) -> Iterator[Any]:
        stand_in = WarmupProcessing(
            sd_model, width, height, batch, interrupt, sd_model_hash=str(getattr(sd_model, "sd_model_hash", "") or "")
        )
        session = adapter.begin(stand_in, settings)
        try:
            application = session.data.get("compile")
            if application is None:
                raise RuntimeError(str(session.data.get("compile_unavailable") or "nothing to compile"))
            parts = [WarmupPart(application)]
            vae = session.data.get(VAE_DATA_KEY)
            if vae is not None and decode is not None:  # the decode runs the decoder's blocks, not the encoder's
                parts.append(WarmupPart(vae, within=getattr(vae.root, "decoder", None)))
            yield parts
        finally:
            session.restorer.close()

    log.info("[Optim] compile warm-up queued: %s blocks at %dx%d, batch %d", family, width, height, batch)
    rt.warmup.start(
        WarmupTarget(
            enter=enter,
            forward=forward,
            decode=decode,
            family=family,
            width=width,
            height=height,
            batch=batch,
            hold=host_job_lock,
            busy=host_jobs_waiting,
            current=lambda: still_loaded(sd_model),
        )
    )
    return True


def _decode_or_none(adapter: Any, sd_model: Any, width: int, height: int, batch: int) -> Callable[[], None] | None:
    """The adapter's decode for the warm-up, or None where it has none (the VAE then compiles in the first
    generation, as without a warm-up)."""
    try:
        return adapter.warmup_decode(sd_model, width, height, batch)
    except NotSupportedHere as exc:
        log.info("[Optim] compile warm-up: the VAE is not warmed up (%s)", exc)
        return None


def before_generation(rt: Runtime, p: Any, settings: GenerationSettings | None) -> None:
    """From the script's ``process``, for every generation: remember its size for its model family's warm-up and
    keep the warm-up off the model until it ends (:meth:`lib_optim.runtime.Runtime.generation_starts`); a wait
    shows in the progress text (``shared.state.textinfo``, §1.8)."""
    family = rt.adapter.model_family(getattr(p, "sd_model", None)) if rt.adapter is not None else None

    def report(state: WarmupState) -> None:
        shared_state = getattr(sys.modules.get("modules.shared"), "state", None)
        if shared_state is not None:
            shared_state.textinfo = f"[Optim] waiting for the {state.text()}"

    rt.generation_starts(p, settings, family=family, report=report)
