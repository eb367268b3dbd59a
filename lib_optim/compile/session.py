"""Regional compile for one generation: what every host adapter calls from its ``apply_compile``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lib_optim.adapter import Session
from lib_optim.compile.auto import AutoJob, AutoPlanner, AutoRun, get_auto_planner, unavailable_run
from lib_optim.compile.blocks import default_block_names
from lib_optim.compile.region import RegionChange
from lib_optim.compile.regional import RegionalCompiler, get_compiler
from lib_optim.log import get_logger

log = get_logger(__name__)

# Where the generation's compile plan waits for its step callbacks and its end (lib_optim.runtime reads it).
AUTO_DATA_KEY = "compile_auto"


@dataclass(frozen=True)
class CompileRegion:
    """What a host adds to a regional compile (:meth:`RegionalCompiler.apply`): the patches that keep its block code
    traceable, its weights token, its Interrupt/Skip check and what to measure before the first compiled call."""

    patches: Sequence[RegionChange] = field(default_factory=tuple)
    weights_token: Callable[[], Hashable] | None = None
    weights_dirty: Callable[[Any], bool] | None = None
    interrupt: Callable[[], None] | None = None
    prepare: Callable[[], None] | None = None


def compile_blocks(
    session: Session,
    root: Any,
    *,
    key: Any,
    device: Any,
    blocks: Any = None,
    label: str = "UNet",
    compiler: RegionalCompiler | None = None,
    region: CompileRegion | None = None,
    job: AutoJob | None = None,
    planner: AutoPlanner | None = None,
) -> None:
    """Regional ``torch.compile`` of ``root``'s repeated blocks for this generation (lib_optim.compile.regional;
    what it relies on in each host: docs/hosts.md §6.9), shared by every adapter: ``key`` must identify what the
    blocks read that torch does not guard — the attention implementation above all. Cannot compile here (no C++
    compiler, no triton, DirectML…): one line naming the fix, the generation runs eagerly, and the reason goes to
    ``session.data``. ``compiler``: the process's :func:`get_compiler` when not given. ``region``: the host's
    :class:`CompileRegion`.

    ``compile=auto`` compiles (mode ``on``) only when ``job`` pays for it (:mod:`lib_optim.compile.auto`;
    ``planner``: the process's :func:`get_auto_planner` when not given); without a ``job`` it runs eagerly. With a
    ``job``, every compiled or auto generation is measured for auto's figures (``session.data["compile_auto"]``)."""
    auto = session.settings.compile.value == "auto"
    mode = "on" if auto else session.settings.compile.value
    compiler = compiler if compiler is not None else get_compiler()
    ok, why = compiler.availability(device, mode)
    known = compiler.failure(root, key, mode) if ok else None
    if not ok or known:
        why = why if not ok else f"failed before for this model and attention: {known}"
        session.data["compile_unavailable"] = why
        if auto:
            eager = unavailable_run(f"compile not available here: {why}" if not ok else f"compile {why}")
            session.data[AUTO_DATA_KEY] = eager
            log.info("compile %s", eager.decision.text())
        elif not ok:
            log.warning("compile: not available here, this generation runs without it: %s", why)
        else:
            log.info("compile: skipped (it %s)", why)
        return
    run: AutoRun | None = None
    if job is not None:
        run = (planner if planner is not None else get_auto_planner()).begin(job, root, auto=auto)
        session.data[AUTO_DATA_KEY] = run
    elif auto:
        run = session.data[AUTO_DATA_KEY] = unavailable_run("the job's size is unknown")
    if auto and run is not None:
        log.info("compile %s", run.decision.text())
        if not run.decision.compile:
            session.restorer.notes.append(f"{label} blocks not compiled: {run.decision.text()}")
            return
    names = blocks if blocks is not None else (*default_block_names("sd"), *default_block_names("flux"))
    region = region if region is not None else CompileRegion()
    application = session.restorer.enter(
        compiler.apply(
            root,
            names,
            key=key,
            mode=mode,
            patches=region.patches,
            weights_token=region.weights_token,
            weights_dirty=region.weights_dirty,
            interrupt=region.interrupt,
            prepare=region.prepare,
        )
    )
    session.data["compile"] = application
    if run is not None:
        run.application = application
    session.restorer.notes.append(f"{label} blocks compiled ({mode}, {application.stats.blocks} blocks)")


VAE_DATA_KEY = "compile_vae"


def compile_vae_blocks(
    session: Session,
    vae: Any,
    *,
    key: Any,
    compiler: RegionalCompiler | None = None,
    region: CompileRegion | None = None,
) -> None:
    """The VAE's decoder and encoder blocks as regions of their own (``ResnetBlock``/``AttnBlock``), in the mode
    the UNet compiled in — only when the UNet's blocks compiled this generation (``compile`` on, or ``auto``
    decided to). Composes with tiled VAE: each tile runs the compiled blocks (a new tile size recompiles once,
    with dynamic sizes). ``key``: what the VAE's attention reads that torch does not guard."""
    unet = session.data.get("compile")
    if unet is None or not getattr(unet, "active", False) or vae is None:
        return
    compiler = compiler if compiler is not None else get_compiler()
    region = region if region is not None else CompileRegion()
    application = session.restorer.enter(
        compiler.apply(
            vae,
            default_block_names("vae"),
            key=("vae", key),
            mode=unet.mode,
            patches=region.patches,
            interrupt=region.interrupt,
            prepare=region.prepare,
            lazy_weights=False,  # no host edits VAE weights in a forward (A1111 LoRA names UNet/CLIP layers)
        )
    )
    session.data[VAE_DATA_KEY] = application
    session.restorer.notes.append(f"VAE blocks compiled ({unet.mode}, {application.stats.blocks} blocks)")
