"""Read and edit the user's launcher config files, ``webui-user.sh`` and ``webui-user.bat``.

What the hosts do with these files (A1111 v1.10.1 and Forge ``main`` ship the same ``webui.sh`` and
``webui.bat``; line numbers below hold for both):

* ``webui.sh:20-23`` *sources* ``webui-user.sh`` into its own bash process, and ``webui.sh:298``
  (``"${python_cmd}" -u "${LAUNCH_SCRIPT}" "$@"``; ``webui.sh:292`` for accelerate) starts launch.py.
  ``webui.sh`` never exports ``COMMANDLINE_ARGS`` and does not put it on the command line, so only
  an *exported* ``COMMANDLINE_ARGS`` reaches Python. A plain ``COMMANDLINE_ARGS=...`` still works
  when the variable was already exported before the file ran (bash keeps the export attribute on
  reassignment): on macOS ``webui.sh:11-16`` sources ``webui-macos-env.sh``, which exports it
  (``webui-macos-env.sh:8``), and a caller may have exported it. Plain shell variables such as
  ``python_cmd`` or ``venv_dir`` are read by ``webui.sh`` itself (e.g. ``webui.sh:62-65``).
* ``webui-user.bat`` runs ``set`` commands and then ``call webui.bat`` (without ``%*``, so arguments
  given to webui-user.bat are dropped). ``webui.bat:3-5`` first calls ``webui.settings.bat`` if it
  exists (it can override anything set here), then ``webui.bat:64`` runs ``%PYTHON% launch.py %*``
  (``webui.bat:71``, the accelerate path, passes no arguments at all). Every ``set`` variable is in
  the environment of the child process; cmd has no unexported variables.
* In both hosts ``modules/paths_internal.py:12-13`` does
  ``sys.argv += shlex.split(os.environ.get('COMMANDLINE_ARGS', ""))`` (POSIX-mode shlex, also on
  Windows), so the tokens reported here are ``shlex.split`` of the final value.

The readers are small interpreters for the subset of bash / cmd that such files use; they never run
anything. Control flow (``if``/``fi``, ``if exist ... (``) cannot be evaluated without running
commands, so assignments inside conditional branches are applied in file order.
"""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shlex
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from lib_optim.log import get_logger

logger = get_logger(__name__)

Kind = Literal["sh", "bat"]

EXTENSION_NAME = "sd-webui-optim"
EDIT_HINT = "edit with: python -m lib_optim profile ..."
BACKUP_INFIX = ".optim-backup-"

# Recognition only relies on this stable prefix, so older blocks stay recognisable if the hint text changes.
_BEGIN_TOKEN = f">>> {EXTENSION_NAME}"
_END_TOKEN = f"<<< {EXTENSION_NAME}"
_BEGIN_RE = re.compile(
    r"^[ \t]*(?P<prefix>#|@?rem\b|::)[ \t]*>>> " + re.escape(EXTENSION_NAME) + r' profile "(?P<name>[^"\r\n]*)"',
    re.IGNORECASE,
)
_END_RE = re.compile(
    r"^[ \t]*(?P<prefix>#|@?rem\b|::)[ \t]*<<< " + re.escape(EXTENSION_NAME) + r" <<<[ \t]*$",
    re.IGNORECASE,
)
# Profile names end up inside a comment line; in a .bat file even REM lines go through %-expansion,
# and a stray "%~" there aborts the whole batch file, so the charset is deliberately narrow.
_PROFILE_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*( [A-Za-z0-9._+-]+)*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# `call webui.bat` (stock); a bare `webui.bat` also hands over for good.
_CALL_WEBUI_RE = re.compile(r'^[ \t]*@?[ \t]*(?:call[ \t]+)?"?(?:[^"\s]*[\\/%])?webui\.bat"?(?=[\s"]|$)', re.IGNORECASE)


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
    # shlex.split of the COMMANDLINE_ARGS value that reaches launch.py (see module docstring).
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


def _decode(data: bytes) -> str:
    # surrogateescape keeps undecodable bytes (cp1252/OEM-encoded .bat files) so re-encoding is byte exact.
    return data.decode("utf-8", errors="surrogateescape")


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


def _tokenise_args(value: str, source: str, line_no: int | None, warnings: list[str]) -> list[str]:
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


def read_launch_config(
    path: str | os.PathLike[str],
    *,
    base_env: Mapping[str, str] | None = None,
    kind: Kind | None = None,
) -> LaunchConfig:
    """Interpret ``webui-user.sh`` / ``webui-user.bat`` and report what reaches launch.py.

    ``base_env`` is the environment the file starts with (exported in sh, visible in bat); values in
    it are expanded by ``$VAR`` / ``%VAR%`` and, if the file does not change them, they are not
    reported in ``env``. ``kind`` defaults to the file suffix.
    """
    p = Path(path)
    k = kind or kind_for_path(p)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise WebuiUserError(str(p), None, f"cannot read launcher config: {exc}") from exc
    text = _decode(data)
    return parse_launch_config(text, k, base_env=base_env, source=str(p), path=p)


def parse_launch_config(
    text: str,
    kind: Kind,
    *,
    base_env: Mapping[str, str] | None = None,
    source: str = "<text>",
    path: Path | None = None,
) -> LaunchConfig:
    """Like :func:`read_launch_config` for text already in memory."""
    text = text.removeprefix("\ufeff")
    if kind == "sh":
        cfg = _ShInterpreter(text, source, base_env or {}).run()
    elif kind == "bat":
        cfg = _BatInterpreter(text, source, base_env or {}, path).run()
    else:
        raise ValueError(f"{source}: unknown launcher kind {kind!r} (expected 'sh' or 'bat')")
    cfg.path = path
    return cfg


# ---------------------------------------------------------------------------------------------------------
# bash subset


@dataclass
class _Part:
    kind: Literal["lit", "var", "cmdsub"]
    text: str  # literal text, variable name, or raw command substitution
    quoted: bool = False
    op: str = ""  # ${NAME<op>arg}
    arg: list[_Part] | None = None
    line_no: int = 0


@dataclass
class _Word:
    parts: list[_Part]
    line_no: int


_SH_SEPARATORS = frozenset(";&|()<>")
_SH_SPECIAL_PARAMS = frozenset("@*#?$!-0123456789")
_SH_LEADING_KEYWORDS = frozenset({"then", "do", "else", "{", "!", "time"})
_SH_ANSI_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", "'": "'", '"': '"', "e": "\x1b", "a": "\a"}


class _ShLexer:
    """Split bash text into simple commands made of words (quotes and expansions kept apart)."""

    def __init__(self, text: str, source: str) -> None:
        self.text = text
        self.source = source
        self.pos = 0
        self.line = 1

    def _peek(self, offset: int = 0) -> str:
        i = self.pos + offset
        return self.text[i] if i < len(self.text) else ""

    def _advance(self, n: int = 1) -> str:
        chunk = self.text[self.pos : self.pos + n]
        self.line += chunk.count("\n")
        self.pos += n
        return chunk

    def commands(self) -> list[list[_Word]]:
        commands: list[list[_Word]] = []
        current: list[_Word] = []
        while self.pos < len(self.text):
            ch = self._peek()
            if ch in " \t\r":
                self._advance()
            elif ch == "\\" and self._peek(1) == "\n":
                self._advance(2)
            elif ch == "#":
                # A '#' starting a word comments out the rest of the line (not the newline).
                while self.pos < len(self.text) and self._peek() != "\n":
                    self._advance()
            elif ch == "\n" or ch in _SH_SEPARATORS:
                self._advance()
                if current:
                    commands.append(current)
                    current = []
            else:
                current.append(self._word())
        if current:
            commands.append(current)
        return commands

    def _word(self) -> _Word:
        start_line = self.line
        parts: list[_Part] = []
        while self.pos < len(self.text):
            ch = self._peek()
            if ch in " \t\r\n" or ch in _SH_SEPARATORS:
                break
            if ch == "\\":
                nxt = self._peek(1)
                if nxt == "\n":
                    self._advance(2)
                elif nxt:
                    self._advance(2)
                    parts.append(_Part("lit", nxt, quoted=True))
                else:
                    self._advance()
                    parts.append(_Part("lit", "\\"))
            elif ch == "'":
                parts.append(self._single_quoted())
            elif ch == '"':
                parts.extend(self._double_quoted())
            elif ch == "$" and self._peek(1) == "'":
                parts.append(self._ansi_c_quoted())
            elif ch == "$":
                parts.append(self._dollar(quoted=False))
            elif ch == "`":
                parts.append(self._backtick(quoted=False))
            else:
                start = self.pos
                while self.pos < len(self.text) and self._peek() not in " \t\r\n\\'\"$`" + "".join(_SH_SEPARATORS):
                    self.pos += 1
                parts.append(_Part("lit", self.text[start : self.pos]))
        return _Word(parts, start_line)

    def _unterminated(self, what: str, line_no: int) -> WebuiUserError:
        return WebuiUserError(self.source, line_no, f"unterminated {what} (bash would fail to source this file)")

    def _single_quoted(self) -> _Part:
        start_line = self.line
        self._advance()
        end = self.text.find("'", self.pos)
        if end < 0:
            raise self._unterminated("single-quoted string", start_line)
        value = self._advance(end - self.pos)
        self._advance()
        return _Part("lit", value, quoted=True)

    def _ansi_c_quoted(self) -> _Part:
        start_line = self.line
        self._advance(2)
        out: list[str] = []
        while True:
            ch = self._peek()
            if not ch:
                raise self._unterminated("$'...' string", start_line)
            self._advance()
            if ch == "'":
                break
            if ch == "\\" and self._peek():
                esc = self._advance()
                out.append(_SH_ANSI_ESCAPES.get(esc, "\\" + esc))
            else:
                out.append(ch)
        return _Part("lit", "".join(out), quoted=True)

    def _double_quoted(self) -> list[_Part]:
        start_line = self.line
        self._advance()
        parts: list[_Part] = []
        buf: list[str] = []

        def flush() -> None:
            if buf:
                parts.append(_Part("lit", "".join(buf), quoted=True))
                buf.clear()

        while True:
            ch = self._peek()
            if not ch:
                raise self._unterminated("double-quoted string", start_line)
            if ch == '"':
                self._advance()
                break
            if ch == "\\":
                nxt = self._peek(1)
                if nxt == "\n":
                    self._advance(2)
                elif nxt in ('"', "\\", "$", "`"):
                    self._advance(2)
                    buf.append(nxt)
                else:
                    buf.append(self._advance())
            elif ch == "$":
                flush()
                parts.append(self._dollar(quoted=True))
            elif ch == "`":
                flush()
                parts.append(self._backtick(quoted=True))
            else:
                buf.append(self._advance())
        flush()
        # "" is still a (empty) word: A="" must assign the empty string.
        return parts or [_Part("lit", "", quoted=True)]

    def _matching(self, open_ch: str, close_ch: str, what: str) -> str:
        """Consume up to the matching close character (after the opener was consumed); return the inside."""
        start_line = self.line
        depth = 1
        start = self.pos
        quote = ""
        while self.pos < len(self.text):
            ch = self._peek()
            if quote:
                if ch == "\\" and quote == '"':
                    self._advance()
                elif ch == quote:
                    quote = ""
            elif ch in "'\"":
                quote = ch
            elif ch == "\\":
                self._advance()
            elif ch == open_ch:
                depth += 1
            elif ch == close_ch:
                depth -= 1
                if depth == 0:
                    inner = self.text[start : self.pos]
                    self._advance()
                    return inner
            self._advance()
        raise self._unterminated(what, start_line)

    def _dollar(self, *, quoted: bool) -> _Part:
        line_no = self.line
        self._advance()  # '$'
        ch = self._peek()
        if ch == "{":
            self._advance()
            inner = self._matching("{", "}", "${...} expansion")
            m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*|[@*#?$!0-9-])(:?[-=+?])?", inner)
            if not m or (m.end() != len(inner) and not m.group(2)):
                # ${#X}, ${X%pat}, ${X/a/b}, ...: too rare in launcher files to interpret.
                return _Part("cmdsub", "${" + inner + "}", quoted=quoted, line_no=line_no)
            op = m.group(2) or ""
            arg = _ShLexer(inner[m.end() :], self.source)._expansion_word() if op else None
            return _Part("var", m.group(1), quoted=quoted, op=op, arg=arg, line_no=line_no)
        if ch == "(":
            self._advance()
            inner = self._matching("(", ")", "$(...) command substitution")
            return _Part("cmdsub", "$(" + inner + ")", quoted=quoted, line_no=line_no)
        m = re.compile(r"[A-Za-z_][A-Za-z0-9_]*").match(self.text, self.pos)
        if m:
            self._advance(m.end() - self.pos)
            return _Part("var", m.group(0), quoted=quoted, line_no=line_no)
        if ch and ch in _SH_SPECIAL_PARAMS:
            self._advance()
            return _Part("var", ch, quoted=quoted, line_no=line_no)
        return _Part("lit", "$", quoted=quoted)

    def _backtick(self, *, quoted: bool) -> _Part:
        line_no = self.line
        self._advance()
        end = self.text.find("`", self.pos)
        if end < 0:
            raise self._unterminated("`...` command substitution", line_no)
        inner = self._advance(end - self.pos)
        self._advance()
        return _Part("cmdsub", "`" + inner + "`", quoted=quoted, line_no=line_no)

    def _expansion_word(self) -> list[_Part]:
        """The word after ``:-`` etc. inside ``${...}``: quotes and expansions, spaces literal."""
        parts: list[_Part] = []
        while self.pos < len(self.text):
            ch = self._peek()
            if ch == "'":
                parts.append(self._single_quoted())
            elif ch == '"':
                parts.extend(self._double_quoted())
            elif ch == "$":
                parts.append(self._dollar(quoted=False))
            elif ch == "\\" and self._peek(1):
                self._advance()
                parts.append(_Part("lit", self._advance(), quoted=True))
            else:
                parts.append(_Part("lit", self._advance()))
        return parts


@dataclass
class _ShVar:
    value: str | None  # None: declared (e.g. `export X`) but unset
    exported: bool


class _ShInterpreter:
    def __init__(self, text: str, source: str, base_env: Mapping[str, str]) -> None:
        self.text = text
        self.source = source
        self.vars: dict[str, _ShVar] = {k: _ShVar(v, True) for k, v in base_env.items()}
        self.touched: set[str] = set()
        self.assignments: list[Assignment] = []
        self.warnings: list[str] = []
        self.last_args_line: int | None = None

    def _warn(self, line_no: int, what: str) -> None:
        msg = f"{self.source}:{line_no}: {what}"
        self.warnings.append(msg)
        logger.debug("%s", msg)

    def _lookup(self, name: str) -> str | None:
        var = self.vars.get(name)
        return var.value if var else None

    def _expand_parts(self, parts: list[_Part]) -> str:
        out: list[str] = []
        for part in parts:
            if part.kind == "lit":
                out.append(part.text)
            elif part.kind == "cmdsub":
                # Running commands is out of scope; keep the text so the user recognises it.
                self._warn(part.line_no, f"{part.text} is not evaluated; kept literally")
                out.append(part.text)
            else:
                out.append(self._expand_var(part))
        return "".join(out)

    def _expand_var(self, part: _Part) -> str:
        value = self._lookup(part.text)
        op = part.op
        if not op:
            return value or ""
        is_unset = value is None or (op.startswith(":") and value == "")
        arg = self._expand_parts(part.arg or [])
        base = op.lstrip(":")
        if base == "-":
            return arg if is_unset else value or ""
        if base == "=":
            if is_unset:
                self._set(part.text, arg, part.line_no)
                return arg
            return value or ""
        if base == "+":
            return "" if is_unset else arg
        # "?" would abort the shell when unset; report the value we have.
        return value or ""

    def _set(self, name: str, value: str, line_no: int, *, export: bool = False) -> None:
        var = self.vars.get(name)
        if var is None:
            var = self.vars[name] = _ShVar(None, False)
        var.value = value
        var.exported = var.exported or export
        self.touched.add(name)
        self.assignments.append(Assignment(name, value, line_no, var.exported))
        if name == "COMMANDLINE_ARGS":
            self.last_args_line = line_no

    def _assignment(self, word: _Word) -> tuple[str, bool, list[_Part]] | None:
        """``NAME=value`` / ``NAME+=value`` with an unquoted name, else None."""
        if not word.parts or word.parts[0].kind != "lit" or word.parts[0].quoted:
            return None
        m = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)(\+?)=", word.parts[0].text)
        if not m:
            return None
        rest = word.parts[0].text[m.end() :]
        value_parts = ([_Part("lit", rest)] if rest else []) + word.parts[1:]
        return m.group(1), bool(m.group(2)), value_parts

    def _assignment_value(self, name: str, append: bool, parts: list[_Part]) -> str:
        # Tilde expansion applies to an unquoted leading "~" in assignment values.
        if parts and parts[0].kind == "lit" and not parts[0].quoted and parts[0].text.startswith("~"):
            head = parts[0].text
            if head == "~" or head.startswith("~/"):
                home = self._lookup("HOME")
                if home is not None:
                    parts = [_Part("lit", home + head[1:]), *parts[1:]]
        value = self._expand_parts(parts)
        if append:
            value = (self._lookup(name) or "") + value
        return value

    def run(self) -> LaunchConfig:
        for words in _ShLexer(self.text, self.source).commands():
            self._command(words)
        env = {n: v.value for n, v in self.vars.items() if n in self.touched and v.value is not None}
        exported = {n for n in env if self.vars[n].exported}
        unset = {n for n in self.touched if n not in env}
        args_var = self.vars.get("COMMANDLINE_ARGS")
        args: list[str] = []
        if args_var is not None and args_var.value is not None:
            if args_var.exported:
                args = _tokenise_args(args_var.value, self.source, self.last_args_line, self.warnings)
            else:
                self._warn(
                    self.last_args_line or 0,
                    "COMMANDLINE_ARGS is set but not exported, so launch.py does not see it "
                    "(webui.sh only passes exported variables); use `export COMMANDLINE_ARGS=...`",
                )
        return LaunchConfig(
            kind="sh",
            commandline_args=args,
            env=env,
            assignments=self.assignments,
            exported=exported,
            unset=unset,
            warnings=self.warnings,
        )

    def _command(self, words: list[_Word]) -> None:
        while words and self._plain(words[0]) in _SH_LEADING_KEYWORDS:
            words = words[1:]
        if not words:
            return
        line_no = words[0].line_no
        head = self._plain(words[0])
        if head == "export":
            self._declare(words[1:], export=True)
            return
        if head in ("declare", "typeset", "local", "readonly"):
            self._declare(words[1:], export=False)
            return
        if head == "unset":
            for w in words[1:]:
                name = self._plain(w)
                if name and not name.startswith("-"):
                    self.vars.pop(name, None)
                    self.touched.add(name)
            return
        assigns = [self._assignment(w) for w in words]
        if all(a is not None for a in assigns):
            for word, a in zip(words, assigns, strict=True):
                assert a is not None
                name, append, parts = a
                self._set(name, self._assignment_value(name, append, parts), word.line_no)
            return
        # `VAR=x cmd` only sets VAR for that one command; if/fi, function calls, source: not assignments.
        logger.debug("%s:%d: not an assignment, ignored: %s", self.source, line_no, head)

    def _plain(self, word: _Word) -> str | None:
        """The word's text if it is pure literal (keywords, option flags, names)."""
        if all(p.kind == "lit" for p in word.parts):
            return "".join(p.text for p in word.parts)
        return None

    def _declare(self, words: list[_Word], *, export: bool) -> None:
        unexport = False
        for w in words:
            plain = self._plain(w)
            if plain is not None and plain.startswith("-"):
                # declare -x exports; export -n removes the export attribute.
                if "x" in plain:
                    export = True
                if export and "n" in plain:
                    unexport = True
                continue
            a = self._assignment(w)
            if a is not None:
                name, append, parts = a
                value = self._assignment_value(name, append, parts)
                if unexport and name in self.vars:
                    self.vars[name].exported = False
                self._set(name, value, w.line_no, export=export and not unexport)
            elif plain is not None and _ENV_NAME_RE.match(plain):
                var = self.vars.setdefault(plain, _ShVar(None, False))
                self.touched.add(plain)
                if unexport:
                    var.exported = False
                elif export:
                    var.exported = True
                    if var.value is not None:
                        self.assignments.append(Assignment(plain, var.value, w.line_no, True))


# ---------------------------------------------------------------------------------------------------------
# cmd.exe subset


_BAT_REM_RE = re.compile(r"^[ \t]*@?[ \t]*rem(?=$|[\s,;=(./\\:+\[\]])", re.IGNORECASE)
_BAT_LABEL_RE = re.compile(r"^[ \t]*@?[ \t]*:")
_BAT_SET_RE = re.compile(r"^[ \t]*@?[ \t]*set(?:[ \t]+|(?=\"))(?P<rest>.*)$", re.IGNORECASE | re.DOTALL)


def _bat_ends_with_continuation(line: str) -> bool:
    """True if the line ends with a caret outside double quotes (cmd then joins the next line)."""
    quoted = False
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == '"':
            quoted = not quoted
        elif ch == "^" and not quoted:
            if i == len(line) - 1:
                return True
            i += 1
        i += 1
    return False


def _bat_split_commands(line: str) -> list[str]:
    """Split on unquoted, unescaped & / && / | / || (carets still in place)."""
    out: list[str] = []
    quoted = False
    start = 0
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == '"':
            quoted = not quoted
        elif ch == "^" and not quoted:
            i += 1
        elif ch in "&|" and not quoted:
            out.append(line[start:i])
            if i + 1 < len(line) and line[i + 1] == ch:
                i += 1
            start = i + 1
        i += 1
    out.append(line[start:])
    return out


def _bat_unescape(text: str) -> str:
    """cmd phase 2 on a command: drop carets outside quotes, keeping the escaped character."""
    out: list[str] = []
    quoted = False
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == '"':
            quoted = not quoted
            out.append(ch)
        elif ch == "^" and not quoted:
            if i + 1 < len(text):
                out.append(text[i + 1])
            i += 1
        else:
            out.append(ch)
        i += 1
    return "".join(out)


class _BatInterpreter:
    def __init__(self, text: str, source: str, base_env: Mapping[str, str], path: Path | None) -> None:
        self.text = text
        self.source = source
        # cmd variable names are case-insensitive; keep them upper-cased like os.environ on Windows.
        self.vars: dict[str, str] = {k.upper(): v for k, v in base_env.items()}
        self.touched: set[str] = set()
        self.assignments: list[Assignment] = []
        self.warnings: list[str] = []
        self.path = path
        self.last_args_line: int | None = None

    def _warn(self, line_no: int, what: str) -> None:
        msg = f"{self.source}:{line_no}: {what}"
        self.warnings.append(msg)
        logger.debug("%s", msg)

    def _batch_param(self, spec: str) -> str:
        """%0..%9 / %~dp0 style parameters: only the script's own location is known."""
        if spec.endswith("0") and self.path is not None:
            mods = spec[1:-1] if spec.startswith("~") else ""
            if "d" in mods or "p" in mods:
                return str(self.path.absolute().parent) + os.sep
            if "f" in mods or not mods:
                return str(self.path.absolute())
        return ""

    def _expand_percent(self, line: str, line_no: int) -> str:
        """cmd phase 1 (percent expansion) for a line of a batch file."""
        out: list[str] = []
        i = 0
        n = len(line)
        while i < n:
            ch = line[i]
            if ch != "%":
                out.append(ch)
                i += 1
                continue
            if i + 1 < n and line[i + 1] == "%":
                out.append("%")
                i += 2
                continue
            m = re.compile(r"%(~[a-zA-Z$:]*)?([0-9*])").match(line, i)
            if m:
                out.append(self._batch_param((m.group(1) or "") + m.group(2)))
                i = m.end()
                continue
            end = line.find("%", i + 1)
            if end < 0:
                # A lone percent sign is dropped in batch files.
                i += 1
                continue
            out.append(self._expand_var(line[i + 1 : end], line_no))
            i = end + 1
        return "".join(out)

    def _expand_var(self, spec: str, line_no: int) -> str:
        name, _, modifier = spec.partition(":")
        value = self.vars.get(name.upper())
        if value is None:
            # In a batch file an undefined %VAR% expands to nothing (on the command line it would stay).
            return ""
        if not modifier:
            return value
        m = re.fullmatch(r"~(-?\d+)(?:,(-?\d+))?", modifier)
        if m:
            start = int(m.group(1))
            sub = value[start:] if start >= 0 else value[len(value) + start :]
            if m.group(2) is not None:
                length = int(m.group(2))
                sub = sub[:length] if length >= 0 else sub[: max(len(sub) + length, 0)]
            return sub
        if "=" in modifier:
            old, _, new = modifier.partition("=")
            if old.startswith("*"):
                idx = value.lower().find(old[1:].lower())
                return value if idx < 0 else new + value[idx + len(old) - 1 :]
            if not old:
                return value
            return re.sub(re.escape(old), lambda _m: new, value, flags=re.IGNORECASE)
        self._warn(line_no, f"%{spec}% uses an unsupported modifier; expanded without it")
        return value

    def run(self) -> LaunchConfig:
        # cmd reads up to each LF and discards every CR (parse phase 1.5).
        lines = [line.replace("\r", "") for line in self.text.split("\n")]
        i = 0
        while i < len(lines):
            line_no = i + 1
            raw = lines[i]
            i += 1
            if _CALL_WEBUI_RE.match(raw):
                # webui.bat starts launch.py from here; what follows runs only after the WebUI exits.
                break
            if _BAT_REM_RE.match(raw) or _BAT_LABEL_RE.match(raw):
                continue
            logical = self._expand_percent(raw, line_no)
            while _bat_ends_with_continuation(logical) and i < len(lines):
                # Caret-newline: cmd drops both and reads on; the next line's first char is escaped.
                nxt = self._expand_percent(lines[i], i + 1)
                i += 1
                logical = logical[:-1] + ("^" + nxt if nxt else "")
            if logical.endswith("^") and _bat_ends_with_continuation(logical):
                logical = logical[:-1]
            for command in _bat_split_commands(logical):
                self._command(command, line_no)
        env = {k: v for k, v in self.vars.items() if k in self.touched}
        unset = {k for k in self.touched if k not in self.vars}
        args: list[str] = []
        value = self.vars.get("COMMANDLINE_ARGS")
        if value is not None:
            args = _tokenise_args(value, self.source, self.last_args_line, self.warnings)
        return LaunchConfig(
            kind="bat",
            commandline_args=args,
            env=env,
            assignments=self.assignments,
            exported=set(env),
            unset=unset,
            warnings=self.warnings,
        )

    def _command(self, command: str, line_no: int) -> None:
        m = _BAT_SET_RE.match(command)
        if not m:
            if command.strip() and not command.strip().lower().startswith(("@echo", "echo")):
                logger.debug("%s:%d: not a set command, ignored: %s", self.source, line_no, command.strip())
            return
        rest = m.group("rest")
        if rest[:1] == "/" or "=" not in rest:
            # set /a, set /p and bare `set X` (which lists variables) do not assign a literal value.
            logger.debug("%s:%d: set form not interpreted: %s", self.source, line_no, command.strip())
            return
        if rest.startswith('"'):
            # set "NAME=value" ...: the value ends at the last quote, anything after it is ignored.
            body = _bat_unescape(rest)[1:]
            last = body.rfind('"')
            if last >= 0:
                body = body[:last]
        else:
            body = _bat_unescape(rest)
        name, _, value = body.partition("=")
        if not name:
            self._warn(line_no, "set with an empty variable name is a syntax error in cmd; ignored")
            return
        if name != name.strip():
            self._warn(
                line_no,
                f"variable name {name!r} has surrounding spaces: cmd sets exactly that name, not "
                f"{name.strip()!r} (write `set {name.strip()}=...` without spaces around '=')",
            )
        key = name.upper()
        self.touched.add(key)
        self.assignments.append(Assignment(name, value, line_no, True))
        if key == "COMMANDLINE_ARGS":
            self.last_args_line = line_no
        if value == "":
            # `set X=` deletes X: the child process does not see it at all.
            self.vars.pop(key, None)
        else:
            self.vars[key] = value


# ---------------------------------------------------------------------------------------------------------
# Rendering our block


def _begin_marker(kind: Kind, profile_name: str) -> str:
    prefix = "#" if kind == "sh" else "@REM"
    return f'{prefix} {_BEGIN_TOKEN} profile "{profile_name}" (managed by {EXTENSION_NAME}; {EDIT_HINT}) >>>'


def _end_marker(kind: Kind) -> str:
    prefix = "#" if kind == "sh" else "@REM"
    return f"{prefix} {_END_TOKEN} <<<"


def _sh_double_quote_body(text: str) -> str:
    """Escape text for the inside of a bash double-quoted string."""
    return re.sub(r'([\\"$`])', r"\\\1", text)


def _bat_escape(text: str) -> str:
    """Escape a literal for a `set NAME=value` line: %% always, carets for specials outside quotes."""
    out: list[str] = []
    quoted = False
    for ch in text:
        if ch == "%":
            out.append("%%")
            continue
        if ch == '"':
            quoted = not quoted
        elif not quoted and ch in "^&|<>":
            out.append("^")
        out.append(ch)
    return "".join(out)


def _check_value(kind: Kind, what: str, value: str) -> None:
    if "\x00" in value:
        raise ValueError(f"render_block: {what} contains a NUL character")
    if kind == "bat" and ("\n" in value or "\r" in value):
        raise ValueError(f"render_block: {what} contains a line break, which a .bat `set` line cannot hold")
    if kind == "bat" and "!" in value:
        # Harmless unless delayed expansion is on, but then it would be eaten silently; keep it out.
        logger.debug("render_block: %s contains '!', which cmd drops under delayed expansion", what)


def render_block(kind: Kind, profile_name: str, add_args: list[str], env: dict[str, str]) -> str:
    """Return our marked block (LF line endings, ending with a newline) for a launcher file.

    ``add_args`` are argument tokens appended to whatever COMMANDLINE_ARGS the file already has;
    they are quoted so that the host's ``shlex.split`` gives back exactly these tokens. ``env``
    holds extra variables (not COMMANDLINE_ARGS) to export/set.
    """
    if kind not in ("sh", "bat"):
        raise ValueError(f"render_block: unknown launcher kind {kind!r} (expected 'sh' or 'bat')")
    if not _PROFILE_NAME_RE.match(profile_name):
        raise ValueError(
            f"render_block: profile name {profile_name!r} is not allowed "
            "(letters, digits, '.', '_', '+', '-' and single inner spaces)"
        )
    lines = [_begin_marker(kind, profile_name)]
    if add_args:
        for i, arg in enumerate(add_args):
            _check_value(kind, f"add_args[{i}]", arg)
        joined = " ".join(shlex.quote(a) for a in add_args)
        if kind == "sh":
            lines.append(f'export COMMANDLINE_ARGS="$COMMANDLINE_ARGS {_sh_double_quote_body(joined)}"')
        else:
            lines.append(f"set COMMANDLINE_ARGS=%COMMANDLINE_ARGS% {_bat_escape(joined)}")
    for name, value in env.items():
        if not _ENV_NAME_RE.match(name):
            raise ValueError(f"render_block: environment variable name {name!r} is not a valid identifier")
        if name.upper() == "COMMANDLINE_ARGS":
            raise ValueError("render_block: pass COMMANDLINE_ARGS tokens via add_args, not env")
        _check_value(kind, f"env[{name!r}]", value)
        if kind == "sh":
            lines.append(f'export {name}="{_sh_double_quote_body(value)}"')
        else:
            # Note: in cmd an empty value undefines the variable.
            lines.append(f"set {name}={_bat_escape(value)}")
    lines.append(_end_marker(kind))
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Finding and editing our block


def _find_block_in_lines(lines: list[str], source: str) -> BlockInfo | None:
    found: BlockInfo | None = None
    begin: tuple[int, str] | None = None
    for idx, line in enumerate(lines, start=1):
        stripped = line.rstrip("\r\n")
        if _BEGIN_TOKEN in stripped:
            m = _BEGIN_RE.match(stripped)
            if not m:
                raise WebuiUserError(source, idx, f"malformed {EXTENSION_NAME} begin marker; fix or delete it")
            if begin is not None:
                raise WebuiUserError(
                    source,
                    idx,
                    f"{EXTENSION_NAME} block begins again before the block from line {begin[0]} ended",
                )
            if found is not None:
                raise WebuiUserError(
                    source,
                    idx,
                    f"second {EXTENSION_NAME} block (another one is at lines {found.start_line}-{found.end_line});"
                    " remove one of them by hand",
                )
            begin = (idx, m.group("name"))
        elif _END_TOKEN in stripped:
            if not _END_RE.match(stripped):
                raise WebuiUserError(source, idx, f"malformed {EXTENSION_NAME} end marker; fix or delete it")
            if begin is None:
                raise WebuiUserError(source, idx, f"{EXTENSION_NAME} end marker without a begin marker")
            found = BlockInfo(profile_name=begin[1], start_line=begin[0], end_line=idx)
            begin = None
    if begin is not None:
        raise WebuiUserError(source, begin[0], f"{EXTENSION_NAME} block is never closed (no end marker)")
    return found


def find_block(path_or_text: str | os.PathLike[str]) -> BlockInfo | None:
    """Locate our block. A ``str`` is file *text*; pass a ``Path`` to read a file."""
    if isinstance(path_or_text, str):
        return _find_block_in_lines(_lines_with_ends(path_or_text), "<text>")
    p = Path(path_or_text)
    text = _decode(p.read_bytes()) if p.exists() else ""
    return _find_block_in_lines(_lines_with_ends(text), str(p))


def _newline_of(text: str) -> str:
    crlf = text.count("\r\n")
    return "\r\n" if crlf and crlf >= text.count("\n") - crlf else "\n"


def _lines_with_ends(text: str) -> list[str]:
    """Split on "\n" only, keeping the ends: bash and cmd break lines there and nowhere else
    (str.splitlines would also split on \x0c, \u2028, a lone \r, ...), so line numbers match theirs."""
    parts = text.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _remove_block_lines(lines: list[str], block: BlockInfo) -> list[str]:
    before = lines[: block.start_line - 1]
    after = lines[block.end_line :]
    block_last = lines[block.end_line - 1]
    if not after and not block_last.endswith("\n") and before:
        # We added the line break in front of the block when the file had no trailing newline.
        last = before[-1]
        before[-1] = last[:-2] if last.endswith("\r\n") else last[:-1]
    return before + after


def _insert_block_lines(lines: list[str], index: int, block_lines: list[str], newline: str) -> list[str]:
    if index < len(lines):
        return lines[:index] + block_lines + lines[index:]
    if lines and not lines[-1].endswith("\n"):
        # Keep the missing trailing newline missing: break before the block, not after it.
        block_lines = [*block_lines]
        block_lines[-1] = block_lines[-1].rstrip("\r\n")
        return [*lines[:-1], lines[-1] + newline, *block_lines]
    return lines + block_lines


def _call_webui_index(lines: list[str]) -> int | None:
    for idx, line in enumerate(lines):
        if _CALL_WEBUI_RE.match(line):
            return idx
    return None


def _new_file_text(kind: Kind, block: str, newline: str) -> str:
    if kind == "sh":
        return "#!/bin/bash\n" + block
    return newline.join(["@echo off", "", *block.splitlines(), "", "call webui.bat", ""])


def _backup_path(path: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}{BACKUP_INFIX}{stamp}-{n}")
        n += 1
    return candidate


def _write_backup(path: Path, data: bytes) -> Path:
    while True:
        backup = _backup_path(path)
        try:
            # O_EXCL: never overwrite an existing backup, even if one appears between check and open.
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        with contextlib.suppress(OSError):
            os.chmod(backup, os.stat(path).st_mode & 0o7777)
        return backup


def _atomic_write(path: Path, data: bytes) -> None:
    mode: int | None = None
    with contextlib.suppress(FileNotFoundError):
        mode = os.stat(path).st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        elif path.suffix == ".sh":
            os.chmod(tmp, 0o755)
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _unified_diff(path: Path, old: str, new: str) -> str:
    diff = difflib.unified_diff(
        old.splitlines(), new.splitlines(), fromfile=f"{path} (current)", tofile=f"{path} (new)", lineterm=""
    )
    text = "\n".join(diff)
    return text + "\n" if text else ""


def _read_existing(path: Path) -> tuple[bytes | None, str]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, ""
    except OSError as exc:
        raise WebuiUserError(str(path), None, f"cannot read launcher config: {exc}") from exc
    return data, _decode(data)


def _commit(path: Path, old_data: bytes | None, old_text: str, new_text: str, dry_run: bool) -> EditResult:
    if new_text == old_text and old_data is not None:
        return EditResult(changed=False, diff="", backup_path=None, new_text=new_text)
    diff = _unified_diff(path, old_text, new_text)
    if dry_run:
        return EditResult(changed=True, diff=diff, backup_path=None, new_text=new_text)
    try:
        backup = _write_backup(path, old_data) if old_data is not None else None
        _atomic_write(path, _encode(new_text))
    except OSError as exc:
        raise WebuiUserError(str(path), None, f"cannot write launcher config: {exc}") from exc
    logger.info("updated %s%s", path, f" (backup: {backup.name})" if backup else "")
    return EditResult(changed=True, diff=diff, backup_path=backup, new_text=new_text)


def _target(path: str | os.PathLike[str]) -> Path:
    # Edit the file a symlink points to, so os.replace does not turn the link into a plain file.
    p = Path(path)
    return p.resolve() if p.is_symlink() else p


def apply_block(path: str | os.PathLike[str], block_text: str, *, dry_run: bool = False) -> EditResult:
    """Insert our block or replace the existing one; see the module docstring for placement."""
    p = _target(path)
    kind = kind_for_path(p)
    block_lines_lf = block_text.splitlines()
    info = _find_block_in_lines(block_lines_lf, "block_text")
    if info is None or info.start_line != 1 or info.end_line != len(block_lines_lf):
        raise ValueError("apply_block: block_text must be exactly one block made by render_block()")
    expected_prefix = "#" if kind == "sh" else "@REM"
    if not block_lines_lf[0].lstrip().upper().startswith(expected_prefix.upper()):
        raise ValueError(f"apply_block: block_text was rendered for another launcher kind than {p.name}")

    old_data, old_text = _read_existing(p)
    if old_data is None:
        newline = "\r\n" if kind == "bat" else "\n"
        new_text = _new_file_text(kind, newline.join(block_lines_lf) + newline, newline)
        return _commit(p, old_data, old_text, new_text, dry_run)

    newline = _newline_of(old_text)
    block_lines = [line + newline for line in block_lines_lf]
    lines = _lines_with_ends(old_text)
    existing = _find_block_in_lines(lines, str(p))
    if existing is not None:
        call_idx = _call_webui_index(lines)
        if kind == "bat" and call_idx is not None and call_idx < existing.start_line - 1:
            # A block after `call webui.bat` has no effect on the launch: move it in front of the call.
            logger.info("%s:%d: moving the %s block before `call webui.bat`", p, existing.start_line, EXTENSION_NAME)
            lines = _remove_block_lines(lines, existing)
        else:
            was_last = existing.end_line == len(lines) and not lines[-1].endswith("\n")
            if was_last:
                block_lines[-1] = block_lines[-1].rstrip("\r\n")
            new_lines = lines[: existing.start_line - 1] + block_lines + lines[existing.end_line :]
            return _commit(p, old_data, old_text, "".join(new_lines), dry_run)

    index = len(lines)
    if kind == "bat":
        call_idx = _call_webui_index(lines)
        if call_idx is not None:
            index = call_idx
    new_text = "".join(_insert_block_lines(lines, index, block_lines, newline))
    return _commit(p, old_data, old_text, new_text, dry_run)


def remove_block(path: str | os.PathLike[str], *, dry_run: bool = False) -> EditResult:
    """Remove our block (and nothing else). No block: nothing is written and ``changed`` is False."""
    p = _target(path)
    old_data, old_text = _read_existing(p)
    if old_data is None:
        return EditResult(changed=False, diff="", backup_path=None, new_text="")
    lines = _lines_with_ends(old_text)
    block = _find_block_in_lines(lines, str(p))
    if block is None:
        return EditResult(changed=False, diff="", backup_path=None, new_text=old_text)
    new_text = "".join(_remove_block_lines(lines, block))
    return _commit(p, old_data, old_text, new_text, dry_run)
