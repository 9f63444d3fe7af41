"""The Hugging Face hub as the harness sees it: switched off, reachable, or kept away from.

Two things reach for the hub: a model given by hub id (harness/models.py) and the hub
corpora ``wikitext2``, ``c4``, ``ptb`` (harness/data.py). On a machine without network
the hub clients retry for ~25 s per file before failing, so both first ask this module,
and fail in seconds with a message naming what works offline. There is one probe, here,
so both callers behave alike and a test patches one place (``hub.reachable``); callers
use it through the module (``from prunebench.harness import hub`` then ``hub.reachable()``)
for that reason.
"""

from __future__ import annotations

import os
import socket
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager

#: Seconds the probe waits for a TCP connection to the hub endpoint.
PROBE_TIMEOUT_S = 3.0

_TRUTHY = {"1", "true", "yes", "on"}
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


def offline_requested() -> bool:
    """Whether the user switched the hub off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in _TRUTHY:
            return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - transformers depends on it
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _endpoint() -> tuple[str, int]:
    """Host and port of the hub endpoint the clients would use (HF_ENDPOINT included)."""
    try:
        from huggingface_hub import constants

        endpoint = constants.ENDPOINT
    except (ImportError, AttributeError):  # pragma: no cover
        endpoint = "https://huggingface.co"
    url = urllib.parse.urlsplit(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    return host, port


def reachable(timeout: float = PROBE_TIMEOUT_S) -> bool:
    """A quick TCP probe of the hub endpoint, bounded in time including DNS resolution.

    Without it an offline machine waits ~25 s in the hub client's retries before
    failing. Behind a proxy the direct probe says nothing, so it is skipped there and
    the hub client decides.
    """
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    host, port = _endpoint()
    outcome: list[bool] = []

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                outcome.append(True)
        except OSError:
            outcome.append(False)

    # DNS resolution has no timeout of its own, hence the thread with a bounded join.
    worker = threading.Thread(target=probe, name="prunebench-hub-probe", daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(outcome and outcome[0])


@contextmanager
def offline_mode(enabled: bool) -> Iterator[None]:
    """Temporarily put ``datasets`` and ``huggingface_hub`` in offline mode: a cached copy
    still loads, a missing one fails at once instead of after network retries."""
    import datasets.config
    from huggingface_hub import constants

    saved = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    if enabled:
        datasets.config.HF_HUB_OFFLINE = constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE = saved


def client_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a hub download raises for a missing, private or unreachable repo."""
    errors: list[type[BaseException]] = [OSError, ValueError]
    try:
        from huggingface_hub.errors import HfHubHTTPError

        errors.append(HfHubHTTPError)
    except ImportError:  # pragma: no cover
        pass
    return tuple(errors)
