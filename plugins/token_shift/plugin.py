"""The ``token_shift`` plugin (methods.md D.1 and D.4): token distribution shift and differential attribution.

On the shared response (``generation.response_source`` tuned, base or reference), per scored position m:
the token y_m, its rank and probability under the base model, its probability under the tuned model,
KL(p_T || p_B) and KL(p_B || p_T) of the two full next-token distributions, and its AlignTDS class. The
stop token that ended a generated response is scored as one more position (``include_stop``).

How (one model in memory at a time): each model's logits at the response positions come from the probe
registry (``Probe("logits", reduce="tail")``: the batch's last ``max M_b + 1`` positions, kept on the device)
in the one shared trace per batch. The model of the pair that runs first saves them per prompt in its own
dtype (:class:`tuneshift.paired.PairedCache`); the second reads them back batch by batch and computes both
KLs in float64, chunked over positions (:mod:`tuneshift.distributions`). The cache is deleted after the
comparison unless ``keep_paired_cache``.

Files: ``token_shift/<model>/positions.parquet`` (each model's own log-prob, rank, entropy and top-k of the
shared tokens), ``attribution.npz`` (``I_<i>`` gradient x input of log p, ``ids``);
``token_shift/compare/<b>__<t>/``: ``positions.parquet``, ``prompts.parquet``, ``by_position.parquet``,
``by_absolute_position.parquet``, ``top_tokens.parquet``, ``by_category.parquet``, ``differential.parquet``,
``differential_prompts.parquet``, ``differential.npz`` (``D_<i>``), ``summary.json``, figures and
``differential.html``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from tuneshift.attribution import attribute, make_item
from tuneshift.distributions import paired_token_stats
from tuneshift.fingerprint import neutral
from tuneshift.generation import response_positions
from tuneshift.paired import PairedCache, PairedCacheError, PairedPlugin, pair_role, release
from tuneshift.plugin import PluginError
from tuneshift.plugins.token_shift import differential as diff
from tuneshift.plugins.token_shift import stats, views
from tuneshift.probes import Probe
from tuneshift.sections import Figure, Headline, Section, Table, View, format_number

if TYPE_CHECKING:
    from tuneshift.runner import Batch, ModelRun, RunContext


@dataclass
class TokenShiftOptions:
    """Options of the ``token_shift`` plugin (defaults: AlignTDS's thresholds)."""

    marginal_max_rank: int = 3        # base rank 1: unshifted; 2..this: marginal; above: shifted (AlignTDS: 3)
    include_stop: bool = True         # also score the stop token that ended a generated response
    top_k: int = 5                    # each model's top-k tokens stored per position
    attribution: bool = True          # differential attribution (I_T - I_B, target log-prob) at shifted positions
    position_bins: int = 10           # bins of the relative position in the response
    early_positions: int = 10         # absolute positions 0..N-1 tabulated
    top_tokens: int = 30              # most often shifted tokens listed
    html_prompts: int = 8             # prompts shown in differential.html
    keep_paired_cache: bool = neutral(False)  # keep the first model's logits cache after the comparison
    max_batch_tokens: int = neutral(16384)    # attribution: vectorised positions per pass


class TokenShiftPlugin(PairedPlugin):
    """Token distribution shift (AlignTDS) and KL of base and tuned on the same tokens, with differential
    attribution of the shifted tokens to instruction and context words."""

    name = "token_shift"
    title = "Token distribution shift"
    Options = TokenShiftOptions
    runs_remote = True  # the logits come from probes; only the differential attribution needs local weights

    def remote_blocker(self) -> str | None:
        if self.options.attribution:
            return ("token_shift.attribution differentiates through the weights here; set "
                    "plugins.token_shift.attribution=false to run the token shift itself remotely")
        return None

    def setup(self, ctx: "RunContext") -> None:
        super().setup(ctx)
        o = self.options
        if o.marginal_max_rank < 1 or o.top_k < 1 or o.position_bins < 1:
            raise PluginError("token_shift.marginal_max_rank, top_k and position_bins must be at least 1")

    # ---- per model ------------------------------------------------------------------------------------------
    def on_model_start(self, ctx: "RunContext", run: "ModelRun") -> None:
        self._roles = pair_role(ctx, run.key)
        self._cache = PairedCache(ctx.store, self.name, run.key)
        if any(is_writer for *_, is_writer in self._roles):
            self._cache.start()
        self._own: list[pd.DataFrame] = []  # per batch, one row per position
        self._pairs: dict[tuple[str, str], list[pd.DataFrame]] = {(b, t): [] for b, t, _, w in self._roles if not w}
        self._readers = {partner: PairedCache(ctx.store, self.name, partner)  # its index read once per model
                         for _, _, partner, is_writer in self._roles if not is_writer}
        self._token_text: dict[int, tuple[str, bool]] = {}

    def probes(self, run: "ModelRun") -> list[Probe]:
        return [Probe("logits", reduce="tail", device="keep")]

    def _text(self, run: "ModelRun", token_id: int) -> str:
        return self._token(run, token_id)[0]

    def _token(self, run: "ModelRun", token_id: int) -> tuple[str, bool]:
        """A token's text and whether it is instruction-following formatting (decoded once per id)."""
        if token_id not in self._token_text:
            text = run.tokenizer.decode([token_id])
            special = token_id in run.tokenizer.all_special_ids
            self._token_text[token_id] = (text, stats.is_format_token(text, special))
        return self._token_text[token_id]

    def on_batch(self, ctx: "RunContext", run: "ModelRun", batch: "Batch", captures) -> None:
        o = self.options
        logits = captures["logits:tail"]                                               # [B, K, V]
        pos = response_positions(batch, logits.shape[1], o.include_stop)
        flat = logits[pos.rows.to(logits.device), pos.cols.to(logits.device)]          # [N, V]
        ids = [e.prompt.id for e in batch.items]
        full_ids = [torch.cat([e.input_ids, e.response_ids]) for e in batch.items]
        readers = [(base, tuned, partner) for base, tuned, partner, is_writer in self._roles if not is_writer]
        others = [self._partner_logits(run, partner, batch, full_ids).to(flat.device)
                  for *_, partner in readers]                                          # [N, V] each
        own, versus = paired_token_stats(flat, others, pos.targets, o.top_k)  # each distribution normalised once
        own = {k: v.cpu() for k, v in own.items()}
        columns = pos.columns(batch)
        self._own.append(pd.DataFrame({**columns, "logp": own["logp"].numpy(), "rank": own["rank"].numpy(),
                                       "entropy": own["entropy"].numpy(), "top_ids": own["top_ids"].tolist(),
                                       "top_logp": own["top_logp"].tolist()}))
        if any(w for *_, w in self._roles):
            self._cache.write(batch.index, ids, {"logits": [flat[pos.of_row(b).to(flat.device)]
                                                            for b in range(len(batch.items))], "ids": full_ids})
        del others
        tokens = [self._token(run, t) for t in columns["token_id"].tolist()] if readers else []  # (text, is_format)
        mine = {"rank": own["rank"].numpy(), "logp": own["logp"].numpy()}
        for (base, tuned, _), vs in zip(readers, versus):
            vs = {k: v.cpu().numpy() for k, v in vs.items()}
            b, t = (vs, mine) if run.key == tuned else (mine, vs)
            kl_tb, kl_bt = ((vs["kl_own_other"], vs["kl_other_own"]) if run.key == tuned
                            else (vs["kl_other_own"], vs["kl_own_other"]))
            self._pairs[(base, tuned)].append(pd.DataFrame({
                **columns, "token": [text for text, _ in tokens], "is_format": [f for _, f in tokens],
                "rank_base": b["rank"], "p_base": np.exp(b["logp"]), "rank_tuned": t["rank"],
                "p_tuned": np.exp(t["logp"]), "kl_tb": kl_tb, "kl_bt": kl_bt}))

    def _partner_logits(self, run: "ModelRun", partner: str, batch: "Batch", full_ids: list) -> torch.Tensor:
        """The partner's cached logits at this batch's positions, checked to be on the same token ids. ``[N, V]``"""
        parts = []
        for b, e in enumerate(batch.items):
            got = self._readers[partner].read(e.prompt.id, ["logits", "ids"])
            if not torch.equal(got["ids"], full_ids[b]):
                raise PairedCacheError(f"prompt {e.prompt.id!r}: {run.key!r} and {partner!r} saw different token "
                                       "ids; token_shift needs identical tokens (the same tokenizer and input "
                                       "format for both models of a pair)")
            parts.append(got["logits"])
        return torch.cat(parts)

    def on_model_end(self, ctx: "RunContext", run: "ModelRun") -> None:
        store, o = ctx.store, self.options
        own = pd.concat(self._own, ignore_index=True) if self._own else pd.DataFrame()
        store.save_table(self.name, run.key, "positions", own)
        if any(w for *_, w in self._roles):
            self._cache.finish({"model": run.key})
        for (base, tuned), frames in self._pairs.items():
            table = pd.concat(frames, ignore_index=True)
            table["class"] = stats.classify(table["rank_base"].to_numpy(), o.marginal_max_rank)
            store.save_table(self.name, store.compare_key(base, tuned), "positions", table)
        if o.attribution and self._roles:
            items = [make_item(e.input_ids, e.response_ids, e.content_mask) for e in run.encoded]
            matrices = attribute(run.model, items, target="logprob", max_batch_tokens=o.max_batch_tokens,
                                 pad_token_id=run.tokenizer.pad_token_id)
            arrays = {f"I_{i}": m.numpy().astype(np.float32) for i, m in enumerate(matrices)}
            arrays["ids"] = np.array([e.prompt.id for e in run.encoded], dtype=str)
            for i, e in enumerate(run.encoded):
                arrays[f"instr_{i}"] = e.instruction_mask[e.content_mask].numpy()
                arrays[f"tokens_{i}"] = np.array([self._text(run, t) for t in e.input_ids[e.content_mask].tolist()],
                                                 dtype=str)
                arrays[f"response_{i}"] = np.array([self._text(run, t) for t in e.response_ids.tolist()], dtype=str)
            store.save_arrays(self.name, run.key, "attribution", arrays)
        summary = {"n_positions": len(own), "mean_logp": float(own["logp"].mean()) if len(own) else float("nan"),
                   "top1_share": float((own["rank"] == 1).mean()) if len(own) else float("nan"),
                   "mean_entropy": float(own["entropy"].mean()) if len(own) else float("nan")}
        store.save_json(self.name, run.key, "summary", summary)
        ctx.logger.log_metrics(summary, prefix=f"{self.name}/{run.key}")

    # ---- per pair -------------------------------------------------------------------------------------------
    def on_compare(self, ctx: "RunContext", base: str, tuned: str) -> None:
        store, o = ctx.store, self.options
        key = store.compare_key(base, tuned)
        table = store.load_table(self.name, key, "positions")
        summary = stats.summary(table, o.position_bins)
        outputs = {"prompts": stats.per_prompt(table),
                   "by_position": stats.by_relative_position(table, o.position_bins),
                   "by_absolute_position": stats.by_absolute_position(table, o.early_positions),
                   "top_tokens": stats.top_shifted_tokens(table, o.top_tokens), "by_category": stats.by_category(table)}
        if o.attribution:
            summary["differential"] = self._differential(ctx, base, tuned, table, key)
        for name, frame in outputs.items():
            store.save_table(self.name, key, name, frame)
            ctx.logger.log_table(f"{self.name}/{key}/{name}", frame)
        store.save_json(self.name, key, "summary", summary)
        folder = store.dir(self.name, key)
        for name, path in views.figures(folder, outputs, base, tuned).items():
            ctx.logger.log_image(f"{self.name}/{key}/{name}", path)
        ctx.logger.log_metrics({k: v for k, v in summary.items() if isinstance(v, (int, float))},
                               prefix=f"{self.name}/{key}")
        if not o.keep_paired_cache:
            release(ctx, self.name, base, tuned)

    def _differential(self, ctx: "RunContext", base: str, tuned: str, table: pd.DataFrame, key: str) -> dict:
        store = ctx.store
        b_arr = store.load_arrays(self.name, base, "attribution")
        t_arr = store.load_arrays(self.name, tuned, "attribution")
        content = table[~table["is_stop"]]
        classes = {pid: g.sort_values("m")["class"].to_numpy() for pid, g in content.groupby("id", sort=False)}
        rows, arrays, shown = [], {}, []
        for i, pid in enumerate(t_arr["ids"].tolist()):
            I_b, I_t = b_arr[f"I_{i}"].astype(np.float64), t_arr[f"I_{i}"].astype(np.float64)
            if I_b.shape != I_t.shape:
                raise PairedCacheError(f"prompt {pid!r}: attribution shapes differ ({I_b.shape} vs {I_t.shape}); "
                                       "differential attribution needs identical tokens")
            D = I_t - I_b                                                               # [N, M]
            arrays[f"D_{i}"] = D.astype(np.float32)
            cls = classes.get(pid, np.array([], dtype=str))
            if D.shape[1] and len(cls) == D.shape[1]:
                rows += diff.position_rows(pid, D, t_arr[f"instr_{i}"], cls)
            if len(shown) < self.options.html_prompts and (cls == "shifted").any():
                shown.append(views.DiffView(pid, t_arr[f"tokens_{i}"].tolist(), t_arr[f"response_{i}"].tolist(),
                                            t_arr[f"instr_{i}"], I_b, I_t, D, cls))
        arrays["ids"] = t_arr["ids"]
        store.save_arrays(self.name, key, "differential", arrays)
        frame = pd.DataFrame(rows, columns=["id", "m", "class", "instruction_share", "abs_mass", "signed_instruction"])
        store.save_table(self.name, key, "differential", frame)
        prompts = diff.per_prompt(frame) if len(frame) else pd.DataFrame()
        store.save_table(self.name, key, "differential_prompts", prompts)
        page = store.save_text(self.name, key, "differential.html", views.differential_html(
            f"differential attribution: {tuned} - {base}", shown))
        ctx.logger.log_html(f"{self.name}/{key}/differential", page)
        return diff.welch(frame) if len(frame) else {}

    # ---- presentation ---------------------------------------------------------------------------------------
    def section(self, ctx: "RunContext", key: str) -> Section | None:
        if not key.startswith("compare/"):
            return Section(self.title, "Each model's log-probability, rank and entropy of the shared response "
                           "tokens (positions.parquet); the comparison holds the shift.",
                           tables=[Table("positions.parquet", "Per position: log p, rank, entropy, top-k",
                                         columns=["id", "m", "token_id", "logp", "rank", "entropy"])])
        s = ctx.store.load_json(self.name, key, "summary")
        early, fmt, dif = s["earliness"], s["format"], s.get("differential", {})
        heads = [
            Headline("shifted share (base rank > 3)", value=s["share_shifted"], n=s["n_positions"],
                     note=f"marginal {format_number(s['share_marginal'])}, unshifted "
                          f"{format_number(s['share_unshifted'])}; AlignTDS: 7.8% Llama-2-7b vs -chat"),
            Headline("mean KL(tuned || base)", value=s["mean_kl_tb"], unit=" nats", n=s["n_positions"],
                     note=f"KL(base || tuned) {format_number(s['mean_kl_bt'])}"),
            Headline("median relative position of shifted tokens", value=early["median_shifted"],
                     test="Mann-Whitney one-sided (shifted earlier)", p=early["p"],
                     n=f"{early['n_shifted']} shifted / {early['n_other']} other",
                     note=f"other positions {format_number(early['median_other'])} (0 = first token, 1 = stop)"),
            Headline("formatting share of shifted positions", value=fmt["format_share_of_shifted"],
                     test="Fisher exact one-sided (enriched)", p=fmt["p"], n=fmt["n"],
                     note=f"other positions {format_number(fmt['format_share_of_other'])}"),
        ]
        if dif:
            heads.append(Headline("instruction share of |I_T - I_B| at shifted positions", value=dif["mean_shifted"],
                                  test="Welch two-sided", p=dif["p"],
                                  n=f"{dif['n_shifted']} shifted / {dif['n_unshifted']} unshifted",
                                  note=f"unshifted positions {format_number(dif['mean_unshifted'])}"))
        return Section(
            self.title, self.explanation(), headlines=heads,
            figures=[Figure("shift_by_position.png", "Class shares and KL(T||B) by relative position in the response"),
                     Figure("top_tokens.png", "The tokens most often shifted")],
            tables=[Table("by_category.parquet", "Per task: class shares, formatting share of shifted positions"),
                    Table("top_tokens.parquet", "Most often shifted tokens"),
                    Table("by_absolute_position.parquet", "Shifted share at the first response positions"),
                    Table("prompts.parquet", "Per prompt")],
            views=[View("differential.html", "Differential attribution (tuned - base) at shifted positions")]
            if dif else [],
            notes=[] if s.get("share_shifted") == s.get("share_shifted") else ["no scored positions"])


__all__ = ["TokenShiftOptions", "TokenShiftPlugin"]
