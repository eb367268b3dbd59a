"""Run by the WebUI's launcher (a separate process, every start, unless --skip-install), and once by the
Extensions tab when the extension is installed from there.

Installs only what is missing from lib_optim/requirements.py; never torch, torchvision or xformers. Honours
--skip-install in both cases: the Extensions tab starts this file without the WebUI's own command line (only
COMMANDLINE_ARGS reaches it, docs/hosts.md §1.4), so the flag is also looked for in the processes that
started this one.
"""

import importlib.util
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib_optim.requirements import NEVER_INSTALL, RUNTIME_REQUIREMENTS


def missing_requirements(is_installed):
    return [
        requirement
        for module, requirement in RUNTIME_REQUIREMENTS.items()
        if module not in NEVER_INSTALL and not is_installed(module)
    ]


def ancestor_command_lines(max_depth=4):
    """The command lines of the processes above this one (the tab runs us through a shell under the WebUI),
    nearest first; empty where they cannot be read."""
    lines = []
    try:
        import psutil  # the hosts install it (requirements_versions.txt); works on Windows too
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            for process in psutil.Process().parents()[:max_depth]:
                lines.append(process.cmdline())
        except (psutil.Error, OSError) as exc:  # a process that ended or is not ours to read
            sys.stderr.write(f"[Optim] install.py: parent processes not readable ({type(exc).__name__})\n")
        return lines
    pid = os.getppid()
    for _ in range(max_depth):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as handle:
                lines.append([part.decode(errors="replace") for part in handle.read().split(b"\0") if part])
            with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
                pid = int(handle.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
        if pid <= 1:
            break
    return lines


def skip_install_requested(args, command_lines=None):
    if getattr(args, "skip_install", False):
        return True
    lines = ancestor_command_lines() if command_lines is None else command_lines
    return any("--skip-install" in line for line in lines)


def main():
    import launch  # the host's launcher module (PYTHONPATH is the WebUI root, docs/hosts.md §1.4)

    if skip_install_requested(launch.args):
        return
    for requirement in missing_requirements(lambda module: importlib.util.find_spec(module) is not None):
        launch.run_pip(f'install "{requirement}"', f"sd-webui-optim requirement: {requirement}")


if __name__ == "__main__":
    main()
