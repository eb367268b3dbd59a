"""``python -m lib_optim`` — see lib_optim.cli."""

import sys

from lib_optim.cli import main

if __name__ == "__main__":
    sys.exit(main())
