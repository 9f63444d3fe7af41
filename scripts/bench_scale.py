"""Benchmark: how pruning time and peak memory grow with model width and depth.

Random Llama-architecture models of growing size (seeded; grouped-query attention with 4
query heads per KV head, head_dim 64, intermediate = 8/3 hidden rounded to 64) go
through the same code path as real models (adapter -> runner -> plugins), each in a
fresh process so ``ru_maxrss`` is its own. Calibration is random token ids (N x L).
Prints one line per (model, method) and a JSON summary with ``--json``; the projection
to 7B/70B in results/README.md is computed from these numbers by ``project``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Self

GIB = 1024**3


class RssSampler:
    """Peak resident memory while a block runs, sampled from /proc every few milliseconds
    (``ru_maxrss`` would include the model-building peak before pruning starts)."""

    def __init__(self, interval: float = 0.005) -> None:
        import os
        import threading

        self._page = os.sysconf("SC_PAGE_SIZE")
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self._page

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self.start = self.current()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.current())


@dataclass(frozen=True)
class Size:
    hidden: int
    layers: int

    @property
    def heads(self) -> int:
        return self.hidden // 64

    @property
    def kv_heads(self) -> int:
        return max(1, self.heads // 4)

    @property
    def intermediate(self) -> int:
        return round(self.hidden * 8 / 3 / 64) * 64


SIZES = (Size(256, 4), Size(512, 4), Size(1024, 4), Size(2048, 2), Size(512, 2), Size(512, 8))


def measure(size: Size, method: str, samples: int, seqlen: int, vocab: int = 8192) -> dict:
    """Prune a random Llama of ``size`` through the one run path (``RunSession``, no evaluation)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from prunebench.harness.session import RunInputs, RunSession
    from prunebench.harness.spec import RunSpec

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.kv_heads, max_position_embeddings=max(2048, seqlen),
                         tie_word_embeddings=False)
    ids = torch.randint(0, vocab, (samples, seqlen), generator=torch.Generator().manual_seed(0))
    spec = RunSpec(model=f"random-llama-{size.hidden}x{size.layers}", method=method, sparsity=0.3, profile="ci",
                   profile_overrides={"calibration_samples": samples, "calibration_seqlen": seqlen}, metrics=[],
                   zeroshot=False, timing=False, use_cache=False)

    def inputs(spec, profile, host):
        source = LlamaForCausalLM(config).eval()
        made = RunInputs.from_model(source, ids, {}, f"random:{asdict(size)}", host=host)
        made.source_model = None  # only the converted copy is kept
        return made

    session = RunSession(spec, show_progress=False, inputs=inputs)
    start = time.perf_counter()
    with RssSampler() as rss:
        result = session.run().to_dict()
    seconds = time.perf_counter() - start
    model_bytes = sum(p.numel() * p.element_size() for p in session.model.parameters())
    dense_decoder = result["params"]["dense"]["decoder"]
    return {
        "size": asdict(size), "method": method, "decoder_params": dense_decoder,
        "params_per_layer": dense_decoder // size.layers, "calibration": [samples, seqlen],
        "prune_s": seconds, "stages_s": result["timings"]["stages_s"],
        "peak_rss_gib": rss.peak / GIB, "rss_before_prune_gib": rss.start / GIB,
        "added_by_pruning_gib": max(rss.peak - rss.start, 0) / GIB, "pruned_model_gib": model_bytes / GIB,
        "process_max_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB,
        "achieved": result["sparsity"]["achieved"],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="wanda-sp,intraslice")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=256)
    parser.add_argument("--sizes", help="comma-separated HIDDENxLAYERS (default: the built-in ladder)")
    parser.add_argument("--json", help="write all measurements to this file")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        hidden, layers, method = args.one.split(":")
        print(json.dumps(measure(Size(int(hidden), int(layers)), method, args.samples, args.seqlen)))
        return 0
    sizes = SIZES
    if args.sizes:
        sizes = tuple(Size(*(int(x) for x in item.split("x"))) for item in args.sizes.split(","))
    rows = []
    for size in sizes:
        for method in args.methods.split(","):
            out = subprocess.run([sys.executable, __file__, "--one", f"{size.hidden}:{size.layers}:{method}",
                                  "--samples", str(args.samples), "--seqlen", str(args.seqlen)],
                                 capture_output=True, text=True, check=False)
            if out.returncode != 0:
                print(out.stderr[-2000:])
                return out.returncode
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(r)
            loop = r["stages_s"].get("layer_loop", 0.0)
            print(f"hidden {size.hidden:5d} layers {size.layers:2d} ({r['decoder_params'] / 1e6:6.1f}M decoder params) "
                  f"{method:>11}: prune {r['prune_s']:6.1f} s (layer loop {loop:6.1f} s, importance "
                  f"{r['stages_s'].get('importance', 0.0):5.1f} s), peak RSS {r['peak_rss_gib']:.2f} GiB, added by "
                  f"pruning {r['added_by_pruning_gib']:.2f} GiB, achieved {r['achieved']:.3f}", flush=True)
    if args.json:
        from prunebench.harness.cache import atomic_write_json

        atomic_write_json(args.json, {"command": " ".join(sys.argv), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
