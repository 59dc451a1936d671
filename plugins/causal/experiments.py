"""The four tests as conditions and intervention builders for :func:`tuneshift.evaluation.evaluate`.

Each test is a list of :class:`Condition` (the baseline, the selected units, the matched random draws, other
controls) and a ``build(rows)`` that turns the rows' condition indices into per-row intervention parameters,
so all draws of a test share batches (one forward evaluates many draws):

- heads: :class:`~tuneshift.interventions.AblateHeads` per layer with a ``[rows, H]`` head mask;
- ffn: :class:`~tuneshift.interventions.ProjectOut` at ``layers.{l}.mlp.output`` with a ``[rows, d, k]`` basis
  (zero columns for rows that remove fewer directions there);
- tokens: :class:`~tuneshift.interventions.CorruptPositions` at ``embed.output`` with a ``[rows, T]`` mask;
- patching: :class:`~tuneshift.interventions.Patch` of the other model's activations (captured once on the same
  tokens) and, as a prompt-agnostic control, :class:`~tuneshift.interventions.Steer` by the mean difference.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from tuneshift.evaluation import Rows
from tuneshift.interventions import AblateHeads, CorruptPositions, Intervention, Patch, ProjectOut, Steer
from tuneshift.plugins.causal.controls import (matched_direction_sets, matched_head_sets, random_token_sets,
                                               rank_matched_direction_sets)
from tuneshift.plugins.causal.sources import Directions, TokenSets


@dataclass
class Condition:
    """One scored condition of a test. ``size``: k heads, r directions, n tokens, or the patched depth."""

    kind: str                 # baseline | selected | random | random_rank | stable | random_instruction | patch | steer
    size: int = 0
    draw: int = -1
    units: Any = None         # heads / (layer, rank) directions: frozenset; tokens: per-item lists; patch: site
    exact: bool = False       # the random draws of this size enumerate every matched set
    label: str = ""           # the units in words (L2H3 = layer 2 head 3; L1d5 = layer 1 direction 5; a site)


def _label(units: Any, kind: str, sep: str) -> str:
    return " ".join(f"L{a}{sep}{b}" for a, b in sorted(units)) if kind in ("selected", "stable") else ""


@dataclass
class Test:
    """A test's conditions and the builder of their per-row interventions."""

    name: str
    conditions: list[Condition]
    build: Callable[[Rows], list[Intervention]]
    info: dict = field(default_factory=dict)


# ---- heads ----------------------------------------------------------------------------------------------------
def heads_test(ranked: Sequence[tuple[int, int]], all_heads: Sequence[tuple[int, int]], ks: Sequence[int],
               n_layers: int, n_heads: int, means: dict[int, torch.Tensor], mode: str, draws: int,
               rng: np.random.Generator, match_layers: bool = True) -> Test:
    """Ablate the top-k heads of ``ranked`` (most grown first) vs matched random k-head sets, for each k."""
    conds = [Condition("baseline")]
    for k in ks:
        chosen = frozenset(ranked[:k])
        controls, exact = matched_head_sets(ranked[:k], all_heads, draws, rng, match_layers)
        conds.append(Condition("selected", k, units=chosen, exact=exact, label=_label(chosen, "selected", "H")))
        conds += [Condition("random", k, d, units=s, exact=exact) for d, s in enumerate(controls)]
    table = torch.zeros(len(conds), n_layers, n_heads, dtype=torch.bool)
    for c, cond in enumerate(conds):
        for layer, head in cond.units or ():
            table[c, layer, head] = True

    def build(rows: Rows) -> list[Intervention]:
        mask = table[rows.condition]  # [R, L, H]
        return [AblateHeads(layer, mask[:, layer], mode=mode, mean=means.get(layer))
                for layer in range(n_layers) if bool(mask[:, layer].any())]

    return Test("heads", conds, build)


# ---- FFN directions -------------------------------------------------------------------------------------------
def ffn_test(directions: Directions, rs: Sequence[int], draws: int, rng: np.random.Generator,
             rank_window: int = 8) -> Test:
    """Project out the r most rotated tuned directions vs r random pool directions of the same layers, vs random
    directions of similar rank (explained variance) in the same layers, and vs the r least rotated ones."""
    table = directions.table  # most rotated first
    units = list(zip(table["layer"].tolist(), table["rank"].tolist()))
    conds = [Condition("baseline")]
    for r in rs:
        chosen = units[:r]
        controls, exact = matched_direction_sets(chosen, units, draws, rng)
        stable = frozenset(units[::-1][:r])
        conds.append(Condition("selected", r, units=frozenset(chosen), exact=exact,
                               label=_label(chosen, "selected", "d")))
        conds.append(Condition("stable", r, units=stable, label=_label(stable, "stable", "d")))
        conds += [Condition("random", r, d, units=s, exact=exact) for d, s in enumerate(controls)]
        conds += [Condition("random_rank", r, d, units=s)
                  for d, s in enumerate(rank_matched_direction_sets(chosen, units, draws, rng, rank_window))]
    layers = sorted(directions.vectors)
    per_cond = [{layer: sorted(rank for l2, rank in (c.units or ()) if l2 == layer) for layer in layers}
                for c in conds]

    def build(rows: Rows) -> list[Intervention]:
        ivs: list[Intervention] = []
        for layer in layers:
            lists = [per_cond[c][layer] for c in rows.condition.tolist()]
            width = max(len(x) for x in lists)
            if width == 0:
                continue
            vecs = directions.vectors[layer]  # [R_dirs, d]
            basis = torch.zeros(len(lists), vecs.shape[1], width)
            for r, ranks in enumerate(lists):
                if ranks:
                    basis[r, :, :len(ranks)] = vecs[ranks].T
            ivs.append(ProjectOut(f"layers.{layer}.mlp.output", basis))
        return ivs

    return Test("ffn", conds, build)


# ---- instruction tokens ---------------------------------------------------------------------------------------
def tokens_test(tokens: TokenSets, ns: Sequence[int], draws: int, rng: np.random.Generator,
                fill: torch.Tensor | None, noise_std: float, seed: int) -> Test:
    """Corrupt each prompt's n most salient instruction tokens vs n random context tokens and vs n random
    instruction tokens (n capped per prompt by the smaller of its instruction and context token counts)."""
    conds = [Condition("baseline", units=[[] for _ in tokens.ranked_instruction])]
    for n in ns:
        counts = [min(n, len(a), len(c)) for a, c in zip(tokens.ranked_instruction, tokens.context)]
        conds.append(Condition("selected", n, units=[a[:k] for a, k in zip(tokens.ranked_instruction, counts)]))
        conds += [Condition("random", n, d, units=s)
                  for d, s in enumerate(random_token_sets(tokens.context, counts, draws, rng))]
        conds += [Condition("random_instruction", n, d, units=s)
                  for d, s in enumerate(random_token_sets(tokens.ranked_instruction, counts, draws, rng))]

    def build(rows: Rows) -> list[Intervention]:
        per_row = [conds[c].units[i] for c, i in zip(rows.condition.tolist(), rows.item.tolist())]
        if not any(per_row):
            return []
        return [CorruptPositions("embed.output", rows.token_mask(per_row), fill, noise_std, seed)]

    return Test("tokens", conds, build)


# ---- patching -------------------------------------------------------------------------------------------------
def patch_test(direction: str, sites: Sequence[str], sources: dict[str, list[torch.Tensor]],
               shift: dict[str, torch.Tensor], steer: bool) -> Test:
    """Patch ``sources`` (the other model's activations per site and item, over each item's prompt and, for the
    teacher-forced score, its reference) into this model, one site per condition; with ``steer``, also add the
    mean activation difference (other - this) at the same site."""
    conds = [Condition("baseline")]
    for depth, site in enumerate(sites):
        conds.append(Condition("patch", depth, units=site, label=site))
        if steer:
            conds.append(Condition("steer", depth, units=site, label=site))

    def build(rows: Rows) -> list[Intervention]:
        ivs: list[Intervention] = []
        kinds = [(conds[c].kind, conds[c].units) for c in rows.condition.tolist()]
        for site in sites:
            patched = torch.tensor([k == ("patch", site) for k in kinds])
            if bool(patched.any()):
                where = rows.attention_mask.bool() & patched[:, None]
                ivs.append(Patch(site, rows.place(sources[site]), positions=where))
            steered = torch.tensor([k == ("steer", site) for k in kinds], dtype=torch.float32)
            if bool(steered.any()):
                ivs.append(Steer(site, steered[:, None] * shift[site][None]))
        return ivs

    return Test(f"patching_{direction}", conds, build, {"sites": list(sites)})


def patch_sites(n_layers: int) -> list[str]:
    """The residual stream at every depth: the embeddings, then after each layer."""
    return ["embed.output"] + [f"layers.{i}.resid_post" for i in range(n_layers)]


__all__ = ["Condition", "Test", "ffn_test", "heads_test", "patch_sites", "patch_test", "tokens_test"]
