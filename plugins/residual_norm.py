"""Example plugin: the mean L2 norm of the residual stream after each layer, per model, and its change.

This is the pattern for a new probe plugin: an ``Options`` dataclass, ``probes()`` naming sites, ``on_batch``
consuming the captures, ``on_model_end`` writing results, ``on_compare`` reading both models back.
Enable it with ``tuneshift plugins=[residual_norm]`` (config: ``conf/plugins/residual_norm.yaml``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from tuneshift.plugin import Plugin
from tuneshift.probes import Probe


@dataclass
class ResidualNormOptions:
    include_embeddings: bool = True  # also report the norm of the token embeddings (layer -1)


class ResidualNorm(Plugin):
    """Mean ||resid_post|| per layer over every real (non-pad) position of every prompt."""

    name = "residual_norm"
    Options = ResidualNormOptions

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

    def on_compare(self, ctx, base: str, tuned: str) -> None:
        b = ctx.store.load_table(self.name, base, "norms")
        t = ctx.store.load_table(self.name, tuned, "norms")
        ratio = t["mean_norm"].to_numpy() / b["mean_norm"].to_numpy()
        table = pd.DataFrame({"layer": b["layer"], "base": b["mean_norm"], "tuned": t["mean_norm"], "ratio": ratio})
        key = ctx.store.compare_key(base, tuned)
        ctx.store.save_table(self.name, key, "norms", table)
        ctx.store.save_json(self.name, key, "summary", {"mean_ratio": float(np.mean(ratio))})
        ctx.logger.log_metrics({"mean_ratio": float(np.mean(ratio))}, prefix=self.name)


__all__ = ["ResidualNorm", "ResidualNormOptions"]
