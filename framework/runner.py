"""The runner: drives prompts through each model, calls the plugin hooks in order, writes results.

It owns the loop (Lightning's ``Trainer``); plugins are the callbacks (:mod:`tuneshift.plugin` documents the
call order). One model is in memory at a time; comparisons read both models' results back from the store.
It takes objects (plugin instances, model specs, prompts, a store, a logger, settings); turning a Hydra config
into those objects is :mod:`tuneshift.cli`'s job, and :mod:`tuneshift.api` builds them for notebooks.

Resume and provenance: a run folder belongs to one set of results-relevant settings (``settings.json``); a
runner refuses a folder that holds results of other settings before writing anything. Each (plugin, model)
result is marked done with a fingerprint of everything it depends on (the plugin's options, the model spec,
the prompts as loaded, generation), and generated responses are cached in ``responses/<model>.jsonl`` with
theirs, so a re-run skips exactly what is still valid.

Prompts and responses (:mod:`tuneshift.prompting`): each model gets its prompts fitted to its context and the
responses of ``generation.response_source``; a source model that has not run yet is loaded first just to
generate them, so the models still run in config order, one in memory at a time.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from tuneshift.adapters import ModelAdapter
from tuneshift.config import GenerationConfig, RunConfig
from tuneshift.data import Prompt
from tuneshift.errors import ConfigError, RunFolderError
from tuneshift.fingerprint import fingerprint, prompts_fingerprint, settings_dict
from tuneshift.generation import Batch, generate_responses, make_batches
from tuneshift.loading import ModelSpec, load_model, preflight
from tuneshift.loggers import Logger, LocalLogger
from tuneshift.memory import release_memory
from tuneshift.plugin import HookTimer, Plugin
from tuneshift.probes import Captures, ProbeRegistry
from tuneshift.modelrun import ModelRun, RunContext
from tuneshift.prompting import PromptPreparer
from tuneshift.remote import check_remote, load_remote, nnsight_remote
from tuneshift.responses import (REFERENCE, check_response_source, format_model, paired_with, source_of)
from tuneshift.results import ResultStore, atomic_write_bytes, atomic_write_json
from tuneshift.sections import Headline, Section

log = logging.getLogger("tuneshift")


@dataclass
class Finding:
    """A headline of one plugin's comparison of one pair, as the run prints it at the end."""

    plugin: str
    base: str
    tuned: str
    headline: Headline

    def text(self) -> str:
        return f"[{self.plugin}] {self.headline.text(self.base, self.tuned)}"


def default_threads() -> int:
    """Half the cores (at least 1): intra-op threads spin-wait, so oversubscribing a busy machine is ruinous."""
    return max(1, (os.cpu_count() or 2) // 2)


class Runner:
    """Runs ``plugins`` over every model of ``models`` and every ``(base, tuned)`` pair of them."""

    def __init__(self, plugins: Sequence[Plugin], models: dict[str, ModelSpec], prompts: Sequence[Prompt], *,
                 store: ResultStore, pairs: Sequence[tuple[str, str]] = (),
                 logger: Logger | Callable[[], Logger] | None = None,
                 generation: GenerationConfig | None = None, settings: RunConfig | None = None,
                 provenance: dict | None = None):
        self.plugins = list(plugins)
        self.models = dict(models)
        self.prompts = list(prompts)
        self.pairs = [tuple(p) for p in pairs]
        self.store = store
        self.output_dir = store.root
        self._logger = logger  # a Logger, or a factory called once the run folder is claimed
        self.logger: Logger = logger if isinstance(logger, Logger) else Logger()
        self.generation = generation or GenerationConfig()
        self.settings = settings or RunConfig()
        self.provenance = provenance
        self.timer = HookTimer()
        self.findings: list[Finding] = []
        self._check_inputs()
        self.data_fingerprint = prompts_fingerprint(self.prompts)
        self.prep = PromptPreparer(self.models, self.pairs, self.generation, self.prompts, self.data_fingerprint,
                                   self.output_dir, self.settings.resume)
        self.settings_hash = fingerprint({"models": self.models, "pairs": self.pairs, "data": self.data_fingerprint,
                                          "generation": self.generation, "run": self.settings,
                                          "plugins": {p.name: p.options for p in self.plugins}})

    def _check_inputs(self) -> None:
        names = [p.name for p in self.plugins]
        if len(set(names)) != len(names):
            raise ConfigError(f"a plugin appears twice in {names}; each plugin runs once per job")
        for pair in self.pairs:
            missing = [k for k in pair if k not in self.models]
            if len(pair) != 2 or missing:
                raise ConfigError(f"model.pairs entry {list(pair)} must name two keys of model.models "
                                  f"({', '.join(self.models)})")
        if not self.prompts and any(not p.weight_only for p in self.plugins):
            raise ConfigError("the data selection holds no prompts; check data.path, data.splits and data.ids")
        if self.settings.batch_size < 1 or self.generation.batch_size < 1:
            raise ConfigError(f"run.batch_size={self.settings.batch_size} and generation.batch_size="
                              f"{self.generation.batch_size} must be at least 1")
        if self.generation.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens={self.generation.max_new_tokens} must be at least 1")
        check_response_source(self.generation.response_source, self.prompts, list(self.models), self.pairs)
        for key, spec in self.models.items():
            preflight(spec, key)  # a wrong path or device fails now, not after the first model's work
        check_remote(self.settings.remote, self.plugins, self.models)
        if self.settings.threads < 0:
            raise ConfigError(f"run.threads={self.settings.threads}: give a number of CPU threads, or 0 for the "
                              "default (half the cores)")

    # ---- hooks dispatch -------------------------------------------------------------------------------------
    def _call(self, plugins: list[Plugin], hook: str, *args: Any) -> None:
        for plugin in plugins:
            with self.timer.span(plugin, hook):
                getattr(plugin, hook)(*args)

    def _plugin_fingerprint(self, plugin: Plugin, spec: ModelSpec | None, key: str | None = None) -> str:
        parts = [plugin.options, spec, self.data_fingerprint, None if plugin.weight_only else self.generation]
        if key is not None and not plugin.weight_only and self.generation.response_source != "own":
            parts.append({k: self.models[k] for k in paired_with(key, self.pairs)})  # shared tokens: partners too
        return fingerprint(*parts)

    def _is_done(self, plugin: Plugin, key: str, fp: str, ctx: RunContext | None = None) -> bool:
        return self.settings.resume and self.store.is_done(plugin.name, key, fp) and \
            (ctx is None or plugin.results_reusable(ctx, key))

    def _finish(self, ctx: RunContext, plugin: Plugin, key: str, fp: str) -> Section | None:
        """Store ``plugin``'s section of ``key``, then mark ``key`` done (the marker is written last)."""
        with self.timer.span(plugin, "section"):
            section = plugin.section(ctx, key)
        if section is not None:
            self.store.save_json(plugin.name, key, "section", section.to_dict())
        self.store.mark_done(plugin.name, key, fp)
        return section

    # ---- the run folder -------------------------------------------------------------------------------------
    def _claim_folder(self) -> None:
        """Refuse a folder holding results of other settings; record ours (before anything else is written)."""
        path = self.output_dir / "settings.json"
        if path.is_file():
            try:
                held = json.loads(path.read_text()).get("hash")
            except (OSError, ValueError):
                held = None
            if held is not None and held != self.settings_hash:
                raise RunFolderError(
                    f"run folder {str(self.output_dir)!r} holds results of other settings (hash {held}, this run "
                    f"{self.settings_hash}); nothing was changed. Run without an explicit hydra.run.dir (each "
                    "setting gets its own folder), or choose a new folder")
        try:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            self.store.clean_partial_writes()
            atomic_write_json(path, {"hash": self.settings_hash, "settings": settings_dict(
                {"models": self.models, "pairs": self.pairs, "generation": self.generation, "run": self.settings,
                 "plugins": {p.name: p.options for p in self.plugins}}), "data_fingerprint": self.data_fingerprint})
            if self.provenance is not None:
                import yaml

                atomic_write_bytes(self.output_dir / "config.yaml", yaml.safe_dump(self.provenance).encode())
        except OSError as err:
            state = ("it holds the finished results of these settings, untouched: read them there (or run "
                     "tuneshift-report on a writable copy)" if self._all_done() else
                     "nothing was changed; choose a writable run.root (or hydra.run.dir)")
            raise RunFolderError(f"run folder {str(self.output_dir)!r} is not writable ({err.strerror}); "
                                 f"{state}") from None

    def _all_done(self) -> bool:
        """Whether every (plugin, model) and (plugin, pair) result of these settings is marked done."""
        for plugin in self.plugins:
            for key, spec in self.models.items():
                if not self.store.is_done(plugin.name, key, self._plugin_fingerprint(plugin, spec)):
                    return False
            for base, tuned in self.pairs:
                if not self.store.is_done(plugin.name, ResultStore.compare_key(base, tuned),
                                          self._compare_fingerprint(plugin, base, tuned)):
                    return False
        return True

    def _compare_fingerprint(self, plugin: Plugin, base: str, tuned: str) -> str:
        return fingerprint(self._plugin_fingerprint(plugin, None), base, tuned, self.models)

    # ---- the run --------------------------------------------------------------------------------------------
    def run(self) -> dict:
        torch.manual_seed(self.settings.seed)
        torch.set_num_threads(self.settings.threads or default_threads())
        ctx = RunContext(self.store, self.logger, self.output_dir, self.prompts, self.pairs, self.generation,
                         self.settings, self.models)
        started = time.perf_counter()
        self._call(self.plugins, "setup", ctx)  # validation first: a bad option changes nothing on disk
        self._claim_folder()
        if not isinstance(self._logger, Logger):
            self.logger = ctx.logger = self._logger() if callable(self._logger) else LocalLogger(self.output_dir)
        try:
            self._call(self.plugins, "on_run_start", ctx)
            for key, spec in self.models.items():
                self._run_model(ctx, key, spec)
            for base, tuned in self.pairs:
                self._compare(ctx, base, tuned)
            self._call(self.plugins, "on_run_end", ctx)
        except BaseException:
            self._wrap_up_after_error(ctx, started)  # the run's own error is the one the user sees
            raise
        self._call(self.plugins, "teardown", ctx)
        self._wrap_up(started)
        return self.store.summary()

    def _wrap_up_after_error(self, ctx: RunContext, started: float) -> None:
        """Teardown, summary and report of a failed run; their own failures are logged, never raised."""
        for step in (lambda: self._call(self.plugins, "teardown", ctx), lambda: self._wrap_up(started)):
            try:
                step()
            except Exception as err:  # noqa: BLE001 -- it must not replace the error that stopped the run
                log.warning("after the run failed, wrapping up failed too (%s: %s)", type(err).__name__,
                            str(err).splitlines()[0][:200] if str(err) else "")

    def _wrap_up(self, started: float) -> None:
        self.store.update_summary("timing", {"seconds_total": time.perf_counter() - started,
                                             "seconds_by_hook": self.timer.seconds})
        self.store.update_summary("headlines", {"findings": [f.text() for f in self.findings]})
        metrics: dict[str, float] = {}
        for finding in self.findings:
            metrics.update(finding.headline.metrics(f"{finding.plugin}/{finding.base}__{finding.tuned}"))
        self.logger.log_summary(metrics)
        if self.settings.report:
            from tuneshift.report import write_report

            write_report(self.output_dir, logger=self.logger)  # also after an error: shows what finished
        self.logger.finish()

    def _load(self, key: str, spec: ModelSpec, traced: list[Plugin]) -> ModelRun:
        attn = "eager" if any(p.needs_eager_attention for p in traced) else None
        chat = self.prep.chat_flag(format_model(key, self.generation.response_source, self.pairs))
        remote = nnsight_remote(self.settings.remote)
        if remote is True:  # NDIF: config and tokenizer only, the weights stay on the server
            model, tokenizer, lm = load_remote(spec, attn)
        else:
            (model, tokenizer), lm = load_model(spec, attn), None
        return ModelRun(key, spec.name, spec, model, tokenizer, ModelAdapter(model), chat, remote=remote, lm=lm)

    def _run_model(self, ctx: RunContext, key: str, spec: ModelSpec) -> None:
        fingerprints = {p.name: self._plugin_fingerprint(p, spec, key) for p in self.plugins}
        pending = [p for p in self.plugins if not self._is_done(p, key, fingerprints[p.name], ctx)]
        if not pending:
            log.info("model %s: every plugin already done with these settings, skipped", key)
            return
        traced = [p for p in pending if not p.weight_only]
        source = source_of(key, self.generation.response_source, self.pairs)
        if any(p.needs_responses for p in traced) and source not in (key, REFERENCE):
            self.prep.source_rows(ctx, source)  # before this model loads: one model in memory at a time
        run = self._load(key, spec, traced)
        try:
            self._call(pending, "on_model_start", ctx, run)
            if traced:
                if any(p.needs_responses for p in traced):
                    self.prep.prepare(ctx, run)
                else:
                    run.encoded = self.prep.encode(run, ctx.prompts)
                self._batches(ctx, run, traced)
            self._call(pending, "on_model_end", ctx, run)
            self.store.update_summary("models", {key: {"name": spec.name, **run.adapter.describe()}})
            for plugin in pending:  # done markers last: a kill before them redoes this model, never skips it
                self._finish(ctx, plugin, key, fingerprints[plugin.name])
        finally:
            del run
            release_memory()  # the model's memory back to the OS before the next one loads

    def _batches(self, ctx: RunContext, run: ModelRun, plugins: list[Plugin]) -> None:
        registry = ProbeRegistry(run.adapter, {p.name: p.probes(run) for p in plugins})
        if registry.needs_attention_pattern and run.model.config._attn_implementation != "eager":
            run.model.set_attn_implementation("eager")
        batches = make_batches(run.encoded, self.settings.batch_size, run.tokenizer.pad_token_id)
        total = -(-len(run.encoded) // self.settings.batch_size)
        for batch in tqdm(batches, total=total, desc=f"{run.name}", disable=not ctx.progress, leave=False):
            captures = registry.run(run.nnsight, batch.input_ids, batch.attention_mask, batch.position_ids,
                                    tail=batch.response_tail, remote=run.remote) if not registry.empty else {}
            for plugin in plugins:
                with self.timer.span(plugin, "on_batch"):
                    plugin.on_batch(ctx, run, batch, captures.get(plugin.name, Captures()))
            del captures

    def _compare(self, ctx: RunContext, base: str, tuned: str) -> None:
        key = ResultStore.compare_key(base, tuned)
        for plugin in self.plugins:
            fp = self._compare_fingerprint(plugin, base, tuned)
            if self._is_done(plugin, key, fp):
                section = self.store.load_section(plugin.name, key)
            else:
                with self.timer.span(plugin, "on_compare"):
                    plugin.on_compare(ctx, base, tuned)
                section = self._finish(ctx, plugin, key, fp)
            summary = self.store.dir(plugin.name, key) / "summary.json"
            if summary.is_file():  # the comparison's numbers, also in the run's summary.json (also on resume)
                self.store.update_summary(plugin.name, {f"{base}__{tuned}": json.loads(summary.read_text())})
            for headline in (section.headlines if section else []):
                self.findings.append(Finding(plugin.name, base, tuned, headline))


__all__ = ["Batch", "Finding", "ModelRun", "RunContext", "Runner", "default_threads", "generate_responses",
           "make_batches"]
