"""``python -m lib_optim``: the checker, the doctor and launch profiles, with no WebUI needed.

Exit status: ``check`` and ``doctor`` return 0 when nothing is above info, 1 for warnings, 2 for errors (also
for a ``--file`` that bash or cmd cannot read as written: saved as UTF-16, an unterminated quote); 64 for every
usage error (a bad option, value or combination; a ``--file`` that is not a launcher file: a folder, a binary
or huge file, webui.sh itself); ``profile`` returns 0 on success and 1 when it refused (the result would not
start, the file is read-only, another edit holds it). With ``--json`` the output is JSON whatever happens; an
error is ``{"error": "...", "exit_code": N}``.

Without ``--host``, ``auto`` looks for the WebUI checkout around ``--file``, the current folder and this
extension's folder. When there is none (a clone of this repository), ``check``, ``doctor`` and ``profile show``
cover both main hosts, A1111 and Forge f2, and say so; ``profile apply`` needs to know which WebUI the file
starts and asks for ``--host``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import shlex
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

from lib_optim import __version__
from lib_optim.compile import add_compile_cache_parser, compile_section_text, run_compile_cache
from lib_optim.host_specs import (
    FALLBACK_HOSTS,
    HostChoice,
    HostKind,
    choose_host,
    extension_dir,
    host_names,
    profiled_hosts,
    webui_user_file,
)
from lib_optim.launch import (
    RULES,
    CheckInput,
    Finding,
    LaunchInput,
    RuntimeFacts,
    env_notes_json,
    env_notes_markdown,
    exit_code,
    format_findings,
    hosts_defining,
    read_launch_input,
    rules_markdown,
    run_checks,
)

EX_USAGE = 64
EX_ERROR = 2  # check / doctor: an error finding, or a launcher file bash or cmd cannot read as written
EX_REFUSED = 1
# Covered when no WebUI checkout is found: the two hosts the extension is made for.


def host_choices() -> tuple[str, ...]:
    """What ``--host`` accepts: every registered host's name and aliases, and auto."""
    return (*host_names(), "auto")


def _profiled_host_options(joiner: str = ", ", last: str = " or ") -> str:
    """``--host a1111, --host forge or --host forge-previous``: the hosts that have launch profiles."""
    options = [f"--host {h.value}" for h in profiled_hosts()]
    return joiner.join(options[:-1]) + last + options[-1] if len(options) > 1 else "".join(options)


class UsageError(Exception):
    pass


class _ArgumentError(Exception):
    """argparse found a bad command line; raised instead of exiting so that --json can answer in JSON."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser
        self.message = message


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # NoReturn, but argparse's stub types the override loosely
        raise _ArgumentError(self, message)


def _out(text: str = "") -> None:
    sys.stdout.write(text + "\n")


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m lib_optim",
        description="sd-webui-optim: check launch flags, diagnose, apply profiles.",
    )
    parser.add_argument("--version", action="version", version=f"sd-webui-optim {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_check(sub)
    _add_doctor(sub)
    _add_profile(sub)
    _add_rules(sub)
    _add_bench(sub)
    add_compile_cache_parser(sub, _Parser)  # the compile wing's command (lib_optim/compile/persist_cli.py)
    return parser


def _host_help(
    auto: str = "the WebUI checkout around the file or this folder "
    "(none found: check, doctor and profile show cover A1111 and Forge f2)",
) -> str:
    """``--host``'s help: every registered host (the names users type), or auto."""
    return f"{', '.join(host_choices()[:-1])}, or auto: {auto}"


def _add_host(parser: argparse.ArgumentParser, help_text: str | None = None) -> None:
    parser.add_argument("--host", default="auto", help=help_text or _host_help())


def _add_check(sub: Any) -> None:
    check = sub.add_parser("check", help="check launch flags and environment variables for a host")
    _add_host(check)
    check.add_argument(
        "--file",
        type=Path,
        help="a webui-user.sh or webui-user.bat to read COMMANDLINE_ARGS and variables from",
    )
    check.add_argument("--json", action="store_true", help="print findings as JSON")
    check.add_argument(
        "--no-env", action="store_true", help="ignore this shell's environment (only --file and ARGS count)"
    )
    check.add_argument(
        "--probe",
        action="store_true",
        help="also look at this machine (torch, xformers, GPU) for runtime rules",
    )
    check.add_argument("args", nargs=argparse.REMAINDER, help="launch arguments, after --")


def _add_doctor(sub: Any) -> None:
    doctor = sub.add_parser("doctor", help="probe this machine, check its launch config, recommend a profile")
    _add_host(doctor)
    doctor.add_argument("--file", type=Path, help="the webui-user file the WebUI is started with")
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_profile(sub: Any) -> None:
    profile = sub.add_parser("profile", help="launch profiles for 8/12/16/24 GB cards")
    psub = profile.add_subparsers(dest="action", required=True, parser_class=_Parser)
    plist = psub.add_parser("list", help="list the profiles")
    plist.add_argument("--json", action="store_true", help="print the list as JSON")
    show = psub.add_parser("show", help="show what a profile sets on a host")
    show.add_argument("name")
    _add_host(show)
    show.add_argument("--directml", action="store_true", help="AMD/Intel card through DirectML")
    show.add_argument("--json", action="store_true", help="print the profile as JSON")
    apply = psub.add_parser("apply", help="write a profile's block into webui-user.sh/.bat (backup first)")
    apply.add_argument("name")
    apply.add_argument("--file", type=Path, required=True)
    _add_host(apply, _host_help("the WebUI around the file"))
    apply.add_argument("--directml", action="store_true", help="AMD/Intel card through DirectML")
    apply.add_argument("--dry-run", action="store_true", help="print the change, write nothing")
    apply.add_argument("--create", action="store_true", help="make the file if it does not exist")
    apply.add_argument("--force", action="store_true", help="write the file even if it is read-only")
    remove = psub.add_parser("remove", help="remove the profile block from webui-user.sh/.bat")
    remove.add_argument("--file", type=Path, required=True)
    remove.add_argument("--dry-run", action="store_true")
    remove.add_argument("--force", action="store_true", help="write the file even if it is read-only")


def _add_rules(sub: Any) -> None:
    rules = sub.add_parser("rules", help="list the checker's rules")
    rules.add_argument("--json", action="store_true", help="print the rules (or, with --env, the variables) as JSON")
    rules.add_argument("--env", action="store_true", help="the environment variables the checker knows instead")


def _add_bench(sub: Any) -> None:
    bench = sub.add_parser("bench", help="time the attention backends side by side and check the planner")
    bench.add_argument(
        "--json", action="store_true", help="print the results (or, with --list-backends, the list) as JSON"
    )
    bench.add_argument("--plot", metavar="FILE.png", help="write a bar chart (needs matplotlib)")
    bench.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    bench.add_argument(
        "--shapes",
        default="sd15-512,sd15-768,sdxl-1024",
        help="comma-separated: sd15-512, sd15-768, sdxl-1024",
    )
    bench.add_argument("--repeats", type=int, help="timed rounds per shape (default 5, --quick 2)")
    bench.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        help="compute dtype (default: fp16 on cuda, fp32 on cpu; fp16/bf16 on cpu check the 2-byte formulas)",
    )
    bench.add_argument(
        "--quick", action="store_true", help="host backends and the largest self/cross attention per shape only"
    )
    bench.add_argument(
        "--compile",
        action="store_true",
        help="instead: an SD1.5-like UNet eager vs with its blocks torch.compiled (steady state, compile time)",
    )
    bench.add_argument(
        "--vae",
        action="store_true",
        help="instead: the SD VAE decode untiled vs tiled at 1024 and 2048 px (peak memory, seconds, PSNR)",
    )
    bench.add_argument(
        "--list-backends",
        action="store_true",
        help="instead: every attention backend, whether it runs here (CUDA when torch sees a GPU), and if not why "
        "and the fix (with --json: as JSON)",
    )
    from lib_optim.bench import add_gpu_report_arguments

    add_gpu_report_arguments(bench)


# --------------------------------------------------------------------------------------------------- hosts


def resolve_host(value: str, near: Path | None = None) -> HostChoice:
    """``--host``: a name, or auto (the checkout around ``near``, the current folder or this extension)."""
    try:
        return choose_host(value, near, extension_dir())
    except ValueError as exc:
        # parse_host says "host: 'x' is not ..."; the option name is said once, here.
        raise UsageError(f"--host: {str(exc).removeprefix('host: ')}; or auto") from None


def not_found_note(choice: HostChoice, why: str = "") -> str:
    where = ", ".join(str(p) for p in choice.searched)
    shown = why or "showing " + " and ".join(h.display_name for h in FALLBACK_HOSTS)
    return f"No WebUI checkout found around {where}: {shown}. Pass {_profiled_host_options()} for yours only."


# ------------------------------------------------------------------------------------------------ findings


def _check_file_arg(path: Path, *, create: bool = False) -> None:
    """A usage error for a --file that is missing (unless ``create``) or a directory."""
    if path.is_dir():
        raise UsageError(f"--file: {str(path)!r} is a directory; give the webui-user.sh or webui-user.bat in it")
    if path.exists() or create:
        return
    near = ""
    if path.parent.is_dir():
        candidates = [p.name for p in path.parent.iterdir() if p.suffix.lower() in (".sh", ".bat", ".cmd")]
        close = difflib.get_close_matches(path.name, candidates, n=1)
        if close:
            near = f" (did you mean {str(path.parent / close[0])!r}?)"
    else:
        near = f" (the folder {str(path.parent)!r} does not exist either)"
    raise UsageError(f"--file: {str(path)!r} does not exist{near}; give the path of webui-user.sh or webui-user.bat")


def _launch_input(args: argparse.Namespace) -> LaunchInput:
    env: dict[str, str] = {} if getattr(args, "no_env", False) else dict(os.environ)
    if args.file is not None:
        _check_file_arg(args.file)
    return read_launch_input(args.file, env, getattr(args, "args", []) or [])


def _hosts(choice: HostChoice, launch: LaunchInput) -> tuple[tuple[HostKind, ...], str]:
    """The hosts to check and, with no checkout found, the note saying so (narrowed to the hosts that define
    the flags given, when some of the usual two do not)."""
    if choice.kind is not None:
        return choice.hosts, ""
    hosts, why = hosts_defining(launch.argv, choice.hosts)
    return hosts, not_found_note(choice, why)


def _with_file_findings(findings: list[Finding], launch: LaunchInput) -> list[Finding]:
    """The file's own findings added, and findings about flags set under a condition marked "may apply"."""
    marked = [
        dataclasses.replace(f, message=f"{f.message} (This may apply: it is set inside a condition at {where}.)")
        if (where := launch.conditional.get(f.subject)) is not None
        else f
        for f in findings
    ]
    ours = {id(f) for f in launch.file_findings}
    # the file's findings first within a severity (stable sort)
    marked.sort(key=lambda f: (-f.severity.rank, id(f) not in ours))
    return marked


def _probe_facts() -> RuntimeFacts:
    from lib_optim.gpu import probe_system
    from lib_optim.launch import nvidia_on_pci_bus, runtime_facts

    return runtime_facts(probe_system(), nvidia_present=nvidia_on_pci_bus())


def _host_dict(finding: Finding, host: HostKind) -> dict[str, Any]:
    return {**finding.to_dict(), "host": host.value}


def cmd_check(args: argparse.Namespace) -> int:
    choice = resolve_host(args.host, args.file.parent if args.file else None)
    launch = _launch_input(args)
    hosts, note = _hosts(choice, launch)
    facts = _probe_facts() if args.probe else RuntimeFacts()
    results = [
        (
            host,
            _with_file_findings(
                run_checks(CheckInput(host, launch.argv, launch.env, facts, launcher_notes=launch.file_findings)),
                launch,
            ),
        )
        for host in hosts
    ]
    worst = max(exit_code(findings) for _, findings in results)
    if args.json:
        if choice.kind is not None:
            data: dict[str, Any] = {
                "host": choice.kind.value,
                "argv": launch.argv,
                "findings": [f.to_dict() for f in results[0][1]],
            }
        else:
            data = {
                "host": None,
                "hosts": [h.value for h in hosts],
                "note": note,
                "argv": launch.argv,
                "findings": [_host_dict(f, host) for host, findings in results for f in findings],
            }
        _out(json.dumps(data, indent=2))
        return worst
    if choice.kind is None:
        _out(note)
        _out("")
    _out("\n\n".join(format_findings(findings, host) for host, findings in results))
    return worst


# -------------------------------------------------------------------------------------------------- doctor


def _script_kind() -> Literal["sh", "bat"]:
    return "bat" if sys.platform == "win32" else "sh"


def _webui_user_path(root: Path | None) -> str:
    name = f"webui-user.{_script_kind()}"
    return str(root / name) if root is not None else "<webui-user file>"


def cmd_doctor(args: argparse.Namespace) -> int:
    from lib_optim.gpu import probe_system
    from lib_optim.launch import doctor_json, gpu_lines, nvidia_on_pci_bus, run_doctor

    choice = resolve_host(args.host, args.file.parent if args.file else None)
    if args.file is None and (found := webui_user_file(choice.root, windows=sys.platform == "win32")):
        _err(f"[Optim] doctor: reading {found} (pass --file for another one)")  # the WebUI found walking up
        args.file = found
    launch = _launch_input(args)
    hosts, note = _hosts(choice, launch)
    env = dict(launch.env)
    env.pop("COMMANDLINE_ARGS", None)
    system = probe_system()
    nvidia_present = nvidia_on_pci_bus()
    reports = [
        run_doctor(
            host,
            system,
            args=launch.argv,
            env=env,
            pci=lambda: nvidia_present,
            webui_root=choice.root,
            launcher_vars=launch.file_vars,
        )
        for host in hosts
    ]
    # doctor runs the checker on argv and env alone: the file's own findings join here
    findings = {r.host: _with_file_findings([*launch.file_findings, *r.findings], launch) for r in reports}
    worst = max(exit_code(f) for f in findings.values())
    first = reports[0]
    if args.json:
        _out(json.dumps(doctor_json(reports, findings, None if choice.kind is not None else note), indent=2))
        return worst
    _out(system.format_text())
    for line in gpu_lines(reports):
        _out(line)
    _out("")
    if choice.kind is None:
        _out(note)
        _out("")
    for r in reports:
        _out(format_findings(findings[r.host], r.host))
        _out("")
    _out(f"Recommended profile: {first.profile} ({first.profile_reason})")
    for r in reports:
        if choice.kind is None:  # the profile differs where a host's GPU flag picks another card
            _out(
                f"On {r.host.display_name}:"
                + (f" {r.profile} ({r.profile_reason})" if r.profile != first.profile else "")
            )
        if r.commandline:
            _out(r.commandline)
        else:
            _out(
                f"(nothing to put in webui-user on {r.host.display_name}: this profile only sets per-generation "
                "defaults there)"
            )
    for r in reports:
        if r.commandline:  # exactly what was shown: --host always (the file may lie outside any checkout)
            directml = " --directml" if r.directml else ""
            _out(
                f"Write it with: python -m lib_optim profile apply {r.profile} "
                f"--file {_webui_user_path(choice.root)} --host {r.host.value}{directml}"
            )
    _out("\n" + compile_section_text([r.compile for r in reports if r.compile is not None]))
    if first.hint:
        _out("")
        _out(first.hint)
    return worst


# ------------------------------------------------------------------------------------------------- profile


def _auto_profile_name() -> str:
    from lib_optim.gpu import probe_system
    from lib_optim.launch import nvidia_on_pci_bus, recommend_profile

    name, reason = recommend_profile(probe_system(), nvidia_on_pci_bus())
    _err(f"auto: {name} ({reason})")
    return name


def cmd_profile(args: argparse.Namespace) -> int:
    from lib_optim.launch import (
        ProfileError,
        apply_profile,
        get_profile,
        remove_profile,
        resolve,
    )

    if args.action == "list":
        return _profile_list(args.json)
    _check_profile_args(args)
    if args.action == "remove":
        edit = remove_profile(args.file, dry_run=args.dry_run, force=args.force)
        _report_edit(edit, args.dry_run, "removed")
        return 0

    near = args.file.resolve().parent if getattr(args, "file", None) else None
    choice = resolve_host(args.host, near)
    if choice.kind is None and args.action == "apply":
        raise UsageError(
            f"--host: no WebUI checkout around {near}, so which WebUI this file starts is unknown; "
            f"pass {_profiled_host_options()}"
        )
    for host in choice.hosts:
        if host not in profiled_hosts():
            allowed = ", ".join(h.value for h in profiled_hosts())
            raise UsageError(f"--host: {host.value!r} has no profiles; allowed: {allowed}")
    profile = get_profile(_auto_profile_name() if args.name.strip().lower() == "auto" else args.name)
    try:  # --directml with a host or a profile that has no DirectML variant: a bad combination of options
        resolved = [(host, resolve(profile, host, directml=args.directml)) for host in choice.hosts]
    except ProfileError as exc:
        raise UsageError(str(exc).removeprefix("[Optim] ")) from None

    if args.action == "show":
        return _profile_show(args, profile, choice, resolved)

    host = resolved[0][0]
    outcome = apply_profile(
        args.file,
        profile,
        host,
        directml=args.directml,
        dry_run=args.dry_run,
        create=args.create,
        force=args.force,
    )
    for note in outcome.notes:
        _out(note)
    _report_edit(outcome.edit, args.dry_run, f"profile {profile.name} written")
    if outcome.findings:
        _out(format_findings(outcome.findings, host))
    return 0


def _profile_list(as_json: bool) -> int:
    from lib_optim.launch import PROFILES

    rows = [(p.name, p.title, p.description) for p in PROFILES.values()]
    rows.append(("auto", "Auto", "Chosen from the detected GPU memory."))
    if as_json:
        _out(json.dumps([{"name": n, "title": t, "description": d} for n, t, d in rows], indent=2))
    else:
        for name, title, description in rows:
            _out(f"{name:<11} {title:<14} {description}")
    return 0


def _check_profile_args(args: argparse.Namespace) -> None:
    """A misspelt profile name or a wrong --file is a usage error (64), not a refusal (1)."""
    from lib_optim.launch import ProfileError, file_kind, get_profile

    try:
        if getattr(args, "file", None) is not None:
            if args.file.is_dir():  # said as such, before "not a webui-user file" for its missing suffix
                _check_file_arg(args.file)
            file_kind(args.file)
            _check_file_arg(args.file, create=getattr(args, "create", False))
        if args.action != "remove":
            get_profile(args.name)
    except ProfileError as exc:
        raise UsageError(str(exc).removeprefix("[Optim] ")) from None


def _profile_show(
    args: argparse.Namespace, profile: Any, choice: HostChoice, resolved: list[tuple[HostKind, Any]]
) -> int:
    from lib_optim.launch import profile_dict, profile_text

    if args.json:
        if choice.kind is not None:
            _out(json.dumps(profile_dict(profile.name, *resolved[0]), indent=2))
        else:
            by_host = {host.value: profile_dict(profile.name, host, hp) for host, hp in resolved}
            data = {"name": profile.name, "host": None, "note": not_found_note(choice), "by_host": by_host}
            _out(json.dumps(data, indent=2))
        return 0
    if choice.kind is None:
        _out(not_found_note(choice))
        _out("")
    _out("\n\n".join(profile_text(profile, host, hp, _script_kind()) for host, hp in resolved))
    return 0


def _report_edit(edit: Any, dry_run: bool, what: str) -> None:
    if not edit.changed:
        _out("Nothing to change.")
        return
    if dry_run:
        _out(edit.diff.rstrip("\n"))
        _out("(dry run: nothing written)")
        return
    _out(edit.diff.rstrip("\n"))
    backup = f"; backup: {edit.backup_path}" if edit.backup_path else ""
    _out(f"{what}{backup}")


# --------------------------------------------------------------------------------------------- rules, bench


def cmd_rules(args: argparse.Namespace) -> int:
    if args.env:
        _out(env_notes_json() if args.json else env_notes_markdown())
        return 0
    if args.json:
        rows = [
            {"id": r.id, "severity": r.severity.value, "hosts": [h.value for h in r.hosts], "title": r.title}
            for r in RULES.values()
        ]
        _out(json.dumps(rows, indent=2))
    else:
        _out(rules_markdown())
    return 0


def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a None entry in sys.modules, or a broken parent package
        return False


def cmd_bench(args: argparse.Namespace) -> int:
    if args.list_backends:
        return _bench_list_backends(args)
    if args.compile and args.vae:
        raise UsageError("--compile and --vae: choose one (each is its own benchmark)")
    specs = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not specs:
        raise UsageError(f"--shapes: no shape in {args.shapes!r}; allowed: sd15-512, sd15-768, sdxl-1024")
    if args.repeats is not None and args.repeats < 1:
        raise UsageError("--repeats: must be 1 or more")
    if args.plot:
        # Checked before the run: finding out after minutes of timing is no way to learn it.
        if not _importable("matplotlib"):
            raise UsageError(
                f"--plot: matplotlib is not installed in this Python ({sys.executable}); "
                "pip install matplotlib, or leave --plot out"
            )
        folder = Path(args.plot).parent
        if not folder.is_dir():
            raise UsageError(f"--plot: the folder {str(folder)!r} does not exist")
    if not _importable("torch"):
        raise UsageError(
            f"bench needs torch, which this Python ({sys.executable}) does not have: run it with the WebUI's "
            "Python (<WebUI folder>/venv/bin/python -m lib_optim bench, on Windows "
            "<WebUI folder>\\venv\\Scripts\\python), or pip install torch"
        )
    try:
        from lib_optim.bench import attention_bench_json as to_json
        from lib_optim.bench import attention_bench_table as format_table
        from lib_optim.bench import run_attention_bench as run_bench
        from lib_optim.bench import write_attention_plot as write_plot
    except (ImportError, OSError) as exc:  # torch is there but does not load (a DLL, a half-installed wheel)
        raise UsageError(f"bench cannot load torch in this Python ({sys.executable}): {exc}") from None

    if args.gpu_report:
        from lib_optim.bench import gpu_report_command

        return gpu_report_command(args, _out, _err)
    if args.compile:
        return _bench_compile(args)
    if args.vae:
        return _bench_vae(args)
    result = run_bench(specs, device=args.device, repeats=args.repeats, quick=args.quick, dtype=args.dtype)
    _out(to_json(result) if args.json else format_table(result))
    if args.plot:
        _err(write_plot(result, args.plot))
    return 0


def _bench_list_backends(args: argparse.Namespace) -> int:
    """``bench --list-backends``: the registry's algorithms, how each host runs them, and whether each runs here."""
    from lib_optim.attention import backend_rows, backends_text

    device, no_torch = "cpu", ""
    if _importable("torch"):
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        no_torch = f"needs torch in this Python ({sys.executable})"
    rows = backend_rows(device, no_torch)
    _out(
        json.dumps({"device": device, "backends": rows}, indent=2, ensure_ascii=False)
        if args.json
        else backends_text(device, rows)
    )
    return 0


def _bench_compile(args: argparse.Namespace) -> int:
    """``bench --compile``: eager vs regional compile at two latent sizes (a size change included, as in use)."""
    import torch

    from lib_optim.bench import format_compile_table, run_compile_bench
    from lib_optim.compile import compile_availability

    device = args.device
    ok, why = compile_availability(device)
    if not ok:
        raise UsageError(f"--compile: torch.compile cannot run here: {why}")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[
        args.dtype or ("fp16" if device == "cuda" else "fp32")
    ]
    rounds = args.repeats if args.repeats is not None else (3 if args.quick else 5)
    sizes = ((32, 32),) if args.quick else ((32, 32), (48, 48))
    results = [run_compile_bench(latent=size, rounds=rounds, device=device, dtype=dtype) for size in sizes]
    _out(json.dumps([r.to_dict() for r in results], indent=2) if args.json else format_compile_table(results))
    return 0


def _bench_vae(args: argparse.Namespace) -> int:
    """``bench --vae``: the random-weight SD VAE's decode, untiled vs tiled, each size in its own process (peaks)."""
    from lib_optim.bench import run_vae_bench
    from lib_optim.bench import vae_bench_json as to_json
    from lib_optim.bench import vae_bench_table as format_vae_table

    sizes = (1024,) if args.quick else (1024, 2048)
    result = run_vae_bench(sizes, device=args.device, dtype=args.dtype)
    _out(to_json(result) if args.json else format_vae_table(result))
    return 0


# ---------------------------------------------------------------------------------------------------- main


def _wants_json(argv: Sequence[str]) -> bool:
    own = list(argv[: argv.index("--")]) if "--" in argv else list(argv)
    return "--json" in own


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Show the library's warnings (e.g. waiting for another edit of the same file) while a command runs."""
    logger = logging.getLogger("lib_optim")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter("[Optim] %(message)s"))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)


def _fail(message: str, code: int, as_json: bool) -> int:
    _err(message)
    if as_json:
        _out(json.dumps({"error": message, "exit_code": code}, indent=2))
    return code


def _unrecognized(args: argparse.Namespace, extra: list[str]) -> str:
    message = f"unrecognized arguments: {' '.join(extra)}"
    if getattr(args, "command", None) == "check":
        host = f" --host {args.host}" if args.host != "auto" else ""
        flags = " ".join(map(shlex.quote, extra))
        message += f"\nWebUI launch flags go after `--`: python -m lib_optim check{host} -- {flags}"
    elif any(a.startswith("--") for a in extra) and getattr(args, "command", None) == "doctor":
        message += "\ndoctor reads launch flags from --file, COMMANDLINE_ARGS or `python -m lib_optim check -- FLAGS`"
    return message


def _commands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of ``parser`` by name (empty when it has none)."""
    found = [a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(found[0]) if found else {}


def _did_you_mean(failed: argparse.ArgumentParser, argv: Sequence[str]) -> str:
    """`` (did you mean 'doctor'?)`` for a mistyped command or profile action; "" when nothing is close."""
    parser: argparse.ArgumentParser = build_parser()
    for word in (a for a in (argv[: argv.index("--")] if "--" in argv else argv) if not a.startswith("-")):
        commands = _commands(parser)
        if word in commands:
            parser = commands[word]
            continue
        close = difflib.get_close_matches(word, list(commands), n=1) if parser.prog == failed.prog else []
        return f" (did you mean {close[0]!r}?)" if close else ""
    return ""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    as_json = _wants_json(argv)
    parser = build_parser()
    command = ""
    handlers = {
        "check": cmd_check,
        "doctor": cmd_doctor,
        "profile": cmd_profile,
        "rules": cmd_rules,
        "bench": cmd_bench,
        "compile-cache": lambda args: run_compile_cache(args, _out, _err),
    }
    from lib_optim.launch import ProfileError
    from lib_optim.webui_user import BrokenLauncherFile, WriteRefused

    if not argv:  # what can this do? The commands, as pip and git answer: on stdout, and no error
        parser.print_help(sys.stdout)
        return 0
    try:
        args, extra = parser.parse_known_args(argv)
        command = args.command
        if extra:
            raise _ArgumentError(parser, _unrecognized(args, extra))
        with _warnings_to_stderr():
            return handlers[command](args)
    except _ArgumentError as exc:
        exc.parser.print_usage(sys.stderr)
        message = exc.message + _did_you_mean(exc.parser, argv)
        return _fail(f"{exc.parser.prog}: error: {message}", EX_USAGE, as_json)
    except UsageError as exc:
        return _fail(f"python -m lib_optim {command}: error: {exc}", EX_USAGE, as_json)
    except BrokenLauncherFile as exc:  # bash or cmd cannot read it: for check and doctor, an error in the setup
        return _fail(str(exc), EX_ERROR if command in ("check", "doctor") else EX_USAGE, as_json)
    except (ProfileError, WriteRefused) as exc:  # refused on purpose, nothing written
        return _fail(str(exc), EX_REFUSED, as_json)
    except ValueError as exc:  # bad file contents (webui_user) name file, line and problem
        return _fail(str(exc), EX_USAGE, as_json)
