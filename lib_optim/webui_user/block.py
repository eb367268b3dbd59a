"""Our marked block in a launcher file: render it, find it, insert, replace or remove it (backup first)."""

from __future__ import annotations

import contextlib
import difflib
import os
import re
import shlex
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path

from lib_optim.log import get_logger
from lib_optim.webui_user.cmd import hands_over
from lib_optim.webui_user.model import (
    ENV_NAME_RE,
    EXTENSION_NAME,
    BlockInfo,
    EditResult,
    Kind,
    WebuiUserError,
    WriteRefused,
    decode_text,
    encode_text,
    kind_for_path,
    read_launcher_bytes,
)

log = get_logger(__name__)

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
        log.debug("render_block: %s contains '!', which cmd drops under delayed expansion", what)


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
    return "\n".join([_begin_marker(kind, profile_name), *block_body(kind, add_args, env), _end_marker(kind)]) + "\n"


def block_body(kind: Kind, add_args: list[str], env: Mapping[str, str]) -> list[str]:
    """The lines between our markers (what a user can paste by hand): see :func:`render_block`."""
    if kind not in ("sh", "bat"):
        raise ValueError(f"render_block: unknown launcher kind {kind!r} (expected 'sh' or 'bat')")
    lines: list[str] = []
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
    return lines


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
    _data, text = _read_existing(p)
    return _find_block_in_lines(_lines_with_ends(text), str(p))


def read_block(path: str | os.PathLike[str]) -> tuple[BlockInfo, list[str]] | None:
    """Our block in the file at ``path`` and the lines between its markers (line ends removed)."""
    p = _target(path)
    _data, text = _read_existing(p)
    lines = _lines_with_ends(text)
    info = _find_block_in_lines(lines, str(p))
    if info is None:
        return None
    return info, [line.rstrip("\r\n") for line in lines[info.start_line : info.end_line - 1]]


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


def _remove_block_lines(lines: list[str], block: BlockInfo, kind: Kind) -> list[str]:
    before = lines[: block.start_line - 1]
    after = lines[block.end_line :]
    block_last = lines[block.end_line - 1]
    if not after and not block_last.endswith("\n") and before:
        # We added the line break in front of the block when the file had no trailing newline.
        last = before[-1]
        before[-1] = last[:-2] if kind == "bat" and last.endswith("\r\n") else last[:-1]
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
        if hands_over(line):
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


def _keep_owner(target: str | Path, original: os.stat_result) -> bool:
    """Give ``target`` the owner and group of ``original``; False if this user may not (not root)."""
    if not hasattr(os, "chown"):
        return True  # Windows: files have no POSIX owner to keep
    now = os.stat(target)
    if (now.st_uid, now.st_gid) == (original.st_uid, original.st_gid):
        return True
    try:
        os.chown(target, original.st_uid, original.st_gid)
    except PermissionError:
        log.debug("cannot give %s the owner %d:%d", target, original.st_uid, original.st_gid, exc_info=True)
        return False
    return True


def _write_backup(path: Path, data: bytes, original: os.stat_result) -> Path:
    while True:
        backup = _backup_path(path)
        try:
            # O_EXCL: never overwrite an existing backup, even if one appears between check and open.
            fd = os.open(backup, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            continue
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        # Same owner, group and mode as the file: it holds the same text, and its owner must be able to
        # restore or delete it. Where this user may not give it away, it stays theirs, unreadable to others.
        if _keep_owner(backup, original):
            os.chmod(backup, original.st_mode & 0o7777)
        return backup


def _write_in_place(path: Path, data: bytes) -> None:
    # Not atomic, but keeps the inode: its hard links, owner, group, mode and ACLs. The backup is written first.
    # A read-only file (written only with force, _check_writable) is made writable for its owner meanwhile and
    # gets its mode back whatever happens.
    mode = os.stat(path).st_mode & 0o7777
    opened = contextlib.nullcontext() if os.access(path, os.W_OK) else _owner_writable(path, mode)
    with opened, path.open("r+b") as fh:
        fh.write(data)
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())


@contextlib.contextmanager
def _owner_writable(path: Path, mode: int) -> Iterator[None]:
    os.chmod(path, mode | stat.S_IWUSR)
    try:
        yield
    finally:
        os.chmod(path, mode)


def _write_file(path: Path, data: bytes) -> None:
    """Replace the file's contents atomically, keeping its mode, owner and group (and its hard links)."""
    try:
        original: os.stat_result | None = os.stat(path)
    except FileNotFoundError:
        original = None
    if original is not None and original.st_nlink > 1:
        # A new file renamed into place would leave the other names with the old text.
        _write_in_place(path, data)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if original is None:
            os.chmod(tmp, 0o755 if path.suffix == ".sh" else 0o644)
        else:
            os.chmod(tmp, original.st_mode & 0o7777)
            if not _keep_owner(tmp, original):
                # Renaming our file into place would change the file's owner: rewrite it instead.
                os.unlink(tmp)
                _write_in_place(path, data)
                return
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------------------
# One edit of a file at a time


LOCK_SUFFIX = ".optim-lock"
LOCK_TIMEOUT_S = 30.0
_LOCK_POLL_S = 0.05
_held_locks = threading.local()


def _try_lock(fd: int) -> bool:
    try:
        if sys.platform == "win32":
            import msvcrt

            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # held by another process (BlockingIOError / PermissionError on Windows)
        return False
    return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":
        import msvcrt

        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_UN)


def _is_current(fd: int, lock_path: Path) -> bool:
    """Whether ``fd`` is still the file at ``lock_path`` (the holder before us removes it on release)."""
    try:
        now = os.stat(lock_path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


@contextlib.contextmanager
def edit_lock(
    path: Path,
    *,
    timeout: float = LOCK_TIMEOUT_S,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[None]:
    """Hold the edit lock of ``path`` (a ``<name>.optim-lock`` file beside it, removed afterwards).

    Another process (or thread) editing the same file waits, saying so once, up to ``timeout`` seconds, then
    gets :class:`WriteRefused`. The OS releases the lock if the holder dies, so a stale lock file is harmless.
    Re-entrant within a thread.
    """
    path = _target(path)
    key = os.path.abspath(path)
    held: set[str] = getattr(_held_locks, "paths", set())
    _held_locks.paths = held
    if key in held:
        yield
        return
    lock_path = path.with_name(path.name + LOCK_SUFFIX)
    deadline = clock() + timeout
    said = False
    while True:
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise WebuiUserError(str(path), None, f"cannot create the lock file {lock_path.name}: {exc}") from exc
        if _try_lock(fd):
            if _is_current(fd, lock_path):
                break
            _unlock(fd)
        os.close(fd)
        if clock() >= deadline:
            raise WriteRefused(
                str(path),
                None,
                f"another edit of this file is still running (lock: {lock_path}); nothing written — "
                "try again when it has finished",
            )
        if not said:
            log.warning("waiting for another edit of %s to finish (lock: %s)", path, lock_path)
            said = True
        sleep(_LOCK_POLL_S)
    held.add(key)
    try:
        yield
    finally:
        held.discard(key)
        # Remove the file before unlocking: whoever waits on this one then sees it is stale and retries.
        with contextlib.suppress(OSError):
            os.unlink(lock_path)
        _unlock(fd)
        os.close(fd)


def _unified_diff(path: Path, old: str, new: str) -> str:
    diff = difflib.unified_diff(
        old.splitlines(), new.splitlines(), fromfile=f"{path} (current)", tofile=f"{path} (new)", lineterm=""
    )
    text = "\n".join(diff)
    return text + "\n" if text else ""


def _read_existing(path: Path) -> tuple[bytes | None, str]:
    try:
        data = read_launcher_bytes(path)
    except FileNotFoundError:
        return None, ""
    return data, decode_text(data)


def _check_writable(path: Path, force: bool) -> None:
    info = os.stat(path)
    if not info.st_mode & 0o222:
        if force:
            log.debug("%s is read-only; written anyway (force)", path)
            return
        raise WriteRefused(
            str(path),
            None,
            f"is read-only (mode {stat.filemode(info.st_mode)}); nothing written — make it writable "
            f"(chmod u+w {path}) or pass --force to write it anyway (it stays read-only)",
        )
    if not os.access(path, os.W_OK):
        owner = f"uid {info.st_uid}" if hasattr(os, "getuid") else "another user"
        raise WriteRefused(
            str(path),
            None,
            f"this user may not write it (owner {owner}, mode {stat.filemode(info.st_mode)}); nothing written — "
            "run the command as its owner",
        )


def _commit(path: Path, old_data: bytes | None, old_text: str, new_text: str, dry_run: bool, force: bool) -> EditResult:
    if new_text == old_text and old_data is not None:
        return EditResult(changed=False, diff="", backup_path=None, new_text=new_text)
    diff = _unified_diff(path, old_text, new_text)
    if dry_run:
        return EditResult(changed=True, diff=diff, backup_path=None, new_text=new_text)
    backup = None
    try:
        if old_data is not None:
            _check_writable(path, force)
            backup = _write_backup(path, old_data, os.stat(path))
        _write_file(path, encode_text(new_text))
    except OSError as exc:
        raise _write_failed(path, old_data, backup, exc) from exc
    log.info("updated %s%s", path, f" (backup: {backup.name})" if backup else "")
    return EditResult(changed=True, diff=diff, backup_path=backup, new_text=new_text)


def _write_failed(path: Path, old_data: bytes | None, backup: Path | None, exc: OSError) -> WebuiUserError:
    """The error for a write that failed: nothing left behind when the file is as it was (its backup removed),
    else the backup kept and named, for the file may be half written."""
    try:
        untouched = old_data is None or read_launcher_bytes(path) == old_data
    except OSError:
        untouched = False
    if not untouched:
        where = f"; restore it from {backup}" if backup else ""
        return WebuiUserError(str(path), None, f"cannot write launcher config: {exc}; it may be half written{where}")
    if backup is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(backup)
    return WriteRefused(
        str(path), None, f"cannot write it ({exc.strerror or exc}); nothing written, the file is as it was"
    )


def _target(path: str | os.PathLike[str]) -> Path:
    # Edit the file a symlink points to, so os.replace does not turn the link into a plain file.
    p = Path(path)
    return p.resolve() if p.is_symlink() else p


def apply_block(
    path: str | os.PathLike[str],
    block_text: str,
    *,
    dry_run: bool = False,
    create: bool = True,
    force: bool = False,
    lock_timeout: float = LOCK_TIMEOUT_S,
) -> EditResult:
    """Insert our block or replace the existing one; the package docstring says what the hosts run.

    In a .bat file the block goes before the line that starts webui.bat; elsewhere at the end of the file.
    In a .sh file the block always has LF line ends, even in a CRLF file: bash would keep a CR in every value.
    ``create``: make the file when it is missing (else WebuiUserError). ``force``: write a read-only file.
    Raises :class:`WriteRefused` (nothing written) for a read-only file or when another edit holds the lock.
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
    lock = contextlib.nullcontext() if dry_run else edit_lock(p, timeout=lock_timeout)
    with lock:
        old_data, old_text = _read_existing(p)
        if old_data is None and not create:
            raise WebuiUserError(str(p), None, "does not exist (nothing written)")
        new_text = _with_block(p, kind, old_data, old_text, block_lines_lf)
        return _commit(p, old_data, old_text, new_text, dry_run, force)


def _with_block(p: Path, kind: Kind, old_data: bytes | None, old_text: str, block_lines_lf: list[str]) -> str:
    if old_data is None:
        newline = "\r\n" if kind == "bat" else "\n"
        return _new_file_text(kind, newline.join(block_lines_lf) + newline, newline)

    # bash reads LF lines right in a CRLF file; a CRLF line would leave a CR at the end of our values.
    newline = _newline_of(old_text) if kind == "bat" else "\n"
    block_lines = [line + newline for line in block_lines_lf]
    lines = _lines_with_ends(old_text)
    existing = _find_block_in_lines(lines, str(p))
    if existing is not None:
        call_idx = _call_webui_index(lines)
        if kind == "bat" and call_idx is not None and call_idx < existing.start_line - 1:
            # A block after `call webui.bat` has no effect on the launch: move it in front of the call.
            log.info("%s:%d: moving the %s block before `call webui.bat`", p, existing.start_line, EXTENSION_NAME)
            lines = _remove_block_lines(lines, existing, kind)
        else:
            was_last = existing.end_line == len(lines) and not lines[-1].endswith("\n")
            if was_last:
                block_lines[-1] = block_lines[-1].rstrip("\r\n")
            return "".join(lines[: existing.start_line - 1] + block_lines + lines[existing.end_line :])

    index = len(lines)
    if kind == "bat":
        call_idx = _call_webui_index(lines)
        if call_idx is not None:
            index = call_idx
    return "".join(_insert_block_lines(lines, index, block_lines, newline))


def remove_block(
    path: str | os.PathLike[str], *, dry_run: bool = False, force: bool = False, lock_timeout: float = LOCK_TIMEOUT_S
) -> EditResult:
    """Remove our block (and nothing else). No block or no file: nothing is written, ``changed`` is False."""
    p = _target(path)
    kind = kind_for_path(p)
    with contextlib.nullcontext() if dry_run else edit_lock(p, timeout=lock_timeout):
        old_data, old_text = _read_existing(p)
        if old_data is None:
            return EditResult(changed=False, diff="", backup_path=None, new_text="")
        lines = _lines_with_ends(old_text)
        block = _find_block_in_lines(lines, str(p))
        if block is None:
            return EditResult(changed=False, diff="", backup_path=None, new_text=old_text)
        new_text = "".join(_remove_block_lines(lines, block, kind))
        return _commit(p, old_data, old_text, new_text, dry_run, force)
