"""A reader for the subset of bash that ``webui-user.sh`` files use (see the package docstring)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Literal

from lib_optim.log import get_logger
from lib_optim.webui_user.model import (
    ENV_NAME_RE,
    Assignment,
    BrokenLauncherFile,
    LaunchConfig,
    NoteTaker,
    WebuiUserError,
    added_tokens,
    tokenise_args,
)

log = get_logger(__name__)


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


@dataclass
class _Command:
    words: list[_Word]
    after_and_or: bool  # follows && or ||, so it runs only if the command before it succeeded (or failed)


_SH_SEPARATORS = frozenset(";&|()<>")
_SH_SPECIAL_PARAMS = frozenset("@*#?$!-0123456789")
_SH_LEADING_KEYWORDS = frozenset({"then", "do", "else", "elif", "{", "!", "time"})
# Compound commands whose bodies may or may not run: `if`/`while`/`until` are followed by their condition
# (a command), `case`/`for`/`select` by words that are not a command; `fi`/`done`/`esac` close them.
_SH_CONDITION_OPENERS = frozenset({"if", "while", "until"})
_SH_HEADER_OPENERS = frozenset({"case", "for", "select"})
_SH_CLOSERS = frozenset({"fi", "done", "esac"})
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

    def commands(self) -> list[_Command]:
        commands: list[_Command] = []
        current: list[_Word] = []
        separator = ""  # what ended the previous command
        while self.pos < len(self.text):
            ch = self._peek()
            # A carriage return is an ordinary character to bash (CRLF files leave it in every value).
            if ch in " \t":
                self._advance()
            elif ch == "\\" and self._peek(1) == "\n":
                self._advance(2)
            elif ch == "#":
                # A '#' starting a word comments out the rest of the line (not the newline).
                while self.pos < len(self.text) and self._peek() != "\n":
                    self._advance()
            elif ch == "\n" or ch in _SH_SEPARATORS:
                doubled = ch in "&|" and self._peek(1) == ch
                self._advance(2 if doubled else 1)
                if current:
                    commands.append(_Command(current, separator in ("&&", "||")))
                    current = []
                separator = ch * 2 if doubled else ch
            else:
                current.append(self._word())
        if current:
            commands.append(_Command(current, separator in ("&&", "||")))
        return commands

    def _word(self) -> _Word:
        start_line = self.line
        parts: list[_Part] = []
        while self.pos < len(self.text):
            ch = self._peek()
            if ch in " \t\n" or ch in _SH_SEPARATORS:
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
                while self.pos < len(self.text) and self._peek() not in " \t\n\\'\"$`" + "".join(_SH_SEPARATORS):
                    self.pos += 1
                parts.append(_Part("lit", self.text[start : self.pos]))
        return _Word(parts, start_line)

    def _unterminated(self, what: str, line_no: int) -> WebuiUserError:
        # bash runs the file up to this command, then stops with "unexpected EOF while looking for matching";
        # webui.sh:20-23 goes on without the rest, so the settings from here on never reach the WebUI.
        return BrokenLauncherFile(
            self.source,
            line_no,
            f"unterminated {what} (bash would fail to source this file: nothing from line {line_no} on reaches "
            "the WebUI). Fix: close it on that line",
        )

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


class ShInterpreter(NoteTaker):
    def __init__(self, text: str, source: str, base_env: Mapping[str, str]) -> None:
        super().__init__(source)
        self.text = text
        self.vars: dict[str, _ShVar] = {k: _ShVar(v, True) for k, v in base_env.items()}
        self.touched: set[str] = set()
        self.assignments: list[Assignment] = []
        self.last_args_line: int | None = None
        self.open_blocks: list[int] = []  # lines of the enclosing if/case/loop keywords
        self.condition_line: int | None = None  # the condition the current command depends on, if any
        self.conditional_flags: dict[str, int] = {}
        self.conditional_vars: dict[str, int] = {}

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
                self.note(
                    part.line_no,
                    "info",
                    part.text,
                    f"{part.text} is not run by the checker; its text is kept as it is",
                    "If it adds launch flags or values, check those directly: python -m lib_optim check -- FLAGS",
                )
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
        before = var.value
        var.value = value
        var.exported = var.exported or export
        self.touched.add(name)
        condition = self.condition_line
        self.assignments.append(Assignment(name, value, line_no, var.exported, condition is not None))
        if name == "COMMANDLINE_ARGS":
            self.last_args_line = line_no
            added = added_tokens(before or "", value)
            for token in added:
                if condition is not None:
                    self.conditional_flags[token] = condition
                else:
                    self.conditional_flags.pop(token, None)
        elif condition is not None:
            self.conditional_vars[name] = condition
        else:
            self.conditional_vars.pop(name, None)

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
        for command in _ShLexer(self.text, self.source).commands():
            self._command(command)
        env = {n: v.value for n, v in self.vars.items() if n in self.touched and v.value is not None}
        exported = {n for n in env if self.vars[n].exported}
        unset = {n for n in self.touched if n not in env}
        args_var = self.vars.get("COMMANDLINE_ARGS")
        args: list[str] = []
        if args_var is not None and args_var.value is not None:
            if args_var.exported:
                args = tokenise_args(args_var.value, self.source, self.last_args_line, self)
            else:
                self.note(
                    self.last_args_line or 0,
                    "warning",
                    "COMMANDLINE_ARGS",
                    "COMMANDLINE_ARGS is set but not exported, so launch.py does not see it "
                    "(webui.sh only passes exported variables)",
                    "Write `export COMMANDLINE_ARGS=...`.",
                )
        self._note_line_endings(env)
        conditional_flags = {t: line for t, line in self.conditional_flags.items() if t in args}
        conditional_vars = {n: line for n, line in self.conditional_vars.items() if n in env}
        for name, line in sorted(conditional_vars.items(), key=lambda item: item[1]):
            self.note_conditional(name, line)
        if conditional_flags:
            self.note_conditional(" ".join(conditional_flags), min(conditional_flags.values()))
        return LaunchConfig(
            kind="sh",
            commandline_args=args,
            env=env,
            assignments=self.assignments,
            exported=exported,
            unset=unset,
            warnings=self.warnings,
            notes=self.notes,
            conditional_flags=conditional_flags,
            conditional_vars=conditional_vars,
        )

    def _note_line_endings(self, env: dict[str, str]) -> None:
        if "\r\n" not in self.text:
            return
        name = PurePath(self.source).name
        spoiled = sorted(n for n, v in env.items() if "\r" in v)
        example = f" ({', '.join(spoiled)} end with it)" if spoiled else ""
        self.note(
            None,
            "warning",
            "line endings",
            "the file has Windows (CRLF) line endings: bash keeps the carriage return of each line in the "
            f"values it sets{example}, so a path or a setting in it is not what you wrote",
            f"Convert it to Unix line endings: dos2unix {name} (or: sed -i 's/\\r$//' {name}).",
        )

    def _command(self, command: _Command) -> None:
        words = command.words
        if not words:
            return
        and_or_line = words[0].line_no if command.after_and_or else None
        while words:
            keyword = self._keyword(words[0])
            if keyword in _SH_LEADING_KEYWORDS:
                words = words[1:]
            elif keyword in _SH_CONDITION_OPENERS:
                self.open_blocks.append(words[0].line_no)
                words = words[1:]
            elif keyword in _SH_HEADER_OPENERS:
                self.open_blocks.append(words[0].line_no)
                return
            elif keyword in _SH_CLOSERS:
                if self.open_blocks:
                    self.open_blocks.pop()
                words = words[1:]
            else:
                break
        if not words:
            return
        self.condition_line = and_or_line or (self.open_blocks[-1] if self.open_blocks else None)
        try:
            self._simple_command(words)
        finally:
            self.condition_line = None

    def _keyword(self, word: _Word) -> str | None:
        plain = self._plain(word)
        # CRLF files: `then\r` is not a keyword to bash either (it fails there), but block nesting still
        # reads better with it recognised.
        return plain.rstrip("\r") if plain is not None else None

    def _simple_command(self, words: list[_Word]) -> None:
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
        log.debug("%s:%d: not an assignment, ignored: %s", self.source, line_no, head)

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
            elif plain is not None and ENV_NAME_RE.match(plain):
                var = self.vars.setdefault(plain, _ShVar(None, False))
                self.touched.add(plain)
                if unexport:
                    var.exported = False
                elif export:
                    var.exported = True
                    if var.value is not None:
                        conditional = self.condition_line is not None
                        self.assignments.append(Assignment(plain, var.value, w.line_no, True, conditional))
