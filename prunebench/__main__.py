"""``python -m prunebench``: the command-line interface."""

import sys

from prunebench.harness.cli import main

sys.exit(main())
