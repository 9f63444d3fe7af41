"""Deprecated wrapper (0.2): the compact Table-1 layout is ``prunebench report --compact``.

    python scripts/compact_table.py FOLDER ...

is ``prunebench report FOLDER ... --compact`` (one table per protocol; the old
``--fallback`` mixing of protocols is gone: give every folder, each protocol gets its
table). This file goes in 0.3.
"""

import sys

from prunebench.harness.cli import main

if __name__ == "__main__":
    print("scripts/compact_table.py is deprecated: use `prunebench report --compact`", file=sys.stderr)
    folders = [a for a in sys.argv[1:] if not a.startswith("--")]
    sys.exit(main(["report", *folders, "--compact"]))
