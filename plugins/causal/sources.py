"""What the causal tests test: the units the other analyses point to, read from their stored result files.

Plugins never import each other, so the causal plugin reads what ``head_relations``, ``ffn_concepts`` and
``saliency`` wrote to the run's result store (they must run in the same job, before ``causal``):

- heads: ``head_relations/<model>/knowledge.parquet`` of both models (head knowledge P_h: one row per layer,
  head and word pair) and ``summary.json`` (layers, heads). Per head, ``c_h`` = the number of (pair, verb)
  incidences with an instruction verb (the sum over instruction verbs v of c_h(v), methods.md B.5-B.6); the
  growth is ``c_h(tuned) - c_h(base)``. The verb list is the one ``head_relations`` ran with (the run's
  ``settings.json``) unless the causal options give one.
- FFN directions: ``ffn_concepts/<model>/directions.npz`` of both models (``vectors [L, R, d]``, rows the
  principal directions of each layer's value vectors, best first). Per tuned direction, its best-match cosine
  ``max_j |<v_T, v_B,j>|`` over the base directions of the same layer; lower = rotated more.
- instruction tokens: ``saliency/<tuned>/densities.parquet`` (importance density per prompt content token,
  at the plugin's threshold b) and ``matrices.npz`` (the integer scores S at b = 0, whose row sums break the
  ties of densities that b = 7 sets to zero).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
import torch

from tuneshift.data import EncodedPrompt


class SourceMissing(Exception):
    """A test's source results are not in the store; the message says which plugin to add."""


def _need(path: Path, plugin: str) -> Path:
    if not path.is_file():
        raise SourceMissing(f"{path.name} of {plugin} is missing ({path}); run {plugin} in the same job, before "
                            f"causal (plugins=[{plugin},...,causal])")
    return path


# ---- heads ----------------------------------------------------------------------------------------------------
def instruction_verbs(output_dir: Path, given: Sequence[str] | None) -> list[str]:
    """The instruction verbs: ``given``, else the list ``head_relations`` ran with in this run."""
    if given:
        return [v.lower() for v in given]
    settings = json.loads(_need(output_dir / "settings.json", "the run").read_text())
    verbs = settings.get("settings", {}).get("plugins", {}).get("head_relations", {}).get("instruction_verbs")
    if not verbs:
        raise SourceMissing("the run's settings.json has no head_relations.instruction_verbs; run head_relations "
                            "in the same job or set causal.instruction_verbs")
    return [v.lower() for v in verbs]


def verb_counts(knowledge: pd.DataFrame, verbs: set[str]) -> pd.Series:
    """``c_h`` per (layer, head): incidences of instruction verbs in the head's knowledge pairs."""
    hits = knowledge["word_a"].isin(verbs).astype(int) + knowledge["word_b"].isin(verbs).astype(int)
    return hits.groupby([knowledge["layer"], knowledge["head"]]).sum()


def head_growth(store, base: str, tuned: str, verbs: Sequence[str]) -> pd.DataFrame:
    """One row per (layer, head) of the mined layers: ``base_count, tuned_count, growth``, most grown first.

    Ties in growth are broken by the tuned count, then by layer and head (deterministic)."""
    plugin = "head_relations"
    summary = json.loads(_need(store.dir(plugin, tuned) / "summary.json", plugin).read_text())
    counts = {}
    for key in (base, tuned):
        knowledge = pd.read_parquet(_need(store.dir(plugin, key) / "knowledge.parquet", plugin))
        counts[key] = verb_counts(knowledge, set(verbs))
    index = pd.MultiIndex.from_product([summary["layers"], range(summary["n_heads"])], names=["layer", "head"])
    table = pd.DataFrame({"base_count": counts[base].reindex(index, fill_value=0),
                          "tuned_count": counts[tuned].reindex(index, fill_value=0)}).reset_index()
    table["growth"] = table["tuned_count"] - table["base_count"]
    return table.sort_values(["growth", "tuned_count", "layer", "head"], ascending=[False, False, True, True],
                             kind="stable").reset_index(drop=True)


# ---- FFN directions -------------------------------------------------------------------------------------------
@dataclass
class Directions:
    """Tuned principal directions of the candidate pool and their rotation from the base."""

    table: pd.DataFrame                 # layer, rank, variance_ratio, best_cos (pool only), most rotated first
    vectors: dict[int, torch.Tensor]    # layer -> [R, d] tuned directions (orthonormal rows)


def rotated_directions(store, base: str, tuned: str, pool: int) -> Directions:
    """Best-match cosines of the first ``pool`` tuned directions of every layer (lowest = rotated most)."""
    plugin = "ffn_concepts"
    arrays = {}
    for key in (base, tuned):
        with np.load(_need(store.dir(plugin, key) / "directions.npz", plugin)) as data:
            arrays[key] = {k: data[k] for k in ("layers", "vectors", "variance_ratio")}
    a, b = arrays[tuned], arrays[base]
    rows, vectors = [], {}
    for li, layer in enumerate(a["layers"].tolist()):
        if layer not in b["layers"].tolist():
            continue
        bi = b["layers"].tolist().index(layer)
        v_t, v_b = a["vectors"][li].astype(np.float64), b["vectors"][bi].astype(np.float64)  # [R, d]
        best = np.abs(v_t[:pool] @ v_b.T).max(1)  # [pool]
        vectors[layer] = torch.from_numpy(a["vectors"][li]).float()
        rows += [{"layer": layer, "rank": r, "variance_ratio": float(a["variance_ratio"][li, r]),
                  "best_cos": float(best[r])} for r in range(min(pool, len(best)))]
    if not rows:
        raise SourceMissing("ffn_concepts analysed no layer of both models")
    table = pd.DataFrame(rows).sort_values(["best_cos", "layer", "rank"], kind="stable").reset_index(drop=True)
    return Directions(table, vectors)


# ---- salient instruction tokens -------------------------------------------------------------------------------
@dataclass
class TokenSets:
    """Per item: instruction token indices ranked by saliency, and the context token indices (model input)."""

    ranked_instruction: list[list[int]]
    context: list[list[int]]
    skipped: dict[str, str]              # prompt id -> why it has no ranking


def salient_tokens(store, tuned: str, items: Sequence[EncodedPrompt]) -> TokenSets:
    """Rank each prompt's instruction tokens by the tuned model's importance density (ties: S row sums)."""
    plugin = "saliency"
    densities = pd.read_parquet(_need(store.dir(plugin, tuned) / "densities.parquet", plugin))
    with np.load(_need(store.dir(plugin, tuned) / "matrices.npz", plugin)) as data:
        ids = data["ids"].tolist()
        row_sums = {pid: data[f"S_{i}"].astype(np.int64).sum(1) for i, pid in enumerate(ids)}
    by_id = {pid: g.sort_values("position") for pid, g in densities.groupby("id")}
    ranked, context, skipped = [], [], {}
    for e in items:
        content = e.content_mask.nonzero().squeeze(1).numpy()           # model-input index of each content token
        instr = e.instruction_mask[e.content_mask].numpy()
        rows = by_id.get(e.prompt.id)
        reason = ("no saliency for this prompt" if rows is None or e.prompt.id not in row_sums else
                  "saliency tokens differ from this encoding" if len(rows) != len(content) or
                  not np.array_equal(rows["instruction"].to_numpy(), instr) else "")
        if reason:
            skipped[e.prompt.id] = reason
            ranked.append([])
            context.append([])
            continue
        density, sums = rows["density"].to_numpy(), row_sums[e.prompt.id]
        order = sorted(np.flatnonzero(instr).tolist(), key=lambda n: (-density[n], -sums[n], n))
        ranked.append([int(content[n]) for n in order])
        context.append([int(content[n]) for n in np.flatnonzero(~instr)])
    return TokenSets(ranked, context, skipped)


__all__ = ["Directions", "SourceMissing", "TokenSets", "head_growth", "instruction_verbs", "rotated_directions",
           "salient_tokens", "verb_counts"]
