"""IntraSlice as recipes: the full method and the cumulative ablation of the paper's Table 4.

A recipe is data naming one component per kind (DESIGN.md), so each ablation row is the
previous row with one component swapped:

| row      | importance    | allocation | attention           | ffn                |
| -------- | ------------- | ---------- | ------------------- | ------------------ |
| Naive    | mask-grad     | global     | head-prune          | select-ls          |
| +Ada-H   | mask-grad     | global     | intraslice-head-pca | select-ls          |
| +Pca-A   | mask-grad-pca | global     | intraslice-head-pca | select-ls          |
| +IPca    | mask-grad-pca | global     | intraslice-head-pca | intraslice-iterpca |

The last row is the full method, ``intraslice``. The same components with uniform ratios
are ``--set allocation=uniform`` on any row (``importance`` is then unused).
"""

from __future__ import annotations

from prunebench.harness.contracts import ComponentRef, Recipe
from prunebench.harness.hookspecs import hookimpl

ABLATION: tuple[tuple[str, str, dict[str, str]], ...] = (
    ("intraslice-naive", "Naive",
     {"importance": "mask-grad", "allocation": "global", "attention": "head-prune", "ffn": "select-ls"}),
    ("intraslice-ada-h", "+Ada-H",
     {"importance": "mask-grad", "allocation": "global", "attention": "intraslice-head-pca", "ffn": "select-ls"}),
    ("intraslice-pca-a", "+Pca-A",
     {"importance": "mask-grad-pca", "allocation": "global", "attention": "intraslice-head-pca", "ffn": "select-ls"}),
    ("intraslice", "+IPca",
     {"importance": "mask-grad-pca", "allocation": "global", "attention": "intraslice-head-pca", "ffn": "intraslice-iterpca"}),
)
"""(recipe name, Table 4 row label, components by kind), in the cumulative row order."""

_DESCRIPTIONS = {
    "intraslice-naive": "IntraSlice ablation, Naive: mask-gradient global ratios, whole-head pruning, channel selection + LS.",
    "intraslice-ada-h": "IntraSlice ablation, +Ada-H: adaptive head PCA compression instead of head pruning.",
    "intraslice-pca-a": "IntraSlice ablation, +Pca-A: PCA-aware mask-gradient importance for the global ratios.",
    "intraslice": "IntraSlice (Li et al. 2026): head PCA + sliced iterative PCA FFN + PCA-aware global ratios.",
}


def ablation_recipes() -> list[str]:
    """Recipe names of Table 4's cumulative rows, in order (the last is ``intraslice``)."""
    return [name for name, _, _ in ABLATION]


def ablation_labels() -> dict[str, str]:
    """Recipe name -> the row label of the paper's Table 4 (Naive, +Ada-H, +Pca-A, +IPca)."""
    return {name: label for name, label, _ in ABLATION}


def recipes() -> list[Recipe]:
    """The recipes as data (defaults of every component are filled in by the host)."""
    return [
        Recipe(
            name,
            {kind: ComponentRef(comp) for kind, comp in comps.items()},
            _DESCRIPTIONS[name],
            role="method" if name == "intraslice" else "ablation",
            ablation_rows=tuple((label, row) for row, label, _ in ABLATION) if name == "intraslice" else (),
        )
        for name, _, comps in ABLATION
    ]


@hookimpl
def prunebench_recipes() -> list[Recipe]:
    return recipes()
