"""Logging for the extension: one logger tree, user-facing lines prefixed ``[Optim]``."""

from __future__ import annotations

import logging
import sys

ROOT_LOGGER_NAME = "lib_optim"
PREFIX = "[Optim]"


def get_logger(name: str) -> logging.Logger:
    """Return ``lib_optim.<name>`` (``name`` may already start with ``lib_optim``)."""
    if name == ROOT_LOGGER_NAME or name.startswith(ROOT_LOGGER_NAME + "."):
        return logging.getLogger(name)
    return logging.getLogger(f"{ROOT_LOGGER_NAME}.{name}")


class _PrefixFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        # messages built from our errors already start with the prefix; never print it twice
        text = text.replace(f"{PREFIX} {PREFIX} ", f"{PREFIX} ")
        return "\n".join(
            line if not line or line.startswith(PREFIX) else f"{PREFIX} {line}" for line in text.split("\n")
        )


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg, unused-ignore]
    """Writes to whatever ``sys.stderr`` is at the time (hosts and test runners replace it)."""

    @property  # type: ignore[override, unused-ignore]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


def setup_console_logging(level: int | str = logging.INFO) -> logging.Logger:
    """Attach one console handler to the ``lib_optim`` logger (idempotent) and set its level.

    The hosts configure the root logger themselves; we keep our own handler and stop propagation
    so each line is printed once, with our prefix.
    """
    logger = logging.getLogger(ROOT_LOGGER_NAME)
    if isinstance(level, str):
        level = logging.getLevelName(level.upper())
        if not isinstance(level, int):
            level = logging.INFO
    logger.setLevel(level)
    if not any(getattr(h, "_optim_handler", False) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(_PrefixFormatter("%(message)s"))
        handler._optim_handler = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.propagate = False
    return logger
