"""The ``head_relations`` plugin (method B): word pairs related by each self-attention head, base vs tuned.

Weights only (``weight_only = True``): no prompts, no traces. Per model (``on_model_end``), written under
``head_relations/<model>/``:

- ``dims.parquet``: one row per (layer, head, dim): ``model, layer, head, kv_head, dim, rank`` (1 = highest
  energy in its head), ``energy``, ``mined`` (False for dims past ``n_dims``), ``n_pairs``, ``pairs`` (list of
  ``"query_word=key_word"``, most similar first) and ``sims`` (their similarities).
- ``knowledge.parquet``: head knowledge P_h, one row per (layer, head, pair): ``word_a, word_b`` (alphabetical),
  ``pair`` (``"a=b"``), ``n_dims`` (dims holding it, > 1) and ``max_sim``.
- ``summary.json`` (headline numbers, word coverage of the similarity backend, timings), ``view.html`` and
  ``knowledge_by_head.png`` (pairs per head).

Per pair (``on_compare``), under ``head_relations/compare/<base>__<tuned>/``:

- ``overlap.parquet``: per layer, how many knowledge pairs base and tuned heads share (pooled Jaccard, mean
  per-head Jaccard, share of base pairs the tuned head keeps).
- ``verb_shares.parquet`` (``r_v`` per layer group and verb) and ``verb_stats.parquet`` (instruction vs general
  verbs per group: mean, std, count, Welch two-sided p).
- ``added_pairs.parquet`` (pairs tuned heads hold that the same base heads do not) and
  ``instruction_verbs.parquet`` (each instruction verb's ``r_v`` per layer group), for the report.
- ``view.html`` (per layer and head, top pairs base beside tuned, pairs that tuning added highlighted), PNG
  plots ``overlap.png`` and ``verb_shares.png``, ``summary.json``.
"""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd
import torch

from tuneshift.plugin import Plugin
from tuneshift.words import load_word_list, static_embeddings
from tuneshift.plugins.head_relations import section as report_section
from tuneshift.plugins.head_relations import verbs, views
from tuneshift.plugins.head_relations.mining import LayerResult, MiningSettings, head_knowledge, mine_model
from tuneshift.plugins.head_relations.similarity import DEFAULT_CACHE_DIR, available_backends, make_backend, thresholds


@dataclass
class HeadRelationsOptions:
    """Options of method B (``conf/plugins/head_relations.yaml``)."""

    top_k: int = 100  # K: top words per dim on the query and on the key side
    n_dims: int = 0  # dims mined per head: 0 = all d_head, n = the n highest-energy dims
    layers: Optional[list[int]] = None  # layers to mine (None: all)
    layer_group_size: int = 8  # layers per group in the verb statistics
    word_list: str = "builtin"  # builtin | tokenizer | path to a word<TAB>frequency file (SingleShareGPT_Vocab.tsv)
    word_limit: int = 0  # mine only the N most frequent words (0: all)
    similarity: str = "ppmi"  # similarity backend: ppmi (offline default) | glove (a vectors file)
    similarity_path: str = ""  # glove: GloVe/word2vec text file (.txt or .txt.gz)
    similarity_options: dict[str, Any] = field(default_factory=dict)  # ppmi: dim, window, min_count, max_vocab ...
    cache_dir: str = DEFAULT_CACHE_DIR  # where the ppmi vectors are cached
    threshold_std: float = 1.96  # tau(w) = mean + threshold_std * std of sim(w, baseline)
    baseline_size: int = 3000  # the most frequent words of the word list that form the baseline set
    knowledge_count: str = "dims"  # dims: a pair counts once per dim (the definition) | occurrences (paper code)
    rope_delta: Optional[int] = None  # None: no RoPE (the paper); d: pairs at relative distance d (query - key)
    qk_norm: str = "gain"  # gain: Gemma-3's per-head q/k norm gains scale each dim | none: ignore them
    head_chunk: int = 16  # query heads per matmul, whole GQA groups (memory: n_words x head_chunk x d_head floats)
    item_chunk: int = 512  # (head, dim) items per similarity block (memory: item_chunk x K x (2D + K) doubles)
    general_verbs: str = "builtin"  # builtin (frozen list) | path to a one-verb-per-line file
    n_general_verbs: int = 3000  # the most frequent general verbs used
    instruction_verbs: list[str] = field(default_factory=lambda: list(verbs.INSTRUCTION_VERBS))
    html_pairs: int = 12  # knowledge pairs shown per head in the HTML views
    device: str = "auto"  # auto: the model's device; else e.g. cpu, cuda


class HeadRelationsPlugin(Plugin):
    """Method B: what instruction tuning changes in the word pairs that attention heads relate."""

    name = "head_relations"
    Options = HeadRelationsOptions
    weight_only = True

    def __init__(self, options: HeadRelationsOptions | None = None):
        super().__init__(options)
        o = self.options
        if o.similarity not in available_backends():
            raise ValueError(f"head_relations.similarity {o.similarity!r} is unknown; available: "
                             f"{', '.join(available_backends())}")
        if o.knowledge_count not in ("dims", "occurrences"):
            raise ValueError(f"head_relations.knowledge_count must be 'dims' or 'occurrences', got "
                             f"{o.knowledge_count!r}")
        if o.baseline_size < 1 or o.layer_group_size < 1 or o.html_pairs < 0 or o.word_limit < 0:
            raise ValueError("head_relations: baseline_size and layer_group_size must be >= 1, word_limit and "
                             "html_pairs >= 0")
        self.settings = MiningSettings(o.top_k, o.n_dims, o.head_chunk, o.item_chunk, o.rope_delta, o.qk_norm)
        self._backend = None
        self._word_cache: dict[str, tuple[torch.Tensor, torch.Tensor, np.ndarray]] = {}

    # ---- hooks ------------------------------------------------------------------------------------------------
    def setup(self, ctx: Any) -> None:
        """Build the similarity backend now, so a wrong backend or a missing vectors file fails before any
        model is loaded."""
        self.backend()

    def on_model_end(self, ctx: Any, model: Any) -> None:
        """Mine every layer of ``model`` and write its dims table, head knowledge, summary and view."""
        o, key = self.options, model.key
        start = time.perf_counter()
        words, table, knowledge, head = self.analyse(model, ctx.progress)
        head["seconds"] = time.perf_counter() - start
        ctx.store.save_table(self.name, key, "dims", table)
        ctx.store.save_table(self.name, key, "knowledge", knowledge)
        ctx.store.save_json(self.name, key, "summary", {"model": model.name, **head})
        ctx.store.update_summary(self.name, {key: head})
        page = views.knowledge_html(f"head_relations: {model.name}", knowledge, None, head["layers"], head["n_heads"],
                                    o.html_pairs, labels=(model.name, ""))
        path = ctx.store.save_text(self.name, key, "view.html", page)
        ctx.logger.log_html(f"{self.name}/{key}/view", path)
        png = views.plot_knowledge_by_head(knowledge, head["layers"], head["n_heads"],
                                           ctx.store.dir(self.name, key) / "knowledge_by_head.png", model.name)
        ctx.logger.log_image(f"{self.name}/{key}/knowledge_by_head", png)
        ctx.logger.log_metrics({k: v for k, v in head.items() if isinstance(v, (int, float))},
                               prefix=f"{self.name}/{key}")
        ctx.logger.log_table(f"{self.name}/{key}/layers", layer_summary(table, knowledge))

    def on_compare(self, ctx: Any, base: str, tuned: str) -> None:
        """Pair overlap per layer, instruction-vs-general verb statistics, the side-by-side view and plots."""
        o, store, cmp = self.options, ctx.store, ctx.store.compare_key(base, tuned)
        know = {k: store.load_table(self.name, k, "knowledge") for k in (base, tuned)}
        summaries = {k: store.load_json(self.name, k, "summary") for k in (base, tuned)}
        n_layers = max(summaries[base]["n_layers_total"], summaries[tuned]["n_layers_total"])
        n_heads = max(summaries[base]["n_heads"], summaries[tuned]["n_heads"])
        layers = sorted(set(summaries[base]["layers"]) & set(summaries[tuned]["layers"]))

        over = overlap(know[base], know[tuned], layers)
        instruction = list(o.instruction_verbs)
        general = verbs.load_general_verbs(o.general_verbs, o.n_general_verbs)
        counts = {k: verbs.word_counts(know[k], instruction + general) for k in (base, tuned)}
        shares = verbs.verb_shares(counts[base], counts[tuned], o.layer_group_size)
        instruction_set = set(instruction)
        shares["verb_set"] = np.where(shares["word"].isin(instruction_set), "instruction", "general")
        groups = sorted({layer // o.layer_group_size for layer in layers})
        stats = verbs.compare_verb_sets(shares, instruction, general, groups)
        stats.insert(1, "layers", [f"{g * o.layer_group_size}-{min((g + 1) * o.layer_group_size, n_layers) - 1}"
                                   for g in stats["group"]])
        store.save_table(self.name, cmp, "overlap", over)
        store.save_table(self.name, cmp, "verb_shares", shares)
        store.save_table(self.name, cmp, "verb_stats", stats)

        plot_dir = store.dir(self.name, cmp)
        pngs = {"overlap": views.plot_overlap(over, plot_dir / "overlap.png", base, tuned),
                "verb_shares": views.plot_verb_shares(stats, plot_dir / "verb_shares.png", "Heads where tuning "
                                                      f"adds pairs with the verb: instruction vs general verbs, "
                                                      f"{base} vs {tuned}")}
        store.save_table(self.name, cmp, "added_pairs", views.added_pairs(know[base], know[tuned], instruction))
        store.save_table(self.name, cmp, "instruction_verbs", views.instruction_verb_table(shares, stats))
        page = views.knowledge_html(f"head_relations: {base} vs {tuned}", know[base], know[tuned], layers,
                                    n_heads, o.html_pairs, labels=(base, tuned), overlap=over, verb_stats=stats,
                                    images=pngs)
        path = store.save_text(self.name, cmp, "view.html", page)
        words_used = {k: summaries[k]["word_list_hash"] for k in (base, tuned)}
        out = {
            "jaccard_pooled_by_layer": over["jaccard"].round(6).tolist(),
            "verb_stats": stats.to_dict(orient="records"),
            "same_word_list": len(set(words_used.values())) == 1,
            "instruction_verbs_in_word_list": summaries[tuned].get("instruction_verbs_in_word_list"),
            "jaccard_mean": float(over["jaccard"].mean()),
        }
        store.save_json(self.name, cmp, "summary", out)
        ctx.logger.log_html(f"{self.name}/{cmp}/view", path)
        for name, png in pngs.items():
            ctx.logger.log_image(f"{self.name}/{cmp}/{name}", png)
        ctx.logger.log_table(f"{self.name}/{cmp}/overlap", over)
        ctx.logger.log_table(f"{self.name}/{cmp}/verb_stats", stats)
        ctx.logger.log_metrics({"jaccard_mean": float(over["jaccard"].mean())}, prefix=f"{self.name}/{cmp}")

    def section(self, ctx: Any, key: str):
        """Headline findings, captions and views of ``key`` (:mod:`.section`)."""
        return report_section.build(ctx.store, self.name, key)

    # ---- steps ------------------------------------------------------------------------------------------------
    def backend(self):
        """The similarity backend (built once per plugin instance)."""
        if self._backend is None:
            o = self.options
            params = dict(o.similarity_options)
            if o.similarity == "glove":
                params["path"] = o.similarity_path
            elif o.similarity == "ppmi":
                params["cache_dir"] = o.cache_dir
            self._backend = make_backend(o.similarity, **params)
        return self._backend

    def word_inputs(self, model: Any) -> tuple[tuple[str, ...], torch.Tensor, torch.Tensor, np.ndarray]:
        """The mined words, their unit similarity vectors ``[n, D]`` (float64), thresholds ``[n]`` (float64)
        and the ``present`` mask; cached per word list, so base and tuned share one lookup."""
        o = self.options
        full = load_word_list(o.word_list, model.tokenizer)
        n_mine = min(o.word_limit, len(full)) if o.word_limit else len(full)
        looked_up = full.words[:max(n_mine, min(o.baseline_size, len(full)))]
        cache_key = hashlib.sha1("\n".join(looked_up).encode()).hexdigest()
        if cache_key not in self._word_cache:
            vecs = self.backend().lookup(looked_up)
            vectors = torch.from_numpy(vecs.vectors).double()
            present = torch.from_numpy(vecs.present)
            tau = thresholds(vectors, present, o.baseline_size, o.threshold_std)
            self._word_cache = {cache_key: (vectors[:n_mine], tau[:n_mine], vecs.present[:n_mine])}
        vectors, tau, present = self._word_cache[cache_key]
        return full.words[:n_mine], vectors, tau, present

    def analyse(self, model: Any, progress: bool = False) -> tuple[tuple[str, ...], pd.DataFrame, pd.DataFrame, dict]:
        """Mine ``model``: the word list, the dims table, the knowledge table and headline numbers."""
        o, adapter = self.options, model.adapter
        device = model.device if o.device == "auto" else torch.device(o.device)
        layers = list(range(adapter.n_layers)) if o.layers is None else [int(x) for x in o.layers]
        bad = [i for i in layers if not 0 <= i < adapter.n_layers]
        if bad:
            raise ValueError(f"head_relations.layers {bad} out of range: the model has {adapter.n_layers} layers")
        words, vectors, tau, present = self.word_inputs(model)
        t0 = time.perf_counter()
        with torch.no_grad():
            e_w = static_embeddings(model.tokenizer, adapter.embedding_matrix().to(device), words)
            results = list(mine_model(adapter, e_w, vectors.to(device), tau.to(device), self.settings, layers,
                                      progress=progress))
        mining_s = time.perf_counter() - t0
        table = dims_table(model.key, results, words, adapter.n_heads // adapter.n_kv_heads)
        knowledge = knowledge_table(model.key, results, words, o.knowledge_count)
        head = {
            "n_layers_total": adapter.n_layers, "layers": layers, "n_heads": adapter.n_heads,
            "n_kv_heads": adapter.n_kv_heads, "d_head": adapter.d_head, "n_words": len(words),
            "word_list": o.word_list, "word_list_hash": hashlib.sha1("\n".join(words).encode()).hexdigest()[:12],
            "word_coverage": float(present.mean()) if len(present) else 0.0,
            "instruction_verbs_in_word_list": int(len(set(o.instruction_verbs) & set(words))),
            "similarity": self.backend().describe(), "top_k": o.top_k, "rope_delta": o.rope_delta,
            "n_pairs": int(table["n_pairs"].sum()),
            "pairs_per_mined_dim": float(table.loc[table["mined"], "n_pairs"].mean()),
            "knowledge_pairs": int(len(knowledge)),
            "knowledge_per_head": float(len(knowledge) / max(1, len(layers) * adapter.n_heads)),
            "mining_seconds": mining_s,
        }
        return words, table, knowledge, head


# ---- tables -------------------------------------------------------------------------------------------------------
def dims_table(model_key: str, results: list[LayerResult], words: tuple[str, ...], group: int) -> pd.DataFrame:
    """One row per (layer, head, dim) with its rank, energy and kept pairs (strings only here, at the end)."""
    word_array = np.asarray(words, dtype=object)
    frames = []
    for r in results:
        n_heads, d_head = r.energy.shape
        head_idx, dim_idx = np.meshgrid(np.arange(n_heads), np.arange(d_head), indexing="ij")
        flat = head_idx.ravel() * d_head + dim_idx.ravel()
        pair_flat = r.head * d_head + r.dim  # [P], grouped by (head, dim) since sorted by head then rank
        counts = np.bincount(pair_flat, minlength=n_heads * d_head)
        order = np.argsort(pair_flat, kind="stable")  # keeps sim order inside a dim
        labels = word_array[r.q_word[order]] + "=" + word_array[r.k_word[order]]
        splits = np.cumsum(counts)[:-1]
        pairs = np.split(labels, splits)
        sims = np.split(r.sim[order], splits)
        frames.append(pd.DataFrame({
            "model": model_key, "layer": r.layer, "head": head_idx.ravel(), "kv_head": head_idx.ravel() // group,
            "dim": dim_idx.ravel(), "rank": r.rank.ravel(), "energy": r.energy.ravel().astype(np.float64),
            "mined": r.mined.ravel(), "n_pairs": counts[flat],
            "pairs": [p.tolist() for p in pairs], "sims": [s.tolist() for s in sims],
        }))
    table = pd.concat(frames, ignore_index=True)
    return table.sort_values(["layer", "head", "rank"], kind="stable").reset_index(drop=True)


def knowledge_table(model_key: str, results: list[LayerResult], words: tuple[str, ...],
                    count: str = "dims") -> pd.DataFrame:
    """Head knowledge of every mined layer as rows ``model, layer, head, word_a, word_b, pair, n_dims,
    max_sim`` (``word_a < word_b`` alphabetically; sorted by layer, head, n_dims and max_sim descending)."""
    cat = {name: np.concatenate([getattr(r, name) for r in results]) if results else np.zeros(0, np.int64)
           for name in ("head", "dim", "q_word", "k_word", "sim")}
    layer = np.concatenate([np.full(len(r.head), r.layer) for r in results]) if results else np.zeros(0, np.int64)
    k = head_knowledge(layer, cat["head"], cat["dim"], cat["q_word"], cat["k_word"], cat["sim"], count)
    word_array = np.asarray(words, dtype=object)
    a, b = word_array[k["word_a"]], word_array[k["word_b"]]
    swap = a > b
    a, b = np.where(swap, b, a), np.where(swap, a, b)
    return pd.DataFrame({"model": model_key, "layer": k["layer"], "head": k["head"], "word_a": a, "word_b": b,
                         "pair": a + "=" + b if len(a) else np.zeros(0, dtype=object),
                         "n_dims": k["n_dims"], "max_sim": k["max_sim"]})


def layer_summary(table: pd.DataFrame, knowledge: pd.DataFrame) -> pd.DataFrame:
    """Per layer: mean pairs per mined dim and the head-knowledge size (for the logger)."""
    per_dim = table[table["mined"]].groupby("layer")["n_pairs"].mean().rename("pairs_per_dim")
    per_layer = knowledge.groupby("layer").size().rename("knowledge_pairs")
    out = pd.concat([per_dim, per_layer], axis=1).fillna(0).reset_index().rename(columns={"index": "layer"})
    return out.astype({"knowledge_pairs": int})


def overlap(base: pd.DataFrame, tuned: pd.DataFrame, layers: list[int]) -> pd.DataFrame:
    """Per layer: knowledge pairs of base and tuned heads, pairs both hold (same layer, head and pair),
    pooled Jaccard ``common / union``, mean per-head Jaccard over heads with any pair, and ``retained``
    ``common / n_base``. Layers without any pair get NaN ratios."""
    keys = ["layer", "head", "pair"]
    merged = pd.merge(base[keys], tuned[keys], on=keys, how="outer", indicator=True)
    per_head = merged.groupby(["layer", "head"])["_merge"].value_counts().unstack(fill_value=0)
    per_head = per_head.reindex(columns=["both", "left_only", "right_only"], fill_value=0)
    per_head["union"] = per_head.sum(axis=1)
    per_head["jaccard"] = per_head["both"] / per_head["union"]
    rows = []
    for layer in layers:
        ph = per_head.xs(layer, level="layer") if layer in per_head.index.get_level_values("layer") else None
        both = int(ph["both"].sum()) if ph is not None else 0
        n_base = int(ph["both"].sum() + ph["left_only"].sum()) if ph is not None else 0
        n_tuned = int(ph["both"].sum() + ph["right_only"].sum()) if ph is not None else 0
        union = n_base + n_tuned - both
        rows.append({"layer": layer, "n_base": n_base, "n_tuned": n_tuned, "n_common": both,
                     "jaccard": both / union if union else float("nan"),
                     "head_jaccard_mean": float(ph["jaccard"].mean()) if ph is not None else float("nan"),
                     "retained": both / n_base if n_base else float("nan")})
    return pd.DataFrame(rows, columns=["layer", "n_base", "n_tuned", "n_common", "jaccard", "head_jaccard_mean",
                                       "retained"])
