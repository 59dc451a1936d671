"""The ``saliency`` plugin (methods.md A): the glue between the runner and the pure modules of this package.

Per model (``on_model_end``), over every prompt with the model's own greedy response (or, with
``generation.response_source`` tuned/base/reference, the shared response on identical tokens, so Table 2
compares base and tuned on the same tokens):

1. exact gradient x input matrices ``I [n_content_tokens, n_response]`` (:mod:`.attribution`); rows are the
   prompt's content tokens: BOS and chat-template tokens are not attributed (the paper excludes BOS);
2. integer scores ``S`` (b = 0, stored), densities and the prompt score at the statistics threshold ``b``
   (:mod:`.density`); the density profile over relative prompt position;
3. Table 1 (followed vs not followed) when a ratings file is given for this model (:mod:`.stats`).

Per (base, tuned) pair (``on_compare``): Table 2 (Welch, base < tuned) per split, the score distributions
and the density profiles of both models.

Files (``<run>/saliency/<model>/``): ``scores.parquet`` (one row per prompt: id, split, score, counts, path
used, skip reason), ``densities.parquet`` (one row per prompt token), ``matrices.npz`` (``S_<i>`` uint8 per
prompt, ``I_<i>`` float32 with ``save_raw``, ``ids``), ``density_profile.parquet``, ``follow_tests.json``
(Table 1, with ratings), ``examples.html``, ``summary.json``. Comparison (``saliency/compare/<b>__<t>/``):
``welch_tests.parquet``, ``summary.json``, ``score_distribution.png``, ``density_profile.png``/``.parquet``.

Prompts without an instruction token get no score (NaN, ``skip_reason="no instruction tokens"``) and are
left out of the statistics; an empty response scores 0 (the paper's rule).
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import pandas as pd

from tuneshift.data import encode_prompt
from tuneshift.plugin import Plugin, PluginError
from tuneshift.plugins.saliency import density as dens
from tuneshift.plugins.saliency import section as report_section
from tuneshift.plugins.saliency import stats, views
from tuneshift.attribution import MODES, TARGETS, attribute, make_item, plan_modes

if TYPE_CHECKING:
    from tuneshift.data import EncodedPrompt
    from tuneshift.runner import ModelRun, RunContext


@dataclass
class SaliencyOptions:
    """Options of the ``saliency`` plugin (``conf/plugins/saliency.yaml``)."""

    target: str = "prob"                   # prob (the paper) | logprob | logit: what is differentiated
    b: float = 7.0                         # sparsification threshold for densities and statistics (paper: 7)
    p: float = 4.0                         # density norm exponent (paper: 4)
    max_new_tokens: Optional[int] = None   # response tokens attributed; None: the run's generation.max_new_tokens
    chat_template: Optional[bool] = None   # None: the run's setting; otherwise prompts rendered this way
    mode: str = "auto"                     # auto (cheaper of the two per prompt) | vjp | jvp
    max_batch_tokens: int = 16384          # vectorised positions per pass (directions x prompts x length)
    max_batch_prompts: int = 8             # prompts sharing one pass
    save_raw: bool = False                 # also store the raw gradient x input matrices (float32)
    html_prompts: int = 12                 # prompts shown in examples.html (0: none)
    ratings: str = ""                      # ratings file for Table 1 (AnnotatedDataset.tsv or id/rating TSV/CSV)
    ratings_model: str = ""                # rows of this `Model` value in the ratings file ("" : all rows)
    ratings_for: str = "tuned"             # model key whose responses the ratings judge
    min_output_tokens: int = 5             # Table 1 drops shorter responses
    profile_bins: int = 10                 # bins of the density profile over relative prompt position


class SaliencyPlugin(Plugin):
    """Method A: gradient x input attribution, importance density, instruction scores, Tables 1 and 2."""

    name = "saliency"
    Options = SaliencyOptions
    needs_responses = True

    def remote_blocker(self) -> str | None:
        return ("differentiates through the weights here (batched VJPs and JVPs); for a hosted model run the "
                "authors' one-backward-per-token algorithm as one remote session (docs/scaling.md section 4)")

    def setup(self, ctx: "RunContext") -> None:
        o = self.options
        if o.target not in TARGETS:
            raise PluginError(f"saliency.target={o.target!r}; choose one of {', '.join(TARGETS)}")
        if o.mode not in MODES:
            raise PluginError(f"saliency.mode={o.mode!r}; choose one of {', '.join(MODES)}")
        if not 0 <= o.b < 10:
            raise PluginError(f"saliency.b={o.b}: the threshold must lie in [0, 10) (scores are 0..10)")
        if o.p <= 1:
            raise PluginError(f"saliency.p={o.p}: the density exponent must be > 1 (paper: 4)")
        if o.max_new_tokens is not None and o.max_new_tokens < 1:
            raise PluginError("saliency.max_new_tokens must be positive or null")
        if ctx.generation.response_source != "own" and o.chat_template is not None:
            raise PluginError(f"saliency.chat_template={o.chat_template} conflicts with generation.response_source="
                              f"{ctx.generation.response_source}: a shared response fixes the input format; leave "
                              "saliency.chat_template null")
        if o.ratings:
            from tuneshift.plugins.saliency.paper import load_ratings

            self._ratings = load_ratings(o.ratings, o.ratings_model or None)
        else:
            self._ratings = None

    # ---- per model --------------------------------------------------------------------------------------------
    def _encoded(self, ctx: "RunContext", run: "ModelRun") -> list["EncodedPrompt"]:
        """The prompts with responses this plugin attributes: the run's, or its own when options differ."""
        o = self.options
        run_max = int(ctx.generation.max_new_tokens)
        chat = run.chat_template if o.chat_template is None else bool(o.chat_template)
        wanted = run_max if o.max_new_tokens is None else int(o.max_new_tokens)
        shared = ctx.generation.response_source != "own"  # the run's shared response, identical tokens
        if shared or (chat == run.chat_template and wanted <= run_max and run.encoded and
                      all(e.response_ids is not None for e in run.encoded)):
            encoded = run.encoded  # greedy: a shorter generation is a prefix of the run's own
        else:
            from tuneshift.generation import generate_responses

            prompts = [e.prompt for e in run.encoded] or ctx.prompts  # as the runner fitted them to the context
            own = dataclasses.replace(run, chat_template=chat,
                                      encoded=[encode_prompt(run.tokenizer, p, chat) for p in prompts])
            generate_responses(own, wanted, int(ctx.generation.batch_size), ctx.progress)
            encoded = own.encoded
        return [dataclasses.replace(e, response_ids=e.response_ids[:wanted]) for e in encoded]

    def on_model_end(self, ctx: "RunContext", run: "ModelRun") -> None:
        o = self.options
        encoded = self._encoded(ctx, run)
        items = [make_item(e.input_ids, e.response_ids, e.content_mask) for e in encoded]
        plans = plan_modes(items, o.mode)
        started = time.perf_counter()
        from tqdm.auto import tqdm

        with tqdm(total=len(items), desc=f"saliency {run.name}", disable=not ctx.progress, leave=False) as bar:
            matrices = attribute(run.model, items, target=o.target, mode=o.mode, max_batch_tokens=o.max_batch_tokens,
                                 max_batch_prompts=o.max_batch_prompts, pad_token_id=run.tokenizer.pad_token_id,
                                 progress=bar.update)
        seconds = time.perf_counter() - started

        score_rows, token_rows, arrays, profiles, shown = [], [], {}, [], []
        for i, (e, raw, plan) in enumerate(zip(encoded, matrices, plans)):
            raw_np = raw.double().numpy()                                  # [N, M]
            levels = dens.normalise(raw_np, 0.0)                           # S, b = 0 (stored, pictures)
            density = dens.density(dens.threshold(levels, o.b), o.p)       # a_n at the statistics threshold
            instr = e.instruction_mask[e.content_mask].numpy()             # [N]
            score = dens.prompt_score(density, instr, e.n_response)
            reason = ("empty response" if e.n_response == 0 else
                      "no instruction tokens" if not instr.any() else "")
            score_rows.append({"id": e.prompt.id, "split": e.prompt.split, "score": score,
                               "n_prompt_tokens": int(instr.size), "n_instruction": int(instr.sum()),
                               "n_response": e.n_response, "path": plan, "skip_reason": reason})
            norm = dens.normalised_density(density)
            tokens = views.token_strings(run.tokenizer, e.input_ids[e.content_mask].tolist())
            token_rows += [{"id": e.prompt.id, "position": n, "token": t, "instruction": bool(instr[n]),
                            "density": float(density[n]), "density_norm": float(norm[n])}
                           for n, t in enumerate(tokens)]
            arrays[f"S_{i}"] = levels.astype(np.uint8)
            if o.save_raw:
                arrays[f"I_{i}"] = raw.numpy().astype(np.float32)
            profiles.append(dens.decile_profile(density, o.profile_bins))
            if i < o.html_prompts:
                shown.append(views.PromptView(e.prompt.id, e.prompt.split, tokens, instr, density, norm,
                                              views.token_strings(run.tokenizer, e.response_ids.tolist()),
                                              levels, score, reason))
        arrays["ids"] = np.array([e.prompt.id for e in encoded], dtype=str)
        scores = pd.DataFrame(score_rows)
        profile = stats.decile_table({run.key: np.stack(profiles) if profiles else np.zeros((0, o.profile_bins))})

        store, key = ctx.store, run.key
        store.save_table(self.name, key, "scores", scores)
        store.save_table(self.name, key, "densities", pd.DataFrame(token_rows))
        store.save_arrays(self.name, key, "matrices", arrays)
        store.save_table(self.name, key, "density_profile", profile)
        summary = self._summary(scores, seconds, plans)
        if self._ratings is not None and key == o.ratings_for:
            follow = stats.table1(scores, self._ratings, o.min_output_tokens)
            store.save_json(self.name, key, "follow_tests", follow)
            summary["follow_tests"] = follow
        store.save_json(self.name, key, "summary", summary)
        if shown:
            page = store.save_text(self.name, key, "examples.html", views.examples_html(
                f"saliency: {run.name}", shown, f"Target: {o.target}; densities at b = {o.b}, p = {o.p}."))
            ctx.logger.log_html(f"{self.name}/{key}/examples", page)
        for png in views.model_figures(store.dir(self.name, key), key, run.name, scores, profile, shown):
            ctx.logger.log_image(f"{self.name}/{key}/{png.stem}", png)
        ctx.logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))},
                               prefix=f"{self.name}/{key}")
        ctx.logger.log_table(f"{self.name}/{key}/scores", scores)

    @staticmethod
    def _summary(scores: pd.DataFrame, seconds: float, plans: list[str]) -> dict:
        valid = scores["score"].dropna()
        by_split = {split: {"mean_score": float(rows["score"].mean()), "n": int(rows["score"].notna().sum())}
                    for split, rows in scores.groupby("split")}
        return {"mean_score": float(valid.mean()) if len(valid) else float("nan"), "n_prompts": int(len(scores)),
                "n_scored": int(len(valid)), "n_skipped_no_instruction": int((scores["skip_reason"] ==
                                                                             "no instruction tokens").sum()),
                "n_vjp": plans.count("vjp"), "n_jvp": plans.count("jvp"), "attribution_seconds": seconds,
                "by_split": by_split}

    def section(self, ctx: "RunContext", key: str):
        """Headline findings, captions and views of ``key`` (:mod:`.section`)."""
        return report_section.build(ctx.store, self.name, key, self.options)

    # ---- per pair ---------------------------------------------------------------------------------------------
    def on_compare(self, ctx: "RunContext", base: str, tuned: str) -> None:
        store = ctx.store
        b_scores = store.load_table(self.name, base, "scores")
        t_scores = store.load_table(self.name, tuned, "scores")
        table = stats.table2(b_scores, t_scores)
        key = store.compare_key(base, tuned)
        tests = pd.DataFrame([{"split": s, **r} for s, r in table.items()])
        store.save_table(self.name, key, "welch_tests", tests)
        pooled = stats.table2(b_scores.assign(split="all"), t_scores.assign(split="all")).get("all")
        summary = {"by_split": table, "all": pooled}
        store.save_json(self.name, key, "summary", summary)
        profile = store.load_table(self.name, base, "density_profile").merge(
            store.load_table(self.name, tuned, "density_profile"), on="decile")
        store.save_table(self.name, key, "density_profile", profile)
        dist = views.score_distribution_png(store.dir(self.name, key) / "score_distribution.png",
                                            {base: b_scores, tuned: t_scores}, f"instruction scores: {base} vs {tuned}")
        prof = views.density_profile_png(store.dir(self.name, key) / "density_profile.png", profile,
                                         f"importance density over relative prompt position: {base} vs {tuned}")
        ctx.logger.log_table(f"{self.name}/{key}/welch_tests", tests)
        ctx.logger.log_image(f"{self.name}/{key}/score_distribution", dist)
        ctx.logger.log_image(f"{self.name}/{key}/density_profile", prof)
        if pooled:
            ctx.logger.log_metrics({f"{k}": v for k, v in pooled.items()}, prefix=f"{self.name}/{key}")


__all__ = ["SaliencyOptions", "SaliencyPlugin"]
