"""Layer-offloaded pruning: the weights stay on disk, one decoder layer at a time is real.

For models larger than memory. The source checkpoint (safetensors, one file or sharded)
is never loaded whole: the dense source model and the harness-format model are built on
the meta device (accelerate's ``init_empty_weights``), the embeddings, final norm and
lm_head are materialised, and each decoder layer is read from the checkpoint
(memory-mapped, the map open only while reading), converted to the harness format,
compressed by the recipe's components, written to its own safetensors shard and put back
on the meta device before the next one is read. The output directory is a sharded
checkpoint with an index, so ``AutoModelForCausalLM.from_pretrained`` (also with
``device_map="auto"``) loads it like any other.

What needs memory at once (measured by ``scripts/bench_offload.py``): the embeddings
and lm_head in the compute dtype, one layer in the source and in the harness format (and
the components' float64 statistics of that layer), and the calibration activations of
one layer's input and output ([N, L, hidden] each). Streamed importance (mask gradients)
also keeps every layer's input activations for its backward pass:
layers x N x L x hidden in the compute dtype.

Whole-model components (a model-level transform such as SliceGPT's rotation, an
importance pass that runs the full model) cannot run here unless they read layers
through ``run.residency``; ``check_offload`` names the ones that do not.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from prunebench.harness.adapters import fill_layer, fill_outer, pruned_config_for
from prunebench.harness.context import LayerResidency
from prunebench.harness.contracts import Recipe
from prunebench.harness.errors import UsageError
from prunebench.harness.manager import PluginHost
from prunebench.harness.pruned_model import PrunedDecoderLayer, PrunedForCausalLM
from prunebench.harness.results import write_result
from prunebench.harness.session import RunInputs

INDEX_FILE = "model.safetensors.index.json"
OUTER_SHARD = "model-outer.safetensors"
SPILL_TOLERANCE = 1e-2
"""Largest relative error a spilled activation may carry (bfloat16 rounds at <= 2^-9 per
element, float16 at <= 2^-12: both are far below it unless values are out of range)."""
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")


class Checkpoint:
    """The tensors of a safetensors checkpoint, read by name prefix.

    Each read opens the shard's memory map and closes it afterwards, so the pages of
    layers not being worked on are never mapped into this process (and never counted in
    its resident memory).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / "model.safetensors"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            self.files = {name: self.directory / file for name, file in weight_map.items()}
        elif single.exists():
            with safe_open(str(single), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise UsageError(f"{self.directory} has no safetensors weights ({INDEX_FILE} or model.safetensors)")

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.files if n.startswith(prefix))

    def read(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) pairs, one tensor at a time, each a copy in the stored dtype."""
        by_file: dict[Path, list[str]] = defaultdict(list)
        for name in names:
            by_file[self.files[name]].append(name)
        for file, group in by_file.items():
            with safe_open(str(file), framework="pt") as f:
                for name in group:
                    yield name, f.get_tensor(name).clone()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc keeps them otherwise).

    Layers of a few hundred MB are allocated and freed once per layer; without a trim the
    heap's high-water mark, not the live data, sets the resident size.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class StoredDtypeEmbedding(nn.Embedding):
    """An embedding table kept in a narrower dtype than the layers compute in; its output
    is cast to the compute dtype (a lookup, so nothing is lost beyond the stored values)."""

    def __init__(self, num: int, dim: int, compute_dtype: torch.dtype = torch.float32) -> None:
        super().__init__(num, dim)
        self.compute_dtype = compute_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


class StoredDtypeLinear(nn.Linear):
    """A bias-free linear map (the lm_head) stored narrow and applied in the input's dtype:
    the weight is widened per call, so the logits are exactly those of the wide model."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def _empty_layer(model: PrunedForCausalLM, index: int, dtype: torch.dtype, device: torch.device) -> PrunedDecoderLayer:
    """A layer of the current spec with uninitialised parameters (filled right after; no
    time is spent on a random init). Buffers are built normally: ``head_to_kv`` follows
    from the spec."""
    with init_empty_weights(include_buffers=False):
        layer = PrunedDecoderLayer(model.config, model.config.layers[index], index)
    for name, param in list(layer.named_parameters()):
        set_module_tensor_to_device(layer, name, device, value=torch.empty(param.shape, dtype=dtype), dtype=dtype)
    return layer.to(device)


class DiskLayers(LayerResidency):
    """Layers read from the source checkpoint on first use, from their own compressed
    shard once written; only the acquired layer is real, all others are on ``meta``."""

    offloaded = True

    def __init__(
        self,
        source_dir: str | os.PathLike[str],
        out_dir: str | os.PathLike[str],
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        spill_dtype: torch.dtype | None = None,
    ) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM

        self.source_dir = Path(source_dir)
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and any(self.out_dir.iterdir()):
            raise UsageError(f"output directory {self.out_dir} exists and is not empty; choose a new one")
        self.staging = self.out_dir.with_name(self.out_dir.name + ".partial")
        shutil.rmtree(self.staging, ignore_errors=True)
        self.staging.mkdir(parents=True)
        self.dtype, self.device = dtype, torch.device(device)
        self.checkpoint = Checkpoint(self.source_dir)
        config = AutoConfig.from_pretrained(self.source_dir)
        with init_empty_weights():
            self.source = AutoModelForCausalLM.from_config(config)
        with init_empty_weights():
            self.model = PrunedForCausalLM(pruned_config_for(self.source))
        self.written: dict[int, Path] = {}
        self.reads = 0
        self.spill_dtype = spill_dtype
        self.spill_max_relative_error = 0.0
        self.spilled_bytes = 0
        self._load_outer()

    def _set_source(self, names: list[str]) -> None:
        # Kept in the stored dtype (e.g. bfloat16): the copy into the harness-format layer
        # converts, so no float32 copy of the source layer is ever made.
        for name, tensor in self.checkpoint.read(names):
            set_module_tensor_to_device(self.source, name, "cpu", value=tensor, dtype=tensor.dtype)

    def _load_outer(self) -> None:
        outer = [n for n in self.checkpoint.files if not n.startswith("model.layers.")]
        self._set_source(outer)
        tied = self.model.config.tie_word_embeddings
        stored = self.source.model.embed_tokens.weight.dtype
        if stored.is_floating_point and stored.itemsize < torch.empty((), dtype=self.dtype).element_size():
            # The embeddings and lm_head are the largest tensors held for the whole run;
            # keeping them in the checkpoint's own 16-bit dtype loses nothing (those are
            # the stored values) and halves them. They compute in the compute dtype.
            with init_empty_weights():
                self.model.model.embed_tokens = StoredDtypeEmbedding(*self.model.model.embed_tokens.weight.shape,
                                                                     compute_dtype=self.dtype)
                self.model.lm_head = StoredDtypeLinear(self.model.lm_head.in_features, self.model.lm_head.out_features)
        for name, param in self.model.named_parameters():
            if name.startswith("model.layers.") or (tied and name == "lm_head.weight"):
                continue
            keep = stored if name in ("model.embed_tokens.weight", "lm_head.weight") and isinstance(
                self.model.model.embed_tokens, StoredDtypeEmbedding) else self.dtype
            set_module_tensor_to_device(self.model, name, self.device, value=torch.empty(param.shape, dtype=keep),
                                        dtype=keep)
        self.model.model.inv_freq = self.model.model.inv_freq.to(self.device)
        fill_outer(self.model, self.source)
        if tied:
            self.model.tie_weights()
        for name in outer:
            set_module_tensor_to_device(self.source, name, "meta")
        release_freed_memory()
        self.model.eval()

    def acquire(self, model: PrunedForCausalLM, index: int) -> nn.Module:
        layer = _empty_layer(model, index, self.dtype, self.device)
        if index in self.written:
            prefix = f"model.layers.{index}."
            with safe_open(str(self.written[index]), framework="pt") as f:
                state = {k[len(prefix):]: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
            layer.load_state_dict(state, strict=True)
        else:
            self._set_source(self.checkpoint.names(f"model.layers.{index}."))
            fill_layer(layer, self.source.model.layers[index], self.source)
            self.source.model.layers[index].to("meta")
            release_freed_memory()
        self.reads += 1
        model.model.layers[index] = layer.eval()
        return layer

    def release(self, model: PrunedForCausalLM, index: int, changed: bool = False) -> None:
        layer = model.model.layers[index]
        if changed:
            path = self.staging / f"model-layer-{index:05d}.safetensors"
            state = {f"model.layers.{index}.{k}": v.detach().contiguous() for k, v in layer.state_dict().items()}
            save_file(state, str(path), metadata={"format": "pt"})
            self.written[index] = path
        model.model.layers[index] = layer.to("meta")
        del layer
        release_freed_memory()

    def stash(self, key: str, tensors: list[torch.Tensor]) -> Any:
        """In memory, or with ``spill_dtype`` written to disk in that dtype.

        Precision check: the relative error ||x - round(x)|| / ||x|| of every stashed
        tensor is measured (the largest is reported as ``spill_max_relative_error``); a
        value that does not fit the dtype (float16 overflows past 65504) or an error above
        ``SPILL_TOLERANCE`` stops the run instead of silently changing the results.
        """
        if self.spill_dtype is None:
            return tensors
        folder = self.staging / "activations"
        folder.mkdir(exist_ok=True)
        stored = {}
        for i, t in enumerate(tensors):
            low = t.detach().to(self.spill_dtype)
            if not torch.isfinite(low).all():
                raise FloatingPointError(f"activations {key} do not fit {self.spill_dtype} (overflow); spill in bfloat16")
            error = float((t - low.to(t.dtype)).norm() / t.norm().clamp_min(torch.finfo(t.dtype).tiny))
            if error > SPILL_TOLERANCE:
                raise FloatingPointError(f"spilling {key} as {self.spill_dtype} loses {error:.2e} (> {SPILL_TOLERANCE})")
            self.spill_max_relative_error = max(self.spill_max_relative_error, error)
            stored[str(i)] = low.contiguous()
        path = folder / f"{key}.safetensors"
        save_file(stored, str(path))
        self.spilled_bytes += path.stat().st_size
        return path

    def unstash(self, handle: Any) -> list[torch.Tensor]:
        if not isinstance(handle, Path):
            return handle
        with safe_open(str(handle), framework="pt") as f:
            out = [f.get_tensor(str(i)).to(self.dtype) for i in range(len(f.keys()))]
        handle.unlink()
        return out

    def finish(self, model: PrunedForCausalLM, copy_tokenizer: bool = True) -> Path:
        """Write the outer weights, the index and the config, then move the checkpoint into
        place in one rename (a crash leaves only ``<out>.partial`` behind)."""
        missing = [i for i in range(len(model.model.layers)) if i not in self.written]
        if missing:
            raise RuntimeError(f"layers {missing[:5]} were never written; the checkpoint would be incomplete")
        tied = model.config.tie_word_embeddings
        outer = {
            k: v.detach().contiguous()
            for k, v in model.state_dict().items()
            if not k.startswith("model.layers.") and not (tied and k == "lm_head.weight")
        }
        save_file(outer, str(self.staging / OUTER_SHARD), metadata={"format": "pt"})
        weight_map = dict.fromkeys(outer, OUTER_SHARD)
        total = sum(v.numel() * v.element_size() for v in outer.values())
        for path in self.written.values():
            with safe_open(str(path), framework="pt") as f:
                for k in f.keys():  # noqa: SIM118
                    weight_map[k] = path.name
            total += path.stat().st_size
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.staging / INDEX_FILE).write_text(json.dumps(index, indent=1))
        model.config.torch_dtype = self.dtype
        model.config.save_pretrained(self.staging)
        if copy_tokenizer:
            for name in TOKENIZER_FILES:
                if (self.source_dir / name).exists():
                    shutil.copy2(self.source_dir / name, self.staging / name)
        shutil.rmtree(self.staging / "activations", ignore_errors=True)
        if self.out_dir.exists():
            self.out_dir.rmdir()  # checked empty at start
        os.replace(self.staging, self.out_dir)
        return self.out_dir


def check_offload(recipe: Recipe, host: PluginHost) -> None:
    """Refuse recipes with components that need the whole model in memory, naming them."""
    blocking = [
        f"{kind}={ref.name}"
        for kind, ref in recipe.components.items()
        if not host.component(kind, ref.name).supports_offload
    ]
    if blocking:
        raise UsageError(
            f"method {recipe.name!r} cannot be pruned layer by layer: {', '.join(blocking)} "
            "need(s) the whole model in memory (swap them with --set, or prune in memory)"
        )


def offload_inputs(source_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], calibration: torch.Tensor,
                   windows: dict[str, torch.Tensor], *, dtype: torch.dtype = torch.float32, seed: int = 0,
                   spill_dtype: torch.dtype | None = None, tokenizer: Any = None,
                   data_fingerprints: dict[str, str] | None = None) -> RunInputs:
    """``RunInputs`` for pruning the checkpoint at ``source_dir`` into ``out_dir`` layer by layer."""
    from prunebench.harness.models import _local_fingerprint as local_fingerprint

    store = DiskLayers(source_dir, out_dir, dtype=dtype, spill_dtype=spill_dtype)

    def save(model: PrunedForCausalLM, folder: str) -> Path:
        if Path(folder).resolve() != store.out_dir.resolve():
            raise UsageError(f"an offloaded run writes its checkpoint to {store.out_dir}, not {folder}")
        return store.finish(model)

    fingerprint = local_fingerprint(Path(source_dir))
    return RunInputs(
        dense=store.model, tokenizer=tokenizer, calibration=calibration, windows=windows, model_fingerprint=fingerprint,
        data_fingerprints=data_fingerprints or {}, residency=store, save=save, device=store.device,
        cache_parts={"model": fingerprint, "dtype": str(dtype), "calibration": tuple(calibration.shape), "seed": seed},
    )


def prune_offloaded(
    source_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    method: str,
    sparsity: float,
    calibration: torch.Tensor,
    *,
    eval_windows: torch.Tensor | None = None,
    eval_source: str = "wiki-offline",
    batch_size: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    overrides: tuple[str, ...] = (),
    host: PluginHost | None = None,
    show_progress: bool = True,
    spill_dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    results_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Prune a checkpoint on disk into ``out_dir`` without loading it whole, through the one
    run path (``harness.session.RunSession``, kind ``offload``).

    Returns the schema-2 result (``harness.results``) with the offload's own numbers under
    ``pruning.offload`` (layer reads, spilled activations) and the peak RSS per stage under
    ``memory.by_stage``; with ``eval_windows``, dense and pruned perplexity (streamed).
    """
    from prunebench.harness.session import RunSession
    from prunebench.harness.spec import RunSpec

    host = host or PluginHost()
    recipe = host.resolve(method, overrides)
    check_offload(recipe, host)
    windows = {} if eval_windows is None else {eval_source: eval_windows}
    spec = RunSpec(
        model=str(source_dir), method=method, sparsity=sparsity, overrides=list(overrides), profile="ci",
        profile_overrides={"calibration_samples": int(calibration.shape[0]), "calibration_seqlen": int(calibration.shape[1]),
                           "eval_sources": [eval_source],
                           "eval_samples": int(eval_windows.shape[0]) if eval_windows is not None else 1,
                           "eval_seqlen": int(eval_windows.shape[1]) if eval_windows is not None else 2,
                           "batch_size": batch_size},
        seed=seed, dtype=str(dtype).replace("torch.", ""), zeroshot=False, timing=False,
        metrics=["ppl", "kv-cache"] if windows else ["kv-cache"], save_dir=str(out_dir), use_cache=False,
    )
    made: list[RunInputs] = []

    def factory(spec: RunSpec, profile: Any, host: PluginHost) -> RunInputs:
        made.append(offload_inputs(source_dir, out_dir, calibration, windows, dtype=dtype, seed=seed,
                                   spill_dtype=spill_dtype, tokenizer=tokenizer))
        return made[0]

    session = RunSession(spec, host=host, show_progress=show_progress, inputs=factory, kind="offload")
    result = session.run(results_dir).to_dict()
    store = made[0].residency
    result["pruning"]["offload"] = {
        "layer_reads": store.reads,
        "spill": {"dtype": str(spill_dtype).replace("torch.", "") if spill_dtype else None,
                  "bytes": store.spilled_bytes, "max_relative_error": store.spill_max_relative_error},
    }
    result["spec"]["saved_to"] = str(Path(out_dir))
    if results_dir is not None:
        write_result(Path(result["path"]), result)
    return result
