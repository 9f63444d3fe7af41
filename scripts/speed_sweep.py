"""Deprecated wrapper (0.2): the speed sweep is ``prunebench speed`` (``harness/speed.py``).

    python scripts/speed_sweep.py MODEL_DIR ... [--profile offline --json J --markdown M --plot P]

is ``prunebench speed MODEL_DIR ...`` with the same options; this file goes in 0.3.
"""

import sys

from prunebench.harness.cli import main

if __name__ == "__main__":
    print("scripts/speed_sweep.py is deprecated: use `prunebench speed`", file=sys.stderr)
    sys.exit(main(["speed", *sys.argv[1:]]))
