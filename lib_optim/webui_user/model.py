"""The types and text helpers shared by the bash reader, the cmd reader and the block editor."""

from __future__ import annotations

import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Kind = Literal["sh", "bat"]

EXTENSION_NAME = "sd-webui-optim"

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# `call webui.bat` (stock); a bare `webui.bat` also hands over for good.
CALL_WEBUI_RE = re.compile(r'^[ \t]*@?[ \t]*(?:call[ \t]+)?"?(?:[^"\s]*[\\/%])?webui\.bat"?(?=[\s"]|$)', re.IGNORECASE)


class WebuiUserError(ValueError):
    """A launcher file cannot be read or edited safely; the message names file, line and problem."""

    def __init__(self, source: str, line_no: int | None, what: str) -> None:
        self.source = source
        self.line_no = line_no
        self.what = what
        where = f"{source}:{line_no}" if line_no is not None else source
        super().__init__(f"{where}: {what}")


@dataclass(frozen=True)
class Assignment:
    """One assignment as the interpreter executed it (value after expansion)."""

    name: str
    value: str
    line_no: int
    # sh: whether the variable is exported after this statement; bat: always True.
    exported: bool = True


@dataclass
class LaunchConfig:
    """Effective result of running a launcher config file up to the point where the host takes over."""

    kind: Kind
    # shlex.split of the COMMANDLINE_ARGS value that reaches launch.py (see the package docstring).
    commandline_args: list[str]
    # Every variable the file sets, final values (sh: exported or not; bat: names upper-cased, as
    # Python's os.environ reports them on Windows). Variables the file unsets are absent.
    env: dict[str, str]
    assignments: list[Assignment] = field(default_factory=list)
    # Names in ``env`` that reach the Python process (sh: exported; bat: all of them).
    exported: set[str] = field(default_factory=set)
    # Names the file removes (sh ``unset X``, bat ``set X=``), final state.
    unset: set[str] = field(default_factory=set)
    # Things that probably do not do what the user meant (unexported COMMANDLINE_ARGS, "set X = 1", ...).
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None

    def process_env(self) -> dict[str, str]:
        """The variables from this file that the Python process sees."""
        return {k: v for k, v in self.env.items() if k in self.exported}


@dataclass(frozen=True)
class BlockInfo:
    """Our managed block in a file; lines are 1-based and inclusive (marker lines included)."""

    profile_name: str
    start_line: int
    end_line: int


@dataclass(frozen=True)
class EditResult:
    changed: bool
    diff: str
    backup_path: Path | None
    new_text: str


# ---------------------------------------------------------------------------------------------------------
# Shared helpers


def kind_for_path(path: str | os.PathLike[str]) -> Kind:
    suffix = Path(path).suffix.lower()
    if suffix == ".sh":
        return "sh"
    if suffix in (".bat", ".cmd"):
        return "bat"
    raise WebuiUserError(str(path), None, "cannot tell the launcher kind: expected a .sh, .bat or .cmd file")


def decode_text(data: bytes) -> str:
    # surrogateescape keeps undecodable bytes (cp1252/OEM-encoded .bat files) so re-encoding is byte exact.
    return data.decode("utf-8", errors="surrogateescape")


def encode_text(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def tokenise_args(value: str, source: str, line_no: int | None, warnings: list[str]) -> list[str]:
    try:
        tokens = shlex.split(value)
    except ValueError as exc:
        # The host would crash the same way at startup (paths_internal.py:13), so this is an error.
        raise WebuiUserError(
            source, line_no, f"COMMANDLINE_ARGS cannot be split as the host does (shlex: {exc}): {value!r}"
        ) from exc
    if value.count("\\") > sum(t.count("\\") for t in tokens):
        # POSIX shlex treats an unquoted backslash as an escape, so C:\models becomes C:models.
        warnings.append(
            f"{source}:{line_no}: COMMANDLINE_ARGS loses backslashes when the host splits it "
            f"(tokens: {tokens!r}); put Windows paths in double quotes"
        )
    return tokens
