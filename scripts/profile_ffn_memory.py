"""Peak resident memory of IntraSlice's FFN component on one wide layer, per phase.

A diagnostic, not a benchmark: it wraps the component's internal steps with a label,
samples /proc/self/statm every 3 ms, and prints each phase's peak above the start. Built
for the issue-10 investigation (IntraSlice over its memory budget on a 1.55B model):

    python scripts/profile_ffn_memory.py      # hidden 2048, intermediate 5632, 8 x 128 tokens (~7 min, 1 thread)
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import plugins.intraslice_ffn as ffn
from harness.adapters import to_pruned
from harness.context import LayerContext, RunContext, embed
from harness.contracts import Allocation
from harness.manager import PluginHost

PHASES = ("reconstruction_map", "iterative_pca", "_try_recompute_q_r", "_try_slice", "fused_plan", "_prepare",
          "channel_scores")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class PhaseSampler:
    """Peak RSS per phase label, sampled by a daemon thread."""

    def __init__(self) -> None:
        self.phase, self.peaks = "init", {}
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0.0), rss_mb())
            time.sleep(0.003)

    def wrap(self, module: Any, name: str) -> None:
        inner: Callable = getattr(module, name)

        def labelled(*args: Any, **kwargs: Any) -> Any:
            outer, self.phase = self.phase, name
            try:
                return inner(*args, **kwargs)
            finally:
                self.phase = outer

        setattr(module, name, labelled)


def main() -> None:
    sampler = PhaseSampler()
    for name in PHASES:
        sampler.wrap(ffn, name)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=1000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=1,
                         num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=256)
    model = to_pruned(LlamaForCausalLM(config))
    ids = torch.randint(0, 1000, (8, 128))
    run = RunContext(model=model, calibration=ids, batch_size=4, device=torch.device("cpu"), seed=0, target=0.3,
                     use_cache=False)
    ctx = LayerContext(run, 0, embed(model, ids, 4, run.device), None, Allocation([0.3], [0.4], {}))
    component = PluginHost().component("ffn", "intraslice-iterpca")
    sampler.phase = "start"
    base = rss_mb()
    start = time.time()
    plan = component.compress_mlp(layer=ctx, ratio=0.4, params=dict(component.defaults))
    sampler.phase = "done"
    time.sleep(0.05)
    print(f"start {base:.0f} MB; {time.time() - start:.0f} s; {plan.summary}")
    for phase, peak in sampler.peaks.items():
        print(f"{phase:22s} peak {peak:7.0f} MB  (+{peak - base:6.0f})")


if __name__ == "__main__":
    main()
