"""Quality regression cases: every method, pruned small and fast, against committed perplexities.

A case prunes one model with one method at one sparsity on a fixed, small calibration
set and measures perplexity on fixed windows. Everything is seeded and runs on CPU, so a
case gives the same number on every machine of the same kind; the committed expectations
(``results/regression/expected.json``, written by ``scripts/regression.py --write``) turn
any change that makes a method worse into a failing test. The cases cover the embedded
SmolLM2-135M (real text: the sensitive check) and tiny random GQA Llama and Phi-3 models
(the architectures' code paths).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prunebench.harness.adapters import to_pruned
from prunebench.harness.context import RunContext
from prunebench.harness.manager import PluginHost
from prunebench.harness.params import param_report
from prunebench.harness.perplexity import perplexity
from prunebench.harness.runner import prune

EXPECTED_PATH = Path(__file__).resolve().parent.parent / "results" / "regression" / "expected.json"
TOLERANCE = 0.02  # relative: a 5% worse perplexity fails, float noise across thread counts does not

REAL_MODEL = "smollm2-135m"
TINY_MODELS = ("tiny-llama-gqa", "tiny-phi3")
SPARSITY = 0.3


@dataclass(frozen=True)
class Protocol:
    """The fixed sizes of a regression case (small enough for CI, large enough to rank methods)."""

    calibration_samples: int = 4
    calibration_seqlen: int = 128
    eval_samples: int = 4
    eval_seqlen: int = 128
    seed: int = 0


def _data(model_name: str, protocol: Protocol) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """(source model, calibration ids, evaluation windows) of a case's model."""
    if model_name in TINY_MODELS:
        from prunebench.harness.testing import tiny_model

        source = tiny_model(model_name.removeprefix("tiny-"), seed=protocol.seed)
        gen = torch.Generator().manual_seed(protocol.seed)
        vocab = source.config.vocab_size
        calibration = torch.randint(0, vocab, (protocol.calibration_samples, protocol.calibration_seqlen), generator=gen)
        windows = torch.randint(0, vocab, (protocol.eval_samples, protocol.eval_seqlen), generator=gen)
        return source, calibration, windows
    from prunebench.harness.data import calibration_batch, evaluation_windows, load_corpus
    from prunebench.harness.models import load_source_model

    loaded = load_source_model(model_name)
    max_pos = loaded.model.config.max_position_embeddings
    calibration = calibration_batch(loaded.tokenizer, load_corpus("wiki-offline"), protocol.calibration_samples,
                                    protocol.calibration_seqlen, protocol.seed, max_pos)
    windows = evaluation_windows(loaded.tokenizer, load_corpus("wiki-offline"), protocol.eval_samples,
                                 protocol.eval_seqlen, max_pos)
    return loaded.model, calibration, windows


def run_case(model_name: str, method: str, sparsity: float = SPARSITY, protocol: Protocol = Protocol(),
             host: PluginHost | None = None) -> dict[str, float]:
    """Prune and measure one case: dense and pruned perplexity, achieved sparsity."""
    host = host or PluginHost()
    recipe = host.resolve(method)
    source, calibration, windows = _data(model_name, protocol)
    model = to_pruned(source).eval()
    dense_ppl = perplexity(model, windows, batch_size=4, progress=False).ppl
    dense_counts = param_report(model, model)["dense"]
    torch.manual_seed(protocol.seed)
    run = RunContext(model=model, calibration=calibration, batch_size=4, device=torch.device("cpu"),
                     seed=protocol.seed, target=sparsity, use_cache=False)
    prune(run, recipe, host, show_progress=False)
    report = param_report(dense_counts, run.model)
    return {"dense_ppl": dense_ppl, "ppl": perplexity(run.model, windows, batch_size=4, progress=False).ppl,
            "achieved": report["achieved_sparsity"]}


def case_key(model_name: str, method: str, sparsity: float) -> str:
    return f"{model_name}/{method}/s{sparsity:.2f}"


def methods(host: PluginHost) -> list[str]:
    """Every method compared head to head (ablation rows are not regression cases)."""
    return sorted(name for name, r in host.recipes.items() if r.role == "method")


def load_expected(path: Path = EXPECTED_PATH) -> dict[str, Any]:
    return json.loads(path.read_text())


def check(measured: float, expected: float, tolerance: float = TOLERANCE) -> str | None:
    """None when ``measured`` is within ``tolerance`` of ``expected``; otherwise why not."""
    change = measured / expected - 1.0
    if abs(change) <= tolerance:
        return None
    direction = "worse" if change > 0 else "better"
    return (f"perplexity {measured:.4f} vs expected {expected:.4f} ({100 * change:+.1f}%, {direction} than "
            f"the committed result, tolerance {100 * tolerance:.0f}%); if intended, rerun "
            f"`python scripts/regression.py --write` and commit results/regression/expected.json")
