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

# float64 values per chunk: 16 MiB. Blocks under glibc's largest mmap threshold (32 MiB) are reused from the
# heap; larger ones are mapped afresh and page-faulted on every call, which measured 2-3x slower on a CPU.
DEFAULT_MAX_ELEMENTS = 1 << 21


def chunks(n: int, vocab: int, max_elements: int = DEFAULT_MAX_ELEMENTS) -> Iterator[slice]:
    """Slices of ``range(n)`` whose ``[len, vocab]`` float64 block holds at most ``max_elements`` values."""
    step = max(1, max_elements // max(1, vocab))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def log_softmax64(logits: Tensor) -> Tensor:
    """``log_softmax`` in float64. ``[n, V] -> [n, V]``"""
    return torch.log_softmax(logits.double(), dim=-1)


def _target_and_rank(lp: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """The target's log-prob and rank (ties favour the target). ``[n, V], [n, 1] -> [n], [n]``"""
    target = lp.gather(-1, y).squeeze(-1)
    return target, 1 + (lp > target[:, None]).sum(-1)


def paired_token_stats(logits: Tensor, others: list[Tensor], targets: Tensor, top_k: int = 5,
                       max_elements: int = DEFAULT_MAX_ELEMENTS) -> tuple[dict[str, Tensor], list[dict[str, Tensor]]]:
    """One model's statistics per position and, against each other model at the same positions, the other's
    target statistics and KL both ways; every distribution is normalised once per chunk (float64).

    ``logits [N, V]``, ``others`` a list of ``[N, V]``, ``targets [N]`` -> (own, versus): own as
    :func:`token_stats`; ``versus[i]`` holds ``logp [N]`` f64 and ``rank [N]`` long of ``others[i]``,
    ``kl_own_other [N]`` = KL(own || other) and ``kl_other_own [N]`` = KL(other || own), f64.
    """
    N, V = logits.shape
    k = min(top_k, V)
    f64, long = {"dtype": torch.float64}, {"dtype": torch.long}
    own = {"logp": logits.new_empty(N, **f64), "rank": logits.new_empty(N, **long),
           "entropy": logits.new_empty(N, **f64), "top_ids": logits.new_empty(N, k, **long),
           "top_logp": logits.new_empty(N, k, **f64)}
    for other in others:
        if other.shape != logits.shape:
            raise ValueError(f"two distributions over one vocabulary needed; got {tuple(logits.shape)} and "
                             f"{tuple(other.shape)}")
    versus = [{"logp": logits.new_empty(N, **f64), "rank": logits.new_empty(N, **long),
               "kl_own_other": logits.new_empty(N, **f64), "kl_other_own": logits.new_empty(N, **f64)}
              for _ in others]
    for part in chunks(N, V, max_elements // (2 + 3 * bool(others))):  # own lp, p; an other's lp, p, difference
        lp = log_softmax64(logits[part])                                              # [n, V]
        p = lp.exp()
        y = targets[part, None].to(lp.device)
        own["logp"][part], own["rank"][part] = _target_and_rank(lp, y)
        own["entropy"][part] = -(p * lp).sum(-1)
        own["top_logp"][part], own["top_ids"][part] = lp.topk(k, dim=-1)
        for other, out in zip(others, versus):
            lq = log_softmax64(other[part].to(lp.device))                             # [n, V]
            out["logp"][part], out["rank"][part] = _target_and_rank(lq, y)
            diff = lp - lq
            out["kl_own_other"][part] = (p * diff).sum(-1)
            out["kl_other_own"][part] = -(lq.exp() * diff).sum(-1)
            del lq, diff
        del lp, p
    return own, versus


def token_stats(logits: Tensor, targets: Tensor, top_k: int = 5,
                max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, Tensor]:
    """Per position: the target's log-prob and rank, the entropy, and the top-k tokens with their log-probs.

    ``logits [N, V]``, ``targets [N]`` -> ``logp [N]`` f64, ``rank [N]`` long, ``entropy [N]`` f64,
    ``top_ids [N, k]`` long, ``top_logp [N, k]`` f64 (all on the logits' device).
    """
    return paired_token_stats(logits, [], targets, top_k, max_elements)[0]


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


def lens_stats(hidden: Tensor, final_logits: Tensor, to_logits: Callable[[Tensor], Tensor], targets: Tensor,
               max_elements: int = DEFAULT_MAX_ELEMENTS) -> dict[str, Tensor]:
    """The logit lens of several layers against the model's final distribution, per position.

    ``hidden [N, L, d]`` (the layers' residual streams at N positions; L may be 0), ``final_logits [N, V]``
    (the model's output there, any dtype), ``to_logits`` (final norm + unembedding), ``targets [N]`` ->
    ``kl [N, L]`` = KL(final || lens_l) f64, ``top1 [N, L]`` long (the lens argmax), ``logp [N, L]`` f64 (the
    target's log-prob under the lens) and ``final_logp [N]`` f64 (the target's log-prob under the model).

    ``KL = sum_v p_f (log p_f - log lens)``, both log-distributions from float64 ``log_softmax`` (a log-sum-exp
    kernel costs twice as much per element here). All layers of a chunk of positions go through one
    unembedding; one chunk holds the lens ``[n, L, V]`` and the final ``[n, V]`` twice, in float64.
    """
    N, L, _ = hidden.shape
    V = final_logits.shape[-1]
    out = {"kl": hidden.new_empty(N, L, dtype=torch.float64), "top1": hidden.new_empty(N, L, dtype=torch.long),
           "logp": hidden.new_empty(N, L, dtype=torch.float64), "final_logp": hidden.new_empty(N, dtype=torch.float64)}
    for part in chunks(N, V * (L + 2), max_elements):
        z = to_logits(hidden[part])                                                   # [n, L, V] model dtype
        out["top1"][part] = z.argmax(-1)
        lens = torch.log_softmax(z, -1, dtype=torch.float64)                          # [n, L, V]
        del z
        final = log_softmax64(final_logits[part].to(lens.device))                     # [n, V]
        p_final = final.exp()
        y = targets[part].to(lens.device)[:, None]
        out["final_logp"][part] = final.gather(-1, y).squeeze(-1)
        out["kl"][part] = (p_final * final).sum(-1)[:, None] - torch.einsum("nv,nlv->nl", p_final, lens)
        out["logp"][part] = lens.gather(-1, y[:, :, None].expand(-1, L, 1)).squeeze(-1)
        del lens, final, p_final
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
           "paired_token_stats", "token_stats"]
