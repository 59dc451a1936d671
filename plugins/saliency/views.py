"""Pictures of the saliency results: a self-contained HTML view per prompt and matplotlib PNG plots.

HTML (no network, no external script): each prompt shows its tokens shaded by normalised importance density
(instruction tokens underlined, a tooltip with the numbers), the response, and a heatmap of the integer
scores S (prompt token x response token, b = 0) drawn on a canvas by a few lines of inline JavaScript from a
compact string (one character per cell): prompt tokens label the rows, response tokens the columns,
instruction tokens are shaded, long sequences keep their ends around a marker (:mod:`.heatmap`), and a tooltip
names the token pair under the mouse.

PNG (matplotlib, Agg backend): score distributions base vs tuned per split, the density profile over relative
prompt position, and per model (also in a single-model run) its own distribution, profile and labelled score
heatmaps (:func:`model_figures`).
"""
from __future__ import annotations

import html
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from tuneshift.plugins.saliency.heatmap import CANVAS_COLS, CANVAS_ROWS, CANVAS_SCRIPT, heatmap_png

CELL_CHARS = "0123456789a"  # S values 0..10, one character per heatmap cell


@dataclass
class PromptView:
    """What one prompt's section shows. ``scores [N, M]`` integer levels 0..10 (b = 0)."""

    id: str
    split: str
    prompt_tokens: list[str]
    instruction: np.ndarray      # [N] bool
    density: np.ndarray          # [N] raw a_n at the statistics threshold
    density_norm: np.ndarray     # [N] a~_n in [0, 1]
    response_tokens: list[str]
    scores: np.ndarray           # [N, M]
    score: float
    note: str = ""


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable text of each token, spaces included, as the difference of decoded prefixes.

    Decoding a single id loses leading spaces with SentencePiece tokenizers (``▁word`` -> ``word``); the
    prefix difference keeps them. A character split over several byte tokens is shown on the first of them
    (the others show nothing). Quadratic in the length, so long sequences decode token by token.
    """
    ids = [int(i) for i in ids]
    if len(ids) > 2048:
        return [tokenizer.decode([i]) for i in ids]
    out: list[str] = []
    stable, pending = "", 0
    for k in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:k])
        if text.endswith("\ufffd") and k < len(ids):  # a character still incomplete: wait for its last byte
            pending += 1
            continue
        new = text[len(stable):] if text.startswith(stable) else tokenizer.decode(ids[k - 1 - pending:k])
        out += [new] + [""] * pending
        stable, pending = text, 0
    return out


def _shown(token: str) -> str:
    """A token as HTML, with newlines and tabs made visible."""
    return html.escape(token).replace("\n", "&#8629;<br>").replace("\t", "&#8677;") or "&#8203;"


def _prompt_html(view: PromptView, index: int) -> str:
    spans = []
    for n, token in enumerate(view.prompt_tokens):
        alpha = float(np.clip(view.density_norm[n], 0.0, 1.0))
        cls = "tok instr" if view.instruction[n] else "tok"
        tip = f"#{n} density {view.density[n]:.3f} (normalised {alpha:.3f})"
        tip += " | instruction" if view.instruction[n] else ""
        spans.append(f'<span class="{cls}" style="background:rgba(214,39,40,{alpha:.3f})" '
                     f'title="{html.escape(tip)}">{_shown(token)}</span>')
    response = "".join(f'<span class="rtok">{_shown(t)}</span>' for t in view.response_tokens)
    n, m = view.scores.shape
    cells = "".join(CELL_CHARS[int(v)] for v in np.clip(view.scores, 0, 10).astype(int).ravel())
    payload = html.escape(json.dumps({"n": n, "m": m, "cells": cells, "rows": view.prompt_tokens,
                                      "cols": view.response_tokens, "instr": [int(x) for x in view.instruction],
                                      "max_rows": CANVAS_ROWS, "max_cols": CANVAS_COLS}), quote=True)
    score = "n/a" if not np.isfinite(view.score) else f"{view.score:.4f}"
    note = f' <span class="note">{html.escape(view.note)}</span>' if view.note else ""
    cut = (f"; the first and last tokens shown, the middle ones marked ⋯ (over {CANVAS_ROWS} prompt or "
           f"{CANVAS_COLS} response tokens)" if n > CANVAS_ROWS or m > CANVAS_COLS else "")
    caption = (f"Scores S of prompt {view.id}: rows are its {n} prompt tokens (instruction tokens shaded yellow), "
               f"columns the {m} response tokens; darker red = a higher score (0-10){cut}.")
    return (f'<section id="p{index}"><h2>{html.escape(view.id)} <small>{html.escape(view.split)} | score {score} | '
            f'{n} prompt x {m} response tokens</small>{note}</h2>'
            f'<div class="prompt">{"".join(spans)}</div>'
            f'<details><summary>response</summary><div class="response">{response}</div></details>'
            f'<figure><div class="heat" data-heat="{payload}"><canvas role="img" aria-label="{html.escape(caption)}">'
            f'</canvas><div class="tip"></div></div><figcaption>{html.escape(caption)}</figcaption></figure>'
            f'</section>')


_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;max-width:80em}
h1{font-size:1.3em} h2{font-size:1.05em;margin-top:2em;border-top:1px solid #ccc;padding-top:.7em}
h2 small{font-weight:normal;color:#555} .note{color:#a33;font-weight:normal;font-size:.9em}
.prompt,.response{font-family:ui-monospace,monospace;line-height:1.9;white-space:pre-wrap;word-break:break-word}
.tok{border-radius:2px;padding:1px 0} .instr{text-decoration:underline;text-decoration-thickness:2px;
text-underline-offset:3px} .rtok{border-right:1px dotted #ddd}
.heat{position:relative;overflow-x:auto} .tip{position:fixed;display:none;background:#fff;
border:1px solid #888;padding:2px 6px;font:12px ui-monospace,monospace;pointer-events:none}
.legend span{display:inline-block;width:1.4em;text-align:center;font-size:.8em}
figure{margin:.5em 0} figcaption{font-size:.85em;color:#444;margin-top:.3em}
"""



def examples_html(title: str, views: Sequence[PromptView], intro: str = "") -> str:
    """One self-contained page with a section per prompt (see the module docstring)."""
    legend = "".join(f'<span style="background:rgba(214,39,40,{k / 10:.1f})">{k}</span>' for k in range(11))
    toc = " ".join(f'<a href="#p{i}">{html.escape(v.id)}</a>' for i, v in enumerate(views))
    body = "".join(_prompt_html(v, i) for i, v in enumerate(views))
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>'
            f'<p>{html.escape(intro)} Prompt tokens are shaded by normalised importance density '
            f'(darker = the token matters to more response tokens); <u>underlined</u> tokens are the instruction. '
            f'Heatmap levels: <span class="legend">{legend}</span></p><p>{toc}</p>{body}'
            f'<script>{CANVAS_SCRIPT}</script></body></html>')


# ---- plots ----------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def score_distribution_png(path: str | Path, scores: dict[str, pd.DataFrame], title: str = "") -> Path:
    """Histograms of prompt scores per split, one colour per model. ``scores[label]``: columns split, score."""
    plt = _pyplot()
    splits = sorted({s for frame in scores.values() for s in frame["split"].unique()}) or ["all"]
    fig, axes = plt.subplots(1, len(splits), figsize=(4.2 * len(splits), 3.4), squeeze=False)
    for ax, split in zip(axes[0], splits):
        values = {label: frame.loc[frame["split"] == split, "score"].dropna().to_numpy()
                  for label, frame in scores.items()}
        finite = np.concatenate([v for v in values.values()]) if values else np.zeros(0)
        bins = np.linspace(float(finite.min()), float(finite.max()) + 1e-9, 21) if finite.size else 10
        for label, vals in values.items():
            if vals.size:
                ax.hist(vals, bins=bins, alpha=0.5, label=f"{label} (mean {vals.mean():.3f}, n={vals.size})")
        if not any(v.size for v in values.values()):
            ax.text(0.5, 0.5, "no scored prompts", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(f"split {split}")
        ax.set_xlabel("instruction score (unitless)")
        ax.set_ylabel("prompts (count)")
        ax.legend(fontsize=7, title="model (mean, n)", title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return _save(plt, fig, path)


def density_profile_png(path: str | Path, table: pd.DataFrame, title: str = "") -> Path:
    """Mean normalised density per relative-position decile; ``table``: column ``decile`` + one per model."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for column in table.columns:
        if column != "decile":
            ax.plot(table["decile"], table[column], marker="o", label=str(column))
    ax.set_xlabel("relative prompt position (decile)")
    ax.set_ylabel("mean normalised density (0-1)")
    ax.set_xticks(list(table["decile"]))
    ax.legend(fontsize=8, title="model", title_fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    return _save(plt, fig, path)


def model_figures(directory: Path, key: str, name: str, scores: pd.DataFrame, profile: pd.DataFrame,
                  shown: Sequence[PromptView], n_heatmaps: int = 2) -> list[Path]:
    """One model's PNGs (a single-model run gets them too): its score distribution, its density profile
    (``profile``: columns decile and ``key``) and the labelled heatmaps of its first ``n_heatmaps`` prompts."""
    paths = [score_distribution_png(directory / "score_distribution.png", {key: scores},
                                    f"instruction scores of {name}, per split"),
             density_profile_png(directory / "density_profile.png", profile,
                                 f"importance density of {name} over relative prompt position")]
    for i, v in enumerate([v for v in shown if v.scores.size][:n_heatmaps]):
        paths.append(heatmap_png(directory / f"heatmap_{i}.png", v.scores, v.prompt_tokens, v.response_tokens,
                                 v.instruction, f"saliency of {name}, prompt {v.id}: score S of each prompt token "
                                 "(rows) for each response token (columns)"))
    return paths


__all__ = ["PromptView", "density_profile_png", "examples_html", "model_figures", "score_distribution_png",
           "token_strings"]


def _save(plt, fig, path: str | Path) -> Path:
    """Lay out, write ``fig`` as a PNG at ``path`` (folders created) and free it."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
