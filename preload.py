"""sd-webui-optim preload: our --optim-* flags, the start-up check, and the start-up profile.

The host executes this file by path, without putting the extension folder on sys.path
(docs/hosts.md §1.2), so we add it for ``import lib_optim``.
"""

import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)


def preload(parser):
    from lib_optim.hosts.startup import preload as run_preload

    run_preload(parser)
