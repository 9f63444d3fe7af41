"""Tests of prunebench.harness.hub: the one hub probe, the offline switches, offline mode.

No test here touches the network: the probe is pointed at a closed local port, or its
socket call is replaced.
"""

from __future__ import annotations

import socket
import time
from typing import Any

import pytest

from prunebench.harness import hub

_PROXIES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in _PROXIES:
        monkeypatch.delenv(var, raising=False)


def _closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"])
@pytest.mark.parametrize("value", ["1", "true", "YES", " on "])
def test_offline_requested_by_either_variable(var: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert hub.offline_requested() is False
    monkeypatch.setenv(var, value)
    assert hub.offline_requested() is True
    monkeypatch.setenv(var, "0")
    assert hub.offline_requested() is False
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # read at import by huggingface_hub
    assert hub.offline_requested() is True


def test_probe_is_skipped_behind_a_proxy(no_proxy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_socket(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("no direct connection behind a proxy")

    monkeypatch.setattr(socket, "create_connection", no_socket)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert hub.reachable() is True


def test_closed_endpoint_is_unreachable_at_once(no_proxy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    start = time.perf_counter()
    assert hub.reachable() is False
    assert time.perf_counter() - start < hub.PROBE_TIMEOUT_S


def test_open_endpoint_is_reachable(no_proxy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert hub.reachable() is True


def test_a_hanging_lookup_is_bounded(no_proxy: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """DNS resolution has no timeout of its own: the probe must give up anyway."""

    def hang(*args: Any, **kwargs: Any) -> Any:
        time.sleep(5)
        raise OSError("resolved too late")

    monkeypatch.setattr(socket, "create_connection", hang)
    start = time.perf_counter()
    assert hub.reachable(timeout=0.2) is False
    assert time.perf_counter() - start < 2


def test_offline_mode_sets_and_restores_both_flags() -> None:
    import datasets.config
    from huggingface_hub import constants

    def flags() -> tuple[bool, bool]:
        return datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE

    before = flags()
    with hub.offline_mode(True):
        assert flags() == (True, True)
    assert flags() == before
    with hub.offline_mode(False):
        assert flags() == before
    with pytest.raises(RuntimeError), hub.offline_mode(True):
        raise RuntimeError("load failed")
    assert flags() == before


def test_client_errors_cover_missing_and_http_failures() -> None:
    from huggingface_hub.errors import HfHubHTTPError

    errors = hub.client_errors()
    assert OSError in errors and ValueError in errors and HfHubHTTPError in errors
