"""Pictures of token distribution shift: shares and KL by position, the most shifted tokens (PNG), and a
self-contained HTML page of differential attribution per prompt (base, tuned and their difference)."""
from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from tuneshift.figures import pyplot, save_figure

COLOURS = {"unshifted": "#4c956c", "marginal": "#f4a259", "shifted": "#bc4b51"}


def figures(folder: Path, outputs: dict[str, pd.DataFrame], base: str, tuned: str) -> dict[str, Path]:
    """``shift_by_position.png`` and ``top_tokens.png`` in ``folder``; returns them by name."""
    plt = pyplot()
    out = {}
    table = outputs["by_position"]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    centres = (table["from"] + table["to"]) / 2
    width = float((table["to"] - table["from"]).iloc[0]) * 0.9 if len(table) else 0.1
    bottom = np.zeros(len(table))
    for cls, colour in COLOURS.items():
        values = table[f"share_{cls}"].fillna(0).to_numpy()
        ax.bar(centres, values, width, bottom=bottom, color=colour, label=cls)
        bottom += values
    ax.set_xlabel("relative position in the shared response (0 = first token, 1 = stop)")
    ax.set_ylabel("share of positions")
    ax.set_ylim(0, 1)
    twin = ax.twinx()
    twin.plot(centres, table["mean_kl_tb"], color="black", marker="o", label="mean KL(T||B)")
    twin.set_ylabel("mean KL(tuned || base), nats")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="upper right")
    ax.set_title(f"token distribution shift by position: {base} vs {tuned}", fontsize=10)
    out["shift_by_position"] = save_figure(fig, folder / "shift_by_position.png")

    top = outputs["top_tokens"].head(20)
    fig, ax = plt.subplots(figsize=(6.4, 0.25 * max(len(top), 4) + 1.2))
    labels = [repr(t) for t in top["token"]]
    colours = ["#577590" if f else "#bc4b51" for f in top["is_format"]]
    ax.barh(range(len(top))[::-1], top["n_shifted"], color=colours)
    ax.set_yticks(range(len(top))[::-1], labels, fontsize=7)
    ax.set_xlabel("shifted occurrences (base rank > 3)")
    ax.set_title(f"most often shifted tokens ({tuned} vs {base}); blue = formatting", fontsize=10)
    out["top_tokens"] = save_figure(fig, folder / "top_tokens.png")
    return out


@dataclass
class DiffView:
    """One prompt of the differential-attribution page. ``I_base, I_tuned, D``: ``[N, M]``; ``classes [M]``."""

    id: str
    prompt_tokens: list[str]
    response_tokens: list[str]
    instruction: np.ndarray
    I_base: np.ndarray
    I_tuned: np.ndarray
    D: np.ndarray
    classes: np.ndarray


def _shown(token: str) -> str:
    return html.escape(token).replace("\n", "&#8629;<br>") or "&#8203;"


def _row(tokens: Sequence[str], values: np.ndarray, instruction: np.ndarray, signed: bool) -> str:
    scale = float(np.abs(values).max()) or 1.0
    spans = []
    for tok, value, instr in zip(tokens, values, instruction):
        a = float(np.clip(abs(value) / scale, 0, 1))
        colour = f"rgba(188,75,81,{a:.2f})" if (value >= 0 or not signed) else f"rgba(87,117,144,{a:.2f})"
        style = f"background:{colour};" + ("text-decoration:underline;" if instr else "")
        spans.append(f'<span style="{style}" title="{value:.4g}">{_shown(tok)}</span>')
    return "".join(spans)


def differential_html(title: str, views: Sequence[DiffView]) -> str:
    """Each prompt's tokens shaded by importance summed over its shifted positions: base, tuned, tuned - base."""
    parts = [f"<h1>{html.escape(title)}</h1><p>Rows: gradient x input of log p(y_m) summed over the shifted "
             "response positions (base rank &gt; 3), for the base model, the tuned model, and their difference "
             "D = I_T - I_B (red: tuned relies on the token more, blue: less). Instruction tokens are underlined; "
             "shifted response tokens are boxed.</p>"]
    for v in views:
        shifted = np.asarray(v.classes) == "shifted"
        resp = "".join(f'<span style="{"outline:1px solid #bc4b51;" if s else ""}">{_shown(t)}</span>'
                       for t, s in zip(v.response_tokens, shifted))
        rows = [("base", np.abs(v.I_base[:, shifted]).sum(1), False),
                ("tuned", np.abs(v.I_tuned[:, shifted]).sum(1), False), ("tuned - base", v.D[:, shifted].sum(1), True)]
        body = "".join(f"<tr><th>{name}</th><td>{_row(v.prompt_tokens, vals, v.instruction, signed)}</td></tr>"
                       for name, vals, signed in rows)
        parts.append(f"<h2>{html.escape(v.id)}</h2><table>{body}</table><p><b>response</b> {resp}</p>")
    style = "<style>body{font-family:sans-serif;max-width:70em} th{text-align:right;padding-right:1em}</style>"
    return f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>{''.join(parts)}</body></html>"


__all__ = ["DiffView", "differential_html", "figures"]
