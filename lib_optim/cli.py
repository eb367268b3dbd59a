"""``python -m lib_optim``: the checker, the doctor and launch profiles, with no WebUI needed.

Exit status: ``check`` and ``doctor`` return 0 when nothing is above info, 1 for warnings, 2 for errors;
64 for a usage error (a bad option or value); ``profile`` returns 0 on success and 1 when it refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from lib_optim import __version__
from lib_optim.checker import RULES, CheckInput, Finding, RuntimeFacts, exit_code, rules_markdown, run_checks
from lib_optim.env_notes import env_notes_json, env_notes_markdown
from lib_optim.hostdetect import detect_kind, extension_dir, find_webui_root
from lib_optim.hostkinds import PROFILED_HOSTS, HostKind, parse_host

EX_USAGE = 64


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EX_USAGE, f"{self.prog}: error: {message}\n")


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

    host_help = "a1111, forge, forge-previous, or auto (find the WebUI checkout around the file or this folder)"

    check = sub.add_parser("check", help="check launch flags and environment variables for a host")
    check.add_argument("--host", default="auto", help=host_help)
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

    doctor = sub.add_parser("doctor", help="probe this machine, check its launch config, recommend a profile")
    doctor.add_argument("--host", default="auto", help=host_help)
    doctor.add_argument("--file", type=Path, help="the webui-user file the WebUI is started with")
    doctor.add_argument("--json", action="store_true")

    profile = sub.add_parser("profile", help="launch profiles for 8/12/16/24 GB cards")
    psub = profile.add_subparsers(dest="action", required=True, parser_class=_Parser)
    plist = psub.add_parser("list", help="list the profiles")
    plist.add_argument("--json", action="store_true")
    show = psub.add_parser("show", help="show what a profile sets on a host")
    show.add_argument("name")
    show.add_argument("--host", default="auto", help=host_help)
    show.add_argument("--directml", action="store_true", help="AMD/Intel card through DirectML")
    show.add_argument("--json", action="store_true")
    apply = psub.add_parser("apply", help="write a profile's block into webui-user.sh/.bat (backup first)")
    apply.add_argument("name")
    apply.add_argument("--file", type=Path, required=True)
    apply.add_argument("--host", default="auto", help=host_help)
    apply.add_argument("--directml", action="store_true", help="AMD/Intel card through DirectML")
    apply.add_argument("--dry-run", action="store_true", help="print the change, write nothing")
    remove = psub.add_parser("remove", help="remove the profile block from webui-user.sh/.bat")
    remove.add_argument("--file", type=Path, required=True)
    remove.add_argument("--dry-run", action="store_true")

    rules = sub.add_parser("rules", help="list the checker's rules")
    rules.add_argument("--json", action="store_true")
    rules.add_argument("--env", action="store_true", help="the environment variables the checker knows instead")

    bench = sub.add_parser("bench", help="time the attention backends side by side and check the planner")
    bench.add_argument("--json", action="store_true")
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
    return parser


def resolve_host(value: str, near: Path | None = None) -> HostKind:
    if value.strip().lower() != "auto":
        try:
            return parse_host(value)
        except ValueError as exc:
            raise UsageError(f"--host: {exc}; or auto") from None
    starts = [p for p in (near, Path.cwd(), extension_dir()) if p is not None]
    root = find_webui_root(*starts)
    if root is None:
        raise UsageError(
            "--host: auto found no WebUI checkout around "
            + ", ".join(str(p) for p in starts)
            + "; pass --host a1111, --host forge or --host forge-previous"
        )
    return detect_kind(root).kind


def format_findings(findings: Sequence[Finding], host: HostKind) -> str:
    if not findings:
        return f"No problems found for {host.display_name}."
    lines = [f"{len(findings)} finding(s) for {host.display_name}:"]
    for f in findings:
        lines.append(f"  [{f.severity.value}] {f.subject}  ({f.rule})")
        lines.append(f"      {f.message}")
        lines.append(f"      fix: {f.fix}")
    return "\n".join(lines)


def _launch_input(args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    env: dict[str, str] = {} if getattr(args, "no_env", False) else dict(os.environ)
    if args.file is not None:
        from lib_optim.webui_user import read_launch_config

        if not args.file.is_file():
            raise UsageError(
                f"--file: {str(args.file)!r} does not exist; give the path of webui-user.sh or webui-user.bat"
            )
        config = read_launch_config(args.file, base_env=env)
        for name in config.unset:
            env.pop(name, None)
        env.update(config.process_env())
        env["COMMANDLINE_ARGS"] = " ".join(_quote(t) for t in config.commandline_args)
    extra = list(getattr(args, "args", []) or [])
    if extra and extra[0] == "--":
        extra = extra[1:]
    from lib_optim.doctor import effective_argv

    return effective_argv(extra, env), env


def _quote(token: str) -> str:
    import shlex

    return shlex.quote(token)


def _probe_facts() -> RuntimeFacts:
    from lib_optim.doctor import nvidia_on_pci_bus, runtime_facts
    from lib_optim.probe import probe_system

    return runtime_facts(probe_system(), nvidia_present=nvidia_on_pci_bus())


def cmd_check(args: argparse.Namespace) -> int:
    host = resolve_host(args.host, args.file.parent if args.file else None)
    argv, env = _launch_input(args)
    facts = _probe_facts() if args.probe else RuntimeFacts()
    findings = run_checks(CheckInput(host, argv, env, facts))
    if args.json:
        _out(json.dumps({"host": host.value, "argv": argv, "findings": [f.to_dict() for f in findings]}, indent=2))
    else:
        _out(format_findings(findings, host))
    return exit_code(findings)


def cmd_doctor(args: argparse.Namespace) -> int:
    from lib_optim.doctor import doctor
    from lib_optim.probe import probe_system

    host = resolve_host(args.host, args.file.parent if args.file else None)
    argv, env = _launch_input(args)
    env.pop("COMMANDLINE_ARGS", None)
    report = doctor(host, probe_system(), args=argv, env=env)
    if args.json:
        _out(json.dumps(report.to_dict(), indent=2))
    else:
        _out(report.system.format_text())
        _out("")
        _out(format_findings(report.findings, host))
        _out("")
        _out(f"Recommended profile: {report.profile}")
        _out(report.commandline)
        _out(f"Write it with: python -m lib_optim profile apply {report.profile} --file <webui-user file>")
    return exit_code(report.findings)


def cmd_profile(args: argparse.Namespace) -> int:
    from lib_optim.profiles import (
        PROFILES,
        ProfileError,
        apply_profile,
        file_kind,
        get_profile,
        launch_line,
        remove_profile,
        resolve,
    )

    try:
        if args.action == "list":
            rows = [(p.name, p.title, p.description) for p in PROFILES.values()]
            rows.append(("auto", "Auto", "Chosen from the detected GPU memory."))
            if args.json:
                _out(json.dumps([{"name": n, "title": t, "description": d} for n, t, d in rows], indent=2))
            else:
                for name, title, description in rows:
                    _out(f"{name:<11} {title:<14} {description}")
            return 0
        try:  # a misspelt profile name or a wrong --file is a usage error (64), not a refusal (1)
            if getattr(args, "file", None) is not None:
                file_kind(args.file)
            if args.action != "remove":
                get_profile(args.name)
        except ProfileError as exc:
            raise UsageError(str(exc).removeprefix("[Optim] ")) from None
        if args.action == "remove":
            edit = remove_profile(args.file, dry_run=args.dry_run)
            _report_edit(edit, args.dry_run, "removed")
            return 0

        gpu_mb = None
        if args.name.strip().lower() == "auto":
            from lib_optim.probe import probe_system

            gpu_mb = probe_system().best_gpu_memory_mb()
        profile = get_profile(args.name, gpu_mb)
        near = args.file.resolve().parent if getattr(args, "file", None) else None
        host = resolve_host(args.host, near)
        if host not in PROFILED_HOSTS:
            raise UsageError(f"--host: {host.value!r} has no profiles; allowed: a1111, forge, forge-previous")
        if args.action == "show":
            hp = resolve(profile, host, directml=args.directml)
            if args.json:
                _out(json.dumps(_profile_dict(profile.name, host, hp), indent=2))
            else:
                _out(f"{profile.title} ({profile.name}) on {host.display_name}: {profile.description}")
                _out(launch_line(hp, "bat" if sys.platform == "win32" else "sh"))
                defaults = hp.generation.non_default()
                _out("Per-generation defaults: " + (json.dumps(defaults) if defaults else "none"))
                if hp.note:
                    _out(hp.note)
            return 0
        outcome = apply_profile(args.file, profile, host, directml=args.directml, dry_run=args.dry_run)
        _report_edit(outcome.edit, args.dry_run, f"profile {profile.name} written")
        if outcome.findings:
            _out(format_findings(outcome.findings, host))
        return 0
    except ProfileError as exc:
        _err(str(exc))
        return 1


def _profile_dict(name: str, host: HostKind, hp: Any) -> dict[str, Any]:
    return {
        "name": name,
        "host": host.value,
        "flags": list(hp.flags),
        "env": dict(hp.env),
        "generation": hp.generation.to_dict(),
        "note": hp.note,
    }


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


def cmd_bench(args: argparse.Namespace) -> int:
    from lib_optim.attention_bench import format_table, run_bench, to_json, write_plot

    specs = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if args.repeats is not None and args.repeats < 1:
        raise UsageError("--repeats: must be 1 or more")
    result = run_bench(specs, device=args.device, repeats=args.repeats, quick=args.quick, dtype=args.dtype)
    _out(to_json(result) if args.json else format_table(result))
    if args.plot:
        _err(write_plot(result, args.plot))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "check": cmd_check,
        "doctor": cmd_doctor,
        "profile": cmd_profile,
        "rules": cmd_rules,
        "bench": cmd_bench,
    }
    try:
        return handlers[args.command](args)
    except UsageError as exc:
        _err(f"python -m lib_optim {args.command}: error: {exc}")
        return EX_USAGE
    except ValueError as exc:  # bad file contents (webui_user) name file, line and problem
        _err(str(exc))
        return EX_USAGE
