"""One launch flag of a WebUI host, as its argparse parser defines it.

The generated tables (:mod:`lib_optim.launch.flagtables`, made by tools/gen_flagtables.py from each host's own
parser code) are tuples of these; the checker's command-line parser (:mod:`lib_optim.launch.cmdline`) reads them
the way argparse would, and the start-up check adds the flags the running parser really has. Each host's spec
names its table (:func:`host_flags`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from lib_optim.host_specs import HostKind, checked_hosts, host_spec, resolve_ref

TakesValue = Literal["none", "one", "optional", "many"]
ValueType = Literal["str", "int", "float", "path"]


@dataclass(frozen=True)
class FlagSpec:
    option: str  # the first long option string, e.g. "--medvram" ("-f" has no long form)
    aliases: tuple[str, ...]  # every other option string of the same argument
    dest: str
    # store_true/false/const, count → none; nargs None → one; "?" → optional; "*"/"+"/N → many
    takes_value: TakesValue
    value_type: ValueType  # "path" for normalized_filepath / pathlib.Path; "str" when untyped or no value
    choices: tuple[str, ...] | None
    const: str | None  # str(const) of nargs="?" flags (the value used when the flag is given bare)
    group: str | None  # mutually exclusive group (Forge backends only), None if not in one
    # "webui" (modules/cmd_args.py), "backend" (backend/args.py, ldm_patched/modules/args_parser.py),
    # "builtin-preload:<extension dir>", or at run time "parser" / "preload:<extension dir>"
    origin: str
    source: str  # "path:line" in the host revision of HOST_REVISIONS; the line holds the option string
    help: str  # help text, "" when none or argparse.SUPPRESS


_BY_OPTION: dict[int, tuple[object, dict[str, FlagSpec]]] = {}


def host_flags(host: HostKind) -> tuple[FlagSpec, ...]:
    """The flag table of a registered host, from its spec's ``flag_table`` (``"module:attribute"``, the rows, a
    mapping {kind: rows} or a callable returning either). KeyError for hosts without a table."""
    spec = host_spec(host)
    if spec.flag_table is None:
        known = ", ".join(h.value for h in checked_hosts())
        raise KeyError(f"no flag table for host {spec.kind.value!r}; tables exist for: {known}")
    table = resolve_ref(spec.flag_table)
    if callable(table):
        table = table()
    if isinstance(table, Mapping):
        table = table[spec.kind]
    return tuple(table)


def flags_by_option(host: HostKind) -> dict[str, FlagSpec]:
    """Option string (every alias too) → spec, for one checked host. KeyError for hosts without a table."""
    rows = host_flags(host)
    cached = _BY_OPTION.get(id(rows))
    if cached is None or cached[0] is not rows:
        by_option: dict[str, FlagSpec] = {}
        for row in rows:
            for option in (row.option, *row.aliases):
                by_option[option] = row
        cached = (rows, by_option)
        _BY_OPTION[id(rows)] = cached
    return dict(cached[1])
