"""Run by the WebUI's launcher (a separate process, every start, unless --skip-install).

Installs only what is missing from lib_optim/requirements.py; never torch, torchvision or xformers.
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


def main():
    import launch  # the host's launcher module (PYTHONPATH is the WebUI root, docs/hosts.md §1.4)

    if getattr(launch.args, "skip_install", False):
        return
    for requirement in missing_requirements(lambda module: importlib.util.find_spec(module) is not None):
        launch.run_pip(f'install "{requirement}"', f"sd-webui-optim requirement: {requirement}")


if __name__ == "__main__":
    main()
