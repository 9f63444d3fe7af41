"""Prune a random Llama model larger than half this machine's comfort zone, layer by layer.

Builds a random Llama-architecture checkpoint (default: 1.55B parameters, hidden 2048,
30 layers, GQA 16/4 heads, intermediate 5632, SmolLM2's 49,152-token vocabulary and
tokenizer) in bfloat16 safetensors shards, one tensor at a time, so building it never
holds the model in memory either. Then each method runs in its own process through
``prunebench offload`` (the same code path as a real checkpoint) and the child's peak
RSS (``ru_maxrss`` from ``wait4``) is compared with half of the model's float32 size.

    python scripts/bench_offload.py --methods wanda-sp,intraslice --sparsity 0.3 \\
        --json results/offload/bench.json

The random weights give perplexities near the vocabulary size; they show that the
pipeline runs end to end and that the pruned checkpoint loads, not model quality.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

SHAPE = {"hidden": 2048, "layers": 30, "heads": 16, "kv_heads": 4, "intermediate": 5632}


def build_random_llama(directory: Path, shape: dict[str, int], vocab_size: int, seed: int = 0) -> dict[str, int]:
    """Write a random Llama checkpoint (bfloat16 shards, one per layer, plus an index).

    Parameter names and shapes come from ``LlamaForCausalLM`` built on the meta device,
    so the checkpoint is exactly what ``save_pretrained`` of a real model would hold.
    """
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=2048, tie_word_embeddings=False, torch_dtype="bfloat16",
        bos_token_id=1, eos_token_id=2,
    )
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, param in skeleton.named_parameters():
        shard = f"model-layer-{int(name.split('.')[2]):05d}.safetensors" if name.startswith("model.layers.") else "model-outer.safetensors"
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            value = 0.02 * torch.randn(param.shape, generator=generator)
        shards.setdefault(shard, {})[name] = value.to(torch.bfloat16)
    weight_map, total = {}, 0
    for shard, tensors in shards.items():
        save_file(tensors, str(directory / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        total += sum(t.numel() * 2 for t in tensors.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    config.save_pretrained(directory)
    params = sum(p.numel() for p in skeleton.parameters())
    return {"parameters": params, "bf16_bytes": total, "fp32_bytes": params * 4}


def child_run(cmd: list[str]) -> tuple[int, float, float]:
    """Run ``cmd``; return (exit status, wall seconds, the child's peak RSS in MiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024.0


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="wanda-sp,intraslice")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--workdir", default="/tmp/prunebench-offload")
    parser.add_argument("--layers", type=int, default=SHAPE["layers"])
    parser.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    parser.add_argument("--intermediate", type=int, default=SHAPE["intermediate"])
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--calibration-seqlen", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--eval-seqlen", type=int, default=128)
    parser.add_argument("--keep", action="store_true", help="keep the pruned checkpoints")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()

    from prunebench.harness.models import load_source_model

    work = Path(args.workdir)
    source = work / "source"
    shape = dict(SHAPE, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate)
    tokenizer = load_source_model("smollm2-135m").tokenizer
    info_path = work / "source-info.json"
    if not info_path.exists() or json.loads(info_path.read_text()).get("shape") != shape:
        shutil.rmtree(source, ignore_errors=True)
        start = time.perf_counter()
        info = build_random_llama(source, shape, vocab_size=len(tokenizer))
        tokenizer.save_pretrained(source)
        info.update(shape=shape, build_seconds=time.perf_counter() - start)
        info_path.write_text(json.dumps(info))
    info = json.loads(info_path.read_text())
    budget_mb = info["fp32_bytes"] / 2 / 2**20
    print(f"model: {info['parameters'] / 1e9:.3f}B parameters, fp32 {info['fp32_bytes'] / 2**30:.2f} GiB, "
          f"bf16 on disk {info['bf16_bytes'] / 2**30:.2f} GiB; RSS budget (half of fp32) {budget_mb / 1024:.2f} GiB")
    rows = []
    for method in [m for m in args.methods.split(",") if m]:
        out = work / f"pruned-{method}"
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
        result_json = work / f"{method}.json"
        cmd = [sys.executable, "-m", "prunebench.harness.cli", "offload", "--model", str(source), "--method", method,
               "--sparsity", str(args.sparsity), "--out", str(out), "--json", str(result_json), "--quiet",
               "--calibration-samples", str(args.calibration_samples), "--calibration-seqlen", str(args.calibration_seqlen),
               "--eval-samples", str(args.eval_samples), "--eval-seqlen", str(args.eval_seqlen)]
        status, wall, peak = child_run(cmd)
        if status != 0:
            print(f"{method}: exit status {status}")
            rows.append({"method": method, "status": status})
            continue
        result = json.loads(result_json.read_text())  # a schema-2 result of kind "offload" (harness/results.py)
        ppl = {phase: (result["metrics"][phase].get("ppl") or {}).get("wiki-offline") for phase in ("dense", "pruned")}
        row = {
            "method": method, "status": 0, "wall_s": wall, "peak_rss_mb": peak, "budget_mb": budget_mb,
            "within_budget": peak < budget_mb, "peak_rss_by_stage_mb": result["memory"]["by_stage"],
            "seconds": result["timings"]["stages_s"], "sparsity": result["sparsity"],
            "metrics": {"dense_ppl": ppl["dense"], "pruned_ppl": ppl["pruned"]},
            "params": {"dense_decoder": result["params"]["dense"]["decoder"],
                       "pruned_decoder": result["params"]["pruned"]["decoder"]},
            "output_bytes_fp32": dir_bytes(out), "layer_reads": result["pruning"]["offload"]["layer_reads"],
            "cell": result["cell"],
        }
        rows.append(row)
        print(f"{method}: peak RSS {peak / 1024:.2f} GiB ({'within' if peak < budget_mb else 'OVER'} the "
              f"{budget_mb / 1024:.2f} GiB budget, {peak / budget_mb:.0%}), wall {wall:.0f} s, achieved sparsity "
              f"{result['sparsity']['achieved']:.3f}, ppl dense {result['metrics'].get('dense_ppl', float('nan')):.1f} "
              f"-> pruned {result['metrics'].get('pruned_ppl', float('nan')):.1f}")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    report = {"model": info, "settings": vars(args), "runs": rows, "threads": torch.get_num_threads()}
    if args.json:
        from prunebench.harness.cache import atomic_write_json

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(args.json, report)
    return 0 if all(r.get("status") == 0 and r.get("within_budget") for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
