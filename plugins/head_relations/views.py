"""Views of method B: a self-contained HTML page of head knowledge (base beside tuned) and PNG plots.

The page has, per layer, one row per head with its top knowledge pairs (most dims first, then similarity);
in a comparison the pairs the tuned head holds and the base head does not are highlighted (tuning added them)
and base pairs the tuned head lost are struck through. Plots are embedded as data URIs, so the file stands
alone. Plots use matplotlib's Agg backend and are written atomically: per pair the overlap per layer and the
verb shares; per model (a single-model run too) the number of pairs each head holds. The report's tables of
pairs added by tuning and of each instruction verb's share are derived here too (:func:`added_pairs`,
:func:`instruction_verb_table`).
"""
from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import numpy as np
import pandas as pd

from tuneshift.results import atomic_write_bytes

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}
td,th{border:1px solid #ddd;padding:3px 6px;vertical-align:top;font-size:13px}
th{background:#f4f4f4}
.pair{display:inline-block;margin:1px 3px;padding:0 3px;border-radius:3px;background:#f0f0f0}
.added{background:#ffe08a;font-weight:600}
.lost{text-decoration:line-through;color:#999}
.n{color:#888;font-size:11px}
h2{margin-top:1.5em}
figure{display:inline-block;max-width:48%;margin:0 1% 1em 0;vertical-align:top}
figure img{max-width:100%} figcaption{font-size:12px;color:#444}
"""
IMAGE_CAPTIONS = {"overlap": "Head-knowledge pairs shared by the base and tuned heads, per layer",
                  "verb_shares": "Share of heads where tuning adds pairs with the verb: instruction vs general "
                                 "verbs, per layer group (Welch p above each group)"}


def _pairs_cell(rows: pd.DataFrame, limit: int, other: set[str] | None, mark: str) -> str:
    """Top ``limit`` pairs of one head; pairs absent from ``other`` get class ``mark``."""
    spans = []
    for pair, n_dims, sim in rows[["pair", "n_dims", "max_sim"]].head(limit).itertuples(index=False):
        cls = f"pair {mark}" if other is not None and pair not in other else "pair"
        spans.append(f'<span class="{cls}" title="{n_dims} dims, sim {sim:.3f}">{html.escape(pair)}'
                     f'<span class="n"> {n_dims}</span></span>')
    more = len(rows) - limit
    if more > 0:
        spans.append(f'<span class="n">+{more} more</span>')
    return " ".join(spans) or '<span class="n">none</span>'


def _table_html(frame: pd.DataFrame, digits: int = 3) -> str:
    return frame.to_html(index=False, float_format=lambda x: f"{x:.{digits}g}" if abs(x) < 1e-3 else f"{x:.{digits}f}",
                         border=0, na_rep="-")


def knowledge_html(title: str, base: pd.DataFrame, tuned: pd.DataFrame | None, layers: list[int], n_heads: int,
                   n_pairs: int, labels: tuple[str, str], overlap: pd.DataFrame | None = None,
                   verb_stats: pd.DataFrame | None = None, images: dict[str, Path] | None = None) -> str:
    """The page: optional plots and tables, then per mined layer one row per head with its top ``n_pairs`` pairs.

    ``base``/``tuned`` are knowledge tables (``layer, head, pair, n_dims, max_sim``, already sorted by
    importance); ``tuned=None`` gives a one-model page."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             "<p>Head knowledge: word pairs (order-free) kept in more than one dimension of a head. The small "
             "number is how many dims hold the pair; hover for its best similarity.</p>"]
    if tuned is not None:
        parts.append(f"<p><span class='pair added'>highlighted</span>: in the {html.escape(labels[1])} head but "
                     f"not in the {html.escape(labels[0])} head (added by tuning); <span class='pair lost'>struck"
                     "</span>: lost by tuning.</p>")
    for name, path in (images or {}).items():
        data = base64.b64encode(Path(path).read_bytes()).decode()
        caption = html.escape(IMAGE_CAPTIONS.get(name, name.replace("_", " ")))
        parts.append(f"<figure><img alt='{caption}' src='data:image/png;base64,{data}'><figcaption>{caption}"
                     "</figcaption></figure>")
    if overlap is not None:
        parts.append("<h2>Pair overlap per layer</h2>" + _table_html(overlap))
    if verb_stats is not None:
        parts.append("<h2>Instruction vs general verbs (share of heads where tuned count &gt; base)</h2>"
                     + _table_html(verb_stats))
    by_base = {key: g for key, g in base.groupby(["layer", "head"], sort=False)}
    by_tuned = {key: g for key, g in tuned.groupby(["layer", "head"], sort=False)} if tuned is not None else {}
    empty = base.iloc[:0]
    head_cols = f"<th>{html.escape(labels[0])}</th>" + (f"<th>{html.escape(labels[1])}</th>" if tuned is not None
                                                         else "")
    for layer in layers:
        rows = []
        for head in range(n_heads):
            b = by_base.get((layer, head), empty)
            cells = []
            if tuned is not None:
                t = by_tuned.get((layer, head), empty)
                cells.append(_pairs_cell(b, n_pairs, set(t["pair"]), "lost"))
                cells.append(_pairs_cell(t, n_pairs, set(b["pair"]), "added"))
            else:
                cells.append(_pairs_cell(b, n_pairs, None, ""))
            rows.append(f"<tr><td>{head}</td>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
        parts.append(f"<h2 id='layer{layer}'>Layer {layer}</h2><table><tr><th>head</th>{head_cols}</tr>"
                     + "".join(rows) + "</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _save_png(fig, path: Path) -> Path:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(Path(path), buffer.getvalue())
    return Path(path)


def plot_overlap(overlap: pd.DataFrame, path: Path, base: str, tuned: str) -> Path:
    """Per-layer overlap of head knowledge between base and tuned (pooled and per-head Jaccard, retained)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for column, label in (("jaccard", "Jaccard (pooled)"), ("head_jaccard_mean", "Jaccard (mean over heads)"),
                          ("retained", f"share of {base} pairs kept")):
        ax.plot(overlap["layer"], overlap[column], marker="o", ms=3, label=label)
    ax.set_xlabel("layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("share of knowledge pairs (0-1)")
    ax.set_ylim(0, 1)
    ax.set_title(f"Head-knowledge overlap, {base} vs {tuned}")
    ax.legend(fontsize=8)
    return _save_png(fig, path)


def plot_verb_shares(stats: pd.DataFrame, path: Path, title: str = "") -> Path:
    """Mean (± std) share of heads where the tuned count exceeds the base count, per layer group, for
    instruction and general verbs, with Welch's p above each group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted(stats["group"].unique())
    x = np.arange(len(groups))
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for offset, (verb_set, color) in zip((-0.2, 0.2), (("instruction", "#d95f02"), ("general", "#7570b3"))):
        side = stats[stats["verb_set"] == verb_set].set_index("group").reindex(groups)
        ax.bar(x + offset, side["mean"].fillna(0), 0.4, yerr=side["std"].fillna(0), color=color, capsize=3,
               label=f"{verb_set} verbs")
    for xi, g in zip(x, groups):
        p = stats.loc[stats["group"] == g, "p_welch"].iloc[0]
        ax.text(xi, 1.02, "p=n/a" if pd.isna(p) else f"p={p:.2g}", ha="center", fontsize=8)
    labels = stats.drop_duplicates("group").set_index("group")["layers"] if "layers" in stats else None
    ax.set_xticks(x, [f"layers {labels[g]}" if labels is not None else str(g) for g in groups], fontsize=8)
    ax.axhline(0.5, color="#999", lw=0.8, ls="--")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("share of heads: tuned > base (0-1)")
    ax.set_xlabel("layer group")
    ax.set_title(title or "Heads where tuning adds pairs with the verb: instruction vs general verbs", fontsize=9)
    ax.legend(fontsize=8, loc="lower right", title="mean ± std over verbs", title_fontsize=7)
    return _save_png(fig, path)


def plot_knowledge_by_head(knowledge: pd.DataFrame, layers: list[int], n_heads: int, path: Path, name: str) -> Path:
    """One model's head knowledge: how many word pairs each head (column) of each layer (row) holds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = knowledge.groupby(["layer", "head"]).size()
    grid = np.array([[int(counts.get((layer, h), 0)) for h in range(n_heads)] for layer in layers])  # [L, H]
    fig, ax = plt.subplots(figsize=(max(4.5, 1.2 + 0.45 * n_heads), max(2.6, 1.4 + 0.35 * len(layers))))
    image = ax.imshow(grid, cmap="Blues", aspect="auto", interpolation="nearest")
    if grid.size <= 400:
        for (i, j), v in np.ndenumerate(grid):
            ax.text(j, i, str(v), ha="center", va="center", fontsize=7,
                    color="white" if v > 0.6 * max(grid.max(), 1) else "black")
    if n_heads <= 32:
        ax.set_xticks(range(n_heads))
    if len(layers) <= 48:
        ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_xlabel("attention head")
    ax.set_ylabel("layer")
    ax.set_title(f"{name}: word pairs each head holds (head knowledge, {int(grid.sum()):,} in all)", fontsize=9)
    fig.colorbar(image, ax=ax, label="word pairs (count)")
    return _save_png(fig, path)


def added_pairs(base: pd.DataFrame, tuned: pd.DataFrame, instruction_verbs: list[str]) -> pd.DataFrame:
    """The word pairs tuned heads hold and the same base heads do not: one row per pair with the number of
    heads that gained it, their layers and whether an instruction verb is part of it; most heads first."""
    keys = ["layer", "head", "pair"]
    merged = tuned[keys + ["word_a", "word_b"]].merge(base[keys], on=keys, how="left", indicator=True)
    added = merged[merged["_merge"] == "left_only"]
    verbs = set(instruction_verbs)
    table = (added.groupby("pair").agg(heads=("head", "size"), layers=("layer", lambda x: sorted(set(x))),
                                       word_a=("word_a", "first"), word_b=("word_b", "first")).reset_index())
    table["instruction_verb"] = table["word_a"].isin(verbs) | table["word_b"].isin(verbs)
    table["layers"] = table["layers"].map(lambda v: ", ".join(map(str, v)))
    return table.sort_values(["heads", "pair"], ascending=[False, True], kind="stable")[
        ["pair", "heads", "layers", "instruction_verb"]].reset_index(drop=True)


def instruction_verb_table(shares: pd.DataFrame, stats: pd.DataFrame) -> pd.DataFrame:
    """``r_v`` of each instruction verb per layer group (columns ``layers a-b``) and its mean, highest first."""
    mine = shares[shares["verb_set"] == "instruction"]
    names = stats.drop_duplicates("group").set_index("group")["layers"].to_dict() if "layers" in stats else {}
    wide = mine.pivot_table(index="word", columns="group", values="share", aggfunc="first")
    wide.columns = [f"layers {names.get(g, g)}" for g in wide.columns]
    wide["mean"] = wide.mean(axis=1)
    heads = mine.groupby("word")["n_heads"].sum().rename("heads_changed")
    return wide.join(heads).sort_values("mean", ascending=False).rename_axis("verb").reset_index()
