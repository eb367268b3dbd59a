"""One launch flag of a WebUI host, as its argparse parser defines it.

The generated tables (:mod:`lib_optim.launch.flagtables`, made by tools/gen_flagtables.py from each host's own
parser code) are tuples of these; the checker's command-line parser (:mod:`lib_optim.launch.cmdline`) reads them
the way argparse would, and the start-up check adds the flags the running parser really has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
