"""Peak resident memory per phase of an offloaded pruning run (``prune_offloaded``).

A diagnostic, not a benchmark. It writes a short random Llama checkpoint with the width of
the 1.55B offload benchmark (hidden 2048, intermediate 5632, 16/4 heads, 49,152-token
vocabulary; only ``--layers`` deep, so it runs in minutes) and prunes it in this process
while a daemon thread samples ``/proc/self/statm`` every few milliseconds. Each sample is
charged to the innermost labelled call on the main thread's stack (the label path, e.g.
``ffn > _try_recompute_q_r``), so the output says which step of which component sets the
process's peak and by how much it rises above the RSS the layer loop started from.

    python scripts/profile_offload_memory.py --method intraslice --layers 3
"""

from __future__ import annotations

import argparse
import functools
import gc
import importlib
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_offload import SHAPE, build_random_llama

PAGE = os.sysconf("SC_PAGE_SIZE")

#: (module, attribute path) of the calls that get a label; missing ones are skipped, so the
#: list can name the steps of several methods.
LABELLED = (
    ("prunebench.harness.manager", "PluginHost.call"),
    ("prunebench.harness.offload", "DiskLayers.acquire"),
    ("prunebench.harness.offload", "DiskLayers.release"),
    ("prunebench.harness.context", "LayerContext.outputs"),
    ("prunebench.harness.context", "LayerContext.trial_layer"),
    ("prunebench.harness.context", "LayerContext.collect"),
    ("prunebench.harness.context", "LayerContext.capture"),
    ("prunebench.harness.surgery", "apply_attention_plan"),
    ("prunebench.harness.surgery", "apply_mlp_plan"),
    ("prunebench.harness.runner", "apply_attention_plan"),
    ("prunebench.harness.runner", "apply_mlp_plan"),
    ("prunebench.plugins.mask_grad", "streamed_mask_importance"),
    ("prunebench.plugins.intraslice_attention", "plan_head_pca"),
    ("prunebench.plugins.intraslice_attention", "joint_o_in"),
    ("prunebench.plugins.intraslice_attention", "group_bases"),
    ("prunebench.plugins.intraslice_ffn", "reconstruction_map"),
    ("prunebench.plugins.intraslice_ffn", "iterative_pca"),
    ("prunebench.plugins.intraslice_ffn", "_try_recompute_q_r"),
    ("prunebench.plugins.intraslice_ffn", "_try_slice"),
    ("prunebench.plugins.intraslice_ffn", "fused_plan"),
    ("prunebench.plugins.intraslice_ffn", "_prepare"),
    ("prunebench.plugins.intraslice_ffn", "channel_scores"),
)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


class PhaseSampler:
    """Peak RSS per label path, sampled by a daemon thread."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.stack: list[str] = ["start"]
        self.peaks: dict[str, float] = {}
        #: one row per stretch between two label changes: [label path, RSS at entry, peak in it]
        self.segments: list[list[Any]] = [["start", rss_mb(), 0.0]]
        self.interval_s = interval_s
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            key = " > ".join(self.stack)
            now = rss_mb()
            self.peaks[key] = max(self.peaks.get(key, 0.0), now)
            segment = self.segments[-1]
            segment[2] = max(segment[2], now)
            time.sleep(self.interval_s)

    def _changed(self) -> None:
        now = rss_mb()
        self.segments[-1][2] = max(self.segments[-1][2], now)
        self.segments.append([" > ".join(self.stack), now, now])

    def label(self, owner: Any, name: str, label: str) -> None:
        inner: Callable = getattr(owner, name)
        sampler = self

        @functools.wraps(inner)
        def labelled(*args: Any, **kwargs: Any) -> Any:
            tag = label
            if label.endswith("PluginHost.call") and len(args) > 1:
                tag = f"{args[1]}:{getattr(args[2], 'name', args[2])}"
            sampler.stack.append(tag)
            sampler._changed()
            try:
                return inner(*args, **kwargs)
            finally:
                sampler.stack.pop()
                sampler._changed()

        setattr(owner, name, labelled)

    def install(self) -> list[str]:
        installed = []
        for module_name, path in LABELLED:
            module = importlib.import_module(module_name)
            *owners, name = path.split(".")
            owner: Any = module
            for part in owners:
                owner = getattr(owner, part, None)
            if owner is None or not hasattr(owner, name):
                continue
            self.label(owner, name, path)
            installed.append(f"{module_name}.{path}")
        return installed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="intraslice")
    parser.add_argument("--sparsity", type=float, default=0.3)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/prunebench-profile")
    parser.add_argument("--calibration-samples", type=int, default=8)
    parser.add_argument("--calibration-seqlen", type=int, default=128)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--top", type=int, default=25, help="label paths to print, highest peak first")
    parser.add_argument("--trace", help="write every stretch (label path, RSS at entry, peak) here as TSV")
    args = parser.parse_args()

    from prunebench.harness.data import calibration_batch, load_corpus
    from prunebench.harness.models import load_source_model
    from prunebench.harness.offload import prune_offloaded, release_freed_memory

    work = Path(args.workdir)
    source = work / f"source-{args.layers}"
    tokenizer = load_source_model("smollm2-135m").tokenizer
    if not (source / "config.json").exists():
        build_random_llama(source, dict(SHAPE, layers=args.layers), vocab_size=len(tokenizer))
        tokenizer.save_pretrained(source)
    calibration = calibration_batch(tokenizer, load_corpus("wiki-offline"), args.calibration_samples,
                                    args.calibration_seqlen, 0, 2048)
    gc.collect()
    release_freed_memory()
    sampler = PhaseSampler()
    installed = sampler.install()
    print(f"labelled {len(installed)} calls; RSS before pruning {rss_mb():.0f} MB")
    out = work / f"pruned-{args.method}"
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    base = rss_mb()
    start = time.perf_counter()
    result = prune_offloaded(source, out, args.method, args.sparsity, calibration, show_progress=False,
                             overrides=tuple(args.overrides))
    sampler.stack = ["done"]
    time.sleep(0.02)
    print(f"pruned in {time.perf_counter() - start:.0f} s, achieved {result['sparsity']['achieved']:.3f}; "
          f"start {base:.0f} MB, peak {max(sampler.peaks.values()):.0f} MB")
    ranked = sorted(sampler.peaks.items(), key=lambda kv: -kv[1])[: args.top]
    for key, peak in ranked:
        print(f"{peak:7.0f} MB  (+{peak - base:6.0f})  {key}")
    if args.trace:
        with open(args.trace, "w") as f:
            f.write("path\tentry_mb\tpeak_mb\n")
            f.writelines(f"{path}\t{entry:.0f}\t{peak:.0f}\n" for path, entry, peak in sampler.segments)


if __name__ == "__main__":
    main()
