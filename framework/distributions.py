"""Next-token distributions, exactly and in bounded memory: ranks, log-probabilities, entropy, KL, top-k.

What it is for
    Token distribution shift and the layer lens (methods.md D) compare full next-token distributions over a
    vocabulary of up to a few hundred thousand tokens. Every function here takes logits ``[N, V]`` (any dtype:
    a model's own output, exact), works through them in chunks of positions sized so that one chunk holds at
    most ``max_elements`` float64 values, and computes in float64 (KL of near-identical distributions and
    probabilities near 1 amplify rounding). Nothing of size ``[N, V]`` in float64 is ever held at once.

Conventions: ``rank`` is 1 for the most probable token, ``1 + #{v : logit_v > logit_target}`` (ties favour the
target); ``KL(p || q) = sum_v p_v (log p_v - log q_v)`` in nats.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch
from torch import Tensor

DEFAULT_MAX_ELEMENTS = 1 << 23  # float64 values per chunk: 64 MiB


def chunks(n: int, vocab: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Iterator[slice]:
    """Slices of ``range(n)`` whose ``[len, vocab]`` float64 block holds at most ``max_elements`` values."""
    step = max(1, max_elements // max(1, vocab))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def log_softmax64(logits: Tensor) -> Tensor:
    """``log_softmax`` in float64. ``[n, V] -> [n, V]``"""
    return torch.log_softmax(logits.double(), dim=-1)


def token_stats(logits: Tensor, targets: Tensor, top_k: int = 5,
                max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, Tensor]:
    """Per position: the target's log-prob and rank, the entropy, and the top-k tokens with their log-probs.

    ``logits [N, V]``, ``targets [N]`` -> ``logp [N]`` f64, ``rank [N]`` long, ``entropy [N]`` f64,
    ``top_ids [N, k]`` long, ``top_logp [N, k]`` f64 (all on the logits' device).
    """
    N, V = logits.shape
    k = min(top_k, V)
    out = {"logp": logits.new_empty(N, dtype=torch.float64), "rank": logits.new_empty(N, dtype=torch.long),
           "entropy": logits.new_empty(N, dtype=torch.float64), "top_ids": logits.new_empty(N, k, dtype=torch.long),
           "top_logp": logits.new_empty(N, k, dtype=torch.float64)}
    for part in chunks(N, V, max_elements):
        lp = log_softmax64(logits[part])                                              # [n, V]
        target = lp.gather(-1, targets[part, None].to(lp.device)).squeeze(-1)         # [n]
        out["logp"][part] = target
        out["rank"][part] = 1 + (lp > target[:, None]).sum(-1)
        out["entropy"][part] = -(lp.exp() * lp).sum(-1)
        values, ids = lp.topk(k, dim=-1)
        out["top_ids"][part], out["top_logp"][part] = ids, values
        del lp
    return out


def kl_divergence(logits_p: Tensor, logits_q: Tensor, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Tensor:
    """``KL(p || q)`` per position of two logit tensors over the same vocabulary. ``[N, V], [N, V] -> [N]`` f64"""
    if logits_p.shape != logits_q.shape:
        raise ValueError(f"KL needs two distributions over one vocabulary; got {tuple(logits_p.shape)} and "
                         f"{tuple(logits_q.shape)}")
    N, V = logits_p.shape
    out = logits_p.new_empty(N, dtype=torch.float64)
    for part in chunks(N, V, max_elements // 2):
        lp, lq = log_softmax64(logits_p[part]), log_softmax64(logits_q[part].to(logits_p.device))
        out[part] = (lp.exp() * (lp - lq)).sum(-1)
        del lp, lq
    return out


def pair_stats(logits_base: Tensor, logits_tuned: Tensor, targets: Tensor,
               max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, Tensor]:
    """Two models at the same positions, each distribution normalised once per chunk (float64).

    ``[N, V] x2, [N]`` -> ``rank_base, rank_tuned [N]`` long, ``logp_base, logp_tuned [N]``, ``kl_tb [N]`` =
    KL(tuned || base) and ``kl_bt [N]`` = KL(base || tuned), f64.
    """
    if logits_base.shape != logits_tuned.shape:
        raise ValueError(f"two distributions over one vocabulary needed; got {tuple(logits_base.shape)} and "
                         f"{tuple(logits_tuned.shape)}")
    N, V = logits_base.shape
    out = {k: logits_base.new_empty(N, dtype=torch.float64) for k in ("logp_base", "logp_tuned", "kl_tb", "kl_bt")}
    out.update({k: logits_base.new_empty(N, dtype=torch.long) for k in ("rank_base", "rank_tuned")})
    for part in chunks(N, V, max_elements // 2):
        lb, lt = log_softmax64(logits_base[part]), log_softmax64(logits_tuned[part].to(logits_base.device))
        y = targets[part, None].to(lb.device)
        for name, lp in (("base", lb), ("tuned", lt)):
            target = lp.gather(-1, y).squeeze(-1)
            out[f"logp_{name}"][part] = target
            out[f"rank_{name}"][part] = 1 + (lp > target[:, None]).sum(-1)
        diff = lt - lb
        out["kl_tb"][part] = (lt.exp() * diff).sum(-1)
        out["kl_bt"][part] = -(lb.exp() * diff).sum(-1)
        del lb, lt, diff
    return out


def lens_stats(hidden: Tensor, final_logp: Tensor, to_logits: Callable[[Tensor], Tensor], targets: Tensor,
               max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, Tensor]:
    """The logit lens of several layers against the model's final distribution, per position.

    ``hidden [N, L, d]`` (the layers' residual streams at N positions), ``final_logp [N, V]`` (the final
    log-probabilities in float64, :func:`log_softmax64`), ``to_logits`` (final norm + unembedding),
    ``targets [N]`` -> ``kl [N, L]`` = KL(final || lens_l) f64, ``top1 [N, L]`` long (the lens argmax),
    ``logp [N, L]`` f64 (the target's log-prob under the lens).

    With lens logits ``z`` and ``log Z = logsumexp(z)``, ``log lens = z - log Z``, so
    ``KL = sum p_f log p_f - p_f . z + log Z``: one float64 log-sum-exp and one dot product per (position,
    layer) instead of a whole normalised ``[V]`` vector, exact in float64. All layers of a chunk of positions
    go through one unembedding.
    """
    N, L, _ = hidden.shape
    V = final_logp.shape[-1]
    out = {"kl": hidden.new_empty(N, L, dtype=torch.float64), "top1": hidden.new_empty(N, L, dtype=torch.long),
           "logp": hidden.new_empty(N, L, dtype=torch.float64)}
    for part in chunks(N, V * max(L, 1), max_elements):
        z = to_logits(hidden[part])                                                   # [n, L, V] model dtype
        out["top1"][part] = z.argmax(-1)
        z = z.double()
        log_z = torch.logsumexp(z, -1)                                                # [n, L]
        final = final_logp[part].to(z.device)                                         # [n, V]
        p_final = final.exp()
        neg_entropy = (p_final * final).sum(-1)                                       # [n]
        out["kl"][part] = neg_entropy[:, None] - torch.einsum("nv,nlv->nl", p_final, z) + log_z
        index = targets[part].to(z.device)[:, None, None].expand(-1, L, 1)
        out["logp"][part] = z.gather(-1, index).squeeze(-1) - log_z
        del z, final, p_final
    return out


def commitment_depth(lens_top1: Tensor, final_top1: Tensor) -> Tensor:
    """First layer from which the lens argmax equals the final argmax at every later layer. ``[N, L], [N] -> [N]``

    A position whose last layer already disagrees (impossible when the last lens is the model's own output)
    gets ``L``.
    """
    agree = lens_top1 == final_top1[:, None]                                            # [N, L]
    stays = agree.flip(-1).long().cumprod(-1).flip(-1).bool()  # agrees here and at every later layer
    L = agree.shape[1]
    layers = torch.arange(L, device=agree.device).expand_as(stays)
    return torch.where(stays, layers, torch.full_like(layers, L)).min(-1).values


__all__ = ["DEFAULT_MAX_ELEMENTS", "chunks", "commitment_depth", "kl_divergence", "lens_stats", "log_softmax64",
           "pair_stats", "token_stats"]
