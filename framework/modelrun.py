"""What the hooks receive: :class:`ModelRun` (one loaded model) and :class:`RunContext` (the run).

Both are made by the runner (:mod:`tuneshift.runner`, which re-exports them); plugins read them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    remote: bool | str = False  # nnsight's remote= for every trace of this model (tuneshift.remote)
    lm: Any = None  # the nnsight model; built on first use unless given (a remote model: meta weights)

    @property
    def device(self) -> torch.device:
        """Where inputs go: the model's device (the CPU for a remote model, whose weights are meta)."""
        from tuneshift.remote import input_device

        return input_device(self.model)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def nnsight(self):
        """An nnsight ``TransformersModel`` around the already loaded model (built on first use)."""
        if self.lm is None:
            from nnsight import TransformersModel

            self.lm = TransformersModel(self.model, tokenizer=self.tokenizer)
        return self.lm

    def fetch_modules(self, *paths: str) -> None:
        """Make the modules at ``paths`` compute here: a remote model's weights there are fetched once."""
        from tuneshift.remote import fetch_modules

        if self.remote is True:
            fetch_modules(self.nnsight, paths, self.remote)


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
