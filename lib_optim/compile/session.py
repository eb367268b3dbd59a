"""Regional compile for one generation: what every host adapter calls from its ``apply_compile``."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lib_optim.adapter import Session
from lib_optim.compile.blocks import default_block_names
from lib_optim.compile.region import RegionPatch
from lib_optim.compile.regional import RegionalCompiler, get_compiler
from lib_optim.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class CompileRegion:
    """What a host adds to a regional compile (:meth:`RegionalCompiler.apply`): the patches that keep its block code
    traceable, its weights token, its Interrupt/Skip check and what to measure before the first compiled call."""

    patches: Sequence[RegionPatch] = field(default_factory=tuple)
    weights_token: Callable[[], Hashable] | None = None
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
) -> None:
    """Regional ``torch.compile`` of ``root``'s repeated blocks for this generation (lib_optim.compile.regional;
    what it relies on in each host: docs/hosts.md §6.9), shared by every adapter: ``key`` must identify what the
    blocks read that torch does not guard — the attention implementation above all. Cannot compile here (no C++
    compiler, no triton, DirectML…): one line naming the fix, the generation runs eagerly, and the reason goes to
    ``session.data``. ``compiler``: the process's :func:`get_compiler` when not given. ``region``: the host's
    :class:`CompileRegion`."""
    mode = session.settings.compile.value
    compiler = compiler if compiler is not None else get_compiler()
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
    region = region if region is not None else CompileRegion()
    application = session.restorer.enter(
        compiler.apply(
            root,
            names,
            key=key,
            mode=mode,
            patches=region.patches,
            weights_token=region.weights_token,
            interrupt=region.interrupt,
            prepare=region.prepare,
        )
    )
    session.data["compile"] = application
    session.restorer.notes.append(f"{label} blocks compiled ({mode}, {application.stats.blocks} blocks)")
