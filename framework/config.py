"""Structured configs (dataclasses) for Hydra: a typo or a wrong type fails with a clear message.

The schema ``tuneshift_schema`` is registered in Hydra's ConfigStore and sits first in ``conf/config.yaml``'s
defaults, so every composed config is validated against it. Plugin options are validated separately
against each plugin's own ``Options`` dataclass (``tuneshift.plugin.build_options``), because the set of
plugins is open.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

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
    format: str = "builtin"  # builtin | organism | jsonl | final_dataset
    path: Optional[str] = None
    limit: Optional[int] = None
    splits: list[str] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


@dataclass
class GenerationConfig:
    """How each model's own response is produced (paper: greedy, 300 new tokens, raw prompt)."""

    max_new_tokens: int = 64
    chat_template: Optional[bool] = None  # None: each model's own ``chat_template`` setting
    batch_size: int = 8


@dataclass
class RunConfig:
    name: str = "${model.name}-${data.name}"
    root: str = "outputs"
    batch_size: int = 4
    seed: int = 0
    progress: bool = True
    resume: bool = True  # skip what a previous run of the same job finished with the same settings
    report: bool = True  # write report.html
    plugin_modules: list[str] = field(default_factory=list)  # extra modules to import (users' plugins)


@dataclass
class LoggerConfig:
    kind: str = "local"  # local | wandb | none
    project: str = "tuneshift"
    group: Optional[str] = None  # default: the model pair's name
    mode: str = "offline"  # WANDB_MODE in the environment wins
    tags: list[str] = field(default_factory=list)


@dataclass
class TuneshiftConfig:
    model: ModelsConfig = field(default_factory=ModelsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    run: RunConfig = field(default_factory=RunConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    plugins: dict[str, Any] = field(default_factory=dict)
    experiment: Optional[str] = None


def register_configs() -> None:
    """Register the schema and the ``tuneshift_models`` resolver (the embedded models' folder; idempotent)."""
    ConfigStore.instance().store(name="tuneshift_schema", node=TuneshiftConfig)
    if not OmegaConf.has_resolver("tuneshift_models"):
        OmegaConf.register_new_resolver("tuneshift_models", lambda: str(MODELS_DIR))


def validate(cfg: Any) -> Any:
    """Merge a plain config into the schema (for configs built outside Hydra); returns a DictConfig."""
    register_configs()
    return OmegaConf.merge(OmegaConf.structured(TuneshiftConfig), cfg)
