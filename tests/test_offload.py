"""Layer-offloaded pruning gives the same model as pruning in memory, one layer at a time."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from prunebench.harness.adapters import to_pruned
from prunebench.harness.builtin_metrics import streamed_perplexity
from prunebench.harness.cli import main
from prunebench.harness.context import RunContext
from prunebench.harness.errors import UsageError
from prunebench.harness.offload import DiskLayers, check_offload, prune_offloaded
from prunebench.harness.perplexity import perplexity
from prunebench.harness.runner import prune
from prunebench.harness.testing import tiny_model
from prunebench.plugins.mask_grad import mask_importance, streamed_mask_importance


def _source(tmp_path, kind: str, layers: int = 3):
    model = tiny_model(kind, layers=layers)
    directory = tmp_path / f"{kind}-source"
    model.save_pretrained(directory, max_shard_size="40KB")  # several shards: exercises the index
    return model, directory


def _in_memory(source, method: str, calibration: torch.Tensor, host) -> torch.nn.Module:
    model = to_pruned(source)
    run = RunContext(model=model, calibration=calibration, batch_size=4, device=torch.device("cpu"), seed=0,
                     target=0.3, use_cache=False)
    torch.manual_seed(0)
    prune(run, host.resolve(method), host, show_progress=False)
    return run.model


@pytest.mark.parametrize(("kind", "method"), [("llama-gqa", "wanda-sp"), ("phi3", "intraslice"),
                                              ("llama-mha", "sobp-exact"), ("phi3-partial", "olica")])
def test_offloaded_equals_in_memory(tmp_path, host, calib_ids, kind, method):
    source, directory = _source(tmp_path, kind)
    assert len(list(directory.glob("*.safetensors"))) > 1
    expected = _in_memory(source, method, calib_ids, host)
    out = tmp_path / "pruned"
    result = prune_offloaded(directory, out, method, 0.3, calib_ids, show_progress=False, host=host)
    reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected(ids).logits)
    assert reloaded.config.layers == expected.config.layers
    assert result["sparsity"]["achieved"] == pytest.approx(0.3, abs=0.05)
    assert not out.with_name(out.name + ".partial").exists()


def test_only_one_layer_is_real_at_a_time(tmp_path, host, calib_ids):
    _, directory = _source(tmp_path, "llama-gqa", layers=4)
    real_counts = []

    class Spy(DiskLayers):
        def acquire(self, model, index):
            layer = super().acquire(model, index)
            real_counts.append(sum(not l.self_attn.q_proj.weight.is_meta for l in model.model.layers))
            return layer

    store = Spy(directory, tmp_path / "out")
    run = RunContext(model=store.model, calibration=calib_ids, batch_size=4, device=torch.device("cpu"), seed=0,
                     target=0.3, use_cache=False, residency=store)
    prune(run, host.resolve("intraslice"), host, show_progress=False)
    assert real_counts and max(real_counts) == 1
    assert len(real_counts) == 3 * 4  # importance forward + backward, then the layer loop


def test_streamed_mask_gradients_match_whole_model(tmp_path, calib_ids):
    source, directory = _source(tmp_path, "llama-gqa")
    model = to_pruned(source)
    run = RunContext(model=model, calibration=calib_ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3)
    expected = mask_importance(model, run.batches, pca=True, ffn_block=32)
    store = DiskLayers(directory, tmp_path / "out")
    streamed_run = RunContext(model=store.model, calibration=calib_ids, batch_size=4, device=torch.device("cpu"),
                              seed=0, target=0.3, residency=store)
    got = streamed_mask_importance(streamed_run, pca=True, ffn_block=32)
    for a, b in zip(expected.attention_channels + expected.mlp, got.attention_channels + got.mlp):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-12)
    assert got.meta["mean_loss"] == pytest.approx(expected.meta["mean_loss"], rel=1e-6)


def test_streamed_perplexity_matches(tmp_path):
    source, directory = _source(tmp_path, "phi3")
    windows = torch.randint(0, 96, (5, 24), generator=torch.Generator().manual_seed(1))
    store = DiskLayers(directory, tmp_path / "out")
    got = streamed_perplexity(store.model, store, windows, batch_size=2)
    want = perplexity(to_pruned(source), windows, batch_size=2, progress=False)
    assert got.ppl == pytest.approx(want.ppl, rel=1e-5)
    assert got.tokens == want.tokens


def test_whole_model_components_are_refused(host):
    with pytest.raises(UsageError, match="transform=slicegpt"):
        check_offload(host.resolve("slicegpt"), host)
    with pytest.raises(UsageError, match="importance=flap"):
        check_offload(host.resolve("flap"), host)
    check_offload(host.resolve("flap", ["importance=none"]), host)


def test_existing_output_refused_and_failure_leaves_no_checkpoint(tmp_path, host, calib_ids, monkeypatch):
    _, directory = _source(tmp_path, "llama-gqa")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        prune_offloaded(directory, taken, "wanda-sp", 0.3, calib_ids, show_progress=False, host=host)
    assert (taken / "x").read_text() == "keep me"

    def broken(self, model, index, changed=False):
        raise RuntimeError("disk full")

    monkeypatch.setattr(DiskLayers, "release", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        prune_offloaded(directory, out, "wanda-sp", 0.3, calib_ids, show_progress=False, host=host)
    assert not out.exists()


def test_cli_offload(tmp_path, capsys):
    from prunebench.harness.models import load_source_model

    source = tiny_model("llama-gqa", vocab_size=49152, layers=2)
    directory = tmp_path / "src"
    source.save_pretrained(directory)
    load_source_model("smollm2-135m").tokenizer.save_pretrained(directory)
    out, report, results = tmp_path / "out", tmp_path / "r.json", tmp_path / "results"
    code = main(["offload", "--model", str(directory), "--method", "wanda-sp", "--sparsity", "0.25", "--out", str(out),
                 "--calibration-samples", "4", "--calibration-seqlen", "32", "--eval-samples", "2", "--eval-seqlen", "32",
                 "--json", str(report), "--results", str(results), "--quiet"])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["schema"] == 2 and data["kind"] == "offload"
    assert data["metrics"]["pruned"]["ppl"]["wiki-offline"] > 1 and data["metrics"]["dense"]["ppl"]["wiki-offline"] > 1
    assert data["pruning"]["offload"]["layer_reads"] > 0
    assert (out / "tokenizer.json").exists() and (out / "config.json").exists()
    provenance = json.loads((out / "config.json").read_text())["provenance"]
    assert provenance["method"] == "wanda-sp" and provenance["target"] == 0.25 and provenance["cell"] == data["cell"]
    # One schema for every kind of run: report reads the offloaded result like any other.
    assert main(["report", str(results)]) == 0
    assert "wanda-sp" in capsys.readouterr().out
    assert main(["offload", "--model", str(tmp_path / "missing"), "--method", "wanda-sp", "--sparsity", "0.3",
                 "--out", str(tmp_path / "o2")]) == 2
    assert "local checkpoint directory" in capsys.readouterr().err


def test_eval_with_disk_offloaded_device_map(tmp_path, capsys):
    """A saved pruned model evaluated with most layers on disk gives the in-memory numbers."""
    from prunebench.harness.evaluate import load_dispatched, parse_max_memory
    from prunebench.harness.models import load_source_model

    model = to_pruned(tiny_model("llama-gqa", vocab_size=49152, layers=4))
    directory = tmp_path / "pruned"
    model.save_pretrained(directory)
    load_source_model("smollm2-135m").tokenizer.save_pretrained(directory)
    windows = torch.randint(0, 49152, (3, 24), generator=torch.Generator().manual_seed(2))
    want = perplexity(model, windows, progress=False).ppl
    dispatched = load_dispatched(directory, max_memory={"cpu": "7MB"}, offload_folder=tmp_path / "offload")
    assert "disk" in set(dispatched.hf_device_map.values())
    assert perplexity(dispatched, windows, progress=False, device="cpu").ppl == pytest.approx(want, rel=1e-6)
    assert parse_max_memory("0=70GiB,cpu=20GiB") == {0: "70GiB", "cpu": "20GiB"}
    with pytest.raises(UsageError, match="DEVICE=SIZE"):
        parse_max_memory("cpu")
    report = tmp_path / "eval.json"
    code = main(["eval", "--model", str(directory), "--max-memory", "cpu=7MB", "--offload-folder", str(tmp_path / "o2"),
                 "--eval-samples", "2", "--eval-seqlen", "32", "--tasks", "arc_easy", "--limit", "2", "--json", str(report),
                 "--quiet"])
    assert code == 0
    data = json.loads(report.read_text())
    assert data["ppl"]["wiki-offline"] > 1 and "disk" in data["device_map"].values()
    assert data["zeroshot"]["tasks"]["arc_easy"]["n"] == 2


@pytest.mark.parametrize("spill", [torch.bfloat16, torch.float16])
def test_spilled_activations_stay_close(tmp_path, calib_ids, spill):
    """Activations spilled to disk in 16 bits: the error is measured, bounded, and the
    scores stay close to the exact ones."""
    source, directory = _source(tmp_path, "llama-gqa")
    model = to_pruned(source)
    run = RunContext(model=model, calibration=calib_ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3)
    expected = mask_importance(model, run.batches, pca=False)
    store = DiskLayers(directory, tmp_path / "out", spill_dtype=spill)
    streamed = RunContext(model=store.model, calibration=calib_ids, batch_size=4, device=torch.device("cpu"), seed=0,
                          target=0.3, residency=store)
    got = streamed_mask_importance(streamed, pca=False)
    unit = 2.0 ** -(8 if spill == torch.bfloat16 else 11)
    assert store.spilled_bytes > 0 and 0 < store.spill_max_relative_error < unit
    assert not list((store.staging / "activations").glob("*"))  # each read once, then removed
    for a, b in zip(expected.mlp + expected.attention, got.mlp + got.attention):
        assert float((b - a).norm() / a.norm()) < 0.02  # normwise; single tiny scores move more


def test_spill_refuses_overflow(tmp_path):
    _, directory = _source(tmp_path, "llama-gqa")
    store = DiskLayers(directory, tmp_path / "out", spill_dtype=torch.float16)
    with pytest.raises(FloatingPointError, match="overflow"):
        store.stash("big", [torch.full((2, 3), 1e6)])


def test_16bit_checkpoint_keeps_outer_weights_narrow_and_exact(tmp_path, host, calib_ids):
    """A bfloat16 checkpoint: embeddings/lm_head stay bfloat16 (half the memory) and the
    pruned model equals in-memory pruning of the same checkpoint upcast to float32."""
    source = tiny_model("llama-gqa", layers=2).to(torch.bfloat16)
    directory = tmp_path / "bf16"
    source.save_pretrained(directory)
    store = DiskLayers(directory, tmp_path / "probe")
    assert store.model.lm_head.weight.dtype == torch.bfloat16
    assert store.model.model.embed_tokens(calib_ids[:1]).dtype == torch.float32
    expected = _in_memory(AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32), "wanda-sp", calib_ids, host)
    out = tmp_path / "pruned"
    prune_offloaded(directory, out, "wanda-sp", 0.3, calib_ids, show_progress=False, host=host)
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, expected(ids).logits)
