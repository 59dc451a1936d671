"""Slow reference implementations of method B, for verification and benchmarks only (never used in a run).

- :func:`naive_tau` and :func:`naive_layer`: the definition (``docs/methods.md`` B.2-B.4) as plain Python loops
  over words, heads, dims and pairs, in float64; the tests require :func:`mining.mine_layer` to give the same
  energies, ranks, pairs and pair order.
- :func:`loop_head`: one head the way the paper's code is organised (a matmul per head, a full sort of the
  vocabulary per dim, a Python loop over the K x K pairs of each dim): a fairer speed baseline.

Both share the tie rules of :mod:`tuneshift.plugins.head_relations.mining`: dims by energy then index, words by
magnitude then id, pairs by similarity (within ``SIM_TIE``) then their place ``i*K + c`` in ``T_q x T_k``.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from tuneshift.plugins.head_relations.mining import SIM_TIE, rotate


def _tie_by_place(found: list[tuple[float, int, int, int]]) -> list[tuple[float, int, int, int]]:
    """Sort ``(-sim, place, a, c)`` by similarity descending; runs of similarities within ``SIM_TIE`` of their
    neighbour are one tie, ordered by place."""
    ranked = sorted(found)
    groups: list[list[tuple[float, int, int, int]]] = []
    for item in ranked:
        if groups and item[0] - groups[-1][-1][0] <= SIM_TIE:
            groups[-1].append(item)
        else:
            groups.append([item])
    return [item for group in groups for item in sorted(group, key=lambda x: x[1])]


def naive_tau(vectors: np.ndarray, present: np.ndarray, n_base: int, mult: float) -> list[float]:
    """``tau(w) = mean + mult * std`` (population) of ``sim(w, u)`` over the present baseline words."""
    base = [u for u in range(n_base) if present[u]]
    tau = []
    for w in range(len(vectors)):
        if not present[w]:
            tau.append(math.inf)
            continue
        sims = [sum(float(x) * float(y) for x, y in zip(vectors[w], vectors[u])) for u in base]
        mean = sum(sims) / len(sims)
        std = math.sqrt(sum((s - mean) ** 2 for s in sims) / len(sims))
        tau.append(mean + mult * std)
    return tau


def naive_layer(adapter, layer: int, e_w: torch.Tensor, vectors: np.ndarray, tau: Sequence[float], k: int,
                n_dims: int = 0, rope=None, heads: Sequence[int] | None = None, qk_norm: str = "gain") -> dict:
    """``{(head, dim): (energy, rank, pairs or None)}``; ``pairs`` is ``[(q_word, k_word, sim)]`` in order, None
    for dims not mined (past ``n_dims``). ``rope`` = (cos_q, sin_q, cos_k, sin_k) as in ``mine_layer``;
    ``qk_norm="gain"`` multiplies dim j of every q by the q-norm gain ``gq[j]`` and of every k by ``gk[j]``."""
    e_w = e_w.double().numpy()
    g = adapter.ln1_gain(layer).double().numpy()
    w_q, w_k = adapter.W_Q(layer).double().clone(), adapter.W_K(layer).double().clone()
    gq, gk = adapter.q_norm_gain(layer), adapter.k_norm_gain(layer)
    if qk_norm == "gain" and gq is not None:
        for j in range(w_q.shape[2]):  # dim by dim, as the definition reads
            w_q[:, :, j] *= float(gq[j])
            w_k[:, :, j] *= float(gk[j])
    if rope is not None:
        w_q, w_k = rotate(w_q, *[t.double() for t in rope[:2]]), rotate(w_k, *[t.double() for t in rope[2:]])
    w_q, w_k = w_q.numpy(), w_k.numpy()
    n_heads, d_head = w_q.shape[0], w_q.shape[2]
    group = n_heads // w_k.shape[0]
    n_words = e_w.shape[0]
    out = {}
    for h in (range(n_heads) if heads is None else heads):
        wq = g[:, None] * w_q[h]
        wk = g[:, None] * w_k[h // group]
        qs, ks, energy = [], [], []
        for j in range(d_head):
            q = [float(e_w[w] @ wq[:, j]) for w in range(n_words)]
            kk = [float(e_w[w] @ wk[:, j]) for w in range(n_words)]
            qs.append(q)
            ks.append(kk)
            energy.append(sum(x * x for x in q) + sum(x * x for x in kk))
        by_energy = sorted(range(d_head), key=lambda j: (-energy[j], j))
        rank = {j: r + 1 for r, j in enumerate(by_energy)}
        chosen = set(by_energy if n_dims == 0 else by_energy[:n_dims])
        for j in range(d_head):
            pairs = None
            if j in chosen:
                t_q = sorted(range(n_words), key=lambda w: (-abs(qs[j][w]), w))[:k]
                t_k = sorted(range(n_words), key=lambda w: (-abs(ks[j][w]), w))[:k]
                found = []
                for i, a in enumerate(t_q):
                    for c_pos, c in enumerate(t_k):
                        sim = sum(float(x) * float(y) for x, y in zip(vectors[a], vectors[c]))
                        if sim > tau[a] and sim > tau[c] and sim > 0 and qs[j][a] * ks[j][c] > 0 and a != c:
                            found.append((-sim, i * len(t_k) + c_pos, a, c))
                pairs = [(a, c, -neg) for neg, _, a, c in _tie_by_place(found)]
            out[(h, j)] = (energy[j], rank[j], pairs)
    return out


def loop_head(e_w: torch.Tensor, wq: torch.Tensor, wk: torch.Tensor, vectors: torch.Tensor, tau: Sequence[float],
              k: int) -> tuple[list[float], dict[int, list[tuple[int, int]]]]:
    """One head, organised as the paper's code: energies ``[d_h]`` and per dim the kept ``(q_word, k_word)``.

    ``wq``/``wk`` ``[d_model, d_h]`` already include the norm gain; ``vectors`` unit rows (float64)."""
    q, key = e_w @ wq, e_w @ wk  # [n, d_h]
    energy = [float((q[:, j] ** 2).sum() + (key[:, j] ** 2).sum()) for j in range(q.shape[1])]
    pairs = {}
    for j in range(q.shape[1]):
        t_q = torch.sort(q[:, j].abs(), descending=True, stable=True).indices[:k].tolist()
        t_k = torch.sort(key[:, j].abs(), descending=True, stable=True).indices[:k].tolist()
        sims = (vectors[t_q] @ vectors[t_k].T).tolist()
        qv, kv = q[t_q, j].tolist(), key[t_k, j].tolist()
        found = []
        for i, a in enumerate(t_q):
            for c_pos, c in enumerate(t_k):
                s = sims[i][c_pos]
                if s > tau[a] and s > tau[c] and s > 0 and qv[i] * kv[c_pos] > 0 and a != c:
                    found.append((-s, i * k + c_pos, a, c))
        pairs[j] = [(a, c) for _, _, a, c in _tie_by_place(found)]
    return energy, pairs
