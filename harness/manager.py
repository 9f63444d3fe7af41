"""The plugin host: registers plugin modules with their components, recipes, metrics and
architecture adapters; resolves and calls components by name.

Order (as tox and pluggy's own example do): entry points of the ``prunebench`` group
(built-ins are listed there too, so the core cannot tell them from third-party methods),
then any plugin objects passed in by the caller (tests, notebooks), then validation.
"""

from __future__ import annotations

import copy
import functools
import json
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import pluggy

from prunebench.harness import hookspecs
from prunebench.harness.components import Component
from prunebench.harness.contracts import COMPONENT_KINDS, ComponentRef, Recipe
from prunebench.harness.errors import UsageError

if TYPE_CHECKING:
    from prunebench.harness.adapters import ArchitectureAdapter
    from prunebench.harness.metrics import Metric

ENTRY_POINT_GROUP = hookspecs.PROJECT


class PluginHost:
    """Holds the pluggy manager plus the name -> component and name -> recipe tables."""

    def __init__(self, plugins: Iterable[object] = (), load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        if load_entry_points:
            self.pm.load_setuptools_entrypoints(ENTRY_POINT_GROUP)
        for plugin in plugins:
            self.pm.register(plugin)
        self.components: dict[tuple[str, str], Component] = {}
        self.recipes: dict[str, Recipe] = {}
        self.aliases: dict[str, str] = {}
        self.metrics: dict[str, Metric] = {}
        self.adapters: list[ArchitectureAdapter] = []
        self._callers: dict[tuple[str, str], Any] = {}
        self._collect()
        if not self.components:
            raise UsageError(
                "no pruning components found: install the package (pip install -e .) so the "
                f"'{ENTRY_POINT_GROUP}' entry points are registered"
            )

    def _collect(self) -> None:
        for batch in self.pm.hook.prunebench_components():
            for component in batch:
                self._add_component(component)
        for batch in self.pm.hook.prunebench_recipes():
            for recipe in batch:
                if recipe.name in self.recipes:
                    raise ValueError(f"two plugins define the method {recipe.name!r}")
                self.recipes[recipe.name] = recipe
        for recipe in self.recipes.values():
            for alias in recipe.aliases:
                if alias in self.recipes or alias in self.aliases:
                    raise ValueError(f"method alias {alias!r} of {recipe.name!r} is taken")
                self.aliases[alias] = recipe.name
        for batch in self.pm.hook.prunebench_metrics():
            for metric in batch:
                if metric.name in self.metrics:
                    raise ValueError(f"two plugins define the metric {metric.name!r}")
                self.metrics[metric.name] = metric
        for batch in self.pm.hook.prunebench_adapters():
            self.adapters.extend(batch)
        for recipe in self.recipes.values():
            self.resolve(recipe.name)  # a recipe naming a missing component fails here, at start-up
            for label, row in recipe.ablation_rows:
                if row not in self.recipes:
                    raise ValueError(f"method {recipe.name!r}: ablation row {label!r} names unknown method {row!r}")
        self.pm.check_pending()

    def _add_component(self, component: Component) -> None:
        key = (component.kind, component.name)
        if key in self.components:
            raise ValueError(f"two plugins define the {component.kind} component {component.name!r}")
        hook = hookspecs.KIND_HOOKS[component.kind]
        if not callable(getattr(component, hook, None)):
            raise TypeError(f"{component!r} must implement the hook {hook!r}")
        self.pm.register(component, name=f"{component.kind}:{component.name}")
        self.components[key] = component

    # ----- lookup -------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(name for k, name in self.components if k == kind)

    def component(self, kind: str, name: str) -> Component:
        if kind not in COMPONENT_KINDS:
            raise UsageError(f"unknown component kind {kind!r}; valid kinds: {', '.join(COMPONENT_KINDS)}")
        try:
            return self.components[(kind, name)]
        except KeyError:
            raise UsageError(
                f"unknown {kind} component {name!r}; valid {kind} components: {', '.join(self.names(kind))}"
            ) from None

    def recipe(self, name: str) -> Recipe:
        if name in self.aliases:
            new = self.aliases[name]
            warnings.warn(f"method {name!r} is now called {new!r}; the old name is removed in prunebench 0.3",
                          FutureWarning, stacklevel=2)
            name = new
        try:
            return self.recipes[name]
        except KeyError:
            raise UsageError(f"unknown method {name!r}; valid methods: {', '.join(sorted(self.recipes))}") from None

    def metric(self, name: str) -> Metric:
        try:
            return self.metrics[name]
        except KeyError:
            raise UsageError(f"unknown metric {name!r}; valid metrics: {', '.join(sorted(self.metrics))}") from None

    # ----- resolution -----------------------------------------------------------------
    def resolve(self, method: str, overrides: Iterable[str] = ()) -> Recipe:
        """The recipe with every kind present, defaults filled in and ``--set`` overrides applied.

        ``KIND=NAME`` swaps a component (its parameters restart from that component's
        defaults); ``KIND.PARAM=VALUE`` sets a parameter (VALUE parsed as JSON when it can be).
        """
        overrides = list(overrides)
        base = self.recipe(method)
        comps = {kind: copy.deepcopy(base.components.get(kind, ComponentRef(DEFAULT_COMPONENTS[kind]))) for kind in COMPONENT_KINDS}
        resolved = {kind: self._with_defaults(kind, ref) for kind, ref in comps.items()}
        swapped = False
        for item in overrides:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise UsageError(f"--set expects KIND=NAME or KIND.PARAM=VALUE, got {item!r}")
            kind, _, param = key.partition(".")
            if kind not in COMPONENT_KINDS:
                raise UsageError(f"unknown component kind {kind!r} in --set; valid kinds: {', '.join(COMPONENT_KINDS)}")
            if not param:
                resolved[kind] = self._with_defaults(kind, ComponentRef(raw))
                swapped = True
            else:
                valid = self.component(kind, resolved[kind].name).defaults
                if param not in valid:
                    raise UsageError(
                        f"unknown parameter {param!r} of {kind} component {resolved[kind].name!r}; "
                        f"valid: {', '.join(sorted(valid)) or '(none)'}"
                    )
                resolved[kind].params[param] = parse_value(raw)
        name = base.name if not overrides else f"{base.name}[{','.join(overrides)}]"
        description = base.description + (" (with swapped components)" if swapped else "")
        return Recipe(name=name, components=resolved, description=description)

    def _with_defaults(self, kind: str, ref: ComponentRef) -> ComponentRef:
        component = self.component(kind, ref.name)
        unknown = set(ref.params) - set(component.defaults)
        if unknown:
            raise UsageError(
                f"unknown parameter(s) {', '.join(sorted(unknown))} of {kind} component {ref.name!r}; "
                f"valid: {', '.join(sorted(component.defaults)) or '(none)'}"
            )
        return ComponentRef(ref.name, {**copy.deepcopy(component.defaults), **ref.params})

    # ----- calling ----------------------------------------------------------------------
    def call(self, kind: str, ref: ComponentRef, **kwargs: Any) -> Any:
        """Call the hook of ``kind`` on the one component ``ref`` names, with its params."""
        component = self.component(kind, ref.name)
        hook = hookspecs.KIND_HOOKS[kind]
        key = (kind, ref.name)
        if key not in self._callers:
            others = [p for p in self.pm.get_plugins() if p is not component]
            self._callers[key] = self.pm.subset_hook_caller(hook, remove_plugins=others)
        return self._callers[key](params=ref.params, **kwargs)


DEFAULT_COMPONENTS: dict[str, str] = {
    "transform": "none",
    "importance": "none",
    "allocation": "uniform",
    "attention": "keep",
    "ffn": "keep",
}
"""What a recipe gets for a kind it does not name: the no-op of that kind."""


def parse_value(raw: str) -> Any:
    """A --set value: JSON when it parses (numbers, true, null, lists), else the string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


@functools.cache
def default_host() -> PluginHost:
    """The process-wide host of the installed plugins (entry points only), built once:
    what code without a host of its own (model conversion, reports) looks things up in."""
    return PluginHost()
