"""Plugins: the analyses, written as Lightning-style callbacks over a run.

What it is for
    A plugin is one analysis (saliency, head relations, FFN concepts, or a user's own). It subclasses
    :class:`Plugin`, overrides the hooks it needs, owns its options (an ``Options`` dataclass: the defaults live
    there and nowhere else) and its report section (:meth:`Plugin.section`). It is found by its ``name``
    through the entry-point group ``tuneshift.plugins``, the way pytest finds ``pytest11`` plugins; the
    built-ins are declared there too, so the core never imports them.

Call order (the runner, :mod:`tuneshift.runner`, is the only caller)::

    setup(ctx)                                  once, all plugins, before any model is loaded
    on_run_start(ctx)
    for each model (one in memory at a time):
        on_model_start(ctx, model)
        probes(model) -> list[Probe]            sites to capture; merged over plugins into one trace per batch
        for each batch:                         skipped for weight-only plugins and finished results
            on_batch(ctx, model, batch, captures)
        on_model_end(ctx, model)                write this model's results (ctx.store)
        section(ctx, model.key)                 its report section (stored as section.json)
    for each (base, tuned) pair:
        on_compare(ctx, base_key, tuned_key)    read both from ctx.store, write the comparison
        section(ctx, "compare/<base>__<tuned>") its report section, whose headlines the run prints at the end
    on_run_end(ctx)
    teardown(ctx)                               always, also after an error

A model whose results a plugin already finished with the same settings is skipped for that plugin, so a
re-run resumes.

Canonical pattern (``plugins/residual_norm.py`` is the whole of such a plugin)::

    @dataclass
    class ResidualNormOptions:
        include_embeddings: bool = True

    class ResidualNorm(Plugin):
        name = "residual_norm"
        Options = ResidualNormOptions

        def probes(self, model):
            return [Probe(f"layers.{i}.resid_post", reduce="norm") for i in range(model.adapter.n_layers)]

        def on_batch(self, ctx, model, batch, captures):
            ...

Registered in the package's ``setup.cfg``::

    [options.entry_points]
    tuneshift.plugins =
        residual_norm = tuneshift.plugins.residual_norm:ResidualNorm
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import inspect
import os
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Iterator

from tuneshift.errors import ConfigError, TuneshiftError
from tuneshift.registry import Registry, RegistryError, validate_options
from tuneshift.sections import Section, files_section

if TYPE_CHECKING:
    from tuneshift.probes import Captures, Probe
    from tuneshift.runner import Batch, ModelRun, RunContext

HOOK_ORDER = ("setup", "on_run_start", "on_model_start", "probes", "on_batch", "on_model_end", "on_compare",
              "on_run_end", "teardown")
PLUGIN_PATH_ENV = "TUNESHIFT_PLUGINS"  # comma-separated modules or .py files to load before the config


@dataclasses.dataclass
class NoOptions:
    """Options of a plugin that has none."""


class PluginError(TuneshiftError, ValueError):
    """A plugin name or its options are wrong; the message says which and how to fix it."""


class Plugin:
    """Base class: every hook is a named no-op. Override only what the analysis needs."""

    name: ClassVar[str] = ""
    title: ClassVar[str] = ""                   # report section title (default: the name)
    Options: ClassVar[type] = NoOptions
    needs_responses: ClassVar[bool] = False     # the runner produces responses (generation.response_source) first
    weight_only: ClassVar[bool] = False         # reads weights through the adapter; no batches, no trace
    needs_eager_attention: ClassVar[bool] = False  # load with eager attention (forward-mode AD, patterns)
    runs_remote: ClassVar[bool] = False         # all model access goes through traces: run.remote may ship them

    def __init__(self, options: Any = None, **overrides: Any):
        if options is None or isinstance(options, dict) or overrides:
            options = build_options(type(self), {**(options or {}), **overrides})
        self.options = options

    # ---- hooks, in call order -----------------------------------------------------------------------------
    def setup(self, ctx: "RunContext") -> None:
        """Called once before any model is loaded: check options that need more than their type."""

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

    # ---- presentation -------------------------------------------------------------------------------------
    def section(self, ctx: "RunContext", key: str) -> Section | None:
        """The report section of results ``key`` (a model key or ``compare/<base>__<tuned>``).

        The default shows every figure, table and view the plugin wrote there, captioned by file name, under
        :attr:`title` with the class docstring as explanation. Override to add headline findings and captions.
        """
        return files_section(ctx.store.dir(self.name, key), self.title or self.name, self.explanation())

    @classmethod
    def explanation(cls) -> str:
        """The first paragraph of the class docstring (what the analysis measures)."""
        doc = inspect.getdoc(cls) or ""
        return doc.split("\n\n")[0].replace("\n", " ") if cls.__doc__ else ""

    # ---- remote execution ---------------------------------------------------------------------------------
    def remote_blocker(self) -> str | None:
        """Why this plugin, with its options, cannot run with ``run.remote`` (None: it can).

        Asked before anything loads. The default: weight-only plugins and plugins not marked
        :attr:`runs_remote` compute on the weights here; override to refuse only some options.
        """
        if self.weight_only:
            return ("reads the model's weights directly; NDIF keeps them on the server (run it with "
                    "run.remote=off on a downloaded copy: it needs no GPU)")
        if not self.runs_remote:
            return ("computes on the model's weights here, not only through traces (a plugin that reads only its "
                    "probes sets runs_remote = True)")
        return None

    # ---- resume -------------------------------------------------------------------------------------------
    def results_reusable(self, ctx: "RunContext", key: str) -> bool:
        """Whether finished results of ``key`` (same settings) may be skipped on resume (default: yes).

        A plugin whose later model reads something this model left behind (a paired cache) returns False
        when that is gone, so the runner recomputes it.
        """
        return True

    def state_dict(self) -> dict:
        """State that must survive a resume (results on disk usually make this unnecessary)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned."""


PLUGINS: Registry[type[Plugin]] = Registry(
    "plugin", group="tuneshift.plugins",
    how_to_add=("A plugin is a Plugin subclass declared in its package's entry points "
                "(setup.cfg: [options.entry_points] tuneshift.plugins = my_probe = mypkg.my_probe:MyProbe), or a "
                f"module or .py file named in the {PLUGIN_PATH_ENV} environment variable."))


def load_plugin_paths(spec: str | None = None) -> list[type[Plugin]]:
    """Import the modules or ``.py`` files in ``spec`` (default: ``$TUNESHIFT_PLUGINS``) and register their plugins.

    Every :class:`Plugin` subclass with a ``name`` defined in such a module is registered, so a user's plugin
    can be a single file with no packaging at all.
    """
    spec = os.environ.get(PLUGIN_PATH_ENV, "") if spec is None else spec
    found: list[type[Plugin]] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        module = _import_file(Path(entry)) if entry.endswith(".py") else _import_module(entry)
        for obj in vars(module).values():
            if inspect.isclass(obj) and issubclass(obj, Plugin) and obj.name and obj.__module__ == module.__name__:
                PLUGINS.register(obj.name, obj)
                found.append(obj)
    return found


def _import_module(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise PluginError(f"{PLUGIN_PATH_ENV}: cannot import module {name!r} ({err}); give an importable module "
                          "name or the path of a .py file") from err


def _import_file(path: Path) -> Any:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise PluginError(f"{PLUGIN_PATH_ENV}: plugin file {str(path)!r} does not exist")
    name = f"tuneshift_user_plugin_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def available_plugins() -> list[str]:
    """Names of every plugin found (built-in and third-party entry points, and registered classes)."""
    return PLUGINS.available()


def build_options(cls: type[Plugin], raw: Any) -> Any:
    """``raw`` options checked against ``cls.Options``: a typo or a wrong type fails naming the key."""
    return validate_options(cls.Options, raw, f"plugin {cls.name!r}", PluginError)


def plugin_class(name: str) -> type[Plugin]:
    try:
        cls = PLUGINS.get(name)
    except RegistryError as err:
        raise PluginError(str(err)) from None
    if not (inspect.isclass(cls) and issubclass(cls, Plugin)):
        raise PluginError(f"entry point {name!r} of tuneshift.plugins is {cls!r}, not a Plugin subclass")
    return cls


def build_plugins(config: dict[str, Any]) -> list[Plugin]:
    """Instantiate plugins in config order from ``{name: options}`` (options validated against ``Options``)."""
    from omegaconf import OmegaConf

    plugins = []
    for name, raw in config.items():
        raw = OmegaConf.to_container(raw, resolve=True) if OmegaConf.is_config(raw) else raw
        if raw is not None and not isinstance(raw, dict):
            raise ConfigError(f"plugins.{name} must be a mapping of options, got {raw!r}")
        plugins.append(plugin_class(name)(raw or {}))
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


__all__ = ["HOOK_ORDER", "PLUGINS", "HookTimer", "NoOptions", "Plugin", "PluginError", "available_plugins",
           "build_options", "build_plugins", "load_plugin_paths", "plugin_class"]
