"""Prompts as each model sees them, with the responses it is scored on (``generation.response_source``).

What it is for
    The runner hands every model its prompts encoded (template or BOS, instruction masks), fitted to its
    context, with a response: the model's own greedy one (generated, or read back from
    ``responses/<model>.jsonl`` when still valid), another model's (the shared response of
    :mod:`tuneshift.responses`, in that model's input format), or the dataset's reference. A source model that
    has not run yet is loaded first just to generate, so one model is in memory at a time.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Sequence

from tuneshift.adapters import ModelAdapter
from tuneshift.config import GenerationConfig
from tuneshift.context import context_limit, fit_context
from tuneshift.data import EncodedPrompt, Prompt, encode_prompt
from tuneshift.fingerprint import fingerprint
from tuneshift.generation import generate_responses
from tuneshift.loading import ModelSpec, load_model
from tuneshift.memory import release_memory
from tuneshift.modelrun import ModelRun, RunContext
from tuneshift.responses import (REFERENCE, apply_own, apply_reference, apply_shared, cache_path, encode_shared,
                                 read_cache, source_of, write_cache)


class PromptPreparer:
    """Encodes prompts and attaches responses for each model of a run (one instance per run)."""

    def __init__(self, models: dict[str, ModelSpec], pairs: Sequence[tuple[str, str]], generation: GenerationConfig,
                 prompts: Sequence[Prompt], data_fingerprint: str, output_dir: Path, resume: bool):
        self.models, self.pairs, self.generation = models, list(pairs), generation
        self.prompts, self.data_fingerprint = list(prompts), data_fingerprint
        self.output_dir, self.resume = output_dir, resume
        self.rows: dict[str, list[dict]] = {}  # responses generated or read in this run, by model

    def encode(self, run: ModelRun, prompts: Sequence[Prompt]) -> list[EncodedPrompt]:
        """Each prompt as ``run``'s model sees it, checked against its context (or cut to fit, when asked)."""
        return self.fit(run, [encode_prompt(run.tokenizer, p, run.chat_template) for p in prompts],
                         self.generation.truncate_prompts)

    def fit(self, run: ModelRun, encoded: list[EncodedPrompt], truncate: bool) -> list[EncodedPrompt]:
        """``encoded`` checked against ``run``'s context; too long is an error unless ``truncate``."""
        limit, source = context_limit(run.model, run.tokenizer)
        return fit_context(encoded, run.tokenizer, limit, source, self.generation.max_new_tokens, run.chat_template,
                           truncate, run.name)

    def chat_flag(self, key: str) -> bool:
        chat = self.generation.chat_template
        return bool(self.models[key].chat_template if chat is None else chat)

    def prepare(self, ctx: RunContext, run: ModelRun) -> None:
        """Encode the prompts and give each its response: the model's own, another model's, or the reference."""
        source = source_of(run.key, self.generation.response_source, self.pairs)
        if source == run.key:
            run.encoded = self.encode(run, ctx.prompts)
            self.own_responses(ctx, run)
            return
        rows = None if source == REFERENCE else self.source_rows(ctx, source)
        # the source's prompts were fitted already: here a prompt that does not fit is an error, never cut
        run.encoded = self.fit(run, encode_shared(run.tokenizer, ctx.prompts, run.chat_template, rows), False)
        if rows is None:
            apply_reference(run.encoded, run.tokenizer)
        else:
            apply_shared(run.encoded, rows, run.tokenizer)

    def own_fingerprint(self, spec: ModelSpec, chat: bool) -> str:
        gen = dataclasses.replace(self.generation, response_source="own")  # a response does not depend on who reads it
        return fingerprint(spec, gen, self.data_fingerprint, chat)

    def cached_rows(self, key: str, chat: bool) -> list[dict] | None:
        """``key``'s own responses from this run or, on resume, from its valid cache file."""
        rows = self.rows.get(key)
        if rows is None and self.resume:
            rows = read_cache(cache_path(self.output_dir, key), self.own_fingerprint(self.models[key], chat),
                              [p.id for p in self.prompts])
        return rows

    def own_responses(self, ctx: RunContext, run: ModelRun) -> None:
        """Generate each prompt's response, or reuse the cached ones of an identical earlier run."""
        gen, fp = self.generation, self.own_fingerprint(run.spec, run.chat_template)
        rows = self.cached_rows(run.key, run.chat_template)
        if rows is not None and rows[0].get("fingerprint") == fp:
            apply_own(run.encoded, rows)
        else:
            generate_responses(run, gen.max_new_tokens, gen.batch_size, ctx.progress)
            rows = write_cache(cache_path(self.output_dir, run.key), fp, run)
        self.rows[run.key] = rows

    def source_rows(self, ctx: RunContext, source: str) -> list[dict]:
        """``source``'s own responses: from this run, its cache, or a first pass that loads it just to generate."""
        rows = self.cached_rows(source, self.chat_flag(source))
        if rows is not None:
            self.rows[source] = rows
        else:
            spec = self.models[source]
            model, tokenizer = load_model(spec)
            try:
                run = ModelRun(source, spec.name, spec, model, tokenizer, ModelAdapter(model), self.chat_flag(source))
                self.prepare(ctx, run)
            finally:
                del model
                release_memory()
        return self.rows[source]


__all__ = ["PromptPreparer"]
