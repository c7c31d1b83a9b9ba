"""``python -m reftlib``: the ``reftlib`` command line (see :mod:`reftlib.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
