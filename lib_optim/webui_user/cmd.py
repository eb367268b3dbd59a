"""A reader for the subset of cmd.exe that ``webui-user.bat`` files use (see the package docstring)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from lib_optim.log import get_logger
from lib_optim.webui_user.model import CALL_WEBUI_RE, Assignment, LaunchConfig, tokenise_args

logger = get_logger(__name__)


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


class BatInterpreter:
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
            if CALL_WEBUI_RE.match(raw):
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
            args = tokenise_args(value, self.source, self.last_args_line, self.warnings)
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
