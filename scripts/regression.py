"""Deprecated wrapper (0.2): the regression cases are ``prunebench regression`` (``harness/regression.py``).

    python scripts/regression.py [--write] [--methods a,b]

is ``prunebench regression`` with the same options; this file goes in 0.3.
"""

import sys

from prunebench.harness.cli import main

if __name__ == "__main__":
    print("scripts/regression.py is deprecated: use `prunebench regression`", file=sys.stderr)
    sys.exit(main(["regression", *sys.argv[1:]]))
