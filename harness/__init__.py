"""prunebench core: hook specs, plugin manager, model format, runner and protocol.

The core knows the hook specs and data contracts only; every pruning method lives in
``plugins/`` or ``baselines/`` (or a third-party package) and is found through the
``prunebench`` entry-point group.
"""

from prunebench import __version__

__all__ = ["__version__"]
