"""The base class of a component: a named, parameterised implementation of one hook."""

from __future__ import annotations

from typing import Any, ClassVar

from prunebench.harness.contracts import COMPONENT_KINDS

WHOLE_MODEL_KINDS = ("transform", "importance")


class Component:
    """Subclass it, set ``kind``, ``name`` and ``defaults``, and implement the kind's hook
    (decorated with ``prunebench.harness.hookspecs.hookimpl``). ``defaults`` lists every parameter the
    component accepts: the core rejects any other name, so typos never pass silently.
    """

    kind: ClassVar[str]
    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}
    budget_params: ClassVar[tuple[str, ...]] = ()
    """Parameters that, when set (not None), fix how much the component removes by
    themselves (SliceGPT's ``slicing``): a run then takes no target sparsity, and its
    result records what set the budget (one sparsity record, never two disagreeing)."""
    noop: ClassVar[bool] = False
    """True for a component that never changes the model (``keep``): the layer loop is
    skipped when both the attention and the FFN component are no-ops."""
    streams_layers: ClassVar[bool | None] = None
    """Whether the component works when only one decoder layer at a time is in memory
    (offloaded pruning, ``prunebench.harness.offload``). ``None`` means the kind's default: the
    layer-loop kinds (attention, ffn) and allocation see one layer or only shapes, so they
    do; transform and importance usually run the whole model, so they must opt in
    (by reading layers through ``run.residency``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        kind = cls.__dict__.get("kind")
        if kind is not None and kind not in COMPONENT_KINDS:
            raise TypeError(f"{cls.__name__}.kind={kind!r}; must be one of {COMPONENT_KINDS}")

    @property
    def supports_offload(self) -> bool:
        if self.streams_layers is not None:
            return bool(self.streams_layers)
        return self.kind not in WHOLE_MODEL_KINDS

    @property
    def summary(self) -> str:
        """The first line of the class docstring, shown by ``prunebench list``."""
        return (type(self).__doc__ or "").strip().splitlines()[0] if type(self).__doc__ else ""

    def __repr__(self) -> str:
        return f"<{self.kind} component {self.name!r}>"
