"""Example plugin: the mean L2 norm of the residual stream after each layer, per model, and its change.

This is the pattern for a new probe plugin: an ``Options`` dataclass, ``probes()`` naming sites, ``on_batch``
consuming the captures, ``on_model_end`` writing results, ``on_compare`` reading both models back, and
``section()`` saying what the report shows (headline findings, figures with captions, tables).
Enable it with ``tuneshift plugins=[residual_norm]``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tuneshift.plugin import Plugin
from tuneshift.probes import Probe
from tuneshift.sections import Figure, Headline, Section, Table


@dataclass
class ResidualNormOptions:
    include_embeddings: bool = True  # also report the norm of the token embeddings (layer -1)


class ResidualNorm(Plugin):
    """Mean ||resid_post|| per layer over every real (non-pad) position of every prompt."""

    name = "residual_norm"
    Options = ResidualNormOptions
    runs_remote = True  # it reads only its probes, so run.remote may ship its traces

    def on_model_start(self, ctx, model) -> None:
        self.sums: dict[str, float] = {}
        self.count = 0

    def _sites(self, n_layers: int) -> list[str]:
        head = ["embed.output"] if self.options.include_embeddings else []
        return head + [f"layers.{i}.resid_post" for i in range(n_layers)]

    def probes(self, model) -> list[Probe]:
        return [Probe(site, reduce="norm") for site in self._sites(model.adapter.n_layers)]

    def on_batch(self, ctx, model, batch, captures) -> None:
        mask = batch.attention_mask.bool()  # [B, T]
        for site in self._sites(model.adapter.n_layers):
            norms = captures[f"{site}:norm"]  # [B, T]
            self.sums[site] = self.sums.get(site, 0.0) + float(norms[mask].double().sum())
        self.count += int(mask.sum())

    def on_model_end(self, ctx, model) -> None:
        sites = self._sites(model.adapter.n_layers)
        table = pd.DataFrame({"layer": [-1 if s == "embed.output" else int(s.split(".")[1]) for s in sites],
                              "site": sites, "mean_norm": [self.sums[s] / self.count for s in sites]})
        ctx.store.save_table(self.name, model.key, "norms", table)
        ctx.logger.log_table(f"{self.name}/{model.key}", table)
        plot_norms(table, {model.key: "mean_norm"}, ctx.store.dir(self.name, model.key) / "norms.png",
                   f"Residual-stream norm per layer, {model.name}")

    def on_compare(self, ctx, base: str, tuned: str) -> None:
        b = ctx.store.load_table(self.name, base, "norms")
        t = ctx.store.load_table(self.name, tuned, "norms")
        ratio = t["mean_norm"].to_numpy() / b["mean_norm"].to_numpy()
        table = pd.DataFrame({"layer": b["layer"], "base": b["mean_norm"], "tuned": t["mean_norm"], "ratio": ratio})
        key = ctx.store.compare_key(base, tuned)
        ctx.store.save_table(self.name, key, "norms", table)
        ctx.store.save_json(self.name, key, "summary", {"mean_ratio": float(np.mean(ratio))})
        ctx.logger.log_metrics({"mean_ratio": float(np.mean(ratio))}, prefix=self.name)
        plot_norms(table, {base: "base", tuned: "tuned"}, ctx.store.dir(self.name, key) / "norms.png",
                   f"Residual-stream norm per layer, {base} vs {tuned}")

    def section(self, ctx, key: str) -> Section:
        norms = ctx.store.load_table(self.name, key, "norms")
        if key.startswith("compare/"):
            headlines = [Headline("mean residual-stream norm (mean over layers)", base=norms["base"].mean(),
                                  tuned=norms["tuned"].mean(), n=f"{len(norms)} sites"),
                         Headline("tuned / base norm ratio (mean over layers)", value=norms["ratio"].mean())]
        else:
            headlines = [Headline("mean residual-stream norm (mean over layers)", value=norms["mean_norm"].mean(),
                                  n=f"{len(norms)} sites")]
        return Section("Residual-stream norm per layer", self.explanation(), headlines,
                       figures=[Figure("norms.png", "Mean L2 norm of the residual stream after each layer "
                                                    "(layer -1: the token embeddings)")],
                       tables=[Table("norms.parquet", "Mean norm per layer")])


def plot_norms(table: pd.DataFrame, columns: dict[str, str], path, title: str):
    """Line per model (``columns``: label -> column of ``table``) of the mean norm against the layer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for label, column in columns.items():
        ax.plot(table["layer"], table[column], marker="o", ms=3, label=label)
    ax.set_xlabel("layer (-1: embeddings)")
    ax.set_ylabel("mean ||residual|| (L2)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["ResidualNorm", "ResidualNormOptions", "plot_norms"]
