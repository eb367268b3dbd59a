"""What ``check --file`` / ``doctor --file`` take from a launcher file, and which hosts its flags fit.

The file is read by the webui_user wing (what bash or cmd would do with it); this turns the result into the
checker's input: the argv and environment the WebUI would get, the file's notes as ``launcher-file`` findings,
and where each flag or variable set under a condition comes from.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from lib_optim.host_specs import HostKind, checked_hosts
from lib_optim.launch.checks import Finding, Severity
from lib_optim.launch.cmdline import parse_args
from lib_optim.launch.doctor import effective_argv
from lib_optim.launch.rules_system import LAUNCHER_FILE_RULE


@dataclass
class LaunchInput:
    argv: list[str]
    env: dict[str, str]
    file_findings: list[Finding] = field(default_factory=list)
    # flag or variable -> "file:line" of the condition it was set under
    conditional: dict[str, str] = field(default_factory=dict)
    # every variable the file sets, exported or not (webui.sh reads plain ones such as venv_dir itself)
    file_vars: dict[str, str] = field(default_factory=dict)


def read_launch_input(file: Path | None, env: dict[str, str], extra: Sequence[str]) -> LaunchInput:
    """The argv and environment the WebUI gets from ``env``, the launcher ``file`` (if any) and ``extra`` flags.

    ``env`` is updated in place with what the file sets and unsets. Raises the webui_user wing's errors
    (``WebuiUserError``; ``BrokenLauncherFile`` when bash or cmd cannot read the file as written).
    """
    result = LaunchInput([], env)
    if file is not None:
        from lib_optim.webui_user import read_launch_config

        config = read_launch_config(file, base_env=env)
        for name in config.unset:
            env.pop(name, None)
        env.update(config.process_env())
        result.file_vars = dict(config.env)
        env["COMMANDLINE_ARGS"] = " ".join(shlex.quote(t) for t in config.commandline_args)
        for note in config.notes:
            where = f"{file}:{note.line_no}" if note.line_no is not None else str(file)
            result.file_findings.append(
                Finding(LAUNCHER_FILE_RULE, Severity(note.severity), note.subject, f"{where}: {note.message}", note.fix)
            )
        for name, line in [*config.conditional_flags.items(), *config.conditional_vars.items()]:
            result.conditional[name] = f"{file}:{line}"
    extra = list(extra)
    if extra and extra[0] == "--":
        extra = extra[1:]
    result.argv = effective_argv(extra, env)
    return result


def hosts_defining(
    argv: Sequence[str], candidates: Sequence[HostKind], every: Sequence[HostKind] | None = None
) -> tuple[tuple[HostKind, ...], str]:
    """With no WebUI checkout found: the ``candidates`` whose flag tables define every flag in ``argv``.

    When none of them does, the hosts among ``every`` (default: all checked hosts) that do. Returns the hosts
    to check and a sentence saying why; ``(tuple(candidates), "")`` when every candidate knows the flags, or
    when no host knows them all (then the unknown-flag findings say the rest).
    """
    unknown: Mapping[HostKind, list[str]] = {
        host: list(dict.fromkeys(f.option for f in parse_args(list(argv), host).unknown))
        for host in dict.fromkeys([*candidates, *(checked_hosts() if every is None else every)])
    }
    lacking = [h for h in candidates if unknown[h]]
    if not lacking:
        return tuple(candidates), ""
    fits = tuple(h for h in candidates if not unknown[h]) or tuple(h for h in unknown if not unknown[h])
    if not fits:
        return tuple(candidates), ""
    flags = list(dict.fromkeys(f for h in lacking for f in unknown[h]))
    names = " and ".join(h.display_name for h in lacking)
    its = "it" if len(flags) == 1 else "them"
    return fits, (
        f"{', '.join(flags)} {'is not a flag' if len(flags) == 1 else 'are not flags'} of {names}, so showing "
        f"{' and '.join(h.display_name for h in fits)} (which define{'s' if len(fits) == 1 else ''} {its})"
    )
