"""Pictures of method C: a self-contained HTML page per layer, and PNG plots (matplotlib, Agg).

The HTML page of a layer lists the base model's directions in rank order; beside each, the tuned
direction that matches it best (by ``|cos|``), with both directions' variance ratios, top words (coloured by
pole: the sign of the word's cosine) and seed-0 concept, tasks and level, plus the Jaccard overlap of the
two word sets. With no tuned model (a single-model run) only the base column is shown.

Plots: per pair the task and level shares (the explainable share apart from the task split, the difference and
Student's p on every bar pair) and the rotation; per model, also in a single-model run, its variance spectrum
and its concepts (:func:`plot_variance`, :func:`plot_model_concepts`).
"""
from __future__ import annotations

import html
import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from tuneshift.plugins.ffn_concepts import stats  # noqa: E402

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


def _bars(ax: plt.Axes, labels: Sequence[str], series: Sequence[tuple[str, np.ndarray, np.ndarray]],
          tests: Sequence[tuple[float, float]] | None = None) -> None:
    """Grouped bars (mean ± std) of ``series`` [(name, means, stds)] per label; with ``tests`` [(difference,
    p)] the difference and p-value above each group (bold below 0.05)."""
    x = np.arange(len(labels))
    width = 0.8 / max(1, len(series))
    tops = np.zeros(len(labels))
    for i, (name, mean, std) in enumerate(series):
        mean, std = np.nan_to_num(np.asarray(mean, float)), np.nan_to_num(np.asarray(std, float))
        ax.bar(x + (i - (len(series) - 1) / 2) * width, mean, width, yerr=std, capsize=2, label=name)
        tops = np.maximum(tops, mean + std)
    for xi, top, (delta, p) in zip(x, tops, tests or []):
        text = f"Δ {delta:+.3f}\n" + ("p = n/a" if not np.isfinite(p) else f"p = {p:.2g}")
        ax.text(xi, top, text, ha="center", va="bottom", fontsize=6.5,
                fontweight="bold" if np.isfinite(p) and p < 0.05 else "normal")
    ax.set_ylim(0, max(float(tops.max(initial=0)) * 1.35, 0.05))
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 6 else 0, ha="right" if len(labels) > 6 else "center",
                  fontsize=8)
    ax.legend(fontsize=7)


def _pair_series(rows: pd.DataFrame, base: str, tuned: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    return [(base, rows["base_mean"].to_numpy(), rows["base_std"].to_numpy()),
            (tuned, rows["tuned_mean"].to_numpy(), rows["tuned_std"].to_numpy())]


def plot_shares(share_table: pd.DataFrame, kind: str, base: str, tuned: str, path: Path,
                group: str | None = "all") -> Path:
    """Bars of the mean share per category, base beside tuned (error bars: std over annotation seeds), with
    the difference and Student's p over seeds (as in ``ttests.parquet``) written above each pair.

    Tasks (``kind="task"``): the explainable share of all annotated directions gets its own panel (left) and
    the task split of the explainable ones (right) leaves out "none" (no assistant task; its numbers are in
    the panel's title), which would otherwise dwarf the others. ``group="all"``: all layers; ``group=None``:
    one bar pair per (layer group, category)."""
    tests = stats.ttests(share_table, base, tuned)
    tests = tests[tests["kind"] == kind]
    tests = tests[tests["group"] == group] if group is not None else tests[tests["group"] != stats.ALL]
    tests = tests.assign(_g=tests["group"].map(lambda g: int(str(g).split("-")[0]) if g != stats.ALL else -1))
    tests = tests.sort_values("_g", kind="stable")
    split_none = kind == "task"
    shown = tests[tests["category"] != "none"] if split_none else tests
    labels = (shown["category"] if group is not None else shown["group"] + " " + shown["category"]).tolist()
    width = max(6.0, 0.55 * len(labels) + 2.5)
    if split_none:
        fig, (left, ax) = plt.subplots(1, 2, figsize=(width + 2.2, 3.8), gridspec_kw={"width_ratios": [1, 3]})
        ex = stats.explainable_ttest(share_table, base, tuned, group or stats.ALL)
        _bars(left, ["explainable"], [(base, [ex["base_mean"]], [ex["base_std"]]),
                                      (tuned, [ex["tuned_mean"]], [ex["tuned_std"]])],
              [(ex["tuned_mean"] - ex["base_mean"], ex["p"])])
        left.set_title("explainable share\n(of all annotated directions)", fontsize=9)
        left.set_ylabel("share of annotated directions (0-1)")
        left.set_xlabel("all layers" if group is not None else "all layers, all groups")
    else:
        fig, ax = plt.subplots(figsize=(width, 3.8))
    _bars(ax, labels, _pair_series(shown, base, tuned),
          list(zip(shown["tuned_mean"] - shown["base_mean"], shown["p"].astype(float))))
    none = tests[tests["category"] == "none"]
    title = f"{kind} split of the explainable directions"
    if split_none and len(none) == 1:
        r = none.iloc[0]
        title += (f'\n(without "none", no assistant task: {base} {r["base_mean"]:.3f} -> {tuned} '
                  f'{r["tuned_mean"]:.3f}, p = {r["p"]:.2g})')
    ax.set_title(title, fontsize=9)
    ax.set_ylabel("share of explainable directions (0-1)")
    ax.set_xlabel(kind if group is not None else f"layer group and {kind}")
    fig.suptitle(textwrap.fill(f"FFN concepts, {base} vs {tuned}: {kind} shares "
                               f"({'all layers' if group == stats.ALL else 'per layer group'}; mean ± std over "
                               "annotation seeds, Student t)", int(fig.get_figwidth() * 13)), fontsize=10)
    return _save(fig, path)


def plot_model_concepts(ann: pd.DataFrame, path: Path, name: str, group_size: int) -> Path:
    """One model's concepts over all layers (a single-model run too): the explainable share, the task split
    without "none" and the linguistic levels, mean ± std over annotation seeds."""
    table = stats.shares(ann, group_size)
    table = table[table["group"] == stats.ALL]
    ex = stats.explainable_shares(table)["share"]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), gridspec_kw={"width_ratios": [1, 3, 4]})
    _bars(axes[0], ["explainable"], [(name, [ex.mean()], [ex.std(ddof=1) if len(ex) > 1 else 0.0])])
    axes[0].set_ylabel("share of annotated directions (0-1)")
    axes[0].set_title("explainable share", fontsize=9)
    for ax, kind in zip(axes[1:], ("task", "level")):
        sub = table[(table["kind"] == kind) & (table["category"] != "none")]
        agg = sub.groupby("category", sort=False)["share"].agg(["mean", "std"])
        _bars(ax, agg.index.tolist(), [(name, agg["mean"].to_numpy(), agg["std"].fillna(0).to_numpy())])
        ax.set_ylabel("share of explainable directions (0-1)")
        ax.set_title(f"{kind}s" + (' (without "none")' if kind == "task" else ""), fontsize=9)
    for ax, label in zip(axes, ("all layers", "assistant task", "linguistic level")):
        ax.set_xlabel(label)
    fig.suptitle(textwrap.fill(f"{name}: concepts of its FFN directions, all layers (mean ± std over annotation "
                               "seeds)", int(fig.get_figwidth() * 13)), fontsize=10)
    return _save(fig, path)


def plot_variance(arrays: dict[str, np.ndarray], path: Path, name: str) -> Path:
    """One model's spectrum: the share of each layer's value-vector variance along each principal direction."""
    ratio = arrays["variance_ratio"]  # [L, R]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    rank = np.arange(1, ratio.shape[1] + 1)
    step = max(1, len(ratio) // 8)  # at most ~8 layers drawn, evenly spaced
    for i in range(0, len(ratio), step):
        ax.plot(rank, np.clip(ratio[i], 1e-12, None), lw=1.2, label=f"layer {int(arrays['layers'][i])}")
    ax.set_yscale("log")
    ax.set_xlabel("principal direction (rank)")
    ax.set_ylabel("share of the layer's variance (log)")
    ax.set_title(f"{name}: variance of the FFN value vectors along each principal direction", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
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
