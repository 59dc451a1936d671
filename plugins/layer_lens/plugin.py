"""The ``layer_lens`` plugin (methods.md D.2, D.3): where in depth tuning changes what the model computes.

Per model, on the shared response's positions, for each layer l: the logit lens (final norm + unembedding of
``resid_post_l``), KL(final || lens_l), the lens top-1 and the target's log-prob under the lens, and the
commitment depth (the first layer from which the lens top-1 equals the final top-1 at every later layer).
Per pair: the residual difference ``||h_T - h_B|| / ||h_B||`` and ``cos(h_T, h_B)`` at the same positions, per
layer; the commitment depths of the two models compared position by position (Wilcoxon signed-rank); and the
activation-difference lens (Minder et al., ICLR 2026): the mean ``h_T - h_B`` per layer at the chat-template
tokens, at the first response tokens, and at the first positions of plain text, decoded through the logit
lens of the model that runs second (the tuned model in the usual order, as diffing-toolkit decodes).

How: residual streams and logits come from the probe registry in the one shared trace per batch
(``resid_post`` of the lensed layers, ``logits`` with ``reduce="tail"``, kept on the device); the lens is
applied at the response positions only, chunked over positions so one float64 ``[chunk, V]`` block is in
memory at a time (:func:`tuneshift.distributions.lens_stats`). The last layer's lens is the model's own
output (tested), so it is not recomputed. The residuals the second model needs are cached per prompt by the
first (:class:`tuneshift.paired.PairedCache`); the ADL means are sums per model, so they need no cache.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from tuneshift.data import encode_prompt
from tuneshift.distributions import commitment_depth, lens_stats
from tuneshift.fingerprint import neutral
from tuneshift.generation import response_positions
from tuneshift.lens import logit_lens
from tuneshift.paired import PairedCache, PairedCacheError, PairedPlugin, pair_role, release
from tuneshift.plugin import PluginError
from tuneshift.plugins.layer_lens import adl, compare, views
from tuneshift.probes import Probe
from tuneshift.sections import Figure, Headline, Section, Table, format_number

if TYPE_CHECKING:
    from tuneshift.runner import Batch, ModelRun, RunContext


@dataclass
class LayerLensOptions:
    """Options of the ``layer_lens`` plugin."""

    layers: list[int] = field(default_factory=list)  # lensed layers (empty: every layer); the last is always in
    include_stop: bool = True       # also the position predicting the stop token
    adl_positions: int = 5          # first positions of plain text, and first response tokens, in the ADL
    adl_top_k: int = 10             # tokens decoded per activation-difference vector
    plain_texts: str = ""           # a text file, one text per line, for the ADL's plain text ("": the prompts)
    keep_paired_cache: bool = neutral(False)


class LayerLensPlugin(PairedPlugin):
    """Logit lens per layer of both models on the same tokens, commitment depth, residual differences and the
    activation-difference lens."""

    name = "layer_lens"
    title = "Layer lens"
    Options = LayerLensOptions
    runs_remote = True  # probes only; with run.remote=ndif the final norm and unembedding are fetched once

    def setup(self, ctx: "RunContext") -> None:
        o = self.options
        super().setup(ctx)  # a shared response
        if o.adl_positions < 1 or o.adl_top_k < 1:
            raise PluginError("layer_lens.adl_positions and adl_top_k must be at least 1")
        if o.plain_texts and not Path(o.plain_texts).expanduser().is_file():
            raise PluginError(f"layer_lens.plain_texts={o.plain_texts!r} does not exist; give a text file with one "
                              "text per line, or leave it empty to use the prompts")

    def _layers(self, n_layers: int) -> list[int]:
        chosen = sorted(set(self.options.layers)) if self.options.layers else list(range(n_layers))
        bad = [i for i in chosen if not 0 <= i < n_layers]
        if bad:
            raise PluginError(f"layer_lens.layers {bad} out of range: the model has {n_layers} layers")
        return sorted(set(chosen) | {n_layers - 1})

    # ---- per model ------------------------------------------------------------------------------------------
    def on_model_start(self, ctx: "RunContext", run: "ModelRun") -> None:
        self.layers = self._layers(run.adapter.n_layers)
        self._roles = pair_role(ctx, run.key)
        self._writer = any(w for *_, w in self._roles)
        self._cache = PairedCache(ctx.store, self.name, run.key)
        if self._writer:
            self._cache.start()
        run.fetch_modules(run.adapter.spec.final_norm, run.adapter.spec.lm_head)  # remote: the lens computes here
        self._lens = logit_lens(run.model, run.adapter)
        self._rows: list[pd.DataFrame] = []  # per batch, one row per position
        self._kl, self._agree, self._logp = [], [], []
        self._diff: dict[tuple[str, str], list[np.ndarray]] = {(b, t): [] for b, t, _, w in self._roles if not w}
        self._readers = {partner: PairedCache(ctx.store, self.name, partner)  # its index read once per model
                         for _, _, partner, is_writer in self._roles if not is_writer}
        self._slots = adl.SlotMeans()

    def probes(self, run: "ModelRun") -> list[Probe]:
        sites = [Probe(f"layers.{i}.resid_post", device="keep") for i in self._layers(run.adapter.n_layers)]
        return sites + [Probe("logits", reduce="tail", device="keep")]

    def on_batch(self, ctx: "RunContext", run: "ModelRun", batch: "Batch", captures) -> None:
        logits = captures["logits:tail"]                                               # [B, K, V]
        K = logits.shape[1]
        pos = response_positions(batch, K, self.options.include_stop)
        rows, cols = pos.rows.to(logits.device), pos.cols.to(logits.device)
        final = logits[rows, cols]                                                     # [N, V]
        final_top1 = final.argmax(-1)
        resid = {i: captures[f"layers.{i}.resid_post"] for i in self.layers}           # [B, T, d] each
        hidden = torch.stack([resid[i][:, -K:][rows, cols] for i in self.layers], 1)   # [N, L', d]
        N, L = hidden.shape[0], len(self.layers)
        got = lens_stats(hidden[:, :-1], final, self._lens, pos.targets)  # the last lens is the output itself
        kl = torch.cat([got["kl"], torch.zeros(N, 1, dtype=torch.float64, device=got["kl"].device)], 1).cpu()
        top1 = torch.cat([got["top1"], final_top1[:, None]], 1).cpu()                  # [N, L']
        logp = torch.cat([got["logp"], got["final_logp"][:, None]], 1).cpu()
        del got
        depth = commitment_depth(top1, final_top1.cpu())
        commit = np.append(np.array(self.layers, dtype=np.int64), L)[depth.numpy()]  # depth L: never commits
        columns = pos.columns(batch)
        del columns["n_response"]
        self._rows.append(pd.DataFrame({**columns, "commitment_layer": commit, "final_top1": final_top1.cpu().numpy()}))
        self._kl.append(kl.numpy())
        self._agree.append((top1 == final_top1.cpu()[:, None]).numpy())
        self._logp.append(logp.numpy())
        self._slots.add_batch(batch, resid, self.layers, self.options.adl_positions)
        full_ids = [torch.cat([e.input_ids, e.response_ids]) for e in batch.items]
        per_row = [hidden[pos.of_row(b).to(hidden.device)] for b in range(len(batch.items))]
        if self._writer:
            self._cache.write(batch.index, [e.prompt.id for e in batch.items], {"resid": per_row, "ids": full_ids})
        for base, tuned, partner, is_writer in self._roles:
            if is_writer:
                continue
            cache = self._readers[partner]
            for b, e in enumerate(batch.items):
                got = cache.read(e.prompt.id, ["resid", "ids"])
                if not torch.equal(got["ids"], full_ids[b]):
                    raise PairedCacheError(f"prompt {e.prompt.id!r}: {run.key!r} and {partner!r} saw different token "
                                           "ids; layer_lens needs identical tokens for both models of a pair")
                h_other = got["resid"].to(per_row[b].device)
                h_b, h_t = (h_other, per_row[b]) if run.key == tuned else (per_row[b], h_other)
                self._diff[(base, tuned)].append(compare.residual_difference(h_b, h_t))  # [n, L', 2]

    def on_model_end(self, ctx: "RunContext", run: "ModelRun") -> None:
        store, o = ctx.store, self.options
        positions = pd.concat(self._rows, ignore_index=True) if self._rows else pd.DataFrame()
        store.save_table(self.name, run.key, "positions", positions)
        kl, agree, logp = (np.concatenate(x) if x else np.zeros((0, len(self.layers))) for x in
                           (self._kl, self._agree, self._logp))
        store.save_arrays(self.name, run.key, "lens", {"kl": kl, "agree": agree, "logp": logp,
                                                        "layers": np.array(self.layers)})
        by_layer = pd.DataFrame({"layer": self.layers, "mean_kl": kl.mean(0) if len(kl) else np.nan,
                                 "top1_agreement": agree.mean(0) if len(agree) else np.nan,
                                 "mean_target_logp": logp.mean(0) if len(logp) else np.nan})
        store.save_table(self.name, run.key, "by_layer", by_layer)
        ctx.logger.log_table(f"{self.name}/{run.key}/by_layer", by_layer)
        plain = adl.plain_text_means(run, self._plain_prompts(ctx, run), self.layers, o.adl_positions,
                                     ctx.settings.batch_size)
        store.save_arrays(self.name, run.key, "adl_means", self._slots.arrays(plain))
        if self._writer:
            self._cache.finish({"model": run.key, "layers": self.layers})
        for (base, tuned), parts in self._diff.items():
            key = store.compare_key(base, tuned)
            diff = np.concatenate(parts) if parts else np.zeros((0, len(self.layers), 2))
            store.save_arrays(self.name, key, "resid_diff", {"rel_norm": diff[..., 0], "cos": diff[..., 1],
                                                             "layers": np.array(self.layers)})
            partner = base if run.key == tuned else tuned
            means = {partner: store.load_arrays(self.name, partner, "adl_means"),
                     run.key: store.load_arrays(self.name, run.key, "adl_means")}
            table = adl.decode(means[base], means[tuned], self._lens, run.tokenizer, o.adl_top_k, run.key)
            store.save_table(self.name, key, "adl", table)
        ctx.logger.log_metrics({"mean_commitment_layer": float(positions["commitment_layer"].mean())
                                if len(positions) else float("nan")}, prefix=f"{self.name}/{run.key}")

    def _plain_prompts(self, ctx: "RunContext", run: "ModelRun") -> list[list[int]]:
        """Token ids of the plain texts (BOS + text, no chat template)."""
        if self.options.plain_texts:
            texts = [t for t in Path(self.options.plain_texts).expanduser().read_text().splitlines() if t.strip()]
        else:
            texts = [p.text for p in ctx.prompts]
        from tuneshift.data import Prompt

        return [encode_prompt(run.tokenizer, Prompt(f"plain{i}", t, ()), False).input_ids.tolist()
                for i, t in enumerate(texts)]

    # ---- per pair -------------------------------------------------------------------------------------------
    def on_compare(self, ctx: "RunContext", base: str, tuned: str) -> None:
        store = ctx.store
        key = store.compare_key(base, tuned)
        outputs, summary = compare.compare_models(store, self.name, base, tuned)
        for name, frame in outputs.items():
            store.save_table(self.name, key, name, frame)
            ctx.logger.log_table(f"{self.name}/{key}/{name}", frame)
        store.save_json(self.name, key, "summary", summary)
        for name, path in views.figures(store.dir(self.name, key), outputs, base, tuned).items():
            ctx.logger.log_image(f"{self.name}/{key}/{name}", path)
        ctx.logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))},
                               prefix=f"{self.name}/{key}")
        if not self.options.keep_paired_cache:
            release(ctx, self.name, base, tuned)

    def section(self, ctx: "RunContext", key: str) -> Section | None:
        if not key.startswith("compare/"):
            return Section(self.title, "Logit lens of this model on the shared tokens, per layer.",
                           tables=[Table("by_layer.parquet", "Per layer: mean KL(final || lens), top-1 agreement")])
        s = ctx.store.load_json(self.name, key, "summary")
        heads = [Headline("commitment layer (mean)", base=s["commitment_base"], tuned=s["commitment_tuned"],
                          test="Wilcoxon signed-rank, same positions", p=s["commitment_p"], n=s["n_positions"]),
                 Headline("mean KL(final || lens) over layers", base=s["lens_kl_base"], tuned=s["lens_kl_tuned"],
                          unit=" nats", n=s["n_positions"]),
                 Headline("largest residual difference ||h_T - h_B|| / ||h_B||", value=s["max_rel_norm"],
                          note=f"at layer {s['max_rel_norm_layer']}; first layer "
                               f"{format_number(s['first_rel_norm'])}"),
                 ]
        top = s.get("adl_headline") or {}
        if top:
            heads.append(Headline(f"activation difference at {top['slot']} ({top['slot_token']!r}), layer "
                                  f"{top['layer']}: ||mean(h_T - h_B)||", value=top["norm"],
                                  note="lens top tokens " + ", ".join(repr(t) for t in top["tokens"])
                                       + f" (decoded by {top['decoded_with']})"))
        return Section(
            self.title, self.explanation(), headlines=heads,
            figures=[Figure("kl_by_layer.png", "KL(final || logit lens) per layer, base vs tuned"),
                     Figure("residual_difference.png", "Relative norm and cosine of h_T - h_B per layer"),
                     Figure("commitment.png", "Commitment layer of each position, base vs tuned")],
            tables=[Table("by_layer.parquet", "Per layer, both models"),
                    Table("adl_top.parquet", "Activation-difference lens: top tokens per slot and layer", max_rows=40)])


__all__ = ["LayerLensOptions", "LayerLensPlugin"]
