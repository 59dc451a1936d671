"""Matched random controls: unit sets of the same size and the same layers as the selected units.

- heads: the selected heads' count per layer is kept and heads are drawn uniformly without replacement within
  each layer (``match_layers``; else from all heads). When the matched sets are few (a 16-head model has 4
  one-head sets in a layer), every other set is used once and the permutation test is exact.
- FFN directions: the selected directions' count per layer is kept; directions are drawn from the same layers'
  candidate pool (the first ``pool`` principal directions, the pool the selection ranked); a second control also
  matches explained variance: each selected direction is replaced by one within a few ranks of it.
- tokens: per prompt, the same number of tokens drawn from its context tokens (or from its instruction tokens).
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from typing import Sequence

import numpy as np

Head = tuple[int, int]


def _enumerate_or_sample(blocks: list[tuple[list, int]], selected: frozenset, n_draws: int,
                         rng: np.random.Generator) -> tuple[list[frozenset], bool]:
    """Sets taking ``count`` members from each block's candidates: all other sets when they are at most
    ``n_draws`` (exact), else ``n_draws`` uniform samples (a sample may equal the selected set)."""
    space = math.prod(math.comb(len(cands), count) for cands, count in blocks)
    if space - 1 <= n_draws:
        choices = [itertools.combinations(cands, count) for cands, count in blocks]
        sets = [frozenset(x for part in combo for x in part) for combo in itertools.product(*choices)]
        return [s for s in sets if s != selected], True
    draws = []
    for _ in range(n_draws):
        members = []
        for cands, count in blocks:
            pick = rng.choice(len(cands), size=count, replace=False)
            members += [cands[i] for i in sorted(pick.tolist())]
        draws.append(frozenset(members))
    return draws, False


def matched_head_sets(selected: Sequence[Head], heads: Sequence[Head], n_draws: int, rng: np.random.Generator,
                      match_layers: bool = True) -> tuple[list[frozenset], bool]:
    """Random head sets matching ``selected`` (per-layer counts when ``match_layers``); returns (sets, exact)."""
    chosen = frozenset(selected)
    if match_layers:
        counts = Counter(layer for layer, _ in selected)
        blocks = [([h for h in heads if h[0] == layer], n) for layer, n in sorted(counts.items())]
    else:
        blocks = [(list(heads), len(selected))]
    return _enumerate_or_sample(blocks, chosen, n_draws, rng)


def matched_direction_sets(selected: Sequence[tuple[int, int]], pool: Sequence[tuple[int, int]], n_draws: int,
                           rng: np.random.Generator) -> tuple[list[frozenset], bool]:
    """Random (layer, rank) sets with the selected per-layer counts, drawn from the same layers' pool."""
    counts = Counter(layer for layer, _ in selected)
    blocks = [([u for u in pool if u[0] == layer], n) for layer, n in sorted(counts.items())]
    return _enumerate_or_sample(blocks, frozenset(selected), n_draws, rng)


def rank_matched_direction_sets(selected: Sequence[tuple[int, int]], pool: Sequence[tuple[int, int]], n_draws: int,
                                rng: np.random.Generator, window: int = 8) -> list[frozenset]:
    """Random sets that replace each selected (layer, rank) by a distinct pool direction of the same layer within
    ``window`` ranks of it: matched in layer and in explained variance (ranks are ordered by variance)."""
    by_layer: dict[int, list[int]] = {}
    for layer, rank in pool:
        by_layer.setdefault(layer, []).append(rank)
    draws = []
    for _ in range(n_draws):
        chosen: set[tuple[int, int]] = set()
        for layer, rank in sorted(selected):
            near = [(layer, r) for r in by_layer[layer] if abs(r - rank) <= window and (layer, r) not in chosen]
            chosen.add(near[int(rng.integers(len(near)))] if near else (layer, rank))
        draws.append(frozenset(chosen))
    return draws


def random_token_sets(candidates: Sequence[Sequence[int]], counts: Sequence[int], n_draws: int,
                      rng: np.random.Generator) -> list[list[list[int]]]:
    """``n_draws`` draws; each gives every item ``counts[i]`` tokens sampled from ``candidates[i]``."""
    out = []
    for _ in range(n_draws):
        out.append([sorted(np.asarray(c)[rng.choice(len(c), size=k, replace=False)].tolist()) if k else []
                    for c, k in zip(candidates, counts)])
    return out


__all__ = ["matched_direction_sets", "matched_head_sets", "random_token_sets", "rank_matched_direction_sets"]
