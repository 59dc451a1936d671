"""The ``ffn_concepts`` plugin (method C): principal directions of FFN value vectors, their words and concepts.

Per model (``on_model_end``, weights only), written under ``ffn_concepts/<model>/``:

- ``directions.npz``: ``layers [L]``, ``vectors [L, R, d]``, ``singular_values [L, R]``,
  ``variance_ratio [L, R]``, ``total_variance [L]``, ``top_index [L, R, k]``, ``top_cos [L, R, k]``.
- ``directions.parquet``: one row per (model, layer, rank): variance ratio, top words and cosines, the
  seed-0 annotation (concept, tasks, level, status, error), per-seed concepts, explainable seed count.
- ``annotations.parquet``: one row per (model, layer, rank, seed) for every annotated direction.
- ``summary.json``, ``view_layer<l>.html`` (single-model pages), ``variance_spectrum.png`` and ``concepts.png``.

Per pair (``on_compare``), under ``ffn_concepts/compare/<base>__<tuned>/``: ``shares.parquet`` (task and
level shares per model/seed/layer group), ``ttests.parquet``, ``rotation.parquet`` (per layer and base
rank: principal angle, best tuned match, |cos|, top-word Jaccard), ``rotation_layers.parquet``,
``summary.json``, ``view_layer<l>.html`` (base beside tuned) and PNG plots. The rotation compares the first
k = min(R, d_model // 4) directions (``rotation_directions`` overrides; > d/2 warns), each angle beside the
same angle between random subspaces of the same sizes (``chance_*``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd
from tqdm.auto import tqdm
import torch

from tuneshift.plugin import Plugin
from tuneshift.words import load_word_list, static_embeddings
from tuneshift.plugins.ffn_concepts import section as report_section
from tuneshift.plugins.ffn_concepts import stats, views
from tuneshift.plugins.ffn_concepts.annotators import Annotator, annotate_word_sets, AnnotationCache, build_annotator
from tuneshift.plugins.ffn_concepts.directions import SVD_METHODS, normalize_rows, principal_directions, top_words


@dataclass
class FFNConceptsOptions:
    """Options of method C (``conf/plugins/ffn_concepts.yaml``)."""

    n_directions: int = 300  # R: principal directions kept per layer (capped at d_model)
    n_words: int = 15  # top words per direction (shown to the annotator)
    word_list: str = "builtin"  # "builtin", "tokenizer" or a word<TAB>frequency file
    word_limit: int = 20000  # the most frequent words kept (0: all)
    layers: Optional[list[int]] = None  # layers to analyse (None: all)
    svd_method: str = "eigh"  # eigh (exact, the fastest measured) | full
    rotation_directions: int = 0  # directions compared base vs tuned (0: min(R, d_model // 4); warns if > d/2)
    word_chunk: int = 16384  # words per matmul in the top-word search
    device: str = "auto"  # "auto": the model's device; else e.g. "cpu", "cuda"
    annotate: bool = True  # run the annotator (False: directions and words only)
    annotate_top: int = 0  # annotate the first N directions per layer (0: all R)
    annotator: str = "offline"  # offline | llm_judge | endpoint (or a user-registered id)
    annotator_options: dict[str, Any] = field(default_factory=dict)  # the annotator's own options
    seeds: int = 5  # annotation repetitions (seeds 0..seeds-1)
    cache_dir: str = "~/.cache/tuneshift/annotations"  # "" disables the cache
    layer_group_size: int = 4  # layers per group in the distribution tables
    html_rows: int = 50  # directions shown per layer page


class FFNConceptsPlugin(Plugin):
    """Method C: what instruction tuning does to the principal directions of the FFN value vectors."""

    name = "ffn_concepts"
    Options = FFNConceptsOptions
    weight_only = True

    def __init__(self, options: FFNConceptsOptions | None = None):
        super().__init__(options)
        o = self.options
        if o.svd_method not in SVD_METHODS:
            raise ValueError(f"ffn_concepts.svd_method {o.svd_method!r} is unknown; choose {', '.join(SVD_METHODS)}")
        if o.n_directions < 1 or o.n_words < 1 or o.seeds < 1 or o.layer_group_size < 1:
            raise ValueError("ffn_concepts: n_directions, n_words, seeds and layer_group_size must be >= 1")
        self._annotator: Annotator | None = None

    # ---- hooks ------------------------------------------------------------------------------------------------
    def setup(self, ctx: Any) -> None:
        """Build the annotator now, so a wrong id or option fails before any model loads."""
        if self.options.annotate:
            self._annotator = build_annotator(self.options.annotator, dict(self.options.annotator_options))

    def on_model_end(self, ctx: Any, model: Any) -> None:
        """Directions, top words and annotations of every layer of ``model``; written to ``ctx.store``."""
        o, key = self.options, model.key
        timings: dict[str, float] = {}
        start = time.perf_counter()
        arrays, table = self.analyse(model, ctx.progress)
        timings["directions_s"] = time.perf_counter() - start
        ann_long = pd.DataFrame()
        if o.annotate:
            start = time.perf_counter()
            table, ann_long, ann_stats = self.annotate(table, key, ctx.progress)
            timings["annotation_s"] = time.perf_counter() - start
            timings |= {f"annotations_{k}": v for k, v in vars(ann_stats).items()}
        ctx.store.save_arrays(self.name, key, "directions", arrays)
        ctx.store.save_table(self.name, key, "directions", table)
        if o.annotate:
            ctx.store.save_table(self.name, key, "annotations", ann_long)
        head = self._headline(arrays, table, ann_long) | timings
        ctx.store.save_json(self.name, key, "summary", {"model": model.name, **head})
        ctx.store.update_summary(self.name, {key: head})
        for layer in arrays["layers"].tolist():
            page = views.layer_html(layer, _seed0(table, layer), model.name, max_rows=o.html_rows)
            ctx.store.save_text(self.name, key, f"view_layer{layer}.html", page)
        out_dir = ctx.store.dir(self.name, key)
        pngs = [views.plot_variance(arrays, out_dir / "variance_spectrum.png", model.name)]
        if o.annotate and len(ann_long):
            pngs.append(views.plot_model_concepts(ann_long, out_dir / "concepts.png", model.name, o.layer_group_size))
        for png in pngs:
            ctx.logger.log_image(f"{self.name}/{key}/{png.stem}", png)
        ctx.logger.log_metrics({k: v for k, v in head.items() if isinstance(v, (int, float))},
                               prefix=f"{self.name}/{key}")
        ctx.logger.log_table(f"{self.name}/{key}/directions", _loggable(table))

    def on_compare(self, ctx: Any, base: str, tuned: str) -> None:
        """Shares + t-tests, the rotation table, pages and plots for the pair (base, tuned)."""
        o, store, cmp = self.options, ctx.store, ctx.store.compare_key(base, tuned)
        tables = {k: store.load_table(self.name, k, "directions") for k in (base, tuned)}
        arrays = {k: store.load_arrays(self.name, k, "directions") for k in (base, tuned)}
        rotation, layer_summary, angles = self.rotation(arrays, tables, base, tuned)
        store.save_table(self.name, cmp, "rotation", rotation)
        store.save_table(self.name, cmp, "rotation_layers", layer_summary)
        out: dict[str, Any] = {"rotation": layer_summary.drop(columns=["layer"]).mean().to_dict()}
        share_table = ttest_table = None
        if o.annotate:
            ann = pd.concat([store.load_table(self.name, k, "annotations") for k in (base, tuned)],
                            ignore_index=True)
            share_table = stats.shares(ann, o.layer_group_size)
            ttest_table = stats.ttests(share_table, base, tuned)
            store.save_table(self.name, cmp, "shares", share_table)
            store.save_table(self.name, cmp, "ttests", ttest_table)
            overall = ttest_table[ttest_table["group"] == stats.ALL]
            out["ttests_all_layers"] = overall.drop(columns=["group"]).to_dict(orient="records")
        store.save_json(self.name, cmp, "summary", out)
        for layer, rot in rotation.groupby("layer"):
            summary = layer_summary[layer_summary["layer"] == layer].iloc[0].drop("layer").to_dict()
            page = views.layer_html(int(layer), _seed0(tables[base], layer), base, _seed0(tables[tuned], layer),
                                    tuned, rot, summary, max_rows=o.html_rows)
            path = store.save_text(self.name, cmp, f"view_layer{int(layer)}.html", page)
            ctx.logger.log_html(f"{self.name}/{cmp}/view_layer{int(layer)}", path)
        plot_dir = store.dir(self.name, cmp)
        chance = rotation.loc[rotation["layer"] == rotation["layer"].iloc[0], "chance_angle_deg"].to_numpy()
        pngs = {"principal_angles": views.plot_rotation(layer_summary, angles, plot_dir / "principal_angles.png",
                                                        chance)}
        if share_table is not None:
            pngs["task_shares"] = views.plot_shares(share_table, "task", base, tuned, plot_dir / "task_shares.png")
            pngs["level_shares"] = views.plot_shares(share_table, "level", base, tuned,
                                                     plot_dir / "level_shares.png", group=None)
            ctx.logger.log_table(f"{self.name}/{cmp}/ttests", ttest_table)
        for name, path in pngs.items():
            ctx.logger.log_image(f"{self.name}/{cmp}/{name}", path)
        ctx.logger.log_table(f"{self.name}/{cmp}/rotation_layers", layer_summary)
        ctx.logger.log_metrics({k: v for k, v in out["rotation"].items() if isinstance(v, float)},
                               prefix=f"{self.name}/{cmp}")

    def section(self, ctx: Any, key: str):
        """Headline findings, captions and views of ``key`` (:mod:`.section`)."""
        return report_section.build(ctx.store, self.name, key)

    def teardown(self, ctx: Any) -> None:
        if self._annotator is not None:
            self._annotator.close()

    # ---- steps ------------------------------------------------------------------------------------------------
    def analyse(self, model: Any, progress: bool = False) -> tuple[dict[str, np.ndarray], pd.DataFrame]:
        """Directions and top words of every selected layer: the arrays to save and the per-direction table."""
        o, adapter = self.options, model.adapter
        device = model.device if o.device == "auto" else torch.device(o.device)
        layers = list(range(adapter.n_layers)) if o.layers is None else list(o.layers)
        bad = [i for i in layers if not 0 <= i < adapter.n_layers]
        if bad:
            raise ValueError(f"ffn_concepts.layers {bad} out of range: the model has {adapter.n_layers} layers")
        words = load_word_list(o.word_list, model.tokenizer, o.word_limit or None)
        with torch.no_grad():
            e_out = normalize_rows(static_embeddings(model.tokenizer, adapter.unembedding_matrix().to(device),
                                                     words.words))  # [n_words, d]
            per_layer = []
            for layer in tqdm(layers, desc=f"ffn concepts: directions {model.name}", unit="layer",
                              disable=not progress, leave=False):
                d = principal_directions(adapter.W_down(layer).to(device), o.n_directions, o.svd_method)
                per_layer.append((d, top_words(e_out, d.vectors, o.n_words, o.word_chunk)))
        arrays = {
            "layers": np.array(layers),
            "vectors": torch.stack([d.vectors for d, _ in per_layer]).cpu().numpy(),
            "singular_values": torch.stack([d.singular_values for d, _ in per_layer]).cpu().numpy(),
            "variance_ratio": torch.stack([d.variance_ratio for d, _ in per_layer]).cpu().numpy(),
            "total_variance": np.array([d.total_variance for d, _ in per_layer]),
            "top_index": torch.stack([t.index for _, t in per_layer]).cpu().numpy(),
            "top_cos": torch.stack([t.cos for _, t in per_layer]).cpu().numpy(),
        }
        n_layers, r, k = arrays["top_index"].shape
        word_array = np.asarray(words.words, dtype=object)
        table = pd.DataFrame({
            "model": model.key, "layer": np.repeat(arrays["layers"], r), "rank": np.tile(np.arange(r), n_layers),
            "singular_value": arrays["singular_values"].ravel(), "variance_ratio": arrays["variance_ratio"].ravel(),
            "top_words": list(word_array[arrays["top_index"].reshape(-1, k)]),
            "top_cos": list(arrays["top_cos"].reshape(-1, k)),
        })
        table["top_words"] = table["top_words"].map(list)
        table["top_cos"] = table["top_cos"].map(list)
        return arrays, table

    def annotate(self, table: pd.DataFrame, key: str,
                 progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame, Any]:
        """Annotate the first ``annotate_top`` directions of each layer under every seed.

        Returns the direction table with seed-0 labels, the long (direction x seed) table and the counts."""
        o = self.options
        if self._annotator is None:
            self._annotator = build_annotator(o.annotator, dict(o.annotator_options))
        chosen = table if o.annotate_top <= 0 else table[table["rank"] < o.annotate_top]
        seeds = list(range(o.seeds))
        cache = AnnotationCache(o.cache_dir) if o.cache_dir and self._annotator.cacheable else None
        with tqdm(desc=f"ffn concepts: annotating {key} (not cached)", unit="label", disable=not progress,
                  leave=False) as bar:
            def advance(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)

            labels, ann_stats = annotate_word_sets(self._annotator, [tuple(w) for w in chosen["top_words"]], seeds,
                                                   cache, progress=advance)
        flat = [a for per_dir in labels for a in per_dir]
        long = pd.DataFrame({
            "model": key, "layer": np.repeat(chosen["layer"].to_numpy(), len(seeds)),
            "rank": np.repeat(chosen["rank"].to_numpy(), len(seeds)), "seed": np.tile(seeds, len(chosen)),
            "concept": [a.concept for a in flat], "tasks": ["; ".join(a.tasks) for a in flat],
            "level": [a.level for a in flat], "status": [a.status for a in flat], "error": [a.error for a in flat],
            "explainable": [a.explainable for a in flat], "raw": [a.raw for a in flat],
            "annotator": self._annotator.id,
        })
        first = long[long["seed"] == 0].set_index(["layer", "rank"])
        per_dir = long.groupby(["layer", "rank"]).agg(concepts_by_seed=("concept", list),
                                                      n_explainable_seeds=("explainable", "sum"))
        table = table.join(first[["concept", "tasks", "level", "status", "error"]], on=["layer", "rank"])
        table = table.join(per_dir, on=["layer", "rank"])
        table["status"] = table["status"].fillna("not_annotated")
        table[["concept", "tasks", "level", "error"]] = table[["concept", "tasks", "level", "error"]].fillna("")
        table["n_explainable_seeds"] = table["n_explainable_seeds"].fillna(0).astype(int)
        table["concepts_by_seed"] = table["concepts_by_seed"].map(lambda v: v if isinstance(v, list) else [])
        return table, long, ann_stats

    def rotation(self, arrays: dict[str, dict[str, np.ndarray]], tables: dict[str, pd.DataFrame], base: str,
                 tuned: str) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray]:
        """Per-direction rotation rows, per-layer summaries and the ``[n_layers, k]`` principal angles, over
        the first k directions of each model (:func:`stats.compared_directions`: d/4 unless asked for)."""
        a, b = arrays[base], arrays[tuned]
        common = [int(x) for x in a["layers"] if x in set(b["layers"].tolist())]
        if not common:
            raise ValueError(f"ffn_concepts: {base!r} and {tuned!r} share no analysed layer")
        if a["vectors"].shape[2] != b["vectors"].shape[2]:
            raise ValueError(f"ffn_concepts: {base!r} and {tuned!r} have different d_model "
                             f"({a['vectors'].shape[2]} vs {b['vectors'].shape[2]}); they are not a base/tuned pair")
        k = stats.compared_directions(min(a["vectors"].shape[1], b["vectors"].shape[1]), a["vectors"].shape[2],
                                      self.options.rotation_directions)
        rows, summaries, angles = [], [], []
        for layer in common:
            ia, ib = int(np.flatnonzero(a["layers"] == layer)[0]), int(np.flatnonzero(b["layers"] == layer)[0])
            wa = np.stack(_seed0(tables[base], layer)["top_words"].map(np.asarray).to_list())[:k]
            wb = np.stack(_seed0(tables[tuned], layer)["top_words"].map(np.asarray).to_list())[:k]
            rot, summary = stats.rotation_layer(torch.from_numpy(a["vectors"][ia, :k]),
                                                torch.from_numpy(b["vectors"][ib, :k]), wa.astype(str), wb.astype(str))
            rows.append(rot.assign(layer=layer))
            summaries.append({"layer": layer, **summary})
            angles.append(rot["principal_angle_deg"].to_numpy())
        rotation = pd.concat(rows, ignore_index=True)
        rotation = rotation[["layer"] + [c for c in rotation.columns if c != "layer"]]
        return rotation, pd.DataFrame(summaries), np.stack(angles)

    def _headline(self, arrays: dict[str, np.ndarray], table: pd.DataFrame, ann: pd.DataFrame) -> dict:
        ratio = arrays["variance_ratio"]
        head = {"n_layers": int(ratio.shape[0]), "n_directions": int(ratio.shape[1]),
                "variance_captured_mean": float(ratio.sum(1).mean()),
                "first_direction_ratio_mean": float(ratio[:, 0].mean())}
        if len(ann):
            head["explainable_share"] = float(ann["explainable"].mean())
            head["failed_share"] = float((ann["status"] == "failed").mean())
        return head


def _seed0(table: pd.DataFrame, layer: int) -> pd.DataFrame:
    """This layer's rows of a direction table, in rank order."""
    return table[table["layer"] == layer].sort_values("rank")


def _loggable(table: pd.DataFrame) -> pd.DataFrame:
    """Lists flattened to strings (W&B tables take scalars)."""
    out = table.copy()
    out["top_words"] = out["top_words"].map(" ".join)
    out["top_cos"] = out["top_cos"].map(lambda v: " ".join(f"{x:+.3f}" for x in v))
    if "concepts_by_seed" in out:
        out["concepts_by_seed"] = out["concepts_by_seed"].map(" | ".join)
    return out
