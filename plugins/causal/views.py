"""Effect plots of the causal tests: score drop vs the number of units, and recovery per depth."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

METRIC_LABELS = {"task": "task-score drop (held-out scorer)", "logprob": "drop in mean log p(reference)"}
KIND_STYLE = {"selected": ("C3", "o", "-"), "random": ("0.35", "s", "--"), "stable": ("C0", "^", "-."),
              "random_instruction": ("C2", "D", ":"), "random_rank": ("C4", "v", ":")}


def effect_plot(effects: pd.DataFrame, draws: pd.DataFrame, names: dict[str, str], xlabel: str, title: str,
                path: Path) -> Path:
    """Per metric panel: the selected units' drop (with its item-bootstrap interval) and each control's mean drop
    (interval over items and draws) against size; single random draws as grey dots."""
    metrics = [m for m in ("task", "logprob") if m in set(effects["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = effects[effects["metric"] == metric]
        sizes = sorted(rows["size"].unique())
        dots = draws[draws["metric"] == metric]
        if len(dots):
            jitter = np.random.default_rng(0).uniform(-0.08, 0.08, len(dots)) * max(1, np.ptp(sizes) or 1) / 4
            ax.scatter(dots["size"] + jitter, dots["drop"], s=8, color="0.75", label=f"single draws: {names['random']}",
                       zorder=1)
        sel = rows.drop_duplicates("size").sort_values("size")
        _line(ax, sel["size"], sel["drop_selected"], sel["drop_selected_ci_low"], sel["drop_selected_ci_high"],
              names["selected"], "selected")
        for kind, part in rows.groupby("control"):
            part = part.sort_values("size")
            _line(ax, part["size"], part["drop_control"], part["drop_control_ci_low"], part["drop_control_ci_high"],
                  names.get(kind, kind), kind)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.set_xticks(sizes)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.legend(fontsize=7, loc="best")
    return _save(fig, title, path)


def _save(fig, title: str, path: Path) -> Path:
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _line(ax, x, y, low, high, label: str, kind: str) -> None:
    color, marker, style = KIND_STYLE.get(kind, ("C4", "v", "-"))
    y = np.asarray(y, dtype=float)
    err = np.vstack([y - np.asarray(low, dtype=float), np.asarray(high, dtype=float) - y])
    ax.errorbar(x, y, yerr=err, color=color, marker=marker, ls=style, capsize=3, label=label, zorder=3)


def patching_plot(patching: pd.DataFrame, title: str, path: Path) -> Path:
    """Recovery per depth: share of the base-vs-tuned gap that patching (or steering) closes, both directions."""
    metrics = [m for m in ("task", "logprob") if m in set(patching["metric"])]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.6 * len(metrics), 3.9), squeeze=False)
    names = {("base_from_tuned", "patch"): ("base run, tuned activations patched in: gap recovered", "C3", "-"),
             ("base_from_tuned", "steer"): ("base run + mean(tuned - base): gap recovered", "C3", ":"),
             ("tuned_from_base", "patch"): ("tuned run, base activations patched in: gap lost", "C0", "-"),
             ("tuned_from_base", "steer"): ("tuned run + mean(base - tuned): gap lost", "C0", ":")}
    for ax, metric in zip(axes[0], metrics):
        rows = patching[patching["metric"] == metric]
        sites = list(dict.fromkeys(rows.sort_values("depth")["site"]))
        for (direction, kind), (label, color, style) in names.items():
            part = rows[(rows["direction"] == direction) & (rows["kind"] == kind)].sort_values("depth")
            if not len(part):
                continue
            y = part["recovery"].to_numpy(dtype=float)
            err = np.vstack([y - part["recovery_ci_low"].to_numpy(dtype=float),
                             part["recovery_ci_high"].to_numpy(dtype=float) - y])
            ax.errorbar(part["depth"], y, yerr=err, color=color, ls=style, marker="o", capsize=3, label=label)
        ax.axhline(0, color="0.6", lw=0.8)
        ax.axhline(1, color="0.6", lw=0.8, ls="--")
        ax.set_xticks(range(len(sites)))
        ax.set_xticklabels([s.replace("layers.", "L").replace(".resid_post", "").replace(".output", "")
                            for s in sites], fontsize=8)
        ax.set_xlabel("patched depth (residual stream after layer; embed = embeddings)")
        ax.set_ylabel(f"share of the gap ({'task score' if metric == 'task' else 'log p(reference)'})")
        ax.legend(fontsize=6.5, loc="best")
    return _save(fig, title, path)


__all__ = ["effect_plot", "patching_plot"]
