"""``python -m smai_plugin.benchmark``: the command line of :mod:`smai_plugin.benchmark.cli`.

The runs' classes live in :mod:`smai_plugin.benchmark.runner`, never in ``__main__``, so the
spawned worker processes unpickle them by that module path.
"""

import sys

from smai_plugin.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
