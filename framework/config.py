"""Structured configs (dataclasses) for Hydra: a typo or a wrong type fails at compose time with the key named.

The schema ``tuneshift_schema`` sits first in ``conf/config.yaml``'s defaults. Each plugin's ``Options``
dataclass is registered in Hydra's ConfigStore as the config ``plugins/<name>`` (its defaults live only
there), so ``plugins=[saliency]`` composes the saliency defaults and ``plugins.saliency.b=abc`` fails naming
``plugins.saliency.b``. YAML under ``conf/`` only overrides (experiments).

Resolvers: ``${tuneshift_models:}`` is the folder of the embedded models (package data), and
``${settings_hash:}`` the short hash of every setting that changes results (:func:`config_hash`), which names
run folders ``<experiment>-<hash>`` so a changed config never writes into an earlier run's folder.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from tuneshift.fingerprint import file_fingerprint, fingerprint, neutral
from tuneshift.loading import ModelSpec
from tuneshift.paths import MODELS_DIR


@dataclass
class ModelsConfig:
    """A model pair (``pairs: [[base, tuned]]``) or a list of models (``pairs: []``)."""

    name: str = "tiny_random"
    models: dict[str, ModelSpec] = field(default_factory=dict)  # key -> spec, in run order
    pairs: list[list[str]] = field(default_factory=list)  # [base_key, tuned_key] comparisons


@dataclass
class DataConfig:
    name: str = "builtin"
    format: str = "builtin"  # a dataset format id: builtin | organism | jsonl | final_dataset | a registered one
    path: Optional[str] = None
    limit: Optional[int] = None  # the first N prompts (after splits/ids); None: all
    splits: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


@dataclass
class GenerationConfig:
    """How responses are produced (paper: greedy, 300 new tokens, raw prompt, each model its own response).

    ``response_source`` says which response every model is scored on (:mod:`tuneshift.responses`): ``own``
    (each model its own greedy response, the paper's protocol), ``tuned`` (the pair's tuned model's greedy
    response fed to both, in the tuned model's input format: AlignTDS's protocol, methods.md D), ``base``
    (the base model's), or ``reference`` (the dataset's ``reference`` column, in the tuned model's format).
    """

    max_new_tokens: int = 64
    chat_template: Optional[bool] = None  # None: each model's own ``chat_template`` setting
    batch_size: int = neutral(8)
    response_source: str = "own"  # own | tuned | base | reference
    truncate_prompts: bool = False  # cut prompts longer than the context (minus max_new_tokens); else an error


@dataclass
class RunConfig:
    name: str = neutral("${model.name}-${data.name}")  # the experiment's name; the folder adds the settings hash
    root: str = neutral("outputs")
    batch_size: int = neutral(4)
    seed: int = 0
    progress: bool = neutral(True)
    resume: bool = neutral(True)  # skip what a previous run of the same settings finished
    report: bool = neutral(True)  # write report.html
    threads: int = neutral(0)  # torch CPU threads; 0: a safe default (half the cores, 1 on a 2-core machine)
    remote: str = "off"  # off | local (nnsight's serialised dry run) | ndif (traces run on NDIF; tuneshift.remote)


@dataclass
class LoggerConfig:
    kind: str = "local"  # local | wandb | none (or a registered logger)
    project: str = "tuneshift"
    group: Optional[str] = None  # default: the sweep in a multirun, else the model pair's name
    mode: str = "offline"  # WANDB_MODE in the environment wins
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 20.0  # seconds W&B may take to start online before the run falls back to offline


@dataclass
class TuneshiftConfig:
    model: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = neutral(default_factory=LoggerConfig)
    plugins: dict[str, Any] = field(default_factory=dict)
    experiment: Optional[str] = neutral(None)


def data_file_fingerprint(data: Any) -> str:
    """Hash of the data file a data config reads (its own path, or the format's built-in file)."""
    from tuneshift.data import DATASETS

    path = data.get("path") if isinstance(data, (dict, DictConfig)) else getattr(data, "path", None)
    fmt = data.get("format") if isinstance(data, (dict, DictConfig)) else getattr(data, "format", None)
    if path is None and fmt in DATASETS:
        path = DATASETS.get(fmt).default_path
    return file_fingerprint(path)


def config_hash(cfg: Any, length: int = 8) -> str:
    """Short hash of the settings of ``cfg`` that change results (names a run folder)."""
    return fingerprint({"models": cfg.model.models, "pairs": cfg.model.pairs, "data": cfg.data,
                        "data_file": data_file_fingerprint(cfg.data), "generation": cfg.generation,
                        "run": cfg.run, "plugins": cfg.plugins}, length=length)


def _settings_hash(*, _root_: DictConfig) -> str:
    try:
        return config_hash(_root_)
    except Exception:  # noqa: BLE001 -- a broken config is reported by validation, with the key named
        return "invalid"


def register_plugin_configs() -> None:
    """Each found plugin's ``Options`` as the config ``plugins/<name>`` (defaults once, in the dataclass)."""
    from tuneshift.plugin import PLUGINS, load_plugin_paths

    load_plugin_paths()
    store = ConfigStore.instance()
    for name, cls in PLUGINS.items():
        options = getattr(cls, "Options", None)
        if options is not None:
            store.store(group="plugins", name=name, node={name: options}, package="plugins")


def register_configs() -> None:
    """Register the schema, the plugins' options and the resolvers (idempotent)."""
    ConfigStore.instance().store(name="tuneshift_schema", node=TuneshiftConfig)
    register_plugin_configs()
    if not OmegaConf.has_resolver("tuneshift_models"):
        OmegaConf.register_new_resolver("tuneshift_models", lambda: str(MODELS_DIR))
    if not OmegaConf.has_resolver("settings_hash"):
        OmegaConf.register_new_resolver("settings_hash", _settings_hash)


def validate(cfg: Any) -> Any:
    """Merge a plain config into the schema (for configs built outside Hydra); returns a DictConfig.

    Plugin options are typed by their ``Options`` dataclass as at compose time.
    """
    from tuneshift.plugin import plugin_class

    register_configs()
    plain = OmegaConf.to_container(cfg, resolve=False) if OmegaConf.is_config(cfg) else dict(cfg)
    plugins = plain.pop("plugins", {}) or {}
    merged = OmegaConf.merge(OmegaConf.structured(TuneshiftConfig), plain)
    for name, options in plugins.items():
        merged.plugins[name] = OmegaConf.merge(OmegaConf.structured(plugin_class(name).Options), options or {})
    return merged


__all__ = ["DataConfig", "GenerationConfig", "LoggerConfig", "ModelsConfig", "RunConfig", "TuneshiftConfig",
           "config_hash", "register_configs", "validate"]
