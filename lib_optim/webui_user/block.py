"""Our marked block in a launcher file: render it, find it, insert, replace or remove it (backup first)."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shlex
import tempfile
from datetime import datetime
from pathlib import Path

from lib_optim.log import get_logger
from lib_optim.webui_user.model import (
    CALL_WEBUI_RE,
    ENV_NAME_RE,
    EXTENSION_NAME,
    BlockInfo,
    EditResult,
    Kind,
    WebuiUserError,
    decode_text,
    encode_text,
    kind_for_path,
)

logger = get_logger(__name__)

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
        if not ENV_NAME_RE.match(name):
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
    text = decode_text(p.read_bytes()) if p.exists() else ""
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
        if CALL_WEBUI_RE.match(line):
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
    return data, decode_text(data)


def _commit(path: Path, old_data: bytes | None, old_text: str, new_text: str, dry_run: bool) -> EditResult:
    if new_text == old_text and old_data is not None:
        return EditResult(changed=False, diff="", backup_path=None, new_text=new_text)
    diff = _unified_diff(path, old_text, new_text)
    if dry_run:
        return EditResult(changed=True, diff=diff, backup_path=None, new_text=new_text)
    try:
        backup = _write_backup(path, old_data) if old_data is not None else None
        _atomic_write(path, encode_text(new_text))
    except OSError as exc:
        raise WebuiUserError(str(path), None, f"cannot write launcher config: {exc}") from exc
    logger.info("updated %s%s", path, f" (backup: {backup.name})" if backup else "")
    return EditResult(changed=True, diff=diff, backup_path=backup, new_text=new_text)


def _target(path: str | os.PathLike[str]) -> Path:
    # Edit the file a symlink points to, so os.replace does not turn the link into a plain file.
    p = Path(path)
    return p.resolve() if p.is_symlink() else p


def apply_block(path: str | os.PathLike[str], block_text: str, *, dry_run: bool = False) -> EditResult:
    """Insert our block or replace the existing one; the package docstring says what the hosts run.

    In a .bat file the block goes before ``call webui.bat``; elsewhere at the end of the file.
    """
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
