"""tuneshift: what instruction tuning changes inside a language model.

The public names, for notebooks and plugin authors (imported lazily, so ``import tuneshift`` is cheap)::

    import tuneshift as ts
    results = ts.compare(base="tiny-random:llama:0", tuned="tiny-random:llama:1", plugins=["residual_norm"])
    attribution = ts.attribute("tiny-random:llama", "Write a haiku about the sea.")
    cache = ts.capture("tiny-random:llama", ["Hello"], probes=["blocks.0.hook_resid_post"])

    from tuneshift import Plugin, Probe, Section, Headline     # writing a plugin

See ``docs/api.md`` (the Python API) and ``docs/plugins.md`` (writing a plugin).
"""
from __future__ import annotations

import importlib
import os
from typing import Any

# Offline by default, for every entry point (the command line, tuneshift-report, python -m ...): this runs
# before any submodule imports huggingface_hub, which reads the variable once. HF_HUB_OFFLINE=0 allows
# downloads.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.2.0"

_EXPORTS = {
    # the Python API
    "compare": "tuneshift.api", "attribute": "tuneshift.api", "capture": "tuneshift.api",
    "load": "tuneshift.api", "Results": "tuneshift.api", "Attribution": "tuneshift.api",
    # writing plugins
    "Plugin": "tuneshift.plugin", "PLUGINS": "tuneshift.plugin", "PluginError": "tuneshift.plugin",
    "plugin_class": "tuneshift.plugin", "available_plugins": "tuneshift.plugin",
    "PluginTestSuite": "tuneshift.plugin_testing",
    "Probe": "tuneshift.probes", "Captures": "tuneshift.probes", "all_sites": "tuneshift.probes",
    "Section": "tuneshift.sections", "Headline": "tuneshift.sections", "Figure": "tuneshift.sections",
    "Table": "tuneshift.sections", "View": "tuneshift.sections",
    "Registry": "tuneshift.registry", "TuneshiftError": "tuneshift.errors",
    # running
    "Runner": "tuneshift.runner", "RunContext": "tuneshift.runner", "ModelRun": "tuneshift.runner",
    "Batch": "tuneshift.generation", "ResultStore": "tuneshift.results", "ModelSpec": "tuneshift.loading",
    "Prompt": "tuneshift.data", "load_prompts": "tuneshift.data",
    "GenerationConfig": "tuneshift.config", "RunConfig": "tuneshift.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tuneshift' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
