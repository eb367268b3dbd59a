"""The launch check: flag tables, the command-line reader, the checker, env notes, profiles and doctor."""

from __future__ import annotations

from lib_optim.launch.checker import (
    LAUNCHER_FILE_RULE,
    RULES,
    CheckInput,
    Finding,
    RuntimeFacts,
    Severity,
    exit_code,
    format_findings,
    rules_markdown,
    run_checks,
)
from lib_optim.launch.cmdline import split_command_line
from lib_optim.launch.doctor import doctor as run_doctor
from lib_optim.launch.doctor import (
    doctor_json,
    effective_argv,
    gpu_lines,
    nvidia_on_pci_bus,
    recommend_profile,
    runtime_facts,
)
from lib_optim.launch.env_notes import env_notes_json, env_notes_markdown
from lib_optim.launch.flagspec import FlagSpec, TakesValue
from lib_optim.launch.gpu_choice import GpuChoice, choose_gpu
from lib_optim.launch.launcher_file import LaunchInput, hosts_defining, read_launch_input
from lib_optim.launch.profiles import (
    PROFILES,
    HostProfile,
    ProfileError,
    apply_profile,
    file_kind,
    get_profile,
    launch_line,
    nothing_to_write,
    profile_dict,
    profile_names,
    profile_text,
    remove_profile,
    resolve,
)

__all__ = [
    "LAUNCHER_FILE_RULE",
    "PROFILES",
    "RULES",
    "CheckInput",
    "Finding",
    "FlagSpec",
    "GpuChoice",
    "HostProfile",
    "LaunchInput",
    "ProfileError",
    "RuntimeFacts",
    "Severity",
    "TakesValue",
    "apply_profile",
    "choose_gpu",
    "doctor_json",
    "effective_argv",
    "env_notes_json",
    "env_notes_markdown",
    "exit_code",
    "file_kind",
    "format_findings",
    "get_profile",
    "gpu_lines",
    "hosts_defining",
    "launch_line",
    "nothing_to_write",
    "nvidia_on_pci_bus",
    "profile_dict",
    "profile_names",
    "profile_text",
    "read_launch_input",
    "recommend_profile",
    "remove_profile",
    "resolve",
    "rules_markdown",
    "run_checks",
    "run_doctor",
    "runtime_facts",
    "split_command_line",
]
