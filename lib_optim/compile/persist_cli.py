"""``python -m lib_optim compile-cache show|clear``: the compile cache of :mod:`lib_optim.compile.persist`, from the
command line. Which folder: the one the WebUI uses, found as ``doctor`` finds the WebUI (around the current folder
or this extension), with the ``--data-dir``, ``SD_WEBUI_CACHE_DIR`` and ``OPTIM_COMPILE_CACHE`` its webui-user file
sets; no WebUI found: the user's cache folder."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lib_optim.compile.persist import (
    CacheRefused,
    cache_status,
    clear_cache,
    data_dir_from_argv,
    human_size,
    status_text,
)
from lib_optim.host_specs import choose_host, extension_dir, webui_user_file
from lib_optim.log import get_logger

log = get_logger(__name__)

EX_REFUSED = 1


def add_compile_cache_parser(sub: Any, parser_class: type[argparse.ArgumentParser]) -> None:
    """``compile-cache`` and its two actions, on the CLI's subparsers ``sub``."""
    cache = sub.add_parser("compile-cache", help="where torch.compile's cache is kept across restarts; clear it")
    actions = cache.add_subparsers(dest="action", required=True, parser_class=parser_class)
    show = actions.add_parser("show", help="the cache folder, its size and entries per torch version")
    show.add_argument("--json", action="store_true", help="print the folder and its entries as JSON")
    clear = actions.add_parser("clear", help="delete the cache (only folders the extension made)")
    clear.add_argument("--torch", metavar="VERSION", help="only this torch version's folder (e.g. 2.1.2+cu121)")
    clear.add_argument("--dry-run", action="store_true", help="say what would be deleted, delete nothing")
    clear.add_argument("--json", action="store_true", help="print what was deleted as JSON")


def webui_location(environ: dict[str, str], *, windows: bool | None = None) -> tuple[Path | None, dict[str, str]]:
    """The WebUI's data folder (None when no WebUI is found) and the environment its webui-user file gives it."""
    choice = choose_host("auto", extension_dir())
    if choice.root is None:
        return None, environ
    windows = sys.platform == "win32" if windows is None else windows
    file = webui_user_file(choice.root, windows=windows)
    env = dict(environ)
    argv: list[str] = []
    if file is not None:
        from lib_optim.webui_user import read_launch_config

        try:
            config = read_launch_config(file, base_env=env)
        except (OSError, ValueError) as exc:  # a file bash cannot read: the checkout itself still counts
            log.debug("compile-cache: %s not read: %s", file, exc)
        else:
            for name in config.unset:
                env.pop(name, None)
            env.update(config.process_env())
            argv = list(config.commandline_args)
    return data_dir_from_argv(argv, choice.root), env


def run_compile_cache(args: argparse.Namespace, out: Callable[[str], None], err: Callable[[str], None]) -> int:
    """Run ``compile-cache show`` or ``clear``; returns the exit status (1: clear refused)."""
    data_dir, env = webui_location(dict(os.environ))
    if args.action == "show":
        status = cache_status(env, data_dir)
        out(json.dumps(status.to_dict(), indent=2) if args.json else status_text(status))
        return 0
    try:
        result = clear_cache(env, data_dir, torch=args.torch, dry_run=args.dry_run)
    except CacheRefused as exc:
        err(f"[Optim] {exc}")
        if args.json:
            out(json.dumps({"error": str(exc), "exit_code": EX_REFUSED}, indent=2))
        return EX_REFUSED
    if args.json:
        out(json.dumps(result.to_dict(), indent=2))
        return 0
    if not result.removed:
        out(f"Nothing to delete in {result.root}.")
        return 0
    verb = "Would delete" if result.dry_run else "Deleted"
    for path, size in result.removed:
        out(f"{verb} {path} ({human_size(size)})")
    if result.dry_run:
        out("(dry run: nothing deleted)")
    return 0
