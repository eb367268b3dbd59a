"""The types and text helpers shared by the bash reader, the cmd reader and the block editor."""

from __future__ import annotations

import os
import re
import shlex
import stat
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from lib_optim.log import get_logger

log = get_logger(__name__)

Kind = Literal["sh", "bat"]
NoteSeverity = Literal["info", "warning"]

EXTENSION_NAME = "sd-webui-optim"
# webui-user files are a few KB; anything this big is the wrong file, and reading it whole would be slow.
MAX_FILE_BYTES = 1024 * 1024

ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WebuiUserError(ValueError):
    """A launcher file cannot be read or edited safely; the message names file, line and problem."""

    def __init__(self, source: str, line_no: int | None, what: str) -> None:
        self.source = source
        self.line_no = line_no
        self.what = what
        where = f"{source}:{line_no}" if line_no is not None else source
        super().__init__(f"{where}: {what}")


class BrokenLauncherFile(WebuiUserError):
    """The launcher file is the right file, but bash or cmd (or the host, splitting COMMANDLINE_ARGS) cannot read
    it as written: the WebUI would not get these settings. ``check`` and ``doctor`` count it as an error."""


class WriteRefused(WebuiUserError):
    """The file was left as it is on purpose: read-only, not ours to write, or being edited by someone else."""


@dataclass(frozen=True)
class Assignment:
    """One assignment as the interpreter executed it (value after expansion)."""

    name: str
    value: str
    line_no: int
    # sh: whether the variable is exported after this statement; bat: always True.
    exported: bool = True
    # Inside if/case/a loop or after && / ||: whether it runs depends on something the reader cannot know.
    conditional: bool = False


@dataclass(frozen=True)
class FileNote:
    """Something in the file that probably does not do what the user meant, or that the reader cannot see."""

    line_no: int | None
    severity: NoteSeverity
    subject: str  # the variable, the flag or the construct, e.g. "COMMANDLINE_ARGS" or "$(whoami)"
    message: str
    fix: str


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
    # Things that probably do not do what the user meant (unexported COMMANDLINE_ARGS, "set X = 1", ...),
    # as "file:line: message" lines; ``notes`` has the same with severity, subject and fix.
    warnings: list[str] = field(default_factory=list)
    path: Path | None = None
    notes: list[FileNote] = field(default_factory=list)
    # Flags (tokens of the final COMMANDLINE_ARGS) and variables that were set only inside a condition,
    # with the line of that condition: they may or may not apply.
    conditional_flags: dict[str, int] = field(default_factory=dict)
    conditional_vars: dict[str, int] = field(default_factory=dict)

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


class NoteTaker:
    """Collects the reader's notes (as :class:`FileNote` and as "file:line: message" warnings)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.notes: list[FileNote] = []
        self.warnings: list[str] = []

    def note(self, line_no: int | None, severity: NoteSeverity, subject: str, message: str, fix: str) -> None:
        self.notes.append(FileNote(line_no, severity, subject, message, fix))
        where = f"{self.source}:{line_no}" if line_no is not None else self.source
        self.warnings.append(f"{where}: {message}")
        log.debug("%s: %s", where, message)

    def note_conditional(self, subject: str, line: int) -> None:
        self.note(
            line,
            "info",
            subject,
            f"{subject} is set inside a condition (line {line}): the checker counts it, but it only applies "
            "when the condition holds",
            "Nothing to do if that is intended; the findings for it say what it does when it applies.",
        )


def added_tokens(before: str, after: str) -> list[str]:
    """The COMMANDLINE_ARGS tokens an assignment adds (best effort: unsplittable values add nothing)."""
    try:
        old, new = Counter(shlex.split(before)), shlex.split(after)
    except ValueError:
        return []
    added: list[str] = []
    for token in new:
        if old[token] > 0:
            old[token] -= 1
        else:
            added.append(token)
    return added


def tokenise_args(value: str, source: str, line_no: int | None, notes: NoteTaker, kind: Kind = "sh") -> list[str]:
    try:
        tokens = shlex.split(value)
    except ValueError as exc:
        # The host would crash the same way at startup (paths_internal.py:13), so this is an error.
        raise BrokenLauncherFile(source, line_no, _unsplittable(value, str(exc), kind)) from exc
    if value.count("\\") > sum(t.count("\\") for t in tokens):
        # POSIX shlex treats an unquoted backslash as an escape, so C:\models becomes C:models.
        notes.note(
            line_no,
            "warning",
            "COMMANDLINE_ARGS",
            f"COMMANDLINE_ARGS loses backslashes when the host splits it (tokens: {tokens!r})",
            "Put Windows paths in double quotes, or write them with forward slashes.",
        )
    joined = [t for t in tokens if joined_flags(t)]
    if joined:
        unquoted = " ".join(t if t in joined else shlex.quote(t) for t in tokens)
        fix = f"set COMMANDLINE_ARGS={unquoted}" if kind == "bat" else f'export COMMANDLINE_ARGS="{unquoted}"'
        keeps = "cmd keeps quotes: everything after '=' is the value" if kind == "bat" else "the inner quotes stay"
        notes.note(
            line_no,
            "warning",
            "COMMANDLINE_ARGS",
            f"COMMANDLINE_ARGS has quotes around several flags ({keeps}), and the WebUI splits the value like a shell "
            f"(modules/paths_internal.py:13), so {joined[0]!r} reaches it as one word: start-up exits with "
            "'unrecognized arguments'",
            f"Remove the quotes around the flags: {fix}",
        )
    return tokens


def joined_flags(token: str) -> bool:
    """A word like ``--xformers --medvram``: several flags that quotes kept together (argparse takes a word with
    a space for a positional, so the WebUI rejects it); ``--ckpt=my model.ckpt`` is one flag with its value."""
    return token.startswith("-") and any(c.isspace() for c in token.partition("=")[0].strip())


def _unsplittable(value: str, why: str, kind: Kind) -> str:
    quote = next((q for q in ('"', "'") if value.count(q) % 2), '"')
    if kind == "bat":
        fix = f"remove the {quote} characters (set COMMANDLINE_ARGS={value.replace(quote, '')}), or close the quote"
    else:
        fix = f"close the {quote} quote, or escape it as \\{quote} if it is part of a value"
    return (
        f"COMMANDLINE_ARGS cannot be split as the host does: it has an unbalanced {quote} quote ({value!r}), and "
        f"the WebUI splits it like a shell (modules/paths_internal.py:13), so it stops at start-up (shlex: {why}). "
        f"Fix: {fix}"
    )


def human_size(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MB" if n >= 1024 * 1024 else f"{n / 1024:.1f} KB"


def read_launcher_bytes(path: Path) -> bytes:
    """The file's bytes, refusing directories, devices and files too big to be a webui-user file.

    Raises FileNotFoundError for a missing file (callers decide whether that is an error), WebuiUserError
    otherwise. Never reads more than :data:`MAX_FILE_BYTES` + 1 bytes.
    """
    try:
        info = path.stat()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise WebuiUserError(str(path), None, f"cannot read launcher config: {exc}") from exc
    if stat.S_ISDIR(info.st_mode):
        raise WebuiUserError(
            str(path), None, "is a directory; give the path of the webui-user.sh or webui-user.bat inside it"
        )
    if not stat.S_ISREG(info.st_mode):
        raise WebuiUserError(str(path), None, "is not a regular file; give the path of webui-user.sh or .bat")
    too_big = (
        f"is {{size}}, but a webui-user file is a few KB (at most {human_size(MAX_FILE_BYTES)} is read): "
        "is this the right file?"
    )
    if info.st_size > MAX_FILE_BYTES:
        raise WebuiUserError(str(path), None, too_big.format(size=human_size(info.st_size)))
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise WebuiUserError(str(path), None, f"cannot read launcher config: {exc}") from exc
    if len(data) > MAX_FILE_BYTES:  # it grew since stat
        raise WebuiUserError(str(path), None, too_big.format(size=f"over {human_size(MAX_FILE_BYTES)}"))
    refuse_content(path, data)
    return data


_LAUNCHERS = {"webui.sh": "webui-user.sh", "webui.bat": "webui-user.bat"}
_UTF16_BOMS = {b"\xff\xfe": "UTF-16 LE", b"\xfe\xff": "UTF-16 BE"}


def refuse_content(path: Path, data: bytes) -> None:
    """Refuse the WebUI's own launcher, a file saved as UTF-16 and a binary file, naming the fix."""
    user_file = _LAUNCHERS.get(path.name.lower())
    if user_file is not None:
        raise WebuiUserError(
            str(path),
            None,
            f"is the WebUI's own launcher, which reads your settings from {user_file}; "
            f"pass --file {path.with_name(user_file)} (create it from the WebUI's template if it is missing)",
        )
    encoding = next((name for bom, name in _UTF16_BOMS.items() if data.startswith(bom)), None)
    if encoding is not None:
        shell = "bash" if path.suffix.lower() == ".sh" else "cmd.exe"
        raise BrokenLauncherFile(
            str(path),
            None,
            f"is saved as {encoding} (what PowerShell 5.1's `>` and Out-File write), which {shell} cannot run, so "
            "the WebUI gets none of its settings. Save it as ANSI or UTF-8: in Notepad, File > Save as > "
            "Encoding: UTF-8 (not 'UTF-8 with BOM') or ANSI; in PowerShell write it with Set-Content -Encoding Default",
        )
    first_nul = data.find(b"\0")
    if first_nul >= 0:
        raise WebuiUserError(
            str(path),
            None,
            f"contains NUL bytes (the first at byte {first_nul}): it is not a text file, so it cannot be "
            "webui-user.sh or webui-user.bat; give the path of that file (a text file next to webui.sh / webui.bat)",
        )
