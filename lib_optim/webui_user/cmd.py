"""A reader for the subset of cmd.exe that ``webui-user.bat`` files use (see the package docstring)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from lib_optim.log import get_logger
from lib_optim.webui_user.model import Assignment, LaunchConfig, NoteTaker, added_tokens, tokenise_args

log = get_logger(__name__)


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


def _bat_split_commands(line: str) -> list[tuple[str, bool]]:
    """Split on unquoted, unescaped & / && / | / || (carets still in place).

    Each command comes with whether it follows ``&&`` or ``||`` (it then runs only if the one before
    succeeded, or failed).
    """
    out: list[tuple[str, bool]] = []
    quoted = False
    start = 0
    after_and_or = False
    i = 0
    while i < len(line):
        ch = line[i]
        if ch == '"':
            quoted = not quoted
        elif ch == "^" and not quoted:
            i += 1
        elif ch in "&|" and not quoted:
            out.append((line[start:i], after_and_or))
            after_and_or = i + 1 < len(line) and line[i + 1] == ch
            if after_and_or:
                i += 1
            start = i + 1
        i += 1
    out.append((line[start:], after_and_or))
    return out


_BAT_WORD_RE = re.compile(r'(?:"[^"]*"?|[^\s"])+')
_BAT_SWITCH_RE = re.compile(r"/[A-Za-z]+(?::\S*)?")  # /b, /c, /d:path; not a path like /opt/webui.bat
_BAT_PARAM_RE = re.compile(r"%~?[a-zA-Z$:]*[0-9*]|%[^%]*%")
_WEBUI_NAMES = frozenset({"webui.bat", "webui"})  # `call webui` finds webui.bat through PATHEXT


def _bat_words(command: str) -> list[tuple[str, int]]:
    """Whitespace-separated words (quotes kept) with the index where each ends."""
    return [(m.group(0), m.end()) for m in _BAT_WORD_RE.finditer(command)]


def _starts_webui(command: str) -> bool:
    words = [w.strip('"') for w, _ in _bat_words(command.strip().lstrip("@"))]
    i = 0
    # `call X`, `start [/b ...] ["title"] X`, `cmd /c X`: X is what runs.
    while i < len(words) and (
        words[i].lower() in ("call", "start", "cmd") or _BAT_SWITCH_RE.fullmatch(words[i]) or not words[i]
    ):
        i += 1
    if i >= len(words):
        return False
    # %~dp0webui.bat, "%~dp0\webui.bat", %ROOT%\webui.bat: the variable parts are folders.
    program = re.split(r"[\\/]", _BAT_PARAM_RE.sub("/", words[i]))[-1].lower()
    return program in _WEBUI_NAMES


def hands_over(line: str) -> bool:
    """Whether this .bat line starts webui.bat (``call webui.bat``, ``call "%~dp0webui.bat"``, ...).

    What follows such a line runs only after the WebUI has exited, so it does not count, and our block
    must go before it.
    """
    return any(_starts_webui(command) for command, _ in _bat_split_commands(line.replace("\r", "")))


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


class BatInterpreter(NoteTaker):
    def __init__(self, text: str, source: str, base_env: Mapping[str, str], path: Path | None) -> None:
        super().__init__(source)
        self.text = text
        # cmd variable names are case-insensitive; keep them upper-cased like os.environ on Windows.
        self.vars: dict[str, str] = {k.upper(): v for k, v in base_env.items()}
        self.touched: set[str] = set()
        self.assignments: list[Assignment] = []
        self.path = path
        self.last_args_line: int | None = None
        self.delayed = False  # setlocal enabledelayedexpansion: !VAR! is expanded when a command runs
        self.scopes: list[tuple[dict[str, str], bool]] = []  # what each setlocal saved, for endlocal
        self.open_blocks: list[int] = []  # lines of the `if ... (` / `for ... (` whose block we are in
        self.condition_line: int | None = None
        self.conditional_flags: dict[str, int] = {}
        self.conditional_vars: dict[str, int] = {}

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
        self.note(
            line_no,
            "info",
            f"%{spec}%",
            f"%{spec}% uses a modifier the checker does not know; read as %{name}%",
            "Check the value it gives by hand, or set the variable directly.",
        )
        return value

    def _expand_delayed(self, text: str, line_no: int) -> str:
        """cmd phase 5 on a command that contains '!': ``!VAR!`` expanded, ``^`` escapes the next character."""
        out: list[str] = []
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "^":
                out.append(text[i + 1 : i + 2])
                i += 2
            elif ch == "!":
                end = text.find("!", i + 1)
                if end < 0:
                    i += 1  # a lone '!' is dropped
                    continue
                # Undefined: nothing, as for %VAR% in a batch file.
                out.append(self._expand_var(text[i + 1 : end], line_no))
                i = end + 1
            else:
                out.append(ch)
                i += 1
        return "".join(out)

    def run(self) -> LaunchConfig:
        # cmd reads up to each LF and discards every CR (parse phase 1.5).
        lines = [line.replace("\r", "") for line in self.text.split("\n")]
        i = 0
        while i < len(lines):
            line_no = i + 1
            raw = lines[i]
            i += 1
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
            if self._line(logical, line_no):
                # webui.bat starts launch.py from here; what follows runs only after the WebUI exits.
                self._note_after_handover(lines, i, line_no)
                break
        env = {k: v for k, v in self.vars.items() if k in self.touched}
        unset = {k for k in self.touched if k not in self.vars}
        args: list[str] = []
        value = self.vars.get("COMMANDLINE_ARGS")
        if value is not None:
            args = tokenise_args(value, self.source, self.last_args_line, self, "bat")
        conditional_flags = {t: line for t, line in self.conditional_flags.items() if t in args}
        conditional_vars = {n: line for n, line in self.conditional_vars.items() if n in env}
        for name, line in sorted(conditional_vars.items(), key=lambda item: item[1]):
            self.note_conditional(name, line)
        if conditional_flags:
            self.note_conditional(" ".join(conditional_flags), min(conditional_flags.values()))
        return LaunchConfig(
            kind="bat",
            commandline_args=args,
            env=env,
            assignments=self.assignments,
            exported=set(env),
            unset=unset,
            warnings=self.warnings,
            notes=self.notes,
            conditional_flags=conditional_flags,
            conditional_vars=conditional_vars,
        )

    def _note_after_handover(self, lines: list[str], start: int, call_line: int) -> None:
        """`set` lines after `call webui.bat`: they run only once the WebUI has exited, so they never reach it."""
        late = [start + k + 1 for k, line in enumerate(lines[start:]) if _BAT_SET_RE.match(line.strip().lstrip("@"))]
        if not late:
            return
        one = len(late) == 1
        where = f"line {late[0]}" if one else f"lines {', '.join(map(str, late))}"
        it, they = ("it", "it") if one else ("them", "they")
        self.note(
            late[0],
            "warning",
            "call webui.bat",
            f"{where} set{'s a variable' if one else ' variables'} after `call webui.bat` (line {call_line}): cmd "
            f"runs {it} only after the WebUI has exited, so {they} never take{'s' if one else ''} effect for the WebUI",
            f"Move {where} above `call webui.bat` (line {call_line}), or delete {it}.",
        )

    def _line(self, logical: str, line_no: int) -> bool:
        """Run one logical line; True when it hands over to webui.bat."""
        for command, after_and_or in _bat_split_commands(logical):
            if _starts_webui(command):
                return True
            condition = line_no if after_and_or else None
            self._compound(command, line_no, condition)
        return False

    def _compound(self, command: str, line_no: int, condition: int | None) -> None:
        """Block structure: `if COND (`, `for ... (`, `) else (`, `)`, and `if COND command`."""
        stripped = command.strip().lstrip("@").strip()
        while stripped.startswith(")"):
            if self.open_blocks:
                self.open_blocks.pop()
            stripped = stripped[1:].strip()
            if stripped.lower().startswith("else"):
                stripped = stripped[4:].strip()
                self.open_blocks.append(line_no)
                if stripped.startswith("("):
                    stripped = stripped[1:].strip()
                else:  # `) else command` on one line
                    self._simple(stripped, line_no, line_no)
                    self.open_blocks.pop()
                    return
        words = _bat_words(stripped)
        first = words[0][0].lower() if words else ""
        if first == "if":
            body = _if_body(stripped, words)
            if body is None:
                log.debug("%s:%d: if-condition not understood, ignored: %s", self.source, line_no, stripped)
                return
            if body.startswith("("):
                self.open_blocks.append(line_no)
                body = body[1:].strip()
                if body:
                    self._simple(body, line_no, line_no)
                return
            self._simple(body, line_no, line_no)
            return
        if first == "for":
            if stripped.endswith("("):
                self.open_blocks.append(line_no)
            else:
                log.debug("%s:%d: for-loop not interpreted: %s", self.source, line_no, stripped)
            return
        if stripped.endswith(")") and self.open_blocks and stripped.count("(") < stripped.count(")"):
            # `set X=1)`: the closing parenthesis ends the block
            stripped = stripped[:-1]
            self._simple(stripped, line_no, condition)
            self.open_blocks.pop()
            return
        self._simple(stripped, line_no, condition)

    def _simple(self, command: str, line_no: int, condition: int | None) -> None:
        self.condition_line = condition or (self.open_blocks[-1] if self.open_blocks else None)
        try:
            self._command(command, line_no)
        finally:
            self.condition_line = None

    def _scope(self, command: str) -> bool:
        """setlocal / endlocal; True if the command was one of them."""
        words = [w.lower() for w, _ in _bat_words(command)]
        if not words or words[0] not in ("setlocal", "endlocal"):
            return False
        if words[0] == "endlocal":
            if self.scopes:
                self.vars, self.delayed = self.scopes.pop()
            return True
        self.scopes.append((dict(self.vars), self.delayed))
        if "enabledelayedexpansion" in words:
            self.delayed = True
        elif "disabledelayedexpansion" in words:
            self.delayed = False
        return True

    def _command(self, command: str, line_no: int) -> None:
        if self._scope(command.strip()):
            return
        text = _bat_unescape(command)  # phase 2: carets outside quotes
        if self.delayed and "!" in text:
            text = self._expand_delayed(text, line_no)
        m = _BAT_SET_RE.match(text)
        if not m:
            if text.strip() and not text.strip().lower().startswith(("@echo", "echo")):
                log.debug("%s:%d: not a set command, ignored: %s", self.source, line_no, text.strip())
            return
        rest = m.group("rest")
        if rest[:1] == "/" or "=" not in rest:
            # set /a, set /p and bare `set X` (which lists variables) do not assign a literal value.
            log.debug("%s:%d: set form not interpreted: %s", self.source, line_no, text.strip())
            return
        if rest.startswith('"'):
            # set "NAME=value" ...: the value ends at the last quote, anything after it is ignored.
            body = rest[1:]
            last = body.rfind('"')
            if last >= 0:
                body = body[:last]
        else:
            body = rest
        name, _, value = body.partition("=")
        if not name:
            self.note(
                line_no,
                "warning",
                "set",
                "set with an empty variable name is a syntax error in cmd; the line is ignored",
                "Write `set NAME=value`.",
            )
            return
        if name != name.strip():
            self.note(
                line_no,
                "warning",
                name.strip(),
                f"variable name {name!r} has surrounding spaces: cmd sets exactly that name, not {name.strip()!r}",
                f"Write `set {name.strip()}=...` without spaces around '='.",
            )
        key = name.upper()
        before = self.vars.get(key, "")
        self.touched.add(key)
        condition = self.condition_line
        self.assignments.append(Assignment(name, value, line_no, True, condition is not None))
        if key == "COMMANDLINE_ARGS":
            self.last_args_line = line_no
            for token in added_tokens(before, value):
                if condition is not None:
                    self.conditional_flags[token] = condition
                else:
                    self.conditional_flags.pop(token, None)
        elif condition is not None:
            self.conditional_vars[key] = condition
        else:
            self.conditional_vars.pop(key, None)
        if value == "":
            # `set X=` deletes X: the child process does not see it at all.
            self.vars.pop(key, None)
        else:
            self.vars[key] = value


_IF_UNARY = frozenset({"exist", "defined", "errorlevel", "cmdextversion"})
_IF_COMPARE = frozenset({"equ", "neq", "lss", "leq", "gtr", "geq"})


def _if_body(command: str, words: list[tuple[str, int]]) -> str | None:
    """The command an ``if`` runs when its condition holds (``(`` for a block), or None if unreadable."""
    i = 1
    while i < len(words) and words[i][0].lower() in ("/i", "not"):
        i += 1
    if i >= len(words):
        return None
    word = words[i][0]
    if word.lower() in _IF_UNARY:
        end = i + 1
    elif "==" in word and not word.endswith("=="):
        end = i  # a==b in one word
    elif word.endswith("==") or (i + 1 < len(words) and words[i + 1][0].startswith("==")):
        nxt = words[i + 1][0] if i + 1 < len(words) else ""
        end = i + 1 if word.endswith("==") or nxt != "==" else i + 2
    elif i + 1 < len(words) and words[i + 1][0].lower() in _IF_COMPARE:
        end = i + 2
    else:
        return None
    if end >= len(words):
        return None
    body = command[words[end][1] :].strip()
    return body or None
