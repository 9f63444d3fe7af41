"""Tests of prunebench.harness.cache: keys that see every input, atomic writes, torch round trips."""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import pytest
import torch

from prunebench.harness import cache


@pytest.fixture(autouse=True)
def _isolated_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test writes into its own cache root, never the developer's."""
    root = tmp_path / "cache"
    monkeypatch.setenv(cache.CACHE_ENV, str(root))
    return root


def test_cache_root_follows_env_and_defaults_to_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache.cache_root() == tmp_path / "cache"
    monkeypatch.delenv(cache.CACHE_ENV)
    assert cache.cache_root() == Path.home() / ".cache" / "prunebench"


@dataclasses.dataclass
class _Spec:
    seq_len: int
    corpus: str


def test_stable_key_changes_with_every_part() -> None:
    base = ("gguf-sha256:abc", {"seq_len": 512, "n": 64, "seed": 0}, ["wiki", "lambada"], 1.5, None, True)
    key = cache.stable_key(*base)
    assert key == cache.stable_key(*base)  # deterministic
    assert len(key) == 64 and int(key, 16) >= 0
    variants = [
        ("gguf-sha256:abd", *base[1:]),
        (base[0], {"seq_len": 256, "n": 64, "seed": 0}, *base[2:]),
        (base[0], {"seq_len": 512, "n": 64, "seed": 1}, *base[2:]),
        (base[0], base[1], ["lambada", "wiki"], *base[3:]),  # list order matters
        (*base[:3], 1.25, None, True),
        (*base[:5], False),
        base[:-1],  # a part missing
        (*base, "extra"),
    ]
    keys = {cache.stable_key(*v) for v in variants}
    assert key not in keys and len(keys) == len(variants)


def test_stable_key_is_canonical() -> None:
    # Dict insertion order does not matter; part order does.
    assert cache.stable_key({"a": 1, "b": 2}) == cache.stable_key({"b": 2, "a": 1})
    assert cache.stable_key("a", "b") != cache.stable_key("b", "a")
    # Common non-JSON values are encoded by value, so equal values give equal keys.
    assert cache.stable_key(Path("/x/y"), _Spec(512, "wiki"), {3, 1, 2}, torch.float16) == cache.stable_key(
        Path("/x/y"), _Spec(512, "wiki"), {2, 3, 1}, torch.float16
    )
    assert cache.stable_key(_Spec(512, "wiki")) != cache.stable_key(_Spec(256, "wiki"))
    assert cache.stable_key(torch.float16) != cache.stable_key(torch.bfloat16)


def test_stable_key_refuses_unstable_values() -> None:
    with pytest.raises(TypeError, match="canonicalise"):
        cache.stable_key(object())


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_atomic_writes_leave_only_the_file(tmp_path: Path) -> None:
    target = tmp_path / "out" / "nested" / "data.bin"
    cache.atomic_write_bytes(target, b"first")
    cache.atomic_write_bytes(target, b"second")  # replaces
    assert target.read_bytes() == b"second"
    assert _entries(target.parent) == ["data.bin"]
    assert stat.S_IMODE(target.stat().st_mode) == cache.default_permissions()

    js = tmp_path / "out" / "r.json"
    cache.atomic_write_json(js, {"b": [1, 2], "a": Path("/p")})
    assert json.loads(js.read_text()) == {"a": "/p", "b": [1, 2]}
    assert js.read_text().index('"a"') < js.read_text().index('"b"')  # sorted keys
    assert _entries(js.parent) == ["nested", "r.json"]


def test_failed_atomic_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "data.json"
    cache.atomic_write_json(target, {"v": 1})
    with pytest.raises(TypeError):
        cache.atomic_write_json(target, {"v": object()})  # fails while encoding
    with pytest.raises(RuntimeError), cache.atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("crash mid-write")
    assert json.loads(target.read_text()) == {"v": 1}
    assert _entries(tmp_path) == ["data.json"]


def test_torch_cache_round_trip(_isolated_root: Path) -> None:
    key = cache.stable_key("stats", "gguf-sha256:abc", 512)
    assert cache.torch_cache_get("stats", key) is None  # miss
    assert not _isolated_root.exists()  # a lookup creates nothing
    obj = {"xtx": torch.randn(4, 4, dtype=torch.float64), "count": 7, "names": ["q", "k"]}
    path = cache.torch_cache_put("stats", key, obj)
    assert path == _isolated_root / "stats" / f"{key}.pt"
    assert _entries(path.parent) == [f"{key}.pt"]
    back = cache.torch_cache_get("stats", key)
    assert back["count"] == 7 and back["names"] == ["q", "k"]
    assert torch.equal(back["xtx"], obj["xtx"]) and back["xtx"].dtype == torch.float64
    assert cache.torch_cache_get("other-kind", key) is None


@pytest.mark.parametrize("kind,key", [("../up", "k"), ("stats", "a/b"), ("", "k"), ("stats", ".hidden"), ("a..b", "k")])
def test_torch_cache_rejects_path_escapes(kind: str, key: str) -> None:
    with pytest.raises(ValueError, match="path component"):
        cache.torch_cache_put(kind, key, 1)


def test_corrupt_entry_is_an_error_not_a_miss(_isolated_root: Path) -> None:
    path = cache.torch_cache_path("stats", "k")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a torch file")
    with pytest.raises(Exception):  # noqa: B017 - torch raises RuntimeError or UnpicklingError by version
        cache.torch_cache_get("stats", "k")
    assert os.path.exists(path)
