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
anything. Control flow (``if``/``fi``, ``case``, loops, ``&&``/``||``; ``if ... (`` blocks in cmd) cannot be
evaluated without running commands, so assignments inside conditional branches are applied in file order
and reported as conditional (``LaunchConfig.conditional_flags`` / ``conditional_vars``). What the readers
cannot see through, or what probably does not do what the user meant, becomes a ``FileNote``. Faithful
details that matter: bash keeps a CR as an ordinary character (a CRLF ``webui-user.sh`` puts it at the end
of every value), cmd drops every CR; cmd expands ``!VAR!`` after ``setlocal enabledelayedexpansion``.

Parts: :mod:`.bash` reads ``webui-user.sh``, :mod:`.cmd` reads ``webui-user.bat``, :mod:`.block` writes
and removes our marked block, :mod:`.model` holds the types they share.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from lib_optim.webui_user.bash import ShInterpreter
from lib_optim.webui_user.block import (
    BACKUP_INFIX,
    EDIT_HINT,
    LOCK_SUFFIX,
    apply_block,
    block_body,
    edit_lock,
    find_block,
    read_block,
    remove_block,
    render_block,
)
from lib_optim.webui_user.cmd import BatInterpreter, hands_over
from lib_optim.webui_user.model import (
    EXTENSION_NAME,
    MAX_FILE_BYTES,
    Assignment,
    BlockInfo,
    BrokenLauncherFile,
    EditResult,
    FileNote,
    Kind,
    LaunchConfig,
    WebuiUserError,
    WriteRefused,
    decode_text,
    joined_flags,
    kind_for_path,
    read_launcher_bytes,
)


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
        data = read_launcher_bytes(p)
    except FileNotFoundError as exc:
        raise WebuiUserError(str(p), None, f"cannot read launcher config: {exc}") from exc
    text = decode_text(data)
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
        cfg = ShInterpreter(text, source, base_env or {}).run()
    elif kind == "bat":
        cfg = BatInterpreter(text, source, base_env or {}, path).run()
    else:
        raise ValueError(f"{source}: unknown launcher kind {kind!r} (expected 'sh' or 'bat')")
    cfg.path = path
    return cfg


__all__ = [
    "BACKUP_INFIX",
    "EDIT_HINT",
    "EXTENSION_NAME",
    "LOCK_SUFFIX",
    "MAX_FILE_BYTES",
    "Assignment",
    "BlockInfo",
    "BrokenLauncherFile",
    "EditResult",
    "FileNote",
    "Kind",
    "LaunchConfig",
    "WebuiUserError",
    "WriteRefused",
    "apply_block",
    "block_body",
    "edit_lock",
    "find_block",
    "hands_over",
    "joined_flags",
    "kind_for_path",
    "parse_launch_config",
    "read_block",
    "read_launch_config",
    "remove_block",
    "render_block",
]
