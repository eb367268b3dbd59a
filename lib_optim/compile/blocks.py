"""What regional compile is asked to do: the lever's values, the torch it needs, and which blocks it compiles.

See :mod:`lib_optim.compile.regional` for why these blocks ("Which blocks") and why no CUDA graphs.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

MODES = ("off", "on", "max-autotune")
# Our value → inductor's mode. No CUDA graphs: see lib_optim.compile.regional's docstring.
_INDUCTOR_MODES: dict[str, str | None] = {"on": None, "max-autotune": "max-autotune-no-cudagraphs"}

MIN_TORCH = (2, 1)

FAMILY_BLOCKS: dict[str, tuple[str, ...]] = {
    # ldm/sgm openaimodel.py (A1111), Forge backend/nn/unet.py, ldm_patched (Forge previous, reForge)
    "sd": ("ResBlock", "SpatialTransformer"),
    # Forge backend/nn/flux.py and chroma.py
    "flux": ("DoubleStreamBlock", "SingleStreamBlock"),
    # Forge backend/nn/mmditx.py
    "sd3": ("JointBlock",),
    # the VAE's decoder and encoder: ldm/sgm diffusionmodules/model.py (A1111), Forge backend/nn/vae.py,
    # ldm_patched/ldm/modules/diffusionmodules/model.py
    "vae": ("ResnetBlock", "AttnBlock", "MemoryEfficientAttnBlock"),
}
_FAMILY_ALIASES = {
    "sd1": "sd",
    "sd15": "sd",
    "sd2": "sd",
    "sdxl": "sd",
    "unet": "sd",
    "chroma": "flux",
}


def default_block_names(family: str) -> tuple[str, ...]:
    """Class names of the blocks to compile for a model family (``sd``/``sd1``/``sd2``/``sdxl``,
    ``flux``/``chroma``, ``sd3``)."""
    name = _FAMILY_ALIASES.get(family.lower(), family.lower())
    if name not in FAMILY_BLOCKS:
        allowed = ", ".join(sorted({*FAMILY_BLOCKS, *_FAMILY_ALIASES}))
        raise ValueError(f"[Optim] regional compile: family={family!r} is unknown; allowed: {allowed}")
    return FAMILY_BLOCKS[name]


def select_blocks(root: Any, selector: Iterable[str] | Callable[[Any], bool]) -> list[Any]:
    """The outermost submodules of ``root`` (not ``root`` itself) that the selector picks, in module order.

    ``selector``: class names (matched against ``type(m).__name__``) or a predicate on a module. A match
    inside another match is skipped: the outer one's compiled code covers it.
    """
    if callable(selector) and not isinstance(selector, (str, bytes)):
        picks: Callable[[Any], bool] = selector
    else:
        names = frozenset([selector] if isinstance(selector, str) else selector)
        if not names or not all(isinstance(n, str) for n in names):
            raise ValueError(f"[Optim] regional compile: blocks={selector!r} must be class names or a predicate")

        def picks(module: Any) -> bool:
            return type(module).__name__ in names

    chosen: list[Any] = []
    covered: set[int] = set()
    for module in root.modules():
        if module is root or id(module) in covered:
            continue
        if picks(module):
            chosen.append(module)
            covered.update(id(sub) for sub in module.modules())
    return chosen


def inductor_mode(mode: str) -> str | None:
    """The ``torch.compile`` mode for one of our values (None = inductor's default)."""
    _check_mode(mode)
    if mode == "off":
        raise ValueError("[Optim] regional compile: mode='off' has no torch.compile mode")
    return _INDUCTOR_MODES[mode]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"[Optim] regional compile: mode={mode!r} is not allowed; allowed: {', '.join(MODES)}")


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``version`` or of the installed torch ((0, 0) when unknown)."""
    if version is None:
        try:
            import torch
        except ImportError:
            return (0, 0)
        version = str(torch.__version__)
    parts = version.split("+")[0].split(".")
    try:
        return (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        return (0, 0)


def _is_module_list(blocks: Any) -> bool:
    try:
        import torch

        items = list(blocks) if isinstance(blocks, Sequence) else None
        return items is not None and all(isinstance(b, torch.nn.Module) for b in items)
    except TypeError:
        return False


def _outermost(blocks: list[Any]) -> list[Any]:
    inner: set[int] = set()
    for block in blocks:
        inner.update(id(sub) for sub in block.modules() if sub is not block)
    seen: set[int] = set()
    result = []
    for block in blocks:
        if id(block) in inner or id(block) in seen:
            continue
        seen.add(id(block))
        result.append(block)
    return result


def _dtype_device(blocks: list[Any]) -> tuple[str, str]:
    for block in blocks:
        for tensor in itertools.chain(block.parameters(), block.buffers()):
            return str(tensor.dtype), str(tensor.device)
    return "none", "none"
