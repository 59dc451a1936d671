"""Figures of the layer lens: KL by layer, residual differences by layer, commitment layers."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from tuneshift.figures import pyplot, save_figure


def figures(folder: Path, outputs: dict[str, pd.DataFrame], base: str, tuned: str) -> dict[str, Path]:
    plt = pyplot()
    t = outputs["by_layer"]
    out = {}
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    ax.plot(t["layer"], t["kl_base"], marker="o", label=base)
    ax.plot(t["layer"], t["kl_tuned"], marker="s", label=tuned)
    ax.set_xticks(t["layer"])
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("mean KL(final || logit lens), nats")
    ax.set_title(f"logit lens on the shared response: {base} vs {tuned}", fontsize=10)
    ax.legend(fontsize=8)
    out["kl_by_layer"] = save_figure(fig, folder / "kl_by_layer.png")

    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    ax.plot(t["layer"], t["rel_norm"], marker="o", color="#bc4b51", label="||h_T - h_B|| / ||h_B||")
    ax.set_xticks(t["layer"])
    ax.set_xlabel("layer (resid_post)")
    ax.set_ylabel("relative norm of the difference")
    twin = ax.twinx()
    twin.plot(t["layer"], t["cos"], marker="s", color="#577590", label="cos(h_T, h_B)")
    twin.set_ylabel("cosine")
    handles = ax.get_legend_handles_labels()[0] + twin.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], fontsize=8)
    ax.set_title(f"residual stream difference per layer ({tuned} - {base})", fontsize=10)
    out["residual_difference"] = save_figure(fig, folder / "residual_difference.png")

    c = outputs["commitment"]
    fig, ax = plt.subplots(figsize=(5.6, 3.4))
    x = np.arange(len(c))
    ax.bar(x - 0.2, c["base"], 0.4, label=base)
    ax.bar(x + 0.2, c["tuned"], 0.4, label=tuned)
    ax.set_xticks(x, c["layer"])
    ax.set_xlabel("commitment layer (lens top-1 = final top-1 from here on)")
    ax.set_ylabel("positions")
    ax.set_title("where each model commits to its next token", fontsize=10)
    ax.legend(fontsize=8)
    out["commitment"] = save_figure(fig, folder / "commitment.png")
    return out


__all__ = ["figures"]
