"""What the hooks receive: :class:`ModelRun` (one loaded model) and :class:`RunContext` (the run).

Both are made by the runner (:mod:`tuneshift.runner`, which re-exports them); plugins read them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.config import GenerationConfig, RunConfig
from tuneshift.data import EncodedPrompt, Prompt
from tuneshift.loading import ModelSpec
from tuneshift.loggers import Logger
from tuneshift.results import ResultStore


@dataclass
class ModelRun:
    """One loaded model and everything plugins need about it (see docs/plugins.md)."""

    key: str
    name: str
    spec: ModelSpec
    model: Any
    tokenizer: Any
    adapter: ModelAdapter
    chat_template: bool
    encoded: list[EncodedPrompt] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @cached_property
    def nnsight(self):
        """An nnsight ``TransformersModel`` around the already loaded model (built on first use)."""
        from nnsight import TransformersModel

        return TransformersModel(self.model, tokenizer=self.tokenizer)


@dataclass
class RunContext:
    """What every hook receives: where results go, the prompts, the pairs and the run's settings."""

    store: ResultStore
    logger: Logger
    output_dir: Path
    prompts: list[Prompt]
    pairs: list[tuple[str, str]]
    generation: GenerationConfig
    settings: RunConfig
    models: dict[str, ModelSpec] = field(default_factory=dict)

    @property
    def progress(self) -> bool:
        return self.settings.progress


__all__ = ["ModelRun", "RunContext"]
