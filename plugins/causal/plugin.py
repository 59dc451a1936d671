"""The ``causal`` plugin (methods.md E): do the units the three analyses point to matter for following instructions?

Per (base, tuned) pair (``on_compare``), on the run's prompts with their ``reference`` answers, each test against
matched random controls (:mod:`.controls`), scored by the held-out task scorer with generation under the
interventions (and, with ``logprob``, by the teacher-forced log-probability of the reference):

- ``heads``: mean-ablate the k heads whose instruction-verb pair counts grew most (``head_relations``) vs random
  k-head sets of the same layers;
- ``ffn``: project the r most rotated tuned FFN directions (lowest best-match cosine to the base, ``ffn_concepts``)
  out of their layers' MLP output vs r random pool directions of the same layers, vs random directions of similar
  explained variance (rank) in the same layers, and vs the r least rotated;
- ``tokens``: corrupt the n instruction tokens the tuned model's saliency ranks highest (``saliency``) vs n random
  context tokens and vs n random instruction tokens;
- ``patching``: the other model's residual stream at each depth patched in on the same tokens, base <- tuned
  (share of the tuned-vs-base gap recovered) and tuned <- base (share lost), vs steering by the mean difference.

Models are loaded here one at a time (base, tuned, base again); the other plugins' results are read from the
store (:mod:`.sources`). Files under ``causal/compare/<base>__<tuned>/``: ``effects.parquet`` (one row per test,
size, control and metric), ``patching.parquet``, ``conditions.parquet`` (every condition's mean scores),
``scores_<test>.npz`` (per-item scores, reused by a re-run with the same settings), ``selection.json``,
``summary.json``, ``heads.png``, ``ffn.png``, ``tokens.png``, ``patching.png`` and ``section.json``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch

from tuneshift.data import encode_prompt
from tuneshift.evaluation import capture_sites, loaded_model, reference_ids, site_means
from tuneshift.fingerprint import neutral
from tuneshift.plugin import Plugin, PluginError
from tuneshift.scoring import SCORERS
from tuneshift.plugins.causal import experiments as ex
from tuneshift.plugins.causal import report
from tuneshift.plugins.causal.runs import score_test
from tuneshift.plugins.causal.sources import (SourceMissing, head_growth, instruction_verbs, rotated_directions,
                                              salient_tokens)

TESTS = ("heads", "ffn", "tokens", "patching")


@dataclass
class CausalOptions:
    """Options of the ``causal`` plugin (defaults sized to run on the organism in minutes on 2 cores)."""

    tests: list[str] = field(default_factory=lambda: list(TESTS))
    scorer: str = "organism"           # the task score of generated answers (a tuneshift.scoring id)
    logprob: bool = True               # also score the teacher-forced log-probability of the reference
    draws: int = 39                    # random draws per size and control (permutation p >= 1 / (draws + 1))
    bootstrap: int = 2000              # bootstrap resamples (items within tasks, and draws)
    permutations: int = 10000          # sign flips for the patching p-values (exact when 2^n is smaller)
    seed: int = 0
    head_k: list[int] = field(default_factory=lambda: [1, 2, 4])
    head_ablation: str = "mean"        # mean (over the prompts' tokens) | zero
    match_layers: bool = True          # random heads from the selected heads' layers, same count per layer
    instruction_verbs: Optional[list[str]] = None  # None: the verbs head_relations ran with
    ffn_r: list[int] = field(default_factory=lambda: [4, 16])
    ffn_pool: int = 64                 # candidate directions per layer: the first N by explained variance
    ffn_rank_window: int = 8           # variance-matched control: a direction within this many ranks of each one
    token_n: list[int] = field(default_factory=lambda: [1, 3])
    corruption: str = "mean"           # mean (mean content-token embedding) | zero | noise (ROME: + N(0, (s sigma)^2))
    noise_scale: float = 3.0           # s of the noise corruption
    patch_layers: Optional[list[int]] = None  # depths patched (-1: embeddings); None: all
    steer_control: bool = True         # patching: also steer by the mean activation difference
    max_new_tokens: Optional[int] = None  # None: the run's generation.max_new_tokens (the evaluation's setting)
    max_rows: int = neutral(128)       # rows (condition x item) per forward
    max_tokens: int = neutral(16384)   # padded tokens per forward


class CausalPlugin(Plugin):
    """Causal tests of the three findings: ablate, project out, corrupt and patch what the analyses select,
    against matched random controls, and measure the held-out task score."""

    name = "causal"
    title = "Causal tests"
    Options = CausalOptions

    def remote_blocker(self) -> str | None:
        return ("decodes step by step with a local KV cache and loads both models again to patch between them; "
                "run it with run.remote=off")

    def setup(self, ctx: Any) -> None:
        o = self.options
        bad = [t for t in o.tests if t not in TESTS]
        if bad:
            raise PluginError(f"causal.tests {bad}: choose from {', '.join(TESTS)}")
        if o.scorer not in SCORERS or SCORERS.get(o.scorer).kind != "text":
            raise PluginError(f"causal.scorer={o.scorer!r}: give a text scorer ({', '.join(SCORERS.available())}; "
                              "logprob is switched on with causal.logprob=true)")
        if o.head_ablation not in ("mean", "zero") or o.corruption not in ("mean", "zero", "noise"):
            raise PluginError("causal.head_ablation must be mean|zero and causal.corruption mean|zero|noise")
        if o.draws < 1 or o.bootstrap < 100 or min(o.head_k + o.ffn_r + o.token_n, default=1) < 1:
            raise PluginError("causal: draws >= 1, bootstrap >= 100, and every k, r, n >= 1")
        missing = [p.id for p in ctx.prompts if p.reference is None]
        if missing:
            raise PluginError(f"causal: {len(missing)} prompts have no 'reference' answer (e.g. {missing[0]!r}); the "
                              "tests score answers against references (data=organism has them)")

    # ---- the comparison -------------------------------------------------------------------------------------
    def on_compare(self, ctx: Any, base: str, tuned: str) -> None:
        o, cmp = self.options, ctx.store.compare_key(base, tuned)
        started = time.perf_counter()
        chat = ctx.generation.chat_template
        chat = ctx.models[tuned].chat_template if chat is None else chat
        max_new = o.max_new_tokens or int(ctx.generation.max_new_tokens)
        scores, tests, notes, selection = {}, {}, [], {}
        patching = "patching" in o.tests
        captured: dict[str, Any] = {}

        def score(run, test, items):
            scores[test.name] = score_test(ctx, self, cmp, run, test, items, max_new)
            tests[test.name] = test

        if patching:
            with loaded_model(base, ctx.models[base], chat) as run:
                items_b = [encode_prompt(run.tokenizer, p, chat) for p in ctx.prompts]
                captured[base] = self._capture(run, items_b)
        with loaded_model(tuned, ctx.models[tuned], chat) as run:
            items = [encode_prompt(run.tokenizer, p, chat) for p in ctx.prompts]
            strata = np.array([e.prompt.category for e in items])
            if patching and any(not torch.equal(a.input_ids, b.input_ids) for a, b in zip(items, items_b)):
                notes.append("patching skipped: base and tuned encode the prompts into different tokens")
                patching = False
            for name, make in (("heads", self._heads), ("ffn", self._ffn), ("tokens", self._tokens)):
                if name not in o.tests:
                    continue
                try:  # each test its own random stream: changing one test's draws leaves the others'
                    test = make(ctx, run, items, base, tuned, np.random.default_rng([o.seed, TESTS.index(name)]))
                except SourceMissing as err:
                    notes.append(f"{name} test skipped: {err}")
                    continue
                selection[name] = test.info
                if "note" in test.info:
                    notes.append(f"{name}: {test.info['note']}")
                score(run, test, items)
            if patching:
                captured[tuned] = self._capture(run, items)
                score(run, self._patch("tuned_from_base", captured[base], captured[tuned]), items)
        if patching:
            with loaded_model(base, ctx.models[base], chat) as run:
                score(run, self._patch("base_from_tuned", captured[tuned], captured[base]), items_b)
        report.write(ctx, self, cmp, base, tuned, tests, scores, strata, selection, notes,
                     seconds=time.perf_counter() - started)

    def section(self, ctx: Any, key: str):
        return report.section(ctx, self, key) if key.startswith("compare/") else None

    # ---- tests ----------------------------------------------------------------------------------------------
    def _heads(self, ctx, run, items, base, tuned, rng) -> ex.Test:
        o, adapter = self.options, run.adapter
        growth = head_growth(ctx.store, base, tuned, instruction_verbs(ctx.output_dir, o.instruction_verbs))
        heads = list(zip(growth["layer"].tolist(), growth["head"].tolist()))
        means = {}
        if o.head_ablation == "mean":
            sites = [f"layers.{i}.attn.z" for i in range(adapter.n_layers)]
            found = site_means(run, [e.input_ids for e in items], sites, o.max_rows)
            means = {i: found[s] for i, s in enumerate(sites)}
        test = ex.heads_test(heads, sorted(heads), [k for k in o.head_k if k <= len(heads)], adapter.n_layers,
                             adapter.n_heads, means, o.head_ablation, o.draws, rng, o.match_layers)
        test.info = {"growth": growth.to_dict(orient="records")}
        k = max(o.head_k)
        grown = int((growth["growth"].head(k) > 0).sum())
        if grown < k:
            test.info["note"] = (f"only {grown} of the top-{k} heads gained instruction-verb pairs (growth "
                                 f"{', '.join(str(int(g)) for g in growth['growth'].head(k))}; "
                                 f"{int((growth['growth'] < 0).sum())} of {len(growth)} heads lost some): the heads test "
                                 "asks whether the heads that lost the fewest matter more than random ones")
        return test

    def _ffn(self, ctx, run, items, base, tuned, rng) -> ex.Test:
        o = self.options
        directions = rotated_directions(ctx.store, base, tuned, o.ffn_pool)
        test = ex.ffn_test(directions, [r for r in o.ffn_r if r <= len(directions.table)], o.draws, rng,
                           o.ffn_rank_window)
        test.info = {"pool_per_layer": o.ffn_pool,
                     "most_rotated": directions.table.head(max(o.ffn_r)).to_dict(orient="records"),
                     "least_rotated": directions.table.tail(max(o.ffn_r)).to_dict(orient="records")}
        return test

    def _tokens(self, ctx, run, items, base, tuned, rng) -> ex.Test:
        o = self.options
        tokens = salient_tokens(ctx.store, tuned, items)
        content = capture_sites(run, [e.input_ids for e in items], ["embed.output"], o.max_rows)["embed.output"]
        pooled = torch.cat([c[e.content_mask] for c, e in zip(content, items)]).double()  # [n_content, d]
        fill = {"mean": pooled.mean(0).float(), "zero": torch.zeros(pooled.shape[1]), "noise": None}[o.corruption]
        noise = o.noise_scale * float(pooled.std()) if o.corruption == "noise" else 0.0
        test = ex.tokens_test(tokens, o.token_n, o.draws, rng, fill, noise, o.seed)
        test.info = {"skipped": tokens.skipped, "corruption": o.corruption, "noise_std": noise,
                     "examples": [{"id": e.prompt.id, "salient": [e.tokens[i] for i in r[:max(o.token_n)]]}
                                  for e, r in list(zip(items, tokens.ranked_instruction))[:12]]}
        return test

    def _sites(self, n_layers: int) -> list[str]:
        sites = ex.patch_sites(n_layers)
        if self.options.patch_layers is None:
            return sites
        return [sites[i + 1] for i in self.options.patch_layers if -1 <= i < n_layers]

    def _capture(self, run, items) -> dict:
        """This model's activations at the patched sites over each prompt (and its reference, for log-probs)."""
        sites = self._sites(run.adapter.n_layers)
        seqs = [e.input_ids for e in items]
        if self.options.logprob:
            seqs = [torch.cat([s, r]) for s, r in zip(seqs, reference_ids(run.tokenizer, items))]
        n_prompt = [e.n_prompt for e in items]
        return {"acts": capture_sites(run, seqs, sites, self.options.max_rows), "sites": sites, "n_prompt": n_prompt}

    def _patch(self, direction: str, source: dict, own: dict) -> ex.Test:
        """Patch ``source`` (the other model) into this one; steer by the mean of (source - own) over prompt tokens."""
        def prompt_mean(captured: dict, site: str) -> torch.Tensor:
            acts = [a[:n] for a, n in zip(captured["acts"][site], captured["n_prompt"])]
            return torch.cat(acts).double().mean(0)

        shift = {s: (prompt_mean(source, s) - prompt_mean(own, s)).float() for s in source["sites"]}
        return ex.patch_test(direction, source["sites"], source["acts"], shift, self.options.steer_control)


__all__ = ["CausalOptions", "CausalPlugin"]
