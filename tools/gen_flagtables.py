#!/usr/bin/env python3
"""Generate lib_optim/launch/flagtables.py from the real command-line parsers of the WebUI hosts.

The host code is never imported or executed: every ``add_argument`` call is read with ``ast`` from

* A1111 v1.10.1: ``modules/cmd_args.py`` (one parser; launcher flags included),
* Forge f2 (main): ``backend/args.py`` (the parser, with mutually exclusive groups), extended by
  ``modules/cmd_args.py`` (``from backend.args import parser``),
* Forge previous: ``ldm_patched/modules/args_parser.py`` extended by ``modules/cmd_args.py``
  (``parser = args_parser.parser``),
* reForge (main): the same structure as Forge previous, with its own back-end flags,

plus ``modules/shared_cmd_options.py`` and every ``extensions-builtin/<ext>/preload.py`` (built-in preloads
always run: ``preload_extensions(extensions_builtin_dir, parser)`` has no extension list).  How cmd_args.py
gets its parser is not assumed: it is read from the module (``parser = argparse.ArgumentParser()``,
``from X import parser`` or ``parser = Y.parser`` with ``from P import Y``).  Which files build each host's parser,
and why a flag missing from a table makes that host exit, is described in docs/hosts.md §2.1.

Each host is read either from a git directory (a mirror without work tree is fine) at a revision, or from a
checkout directory.  Usage::

    python tools/gen_flagtables.py              # default mirrors under /work/.mirror, writes the module
    python tools/gen_flagtables.py --check      # exit 1 when the committed module differs
    python tools/gen_flagtables.py --a1111 /path/to/stable-diffusion-webui --forge /path/to/forge@main
    python tools/gen_flagtables.py --forge-previous /path/to/forge@previous --reforge /path/to/reforge@main
    python tools/gen_flagtables.py --dump a1111 --a1111 /path/to/checkout   # print one table, no writing
"""

from __future__ import annotations

import argparse
import ast
import difflib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("gen_flagtables")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "lib_optim" / "launch" / "flagtables.py"
MIRROR_ROOT = Path("/work/.mirror")
A1111_MIRROR = MIRROR_ROOT / "kklouzal+stable-diffusion-webui" / "repo"
FORGE_MIRROR = MIRROR_ROOT / "lllyasviel+stable-diffusion-webui-forge" / "repo"
REFORGE_MIRROR = MIRROR_ROOT / "Panchovix+stable-diffusion-webui-reForge" / "repo"

# host key (HostKind member name) → (default git dir, default revision)
DEFAULT_SOURCES: dict[str, tuple[Path, str]] = {
    "A1111": (A1111_MIRROR, "v1.10.1"),
    "FORGE": (FORGE_MIRROR, "main"),
    "FORGE_PREVIOUS": (FORGE_MIRROR, "previous"),
    "REFORGE": (REFORGE_MIRROR, "main"),
}
HOST_ORDER = ("A1111", "FORGE", "FORGE_PREVIOUS", "REFORGE")

CMD_ARGS = "modules/cmd_args.py"
SHARED_CMD_OPTIONS = "modules/shared_cmd_options.py"
BUILTIN_PRELOAD_RE = re.compile(r"^extensions-builtin/([^/]+)/preload\.py$")

# Variable names of mutually exclusive groups in the host code → stable group names.
GROUP_NAMES = {
    "fp_group": "fp",
    "fpunet_group": "unet",
    "fpvae_group": "vae",
    "fpte_group": "text_encoder",
    "attn_group": "attention",
    "upcast": "upcast",
    "vram_group": "vram",
    "cache_group": "cache",  # reForge
    "cm_group": "cuda_malloc",  # reForge: --cuda-malloc / --disable-cuda-malloc
}

NO_VALUE_ACTIONS = {"store_true", "store_false", "store_const", "count", "append_const", "help", "version"}
VALUE_ACTIONS = {None, "store", "append", "extend"}
TYPE_NAMES = {
    None: "str",
    "str": "str",
    "str.lower": "str",
    "str.upper": "str",
    "json.loads": "str",  # a JSON document given as one string
    "int": "int",
    "float": "float",
    "normalized_filepath": "path",
    "Path": "path",
    "pathlib.Path": "path",
}


PARSER_CLASSES = {"argparse.ArgumentParser", "ArgumentParser"}


class ExtractError(RuntimeError):
    """The host code does something the extractor does not understand; fix the extractor, don't guess."""


# --------------------------------------------------------------------------------------------- sources


class Source:
    """Read-only view of one host revision."""

    label: str

    def read(self, path: str) -> str | None:
        raise NotImplementedError

    def files(self, prefix: str) -> list[str]:
        raise NotImplementedError

    def revision(self) -> str:
        raise NotImplementedError

    def exists(self, path: str) -> bool:
        return self.read(path) is not None


def _git(git_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True, text=True, check=False)


@dataclass
class GitSource(Source):
    git_dir: Path
    rev: str
    _cache: dict[str, str | None] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.label = f"{self.git_dir}@{self.rev}"
        res = _git(self.git_dir, "rev-parse", "--verify", f"{self.rev}^{{commit}}")
        if res.returncode != 0:
            raise ExtractError(f"{self.label}: not a git revision: {res.stderr.strip()}")
        self.sha = res.stdout.strip()

    def read(self, path: str) -> str | None:
        if path not in self._cache:
            res = _git(self.git_dir, "show", f"{self.sha}:{path}")
            self._cache[path] = res.stdout if res.returncode == 0 else None
        return self._cache[path]

    def files(self, prefix: str) -> list[str]:
        res = _git(self.git_dir, "ls-tree", "-r", "--name-only", self.sha, "--", prefix)
        if res.returncode != 0:
            raise ExtractError(f"{self.label}: git ls-tree failed: {res.stderr.strip()}")
        return sorted(res.stdout.splitlines())

    def revision(self) -> str:
        return f"{self.rev} ({self.sha[:8]})"


@dataclass
class DirSource(Source):
    root: Path

    def __post_init__(self) -> None:
        self.label = str(self.root)
        if not self.root.is_dir():
            raise ExtractError(f"{self.root}: not a directory")

    def read(self, path: str) -> str | None:
        p = self.root / path
        return p.read_text(encoding="utf-8") if p.is_file() else None

    def files(self, prefix: str) -> list[str]:
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(p.relative_to(self.root).as_posix() for p in base.rglob("*") if p.is_file())

    def revision(self) -> str:
        res = subprocess.run(
            ["git", "-C", str(self.root), "rev-parse", "HEAD"], capture_output=True, text=True, check=False
        )
        if res.returncode != 0:
            return "checkout (no git revision)"
        sha = res.stdout.strip()
        tag = subprocess.run(
            ["git", "-C", str(self.root), "describe", "--tags", "--exact-match", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        )
        name = tag.stdout.strip() if tag.returncode == 0 else "checkout"
        return f"{name} ({sha[:8]})"


def open_source(spec: str, default_rev: str | None = None) -> Source:
    """``PATH`` or ``PATH@REV``.  A directory with a work tree (modules/ present) and no @REV is read from
    disk; otherwise PATH is taken as a git directory (``.git`` of a checkout, or a bare mirror)."""
    path_s, _, rev = spec.partition("@")
    path = Path(path_s).expanduser()
    if not rev and (path / "modules").is_dir():
        return DirSource(path)
    git_dir = path / ".git" if (path / ".git").exists() else path
    if not rev:
        if default_rev is None:
            raise ExtractError(f"{spec}: no work tree here; name a revision as PATH@REV")
        rev = default_rev
    return GitSource(git_dir, rev)


# --------------------------------------------------------------------------------------------- extraction


@dataclass(frozen=True)
class Flag:
    option: str
    aliases: tuple[str, ...]
    dest: str
    takes_value: str
    value_type: str
    choices: tuple[str, ...] | None
    const: str | None
    group: str | None
    origin: str
    source: str
    help: str

    def astuple(self) -> tuple[Any, ...]:
        return (
            self.option,
            self.aliases,
            self.dest,
            self.takes_value,
            self.value_type,
            self.choices,
            self.const,
            self.group,
            self.origin,
            self.source,
            self.help,
        )


def _dotted(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        base = _dotted(node.value)
        return f"{base}.{node.attr}" if base else None
    return None


def _literal(node: ast.AST, where: str) -> Any:
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ExtractError(f"{where}: not a literal: {ast.unparse(node)}") from None


@dataclass
class _Module:
    path: str
    tree: ast.Module
    enums: dict[str, tuple[str, ...]]  # Enum subclasses defined in the module → their string values
    actions: set[str]  # argparse.Action subclasses defined in the module


def _parse(source: Source, path: str) -> _Module:
    text = source.read(path)
    if text is None:
        raise ExtractError(f"{source.label}: {path} is missing")
    tree = ast.parse(text, filename=path)
    enums: dict[str, tuple[str, ...]] = {}
    actions: set[str] = set()
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        bases = {_dotted(b) for b in node.bases}
        if bases & {"enum.Enum", "Enum"}:
            values = []
            for stmt in node.body:
                if isinstance(stmt, ast.Assign) and isinstance(stmt.value, ast.Constant):
                    values.append(str(stmt.value.value))
            enums[node.name] = tuple(values)
        if bases & {"argparse.Action", "Action"}:
            actions.add(node.name)
    return _Module(path, tree, enums, actions)


def _module_path(dotted: str) -> str:
    return dotted.replace(".", "/") + ".py"


def _parser_origin(source: Source, mod: _Module) -> tuple[str | None, int | None]:
    """Where does the module-level name ``parser`` come from?  Returns (base module path or None, line of
    ``argparse.ArgumentParser(...)`` when created here)."""
    imported: dict[str, str] = {}  # local name → dotted module
    result: tuple[str | None, int | None] | None = None
    for node in mod.tree.body:
        if isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                local = alias.asname or alias.name
                if local == "parser" and alias.name == "parser":
                    result = (_module_path(node.module), None)
                else:
                    imported[local] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    imported[alias.asname] = alias.name
                else:
                    top = alias.name.split(".")[0]
                    imported[top] = top
        elif (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and node.targets[0].id == "parser"
        ):
            value = node.value
            if isinstance(value, ast.Call) and _dotted(value.func) in PARSER_CLASSES:
                if any(kw.arg == "add_help" for kw in value.keywords):
                    raise ExtractError(f"{mod.path}:{node.lineno}: add_help= is not handled")
                result = (None, node.lineno)
            elif isinstance(value, ast.Attribute) and value.attr == "parser":
                owner = _dotted(value.value)
                if owner is None or not imported.get(owner):
                    raise ExtractError(f"{mod.path}:{node.lineno}: cannot resolve {ast.unparse(value)}")
                result = (_module_path(imported[owner]), None)
            else:
                raise ExtractError(f"{mod.path}:{node.lineno}: unknown parser source {ast.unparse(value)}")
    if result is None:
        raise ExtractError(f"{source.label}: {mod.path} defines no module-level `parser`")
    return result


def _flag_from_call(mod: _Module, call: ast.Call, group: str | None, origin: str) -> Flag:
    where = f"{mod.path}:{call.lineno}"
    options: list[tuple[str, int]] = []
    for arg in call.args:
        if not (isinstance(arg, ast.Constant) and isinstance(arg.value, str)):
            raise ExtractError(f"{where}: option string is not a literal: {ast.unparse(arg)}")
        options.append((arg.value, arg.lineno))
    if not options or not all(o.startswith("-") for o, _ in options):
        raise ExtractError(f"{where}: positional arguments are not handled")
    kw = {k.arg: k.value for k in call.keywords if k.arg is not None}
    if any(k.arg is None for k in call.keywords):
        raise ExtractError(f"{where}: **kwargs are not handled")

    action_node = kw.get("action")
    action: str | None = None
    if action_node is not None:
        if isinstance(action_node, ast.Constant) and isinstance(action_node.value, str):
            action = action_node.value
        elif not (isinstance(action_node, ast.Name) and action_node.id in mod.actions):  # the module's own Action
            raise ExtractError(f"{where}: unknown action {ast.unparse(action_node)}")
    if action is not None and action not in NO_VALUE_ACTIONS | VALUE_ACTIONS:
        raise ExtractError(f"{where}: unknown action {action!r}")

    nargs = _literal(kw["nargs"], where) if "nargs" in kw else None
    if action in NO_VALUE_ACTIONS:
        takes_value = "none"
    elif nargs is None:
        takes_value = "one"
    elif nargs == "?":
        takes_value = "optional"
    elif nargs in ("*", "+", "...", "A...") or (isinstance(nargs, int) and nargs > 0):
        takes_value = "many"
    else:
        raise ExtractError(f"{where}: unknown nargs {nargs!r}")

    choices: tuple[str, ...] | None = None
    type_node = kw.get("type")
    type_name = _dotted(type_node) if type_node is not None else None
    if type_node is not None and type_name is None:
        raise ExtractError(f"{where}: unknown type {ast.unparse(type_node)}")
    if type_name in mod.enums:
        # ldm_patched's EnumAction makes the Enum's values the choices; without it (reForge's --fast) argparse
        # calls the Enum on each value, which accepts only its values too
        choices = mod.enums[type_name]
        value_type = "str"
    elif type_name in TYPE_NAMES:
        value_type = TYPE_NAMES[type_name]
    else:
        raise ExtractError(f"{where}: unknown type {type_name}")
    if takes_value == "none":
        value_type = "str"
    if "choices" in kw:
        choices = tuple(str(c) for c in _literal(kw["choices"], where))

    const: str | None = None
    if takes_value == "optional" and "const" in kw:
        const = str(_literal(kw["const"], where))

    help_text = ""
    if "help" in kw:
        node = kw["help"]
        if _dotted(node) in {"argparse.SUPPRESS", "SUPPRESS"}:
            help_text = ""
        else:
            value = _literal(node, where)
            help_text = "" if value is None else str(value)

    longs = [o for o, _ in options if o.startswith("--")]
    option = longs[0] if longs else options[0][0]
    line = next(ln for o, ln in options if o == option)
    aliases = tuple(o for o, _ in options if o != option)
    dest = str(_literal(kw["dest"], where)) if "dest" in kw else option.lstrip("-").replace("-", "_")
    return Flag(
        option=option,
        aliases=aliases,
        dest=dest,
        takes_value=takes_value,
        value_type=value_type,
        choices=choices,
        const=const,
        group=group,
        origin=origin,
        source=f"{mod.path}:{line}",
        help=help_text,
    )


def _group_name(var: str, where: str) -> str:
    if var in GROUP_NAMES:
        return GROUP_NAMES[var]
    name = var.removesuffix("_group")
    log.warning("%s: unknown mutually exclusive group variable %r, naming it %r", where, var, name)
    return name


def _calls_in_order(nodes: Iterable[ast.stmt]) -> list[ast.Call]:
    calls: list[ast.Call] = []
    for stmt in nodes:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            continue  # module level only; functions are read separately where they matter (preload)
        calls.extend(n for n in ast.walk(stmt) if isinstance(n, ast.Call))
    return sorted(calls, key=lambda c: (c.lineno, c.col_offset))


def _extract_from(mod: _Module, body: Iterable[ast.stmt], parser_name: str, origin: str) -> list[Flag]:
    """add_argument calls on ``parser_name`` and on its mutually exclusive groups, in source order."""
    body = list(body)
    groups: dict[str, str | None] = {parser_name: None}
    for stmt in body:
        for node in ast.walk(stmt):
            if not (
                isinstance(node, ast.Assign)
                and len(node.targets) == 1
                and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute)
                and _dotted(node.value.func.value) == parser_name
            ):
                continue
            var = node.targets[0].id
            method = node.value.func.attr
            if method == "add_mutually_exclusive_group":
                groups[var] = _group_name(var, f"{mod.path}:{node.lineno}")
            elif method == "add_argument_group":  # titled section in --help, not exclusive
                groups[var] = None
    flags = []
    for call in _calls_in_order(body):
        if not (isinstance(call.func, ast.Attribute) and call.func.attr == "add_argument"):
            continue
        receiver = _dotted(call.func.value)
        if receiver not in groups:
            log.debug("%s:%s: add_argument on %s ignored (other parser)", mod.path, call.lineno, receiver)
            continue
        flags.append(_flag_from_call(mod, call, groups[receiver], origin))
    return flags


def _origin_for(path: str) -> str:
    return "webui" if path.startswith("modules/") else "backend"


def _implicit_help(path: str, line: int) -> Flag:
    return Flag(
        option="--help",
        aliases=("-h",),
        dest="help",
        takes_value="none",
        value_type="str",
        choices=None,
        const=None,
        group=None,
        origin=_origin_for(path),
        source=f"{path}:{line}",
        help="show this help message and exit",
    )


def _parser_chain(source: Source) -> list[tuple[_Module, int | None]]:
    """cmd_args.py and the modules its parser comes from, base first."""
    chain: list[tuple[_Module, int | None]] = []
    path: str | None = CMD_ARGS
    seen = set()
    while path is not None:
        if path in seen:
            raise ExtractError(f"{source.label}: parser import cycle at {path}")
        seen.add(path)
        mod = _parse(source, path)
        base, created_at = _parser_origin(source, mod)
        chain.append((mod, created_at))
        path = base
    chain.reverse()
    return chain


def _check_shared_cmd_options(source: Source) -> Iterable[Flag]:
    """shared_cmd_options.py: the parser must be cmd_args.parser, built-in preloads must run for every
    built-in extension; direct add_argument calls there would be listed too."""
    mod = _parse(source, SHARED_CMD_OPTIONS)
    text = ast.unparse(mod.tree)
    if "preload_extensions(extensions_builtin_dir, parser)" not in text:
        raise ExtractError(
            f"{source.label}: {SHARED_CMD_OPTIONS} no longer runs every built-in preload unconditionally"
        )
    if "parser = cmd_args.parser" not in text:
        raise ExtractError(f"{source.label}: {SHARED_CMD_OPTIONS} does not use cmd_args.parser")
    return _extract_from(mod, mod.tree.body, "parser", "webui")


def extract_host(source: Source) -> list[Flag]:
    """Every option the host's main parser knows, in the order they are added."""
    flags: list[Flag] = []
    for mod, created_at in _parser_chain(source):
        if created_at is not None:
            flags.append(_implicit_help(mod.path, created_at))
        flags.extend(_extract_from(mod, mod.tree.body, "parser", _origin_for(mod.path)))
    flags.extend(_check_shared_cmd_options(source))

    preloads = []
    for path in source.files("extensions-builtin"):
        m = BUILTIN_PRELOAD_RE.match(path)
        if m:
            preloads.append((m.group(1), path))
    for ext, path in sorted(preloads):  # preload_extensions() runs them in sorted(dirname) order
        mod = _parse(source, path)
        funcs = [n for n in mod.tree.body if isinstance(n, ast.FunctionDef) and n.name == "preload"]
        if not funcs:
            continue
        func = funcs[0]
        if not func.args.args:
            raise ExtractError(f"{path}: preload() takes no parser")
        flags.extend(_extract_from(mod, func.body, func.args.args[0].arg, f"builtin-preload:{ext}"))

    seen: dict[str, str] = {}
    for flag in flags:
        for opt in (flag.option, *flag.aliases):
            if opt in seen:
                raise ExtractError(f"{source.label}: {opt} defined twice ({seen[opt]}, {flag.source})")
            seen[opt] = flag.source
    return flags


# --------------------------------------------------------------------------------------------- rendering


def _lit(value: Any) -> str:
    if value is None:
        return "None"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, tuple):
        if not value:
            return "()"
        inner = ", ".join(_lit(v) for v in value)
        return f"({inner},)" if len(value) == 1 else f"({inner})"
    raise TypeError(value)


HEADER = '''\
# Generated by tools/gen_flagtables.py from the hosts' own argparse code — do not edit by hand.
{revisions}
# Regenerate: python tools/gen_flagtables.py   (check only: python tools/gen_flagtables.py --check)
# ruff: noqa: E501
"""Command-line flags every checked WebUI host knows: its main parser plus its built-in preload.py files.

A flag missing here is unknown to that host: `modules/shared_cmd_options.py` calls `parser.parse_args()`,
which exits with "unrecognized arguments" unless IGNORE_CMD_ARGS_ERRORS is set (docs/hosts.md §2.1).  User
extensions' preload.py files can add more flags; those are not in these tables.  argparse's own -h/--help
(add_help=True) is listed too; its source is the ArgumentParser() line.
"""

from __future__ import annotations

from lib_optim.host_specs import HostKind
from lib_optim.launch.flagspec import FlagSpec
'''

FOOTER = '''

FLAGS: dict[HostKind, tuple[FlagSpec, ...]] = {{
{entries}
}}

HOST_REVISIONS: dict[HostKind, str] = {{
{revision_entries}
}}

_BY_OPTION: dict[HostKind, dict[str, FlagSpec]] = {{}}


def flags_for(host: HostKind) -> dict[str, FlagSpec]:
    """Option string (every alias too) → spec, for one checked host.  KeyError for hosts without a table."""
    if host not in FLAGS:
        known = ", ".join(h.value for h in FLAGS)
        raise KeyError(f"no flag table for host {{host.value!r}}; tables exist for: {{known}}")
    table = _BY_OPTION.get(host)
    if table is None:
        table = {{}}
        for spec in FLAGS[host]:
            for opt in (spec.option, *spec.aliases):
                table[opt] = spec
        _BY_OPTION[host] = table
    return dict(table)
'''

FIELD_COMMENT = (
    "# FlagSpec(option, aliases, dest, takes_value, value_type, choices, const, group, origin, source, help)"
)


def render(tables: dict[str, list[Flag]], revisions: dict[str, str], labels: dict[str, str]) -> str:
    rev_lines = "\n".join(f"#   {key}: {labels[key]} {revisions[key]}" for key in HOST_ORDER if key in tables)
    out = [HEADER.format(revisions="# Host revisions:\n" + rev_lines), FIELD_COMMENT, "# fmt: off"]
    for key in HOST_ORDER:
        if key not in tables:
            continue
        out.append(f"_{key}: tuple[FlagSpec, ...] = (")
        for flag in tables[key]:
            args = ", ".join(_lit(v) for v in flag.astuple())
            out.append(f"    FlagSpec({args}),")
        out.append(")")
    out.append("# fmt: on")
    entries = "\n".join(f"    HostKind.{key}: _{key}," for key in HOST_ORDER if key in tables)
    revision_entries = "\n".join(f"    HostKind.{key}: {_lit(revisions[key])}," for key in HOST_ORDER if key in tables)
    return "\n".join(out) + FOOTER.format(entries=entries, revision_entries=revision_entries)


# --------------------------------------------------------------------------------------------- CLI

_LABELS = {
    "A1111": "AUTOMATIC1111 stable-diffusion-webui",
    "FORGE": "stable-diffusion-webui-forge",
    "FORGE_PREVIOUS": "stable-diffusion-webui-forge",
    "REFORGE": "stable-diffusion-webui-reForge",
}


def _labels_for(sources: dict[str, Source]) -> dict[str, str]:
    out = {}
    for key, src in sources.items():
        if isinstance(src, GitSource) and src.git_dir.parent.name.count("+") == 1:
            out[key] = src.git_dir.parent.name.replace("+", "/")  # /work/.mirror/owner+name/repo
        else:
            out[key] = _LABELS[key]
    return out


def build(sources: dict[str, Source]) -> tuple[str, dict[str, list[Flag]]]:
    """The module text, and the tables it holds."""
    tables = {key: extract_host(src) for key, src in sources.items()}
    revisions = {key: src.revision() for key, src in sources.items()}
    return render(tables, revisions, _labels_for(sources)), tables


def default_sources() -> dict[str, Source]:
    return {key: GitSource(path, rev) for key, (path, rev) in DEFAULT_SOURCES.items()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--a1111", metavar="PATH[@REV]", help=f"A1111 checkout or git dir (default {A1111_MIRROR}@v1.10.1)")
    ap.add_argument("--forge", metavar="PATH[@REV]", help=f"Forge f2 checkout or git dir (default {FORGE_MIRROR}@main)")
    ap.add_argument(
        "--forge-previous",
        metavar="PATH[@REV]",
        help=f"Forge `previous` checkout or git dir (default {FORGE_MIRROR}@previous)",
    )
    ap.add_argument(
        "--reforge", metavar="PATH[@REV]", help=f"reForge checkout or git dir (default {REFORGE_MIRROR}@main)"
    )
    ap.add_argument("-o", "--output", type=Path, default=DEFAULT_OUTPUT, help="module to write (default %(default)s)")
    ap.add_argument(
        "--check", action="store_true", help="compare with --output instead of writing; exit 1 on difference"
    )
    ap.add_argument(
        "--dump",
        choices=[k.lower() for k in HOST_ORDER],
        help="print one host's table as JSON lines and exit",
    )
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")

    given = {"A1111": args.a1111, "FORGE": args.forge, "FORGE_PREVIOUS": args.forge_previous, "REFORGE": args.reforge}
    try:
        sources: dict[str, Source] = {}
        for key in HOST_ORDER:
            default_path, default_rev = DEFAULT_SOURCES[key]
            if args.dump and key != args.dump.upper():
                continue
            sources[key] = open_source(given[key], default_rev) if given[key] else GitSource(default_path, default_rev)
        if args.dump:
            (key,) = sources
            for flag in extract_host(sources[key]):
                print(json.dumps(flag.astuple()))
            return 0
        text, tables = build(sources)
    except ExtractError as exc:
        log.error("%s", exc)
        return 2

    if args.check:
        old = args.output.read_text(encoding="utf-8") if args.output.exists() else ""
        if old == text:
            log.info("%s is up to date", args.output)
            return 0
        sys.stdout.writelines(
            difflib.unified_diff(old.splitlines(True), text.splitlines(True), str(args.output), "generated")
        )
        return 1
    tmp = args.output.with_suffix(".py.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.output)
    for key, src in sources.items():
        log.info("%s %s: %d flags", key, src.revision(), len(tables[key]))
    log.info("wrote %s", args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
