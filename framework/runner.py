"""The runner: drives prompts through each model, calls the plugin hooks in order, writes results.

It owns the loop (Lightning's ``Trainer``); plugins are the callbacks (``framework/plugin.py`` documents the
call order). One model is in memory at a time; comparisons read both models' results back from the store.

Resume: each (plugin, model) result is marked done with a fingerprint of everything it depends on (the
plugin's options, the model spec, the data and generation settings). A re-run of the same job skips what is
done with the same fingerprint; generated responses are cached in ``responses/<model>.jsonl`` too.

Python API::

    from tuneshift.runner import run
    summary = run(cfg)          # cfg: a DictConfig valid against tuneshift.config.TuneshiftConfig
"""
from __future__ import annotations

import gc
import hashlib
import importlib
import json
import logging
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from tuneshift.adapters import ModelAdapter
from tuneshift.data import EncodedPrompt, Prompt, encode_prompt, left_pad, load_prompts
from tuneshift.loading import ModelSpec, load_model
from tuneshift.loggers import Logger, build_logger
from tuneshift.plugin import HookTimer, Plugin, build_plugins
from tuneshift.probes import Captures, ProbeRegistry
from tuneshift.results import ResultStore, atomic_write_bytes

log = logging.getLogger("tuneshift")


@dataclass
class ModelRun:
    """One loaded model and everything plugins need about it (see docs/plugin_contract.md)."""

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
class Batch:
    """Prompts (with responses when generated) as one left-padded batch."""

    index: int
    items: list[EncodedPrompt]
    input_ids: torch.Tensor  # [B, T] prompt + response, left-padded
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]


@dataclass
class RunContext:
    cfg: DictConfig
    store: ResultStore
    logger: Logger
    output_dir: Path
    prompts: list[Prompt]
    pairs: list[tuple[str, str]]
    progress: bool = True


def _fingerprint(*parts: Any) -> str:
    blob = json.dumps([OmegaConf.to_container(p, resolve=True) if OmegaConf.is_config(p) else p for p in parts],
                      sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def make_batches(items: list[EncodedPrompt], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Consecutive batches of prompt (+ response) ids, left-padded with position ids over real tokens."""
    for index, start in enumerate(range(0, len(items), batch_size)):
        chunk = items[start:start + batch_size]
        seqs = [e.input_ids if e.response_ids is None else torch.cat([e.input_ids, e.response_ids]) for e in chunk]
        ids, mask, pos = left_pad(seqs, pad_id)
        yield Batch(index, chunk, ids, mask, pos)


def _stop_ids(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_responses(run: ModelRun, max_new_tokens: int, batch_size: int, progress: bool) -> None:
    """Greedy responses of ``run.model`` to its own prompts, in place (``response_ids`` without the stop token)."""
    stops = _stop_ids(run.model, run.tokenizer)
    pad = run.tokenizer.pad_token_id
    batches = list(make_batches(run.encoded, batch_size, pad))
    for batch in tqdm(batches, desc=f"generate {run.name}", disable=not progress, leave=False):
        out = run.model.generate(input_ids=batch.input_ids.to(run.device),
                                 attention_mask=batch.attention_mask.to(run.device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=sorted(stops) or None,
                                 top_p=None, top_k=None, temperature=None)
        new = out[:, batch.input_ids.shape[1]:].cpu()
        for item, row in zip(batch.items, new):
            stop_at = [i for i, t in enumerate(row.tolist()) if t in stops]
            item.response_ids = row[: stop_at[0] if stop_at else len(row)].clone()
            item.response_text = run.tokenizer.decode(item.response_ids, skip_special_tokens=True)


class Runner:
    """Runs the plugins over every model of ``cfg.model`` and every pair of it."""

    def __init__(self, cfg: DictConfig, output_dir: str | Path | None = None):
        self.cfg = cfg
        self.output_dir = Path(output_dir or Path(cfg.run.root) / cfg.run.name)
        self.store = ResultStore(self.output_dir)
        for module in cfg.run.plugin_modules:
            importlib.import_module(module)  # a user's plugin registers itself on import
        self.plugins: list[Plugin] = build_plugins(cfg.plugins)
        self.timer = HookTimer()

    # ---- hooks dispatch -------------------------------------------------------------------------------------
    def _call(self, plugins: list[Plugin], hook: str, *args: Any) -> None:
        for plugin in plugins:
            with self.timer.span(plugin, hook):
                getattr(plugin, hook)(*args)

    def _plugin_fingerprint(self, plugin: Plugin, spec: ModelSpec | None) -> str:
        return _fingerprint(OmegaConf.to_container(OmegaConf.structured(plugin.options)),
                            None if spec is None else OmegaConf.to_container(OmegaConf.structured(spec)),
                            self.cfg.data, None if plugin.weight_only else self.cfg.generation)

    def _is_done(self, plugin: Plugin, key: str, fingerprint: str) -> bool:
        return self.cfg.run.resume and self.store.is_done(plugin.name, key, fingerprint)

    # ---- the run --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.run.seed)
        atomic_write_bytes(self.output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True).encode())
        prompts = load_prompts(cfg.data.format, cfg.data.path, cfg.data.limit, list(cfg.data.splits) or None,
                               list(cfg.data.ids) or None)
        pairs = [tuple(p) for p in cfg.model.pairs]
        for pair in pairs:
            missing = [k for k in pair if k not in cfg.model.models]
            if len(pair) != 2 or missing:
                raise ValueError(f"model.pairs entry {list(pair)} must name two keys of model.models "
                                 f"({', '.join(cfg.model.models)})")
        logger = build_logger(cfg.logger.kind, self.output_dir, cfg.logger.project, cfg.model.name,
                              cfg.logger.group or cfg.model.name, cfg.logger.mode,
                              OmegaConf.to_container(cfg, resolve=True), list(cfg.logger.tags))
        ctx = RunContext(cfg, self.store, logger, self.output_dir, prompts, pairs, cfg.run.progress)
        started = time.perf_counter()
        try:
            self._call(self.plugins, "setup", ctx)
            self._call(self.plugins, "on_run_start", ctx)
            for key, spec_cfg in cfg.model.models.items():
                self._run_model(ctx, key, OmegaConf.to_object(spec_cfg))
            for base, tuned in pairs:
                self._compare(ctx, base, tuned)
            self._call(self.plugins, "on_run_end", ctx)
        finally:
            self._call(self.plugins, "teardown", ctx)
            self.store.update_summary("timing", {"seconds_total": time.perf_counter() - started,
                                                 "seconds_by_hook": self.timer.seconds})
            if cfg.run.report:
                from tuneshift.report import write_report

                write_report(self.output_dir, logger=logger)  # also after an error: shows what finished
            logger.finish()
        return self.store.summary()

    def _run_model(self, ctx: RunContext, key: str, spec: ModelSpec) -> None:
        fingerprints = {p.name: self._plugin_fingerprint(p, spec) for p in self.plugins}
        pending = [p for p in self.plugins if not self._is_done(p, key, fingerprints[p.name])]
        if not pending:
            log.info("model %s: every plugin already done, skipped", key)
            return
        traced = [p for p in pending if not p.weight_only]
        needs_jvp_safe_attention = any(getattr(p, "needs_eager_attention", False) for p in traced)
        model, tokenizer = load_model(spec, "eager" if needs_jvp_safe_attention else None)
        chat = self.cfg.generation.chat_template
        chat = spec.chat_template if chat is None else chat
        run = ModelRun(key, spec.name, spec, model, tokenizer, ModelAdapter(model), bool(chat))
        try:
            self._call(pending, "on_model_start", ctx, run)
            if traced:
                run.encoded = [encode_prompt(tokenizer, p, run.chat_template) for p in ctx.prompts]
                if any(p.needs_responses for p in traced):
                    self._responses(ctx, run)
                self._batches(ctx, run, traced)
            self._call(pending, "on_model_end", ctx, run)
            for plugin in pending:
                self.store.mark_done(plugin.name, key, fingerprints[plugin.name])
            self.store.update_summary("models", {key: {"name": spec.name, **run.adapter.describe()}})
        finally:
            del run, model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def _responses(self, ctx: RunContext, run: ModelRun) -> None:
        """Generate each prompt's response, or reuse the cached ones of an identical earlier run."""
        gen = self.cfg.generation
        fingerprint = _fingerprint(OmegaConf.to_container(OmegaConf.structured(run.spec)), gen, self.cfg.data)
        path = self.output_dir / "responses" / f"{run.key}.jsonl"
        if self.cfg.run.resume and path.is_file():
            rows = [json.loads(line) for line in path.read_text().splitlines()]
            if rows and rows[0].get("fingerprint") == fingerprint and len(rows) == len(run.encoded):
                for item, row in zip(run.encoded, rows):
                    item.response_ids = torch.tensor(row["response_ids"], dtype=torch.long)
                    item.response_text = row["response"]
                return
        generate_responses(run, gen.max_new_tokens, gen.batch_size, ctx.progress)
        lines = [json.dumps({"fingerprint": fingerprint, "id": e.prompt.id, "prompt": e.prompt.text,
                             "response": e.response_text, "response_ids": e.response_ids.tolist()})
                 for e in run.encoded]
        atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())

    def _batches(self, ctx: RunContext, run: ModelRun, plugins: list[Plugin]) -> None:
        registry = ProbeRegistry(run.adapter, {p.name: p.probes(run) for p in plugins})
        if registry.needs_attention_pattern and run.model.config._attn_implementation != "eager":
            run.model.set_attn_implementation("eager")
        batches = make_batches(run.encoded, self.cfg.run.batch_size, run.tokenizer.pad_token_id)
        total = -(-len(run.encoded) // self.cfg.run.batch_size)
        for batch in tqdm(batches, total=total, desc=f"{run.name}", disable=not ctx.progress, leave=False):
            captures = registry.run(run.nnsight, batch.input_ids, batch.attention_mask, batch.position_ids) \
                if not registry.empty else {}
            for plugin in plugins:
                with self.timer.span(plugin, "on_batch"):
                    plugin.on_batch(ctx, run, batch, captures.get(plugin.name, Captures()))
            del captures

    def _compare(self, ctx: RunContext, base: str, tuned: str) -> None:
        key = ResultStore.compare_key(base, tuned)
        for plugin in self.plugins:
            fingerprint = _fingerprint(self._plugin_fingerprint(plugin, None), base, tuned,
                                       OmegaConf.to_container(self.cfg.model.models, resolve=True))
            if self._is_done(plugin, key, fingerprint):
                continue
            with self.timer.span(plugin, "on_compare"):
                plugin.on_compare(ctx, base, tuned)
            self.store.mark_done(plugin.name, key, fingerprint)
            headline = self.store.dir(plugin.name, key) / "summary.json"
            if headline.is_file():  # a plugin's comparison summary is the run's headline for that plugin
                self.store.update_summary(plugin.name, {f"{base}__{tuned}": json.loads(headline.read_text())})


def run(cfg: DictConfig, output_dir: str | Path | None = None) -> dict:
    """Run the job described by ``cfg``; returns the run summary (also in ``summary.json``)."""
    return Runner(cfg, output_dir).run()
