"""sd-webui-optim core library.

Plain Python + torch. Host code (``modules``, ``backend``, ``ldm``, ...) is imported only in
``lib_optim.hosts``; gradio only in ``lib_optim.ui``. Importing this package is cheap (no torch).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

__version__ = "0.1.0"


def lazy_exports(package: str, table: dict[str, tuple[str, str | None]]) -> Callable[[str], Any]:
    """A wing face's ``__getattr__`` for the names it exports from torch-heavy modules: each is imported on first
    use, so importing the face stays cheap. ``table`` maps an exported name to (module, attribute); attribute
    None exports the module itself."""

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, attribute = table[name]
        loaded = importlib.import_module(module)
        return loaded if attribute is None else getattr(loaded, attribute)

    return __getattr__
