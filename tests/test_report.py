"""Reports never mix protocols, show intervals and ranks that count only significant wins,
state a verdict for every pair, render the compact layout, cost and sweep tables, and
plot with error bars."""

from __future__ import annotations

import math

import pytest

from prunebench.harness.report import (
    Comparison,
    compact_markdown,
    cost_rows,
    group_by_protocol,
    markdown,
    plots,
    sweep_markdown,
    sweep_plot,
    sweep_rows,
)
from prunebench.harness.spec import RunSpec
from prunebench.harness.testing import fake_result

SEQ = 256  # the ci profile's perplexity window


def _windows(mean_ppl: float, noise: float, seed: int, n: int = 32) -> list[float]:
    """Per-window summed NLLs around log(mean_ppl), a fixed pattern per seed."""
    import random

    rng = random.Random(seed)
    return [(math.log(mean_ppl) + noise * rng.uniform(-1, 1)) * (SEQ - 1) for _ in range(n)]


def _result(method: str, sparsity: float, ppl: float, seed: int = 0, noise: float = 0.3, **kw):
    spec = RunSpec(method="wanda-sp", sparsity=sparsity, seed=seed, profile="ci", zeroshot=False, timing=False)
    r = fake_result(spec, ppl, window_nll={"wiki-offline": _windows(ppl, noise, seed)}, **kw)
    r["recipe"]["name"] = r["spec"]["method"] = method
    return r


def test_mixed_protocols_are_grouped_visibly_never_in_one_table():
    a = fake_result(RunSpec(method="wanda-sp", sparsity=0.2, profile="ci", zeroshot=False, timing=False), 30.0)
    b = fake_result(RunSpec(method="wanda-sp", sparsity=0.2, profile="offline", zeroshot=False, timing=False), 25.0)
    assert len(group_by_protocol([a, b])) == 2
    text = markdown([a, b])
    assert text.count("Protocol `") == 2 and "8x256" in text and "64x512" in text


def test_the_footer_names_zero_shot_only_when_it_was_measured():
    r = fake_result(RunSpec(method="wanda-sp", sparsity=0.2, profile="ci", zeroshot=False, timing=False), 30.0)
    assert "zero-shot" not in markdown([r]).split("\n")[0]


def test_a_clear_gap_is_a_verdict_and_a_rank_a_gap_inside_the_noise_is_neither():
    clear = [_result("good", 0.3, 30.0, s) for s in (0, 1, 2)] + [_result("bad", 0.3, 60.0, s) for s in (0, 1, 2)]
    comparison = Comparison(clear)
    verdict = next(v for v in comparison.verdicts if v.key == "ppl:wiki-offline")
    assert (verdict.a, verdict.b, verdict.verdict) in {("bad", "good", "worse"), ("good", "bad", "better")}
    assert verdict.seeds == 3 and verdict.low < verdict.high
    rank = comparison.ranks["ppl:wiki-offline"]
    assert rank[("good", 0.3)] == "1" and rank[("bad", 0.3)] == "2"

    close = [_result("x", 0.3, 30.0, s, noise=0.5) for s in (0, 1, 2)] + [_result("y", 0.3, 30.3, s + 10, noise=0.5)
                                                                         for s in (0, 1, 2)]
    for r, s in zip(close[3:], (0, 1, 2)):
        r["spec"]["seed"] = s
    comparison = Comparison(close)
    verdict = next(v for v in comparison.verdicts if v.key == "ppl:wiki-offline")
    assert verdict.verdict == "no significant difference"
    assert comparison.ranks["ppl:wiki-offline"][("x", 0.3)] == "=1" == comparison.ranks["ppl:wiki-offline"][("y", 0.3)]
    text = markdown(close)
    assert "**no significant difference**" in text and "=1" in text


def test_cells_show_the_mean_over_seeds_with_an_interval_and_the_seed_count():
    results = [_result("m", 0.3, ppl, s, noise=0.05) for s, ppl in zip((0, 1, 2), (29.0, 30.0, 31.0))]
    comparison = Comparison(results)
    stat = comparison.stats[("m", 0.3)]["ppl:wiki-offline"]
    assert stat.seeds == [0, 1, 2] and stat.spread == (29.0, 31.0)
    assert stat.low < stat.mean < stat.high and 29.0 < stat.mean < 31.0
    row = comparison.rows()[1]
    assert row[comparison.header().index("seeds")] == 3
    assert "[" in row[comparison.header().index("PPL wiki-offline")]


def test_one_seed_verdicts_say_they_cover_the_evaluation_text_only():
    comparison = Comparison([_result("a", 0.3, 30.0), _result("b", 0.3, 90.0)])
    assert "evaluation text only" in comparison.verdicts[0].note


def test_zero_shot_uses_standard_errors():
    a = _result("a", 0.3, 30.0, zeroshot=0.40)
    b = _result("b", 0.3, 30.0, zeroshot=0.41)
    for r in (a, b):
        r["spec"]["protocol"]["metrics"]["zeroshot"] = {}
    comparison = Comparison([a, b])
    verdict = next(v for v in comparison.verdicts if v.key == "zeroshot:average")
    assert verdict.verdict == "no significant difference" and "z-test" in verdict.test


def test_compact_layout_is_methods_by_sparsity():
    results = [_result(m, s, p) for m, s, p in (("a", 0.2, 30.0), ("a", 0.3, 40.0), ("b", 0.2, 20.0), ("b", 0.3, 50.0))]
    text = compact_markdown(results)
    lines = [line for line in text.splitlines() if line.startswith("|")]
    assert lines[0].split("|")[2].strip() == "20%" and lines[2].split("|")[1].strip() == "dense"
    assert {lines[3].split("|")[1].strip(), lines[4].split("|")[1].strip()} == {"a", "b"}


def test_plots_are_written_as_png(tmp_path):
    results = [_result(m, s, 30.0 + s) for m in ("a", "b") for s in (0.2, 0.3)]
    written = plots(results, tmp_path)
    assert len(written) == 2  # headline measures with error bars, pruning time (no timing measured)
    for p in written:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_table_ratios_to_the_reference_method():
    results = []
    for method, seconds in (("slicegpt", 40.0), ("wanda-sp", 10.0), ("intraslice", 100.0)):
        r = _result(method, 0.3, 30.0)
        r["timings"]["stages_s"] = {"prune": seconds, "prune.importance": 1.0, "prune.layer_loop": seconds - 1}
        r["memory"]["peak_rss_after_prune_mb"] = 2048.0
        results.append(r)
    header, body = cost_rows(results, reference="slicegpt")
    ratio = {row[0]: row[header.index("x slicegpt")] for row in body}
    assert ratio == {"slicegpt": 1.0, "wanda-sp": 0.25, "intraslice": 2.5}
    assert all(row[header.index("peak RSS GiB")] == 2.0 for row in body)
    header, body = cost_rows(results, reference="flap")  # no reference run: no ratios, still the times
    assert all(row[header.index("x flap")] is None for row in body)


def test_sweep_table_orders_by_the_swept_field_across_protocols(tmp_path):
    results = []
    for samples, ppl in ((32, 40.0), (16, 50.0), (64, 35.0)):
        spec = RunSpec(method="wanda-sp", sparsity=0.3, profile="ci", zeroshot=False, timing=False,
                       profile_overrides={"calibration_samples": samples})
        results.append(fake_result(spec, ppl))
    assert len({r["spec"]["protocol_id"] for r in results}) == 3  # one protocol per calibration size
    key = "spec.protocol.calibration.samples"
    header, body = sweep_rows(results, key)
    assert [row[header.index("samples")] for row in body] == [16, 32, 64]
    assert [row[header.index("PPL wiki-offline")] for row in body] == [50.0, 40.0, 35.0]
    no_field = fake_result(RunSpec(method="wanda-sp", sparsity=0.3, profile="ci", zeroshot=False, timing=False), 9.0)
    no_field["spec"]["protocol"]["calibration"].pop("samples")
    assert "1 result(s) without" in sweep_markdown([*results, no_field], key)
    with pytest.raises(KeyError, match="lambda_b"):
        sweep_rows(results, "recipe.components.allocation.params.lambda_b")
    assert sweep_plot(results, key, tmp_path / "plots" / "sweep.png").stat().st_size > 0


def _named(name: str, components: dict[str, str]) -> dict:
    return {"recipe": {"name": name, "components": {k: {"name": v, "params": {}} for k, v in components.items()}}}


def test_results_recorded_under_a_reused_name_are_reported_under_their_recipe_by_content():
    """Before 0.2, ``intraslice`` was the full paper method (now ``intraslice-paper-ablation-ipca``);
    the name now means the authors' default run. Old results land in the old recipe's rows."""
    from prunebench.harness.report import canonical_names

    old = {"importance": "mask-grad-pca", "allocation": "global", "attention": "intraslice-head-pca",
           "ffn": "intraslice-iterpca", "transform": "none"}
    new = {**old, "importance": "mask-grad", "ffn": "select-ls"}
    renamed = canonical_names([
        _named("intraslice", old),
        _named("intraslice", new),
        _named("intraslice[allocation=uniform]", {**old, "allocation": "uniform"}),
        _named("intraslice", {}),  # an offload benchmark file: no components recorded, older than the rename
        _named("sobp", {"allocation": "sobp-global"}),  # a plain alias
    ])
    assert [r["recipe"]["name"] for r in renamed] == [
        "intraslice-paper-ablation-ipca", "intraslice", "intraslice-paper-ablation-ipca[allocation=uniform]",
        "intraslice-paper-ablation-ipca", "sobp-exact",
    ]
