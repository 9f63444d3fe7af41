"""IntraSlice as recipes: the method as its authors' code runs it, the same with the
project's improvements, and the cumulative ablation of the paper's Table 4.

``intraslice`` (the method) follows the reference code (github Asker0Lee/IntraSlice,
``run-prune.sh``: ``--global_bias 1.0``, no ``--iterpca``, ``--global_layer_rate global``)
option by option; where the code and the paper disagree, the recipe follows the code:

* importance ``mask-grad`` with ``grad_group=8, head_score="summed"``: the default run
  scores the global ratios with plain mask gradients, summed over groups of 8 sequences
  and over a head's channels before squaring; the paper's PCA-aware scores (Eq. 11) are
  a non-default branch of the code (``global_pca``);
* allocation ``global`` with ``selection="reference"``, ``lambda_b=1``, ``cap=0.8``: whole
  heads and neurons ranked by raw score, counts turned into per-layer ratios, the cap's
  excess re-spread;
* attention ``intraslice-head-pca`` with ``split="shared"`` (one common dim for q/k and
  v/o), ``pre_delete=True``, ``spectra="head"``, ``qk_floor=0.75`` and the map back with
  ``lsq_prior="zero"``, ``lsq_ridge_mean="all"`` (the code's ridge, 1% of the mean
  diagonal over all o_proj input dims);
* ffn ``select-ls`` with ``ridge="fixed"`` (1% of mean diag H) and ``score="damped"``: the
  default run has no iterative PCA (the paper's Algorithm 3 is behind ``--iterpca``,
  which crashes on Llama as committed).

What remains different from the code is listed in each component's module docstring
(e.g. the q/k pair score, whole-model parameter accounting, real slicing instead of
zeroed weights).

``intraslice+``: ``intraslice`` with the improvements the project judges clearly better:
``spectra="kv-group"`` (Eq. 3's spectra in the basis the plan really uses under GQA) and
the FFN's data-scaled ridge (``ridge="adaptive"``, measured in ``plugins/intraslice_ffn.py``:
at a few thousand calibration tokens the 1% ridge overfits Eq. 8). Its defaults are
provisional: they are to be set by measurement, recorded in results/README.md.

The ablation rows (``role="ablation"``) are the paper's Table 4, each the previous row
with one component swapped, all at the components' project defaults:

| row      | recipe                         | importance    | allocation | attention           | ffn                |
| -------- | ------------------------------ | ------------- | ---------- | ------------------- | ------------------ |
| Naive    | intraslice-naive               | mask-grad     | global     | head-prune          | select-ls          |
| +Ada-H   | intraslice-ada-h               | mask-grad     | global     | intraslice-head-pca | select-ls          |
| +Pca-A   | intraslice-pca-a               | mask-grad-pca | global     | intraslice-head-pca | select-ls          |
| +IPca    | intraslice-paper-ablation-ipca | mask-grad-pca | global     | intraslice-head-pca | intraslice-iterpca |

The last row is the full paper method (PCA-aware scores and iterative PCA); it is what
``intraslice`` was before the recipe followed the reference code (the same components
and parameters, so earlier results of ``intraslice`` are this row's). ``intraslice``
declares these rows, so ``prunebench ablate --method intraslice`` runs them; its extra
"uniform ratios" row runs ``intraslice`` itself with ``--set allocation=uniform``, not the
last row. The same components with uniform ratios are ``--set allocation=uniform`` on any
row (``importance`` is then unused).
"""

from __future__ import annotations

from typing import Any

from prunebench.harness.contracts import ComponentRef, Recipe
from prunebench.harness.hookspecs import hookimpl

ABLATION: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("intraslice-naive", "Naive",
     {"importance": "mask-grad", "allocation": "global", "attention": "head-prune", "ffn": "select-ls"}),
    ("intraslice-ada-h", "+Ada-H",
     {"importance": "mask-grad", "allocation": "global", "attention": "intraslice-head-pca", "ffn": "select-ls"}),
    ("intraslice-pca-a", "+Pca-A",
     {"importance": "mask-grad-pca", "allocation": "global", "attention": "intraslice-head-pca", "ffn": "select-ls"}),
    ("intraslice-paper-ablation-ipca", "+IPca",
     {"importance": "mask-grad-pca", "allocation": "global", "attention": "intraslice-head-pca", "ffn": "intraslice-iterpca"}),
)
"""(recipe name, Table 4 row label, components by kind), in the cumulative row order."""
FULL_PAPER_METHOD = ABLATION[-1][0]
"""The full paper method: what ``intraslice`` computed before 0.2 (its earlier results are reported under this name)."""

REFERENCE: dict[str, tuple[str, dict[str, Any]]] = {
    "importance": ("mask-grad", {"grad_group": 8, "head_score": "summed"}),
    "allocation": ("global", {"selection": "reference", "lambda_b": 1.0, "cap": 0.8}),
    "attention": ("intraslice-head-pca", {
        "split": "shared", "pre_delete": True, "spectra": "head", "qk_floor": 0.75, "o_map": "lsq",
        "lsq_prior": "zero", "lsq_ridge_mean": "all", "damping": 0.01,
    }),
    "ffn": ("select-ls", {"ridge": "fixed", "score": "damped", "damping": 0.01}),
}
"""``intraslice``: (component, parameters) by kind, as the authors' default run computes."""

IMPROVEMENTS: dict[str, dict[str, Any]] = {
    "attention": {"spectra": "kv-group"},
    "ffn": {"ridge": "adaptive"},
}
"""``intraslice+``: parameters changed from ``REFERENCE`` (provisional; set by measurement)."""

_DESCRIPTIONS = {
    "intraslice-naive": "IntraSlice ablation, Naive: mask-gradient global ratios, whole-head pruning, channel selection + LS.",
    "intraslice-ada-h": "IntraSlice ablation, +Ada-H: adaptive head PCA compression instead of head pruning.",
    "intraslice-pca-a": "IntraSlice ablation, +Pca-A: PCA-aware mask-gradient importance for the global ratios.",
    "intraslice-paper-ablation-ipca": "IntraSlice ablation, +IPca: the full paper method (PCA-aware ratios, head PCA, "
                                      "sliced iterative PCA FFN).",
    "intraslice": "IntraSlice (Li et al. 2026) as the authors' code runs it: mask-gradient global ratios, shared-dim "
                  "head PCA, FFN selection + LS.",
    "intraslice+": "IntraSlice with the project's improvements (KV-group spectra, data-scaled FFN ridge; provisional).",
}


def ablation_recipes() -> list[str]:
    """Recipe names of Table 4's cumulative rows, in order (the last is the full paper method)."""
    return [name for name, _, _ in ABLATION]


def ablation_labels() -> dict[str, str]:
    """Recipe name -> the row label of the paper's Table 4 (Naive, +Ada-H, +Pca-A, +IPca)."""
    return {name: label for name, label, _ in ABLATION}


def _components(changes: dict[str, dict[str, Any]] | None = None) -> dict[str, ComponentRef]:
    """``REFERENCE`` as component references, with ``changes`` (kind -> parameters) applied."""
    changes = changes or {}
    return {kind: ComponentRef(name, {**params, **changes.get(kind, {})}) for kind, (name, params) in REFERENCE.items()}


def recipes() -> list[Recipe]:
    """The recipes as data (defaults of every component are filled in by the host)."""
    rows = tuple((label, name) for name, label, _ in ABLATION)
    out = [
        Recipe(name, {kind: ComponentRef(comp) for kind, comp in comps.items()}, _DESCRIPTIONS[name], role="ablation",
               formerly=("intraslice",) if name == FULL_PAPER_METHOD else ())
        for name, _, comps in ABLATION
    ]
    out.append(Recipe("intraslice", _components(), _DESCRIPTIONS["intraslice"], ablation_rows=rows))
    out.append(Recipe("intraslice+", _components(IMPROVEMENTS), _DESCRIPTIONS["intraslice+"]))
    return out


@hookimpl
def prunebench_recipes() -> list[Recipe]:
    return recipes()
