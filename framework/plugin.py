"""Plugins: the analyses, written as Lightning-style callbacks over a run.

What it is for
    A plugin is one analysis (saliency, head relations, FFN concepts, or a user's own). It subclasses
    :class:`Plugin`, overrides the hooks it needs, and is found by its ``name`` from the config.

Call order (the runner, :mod:`tuneshift.runner`, is the only caller)::

    setup(ctx)                                  once, all plugins, before any model is loaded
    on_run_start(ctx)
    for each model (one in memory at a time):
        on_model_start(ctx, model)
        probes(model) -> list[Probe]            sites to capture; merged over plugins into one trace per batch
        for each batch:                         skipped for weight-only plugins and finished results
            on_batch(ctx, model, batch, captures)
        on_model_end(ctx, model)                write this model's results (ctx.store)
    for each (base, tuned) pair:
        on_compare(ctx, base_key, tuned_key)    read both from ctx.store, write the comparison
    on_run_end(ctx)
    teardown(ctx)                               always, also after an error

A model whose results a plugin already finished (``ctx.store.is_done``) is skipped for that plugin, so a
re-run resumes. Options come from the plugin's ``Options`` dataclass, which validates the config.

Canonical pattern (``plugins/residual_norm.py`` is the whole of such a plugin)::

    @dataclass
    class ResidualNormOptions:
        positions: str = "all"

    class ResidualNorm(Plugin):
        name = "residual_norm"
        Options = ResidualNormOptions

        def probes(self, model):
            return [Probe(f"layers.{i}.resid_post", reduce="norm") for i in range(model.adapter.n_layers)]

        def on_batch(self, ctx, model, batch, captures):
            ...
"""
from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

if TYPE_CHECKING:
    from tuneshift.probes import Captures, Probe
    from tuneshift.runner import Batch, ModelRun, RunContext

HOOK_ORDER = ("setup", "on_run_start", "on_model_start", "probes", "on_batch", "on_model_end", "on_compare",
              "on_run_end", "teardown")


@dataclasses.dataclass
class NoOptions:
    """Options of a plugin that has none."""


class PluginError(ValueError):
    """A plugin name or its options are wrong; the message says which and how to fix it."""


class Plugin:
    """Base class: every hook is a named no-op. Override only what the analysis needs."""

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    needs_responses: ClassVar[bool] = False  # the runner generates each model's own response first
    weight_only: ClassVar[bool] = False  # reads weights through the adapter; no batches, no trace
    needs_eager_attention: ClassVar[bool] = False  # load with eager attention (forward-mode AD, patterns)

    _registry: ClassVar[dict[str, type["Plugin"]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Plugin._registry[cls.name] = cls

    def __init__(self, options: Any = None):
        self.options = options if options is not None else self.Options()

    # ---- hooks, in call order -----------------------------------------------------------------------------
    def setup(self, ctx: "RunContext") -> None:
        """Called once before any model is loaded."""

    def on_run_start(self, ctx: "RunContext") -> None:
        """Called after every plugin's setup, before the first model."""

    def on_model_start(self, ctx: "RunContext", model: "ModelRun") -> None:
        """Called when ``model`` is loaded (weight-only plugins usually compute here or in on_model_end)."""

    def probes(self, model: "ModelRun") -> list["Probe"]:
        """Sites this plugin wants captured on every batch of ``model``."""
        return []

    def on_batch(self, ctx: "RunContext", model: "ModelRun", batch: "Batch", captures: "Captures") -> None:
        """Called per batch with exactly the captures this plugin's probes asked for."""

    def on_model_end(self, ctx: "RunContext", model: "ModelRun") -> None:
        """Called after the last batch of ``model``: write its results to ``ctx.store``."""

    def on_compare(self, ctx: "RunContext", base: str, tuned: str) -> None:
        """Called for each (base, tuned) pair of model keys once both models are done."""

    def on_run_end(self, ctx: "RunContext") -> None:
        """Called after every model and comparison."""

    def teardown(self, ctx: "RunContext") -> None:
        """Called last, also after an error: free what setup took."""

    # ---- resume -------------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """State that must survive a resume (results on disk usually make this unnecessary)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


def available_plugins() -> list[str]:
    """Names of every registered plugin (importing :mod:`plugins` registers the built-in ones)."""
    import tuneshift.plugins  # noqa: F401  (registers the built-in plugins)

    return sorted(Plugin._registry)


def plugin_class(name: str) -> type[Plugin]:
    available = available_plugins()
    if name not in Plugin._registry:
        raise PluginError(f"unknown plugin {name!r}; available: {', '.join(available)}. A new plugin is a "
                          "Plugin subclass with a `name` in a module under plugins/ (imported by "
                          "plugins/__init__.py) plus a config entry in conf/plugins/.")
    return Plugin._registry[name]


def build_options(cls: type[Plugin], raw: Any) -> Any:
    """Validate ``raw`` (a mapping from the config) against ``cls.Options``; a typo or wrong type fails clearly."""
    schema = OmegaConf.structured(cls.Options)
    try:
        merged = OmegaConf.merge(schema, raw if raw is not None else {})
    except OmegaConfBaseException as err:
        fields = ", ".join(f.name for f in dataclasses.fields(cls.Options)) or "(none)"
        reason = str(err).splitlines()[0]
        raise PluginError(f"bad options for plugin {cls.name!r}: {reason}. "
                          f"Valid options: {fields}") from err
    return OmegaConf.to_object(merged)


def build_plugins(config: dict[str, Any]) -> list[Plugin]:
    """Instantiate plugins in config order from ``{name: options}``; ``None`` or ``false`` disables one."""
    plugins = []
    for name, raw in config.items():
        raw = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw
        if raw is False or (isinstance(raw, dict) and raw.get("enabled", True) is False):
            continue
        cls = plugin_class(name)
        options = {k: v for k, v in raw.items() if k != "enabled"} if isinstance(raw, dict) else raw
        plugins.append(cls(build_options(cls, options)))
    return plugins


class HookTimer:
    """Accumulates seconds spent per (plugin, hook) so a slow plugin shows up by name in the summary."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def span(self, plugin: Plugin, hook: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            key = f"{plugin.name}.{hook}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - start
