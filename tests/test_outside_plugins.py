"""A metric and an architecture adapter registered from outside the package (an installed
distribution with a ``prunebench`` entry point, as a third party would ship them) show up
in ``prunebench list``, work in a run, and the metric appears in a report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from prunebench.harness.adapters import adapter_for
from prunebench.harness.manager import PluginHost, default_host
from prunebench.harness.report import markdown
from prunebench.harness.session import RunInputs, RunSession
from prunebench.harness.spec import RunSpec

OUTSIDE = textwrap.dedent(
    '''
    """A plugin package from outside prunebench: a metric and an adapter for a model family."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from prunebench.harness.adapters import ArchitectureAdapter, LayerWeights, read_projection
    from prunebench.harness.hookspecs import hookimpl
    from prunebench.harness.metrics import Measure, Metric

    READS = []  # layers this adapter read: proof that it, not the built-in Llama adapter, converted the model


    class OutsideConfig(LlamaConfig):
        model_type = "outside-llama"


    class OutsideForCausalLM(LlamaForCausalLM):
        config_class = OutsideConfig


    AutoConfig.register("outside-llama", OutsideConfig, exist_ok=True)
    AutoModelForCausalLM.register(OutsideConfig, OutsideForCausalLM, exist_ok=True)


    class OutsideAdapter(ArchitectureAdapter):
        """The outside family: Llama's layout under its own model class."""

        name = "outside-llama"
        model_classes = (OutsideForCausalLM,)

        def read_layer(self, layer, shape):
            READS.append(layer.self_attn.layer_idx)
            a, m = layer.self_attn, layer.mlp
            return LayerWeights(
                q=read_projection(a.q_proj), k=read_projection(a.k_proj), v=read_projection(a.v_proj),
                o=read_projection(a.o_proj), gate=read_projection(m.gate_proj), up=read_projection(m.up_proj),
                down=read_projection(m.down_proj), input_norm=layer.input_layernorm.weight.detach().clone(),
                post_attention_norm=layer.post_attention_layernorm.weight.detach().clone(),
            )


    class WeightNorm(Metric):
        """Frobenius norm of all decoder-layer weights."""

        name, keys, default = "weight-norm", ("weight_norm",), False

        def measure(self, ctx):
            total = sum(float(p.detach().double().pow(2).sum()) for p in ctx.model.model.layers.parameters())
            return {"weight_norm": total ** 0.5}

        def measures(self, block, result):
            value = block.get("weight_norm")
            return [] if value is None else [Measure("weight-norm", "weight norm", value)]


    @hookimpl
    def prunebench_metrics():
        return [WeightNorm()]


    @hookimpl
    def prunebench_adapters():
        return [OutsideAdapter()]
    '''
)


@pytest.fixture
def outside_dist(tmp_path, monkeypatch):
    """An installed-looking distribution on sys.path that declares a prunebench entry point."""
    (tmp_path / "outside_plugin.py").write_text(OUTSIDE)
    dist = tmp_path / "outside_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: outside-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[prunebench]\noutside = outside_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    default_host.cache_clear()  # the process-wide host is built once: rebuild it with the outside plugin
    yield tmp_path
    sys.modules.pop("outside_plugin", None)
    default_host.cache_clear()


def _outside_model(vocab: int = 96):
    import outside_plugin

    torch.manual_seed(0)
    config = outside_plugin.OutsideConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return outside_plugin, outside_plugin.OutsideForCausalLM(config).eval()


def test_the_outside_metric_and_adapter_register_and_work_in_a_run(outside_dist, tmp_path):
    host = PluginHost()
    assert "weight-norm" in host.metrics
    module, model = _outside_model()
    adapter = adapter_for(model, host)
    assert adapter.name == "outside-llama"  # the most specific adapter wins over the built-in Llama family's
    gen = torch.Generator().manual_seed(0)
    calibration, windows = torch.randint(0, 96, (4, 32), generator=gen), torch.randint(0, 96, (2, 32), generator=gen)
    spec = RunSpec(model="outside-tiny", method="wanda-sp", sparsity=0.3, profile="ci", metrics=["ppl", "weight-norm"],
                   zeroshot=False, timing=False, use_cache=False,
                   profile_overrides={"calibration_samples": 4, "calibration_seqlen": 32, "eval_sources": ["random"],
                                      "eval_samples": 2, "eval_seqlen": 32})
    module.READS.clear()
    result = RunSession(spec, host=host, show_progress=False,
                        inputs=lambda s, p, h: RunInputs.from_model(model, calibration, {"random": windows}, "outside", host=h)
                        ).run(tmp_path / "results").to_dict()
    assert module.READS == [0, 1]  # the outside adapter converted the model
    dense, pruned = result["metrics"]["dense"]["weight_norm"], result["metrics"]["pruned"]["weight_norm"]
    assert 0 < pruned < dense  # pruning removed weights
    assert "weight-norm" not in result["spec"]["protocol"]["metrics"]  # no settings: it does not split protocols
    assert "weight norm" in markdown([result])


def test_prunebench_list_shows_them(outside_dist):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(outside_dist), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "prunebench", "list"], env=env, capture_output=True, text=True, check=True,
                         timeout=300).stdout
    assert "weight-norm" in out and "Frobenius norm" in out
    assert "OutsideForCausalLM" in out


@pytest.mark.real
def test_a_cli_run_on_an_outside_checkpoint_reports_the_outside_metric(outside_dist, tmp_path, smollm2):
    """The whole CLI path: a local checkpoint of the outside model class, converted by the
    outside adapter, measured by the outside metric, rendered by report."""
    _, model = _outside_model(vocab=len(smollm2.tokenizer))
    checkpoint = tmp_path / "outside-checkpoint"
    model.save_pretrained(checkpoint)
    smollm2.tokenizer.save_pretrained(checkpoint)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(outside_dist), os.environ.get("PYTHONPATH", "")])}
    results = tmp_path / "results"
    run = [sys.executable, "-m", "prunebench", "run", "--model", str(checkpoint), "--method", "wanda-sp", "--sparsity", "0.3",
           "--profile", "ci", "--metrics", "ppl,weight-norm", "--no-zeroshot", "--no-timing", "--calibration-samples", "4",
           "--calibration-seqlen", "32", "--eval", "wiki-offline", "--eval-samples", "2", "--eval-seqlen", "32",
           "--results", str(results), "--quiet"]
    subprocess.run(run, env=env, capture_output=True, text=True, check=True, timeout=900)
    (path,) = results.glob("*.json")
    data = json.loads(path.read_text())
    assert data["metrics"]["pruned"]["weight_norm"] < data["metrics"]["dense"]["weight_norm"]
    report = subprocess.run([sys.executable, "-m", "prunebench", "report", str(results)], env=env, capture_output=True,
                            text=True, check=True, timeout=300).stdout
    assert "weight norm" in report
