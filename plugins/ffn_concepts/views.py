"""Pictures of method C: a self-contained HTML page per layer, and PNG plots (matplotlib, Agg).

The HTML page of a layer lists the base model's directions in rank order; beside each, the tuned
direction that matches it best (by ``|cos|``), with both directions' variance ratios, top words (coloured by
pole: the sign of the word's cosine) and seed-0 concept, tasks and level, plus the Jaccard overlap of the
two word sets. With no tuned model (a single-model run) only the base column is shown.
"""
from __future__ import annotations

import html
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

_CSS = """
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}
table{border-collapse:collapse;width:100%}
th,td{border-bottom:1px solid #ddd;padding:4px 6px;vertical-align:top;text-align:left}
th{background:#f4f4f4;position:sticky;top:0}
.pos{color:#1a5fb4}.neg{color:#c01c28}.num{font-variant-numeric:tabular-nums;white-space:nowrap}
.concept{font-weight:600}.muted{color:#888}.fail{color:#c01c28}
"""


def _words_html(words: Sequence[str], cos: Sequence[float]) -> str:
    return " ".join(f'<span class="{"pos" if c >= 0 else "neg"}" title="cos {c:+.3f}">{html.escape(str(w))}</span>'
                    for w, c in zip(words, cos))


def _label_html(row: pd.Series) -> str:
    status = row.get("status", "not_annotated")
    if status == "failed":
        return f'<span class="fail">failed: {html.escape(str(row.get("error", ""))[:200])}</span>'
    concept = str(row.get("concept", ""))
    if status != "ok" or not concept:
        return '<span class="muted">not annotated</span>'
    tasks = html.escape(str(row.get("tasks", "")))
    level = html.escape(str(row.get("level", "")))
    return (f'<span class="concept">{html.escape(concept)}</span><br><span class="muted">{tasks}'
            f'{" · " + level if level else ""}</span>')


def _direction_cells(row: pd.Series) -> str:
    return (f'<td class="num">{int(row["rank"])}<br>{100 * row["variance_ratio"]:.2f}%</td>'
            f'<td>{_words_html(row["top_words"], row["top_cos"])}</td><td>{_label_html(row)}</td>')


def layer_html(layer: int, base: pd.DataFrame, base_name: str, tuned: pd.DataFrame | None = None,
               tuned_name: str = "", rotation: pd.DataFrame | None = None, summary: dict | None = None,
               max_rows: int = 50) -> str:
    """One layer's page. ``base``/``tuned``: rows (rank, variance_ratio, top_words, top_cos, concept, tasks,
    level, status, error) of this layer, seed 0; ``rotation``: this layer's rotation rows (by base rank)."""
    base = base.sort_values("rank").head(max_rows)
    title = f"FFN layer {layer}: principal directions of the value vectors"
    head = [f"<h1>{html.escape(title)}</h1>",
            '<p>Words: top by |cos| with the static output embedding; <span class="pos">blue</span> lie on the '
            'positive pole, <span class="neg">red</span> on the negative one. Concepts: seed 0.</p>']
    if summary:
        head.append("<p>" + " · ".join(f"{html.escape(k)}: {v:.3g}" if isinstance(v, float) else
                                       f"{html.escape(k)}: {v}" for k, v in summary.items()) + "</p>")
    cols = f"<th>rank<br>var</th><th>{html.escape(base_name)} words</th><th>concept</th>"
    if tuned is not None and rotation is not None:
        cols += (f"<th>|cos|<br>Jaccard</th><th>rank<br>var</th><th>{html.escape(tuned_name)} words</th>"
                 "<th>concept</th>")
        tuned_by_rank = tuned.set_index("rank", drop=False)
        rot = rotation.set_index("rank")
    rows = []
    for _, row in base.iterrows():  # a page of <= max_rows rows: presentation, not numerics
        cells = _direction_cells(row)
        if tuned is not None and rotation is not None:
            if int(row["rank"]) not in rot.index:  # beyond the k compared directions
                cells += '<td class="num">not compared</td><td></td><td></td><td></td>'
            else:
                match = rot.loc[int(row["rank"])]
                partner = tuned_by_rank.loc[int(match["best_tuned_rank"])]
                cells += (f'<td class="num">{match["best_abs_cos"]:.3f}<br>{match["top_words_jaccard"]:.2f}</td>'
                          + _direction_cells(partner))
        rows.append(f"<tr>{cells}</tr>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>{''.join(head)}<table><tr>{cols}</tr>{''.join(rows)}"
            "</table></body></html>")


def _save(fig: plt.Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_shares(share_table: pd.DataFrame, kind: str, base: str, tuned: str, path: Path,
                group: str | None = "all") -> Path:
    """Bars of the mean share per category (error bars: std over seeds), base beside tuned.

    ``group="all"``: one panel over all layers; ``group=None``: one bar pair per (layer group, category)."""
    sub = share_table[(share_table["kind"] == kind) & share_table["model"].isin([base, tuned])]
    sub = sub[sub["group"] == group] if group is not None else sub[sub["group"] != "all"]
    stats = sub.groupby(["group", "category", "model"], sort=False)["share"].agg(["mean", "std"]).reset_index()
    labels = stats[["group", "category"]].drop_duplicates()
    order = {c: i for i, c in enumerate(dict.fromkeys(sub["category"]))}
    labels = labels.assign(_g=labels["group"].map(lambda g: int(str(g).split("-")[0]) if g != "all" else -1),
                           _c=labels["category"].map(order)).sort_values(["_g", "_c"])[["group", "category"]]
    x = np.arange(len(labels))
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(labels) + 2), 3.6))
    for offset, model in ((-0.2, base), (0.2, tuned)):
        m = labels.merge(stats[stats["model"] == model], on=["group", "category"], how="left")
        ax.bar(x + offset, m["mean"].fillna(0), 0.4, yerr=m["std"].fillna(0), label=model, capsize=2)
    names = labels["category"] if group is not None else labels["group"] + " " + labels["category"]
    ax.set_xticks(x, names, rotation=45 if group is None else 0, ha="right" if group is None else "center",
                  fontsize=8)
    ax.set_ylabel("share of explainable directions")
    ax.set_title(f"{kind} shares ({'all layers' if group == 'all' else 'per layer group'})")
    ax.legend()
    return _save(fig, path)


def plot_rotation(layers: pd.DataFrame, angles: np.ndarray, path: Path, chance: np.ndarray | None = None) -> Path:
    """Left: mean/median principal angle per layer beside the chance level. Right: each layer's ascending
    angles beside the chance curve (the same angle between random subspaces of the same sizes).

    ``layers``: one row per layer (layer, mean_angle_deg, median_angle_deg, chance_mean_angle_deg,
    chance_median_angle_deg, n_directions, d_model); ``angles``: ``[n_layers, k]`` degrees, ascending per
    layer; ``chance``: ``[k]`` chance angles (ascending)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.plot(layers["layer"], layers["mean_angle_deg"], "o-", label="mean angle")
    left.plot(layers["layer"], layers["median_angle_deg"], "s--", label="median angle")
    left.plot(layers["layer"], layers["chance_mean_angle_deg"], ":", color="grey", label="mean, random subspaces")
    left.set_xlabel("layer")
    left.xaxis.set_major_locator(MaxNLocator(integer=True))
    left.set_ylabel("principal angle (deg)")
    left.set_ylim(0, 90)
    k, d = int(layers["n_directions"].iloc[0]), int(layers["d_model"].iloc[0])
    left.set_title(f"base vs tuned {k}-dim subspaces of R^{d}")
    left.legend(fontsize=8)
    index = np.arange(1, angles.shape[1] + 1)
    colours = plt.cm.viridis(np.linspace(0, 0.9, max(1, angles.shape[0])))
    for row, layer, colour in zip(angles, layers["layer"], colours):
        right.plot(index, row, color=colour, lw=1, label=f"layer {int(layer)}")
    if chance is not None:
        right.plot(index[:len(chance)], chance, "--", color="grey", lw=2, label="random subspaces")
    right.set_xlabel("angle index (ascending)")
    right.set_ylabel("principal angle (deg)")
    right.set_ylim(0, 90)
    right.set_title("principal angles per layer")
    right.legend(fontsize=7, ncol=2)
    return _save(fig, path)
