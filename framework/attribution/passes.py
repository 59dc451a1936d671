"""The two exact paths: batched vector-Jacobian products (one per response token) and batched
forward-mode Jacobian-vector products (one per attributed prompt token), both on the model body only."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from tuneshift.attribution.items import Target, head_logits, target_values
from tuneshift.attribution.layout import Layout, body_forward
from tuneshift.attribution.plan import sliding_window


# ---- output-layer cotangents ---------------------------------------------------------------------------------
def output_cotangents(model: nn.Module, hidden: Tensor, lay: Layout, target: Target) -> Tensor:
    """``g[b, m] = d f_m / d h`` at the column predicting response token m, zero past a row's end. ``[B, M, d]``

    The target (logits to p, M x V values) is computed in float64; ``g`` comes back in the model's dtype.

    ``hidden [B, M, d]`` are the body's outputs at those columns. One backward through the output layer at the
    M response columns only: the vocabulary-sized matmul is never repeated per response token.
    """
    hidden = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        values = target_values(head_logits(model, hidden, torch.float64), lay.targets, target)  # [B, M] fp64
        (grad,) = torch.autograd.grad((values * lay.resp_valid).sum(), hidden)
    return grad.detach()


def response_cotangents(body: nn.Module, model: nn.Module, lay: Layout, embeds: Tensor,
                         target: Target) -> Tensor:
    """:func:`_output_cotangents` after one body forward without autograd. ``[B, M, d]``"""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        hidden = lay.at_responses(body_forward(body, embeds, lay.mask, lay.positions))  # [B, M, d]
    return output_cotangents(model, hidden, lay, target)


# ---- the two exact paths --------------------------------------------------------------------------------------
def chunk_size(batch: int, length: int, overhead_tokens: float, max_batch_tokens: int) -> int:
    """Directions per vectorised pass: memory-bounded, and sized for causal truncation.

    A chunk of K directions wastes about K/2 token-passes per direction (it runs on the prefix of its last
    direction) and costs one extra pass of ``overhead_tokens`` (its own forward); the sum is smallest at
    ``K = sqrt(2 * overhead_tokens)``. Memory caps ``K * batch * length`` at ``max_batch_tokens``.
    """
    best = max(1, round(math.sqrt(2.0 * max(overhead_tokens, 1.0))))
    return max(1, min(best, max_batch_tokens // max(1, batch * length)))


def vjp_batch(model: nn.Module, body: nn.Module, lay: Layout, embeds: Tensor, target: Target,
               max_batch_tokens: int, use_cache: bool = True) -> Tensor:
    """``I[b, p, m]`` for the prompt columns p by M batched VJPs (one per response token). ``[B, P, M]``

    Chunks run from the last response token backwards: the first one covers the whole sequence, and its
    forward also yields the output-layer cotangents ``g`` for every response token. Columns before the
    first attributed one (BOS, a chat template's system prompt) are run once into a key/value cache and
    never differentiated; their rows of the result stay 0.
    """
    B, P, M = embeds.shape[0], lay.P, lay.M
    out = embeds.new_zeros(B, P, M)
    batch_index = torch.arange(B, device=embeds.device)
    first = torch.where(lay.row_valid[:, 0], lay.row_cols[:, 0], torch.full_like(lay.row_cols[:, 0], P - 1))
    c0 = int(first.min()) if use_cache else 0         # columns [0, c0) hold no attributed token in any row
    cache = build_prefix_cache(body, embeds, lay, c0)
    K = chunk_size(B, P + M - 1 - c0, 1.5 * (P - c0 + M / 2), max_batch_tokens)
    grads_h: Tensor | None = None
    for m1 in range(M, 0, -K):
        m0 = max(0, m1 - K)
        width = P + m1 - 1                            # response tokens [m0, m1) need columns [0, width)
        leaf = embeds[:, c0:width].detach().requires_grad_(True)                     # [B, W, d]
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            past = copy_cache(cache) if cache is not None else None
            hidden = body_forward(body, leaf, lay.mask[:, :width], lay.positions[:, c0:width], past)  # [B, W, d]
            if grads_h is None:                       # first chunk: every response column present
                grads_h = output_cotangents(model, lay.at_responses(hidden.detach(), c0), lay, target)  # [B, M, d]
            k = torch.arange(m1 - m0, device=embeds.device)
            cot = hidden.new_zeros((m1 - m0,) + tuple(hidden.shape))                   # [K, B, W, d]
            cot[k[:, None], batch_index[None, :], lay.pred_cols[:, m0:m1].T - c0] = grads_h[:, m0:m1].transpose(0, 1)
            (grad,) = torch.autograd.grad(hidden, leaf, cot, is_grads_batched=True)   # [K, B, W, d]
        out[:, c0:, m0:m1] = torch.einsum("kbpd,bpd->bpk", grad[:, :, :P - c0], embeds[:, c0:P])
        del leaf, hidden, cot, grad, past
    return out


def build_prefix_cache(body: nn.Module, embeds: Tensor, lay: Layout, upto: int):
    """Key/value cache of the body over columns ``[0, upto)`` (no autograd), or None when ``upto`` is 0."""
    from transformers import DynamicCache

    if upto == 0:
        return None
    cache = DynamicCache(config=body.config)
    with torch.no_grad():
        body(inputs_embeds=embeds[:, :upto], attention_mask=lay.mask[:, :upto],
             position_ids=lay.positions[:, :upto], cache=cache, use_cache=True)
    return cache


def copy_cache(cache):
    """A fresh cache object holding the same (immutable, shared) prefix tensors, so updates stay local."""
    from transformers import DynamicCache

    fresh = DynamicCache(config=None)
    for i, layer in enumerate(cache.layers):
        fresh.update(layer.keys, layer.values, i)
    return fresh


def supports_prefix_cache(model: nn.Module) -> bool:
    """Whether the JVP path may run the untouched prefix once through a key/value cache.

    Sliding-window families keep a model-specific cache layout; they run without it (exact either way).
    """
    return sliding_window(model) is None


def jvp_batch(model: nn.Module, body: nn.Module, lay: Layout, embeds: Tensor, grads_h: Tensor,
               max_batch_tokens: int, use_cache: bool = True) -> Tensor:
    """``I[b, k, m]`` for each row's k-th attributed token by batched forward-mode JVPs. ``[B, R_max, M]``

    The tangent of direction k is ``e`` at row b's k-th attributed column (one column per prompt of the
    batch); pushing it through the body gives ``dh`` at every response column, and ``<dh_m, g_m>`` is the
    whole row ``I[k, :]``. A chunk whose first column is c0 runs columns ``[0, c0)`` once without tangents.
    """
    from torch.func import jvp, vmap

    B, P, M = embeds.shape[0], lay.P, lay.M
    R, L = lay.row_cols.shape[1], embeds.shape[1]
    out = embeds.new_zeros(B, R, M)
    batch_index = torch.arange(B, device=embeds.device)
    first_col = torch.where(lay.row_valid, lay.row_cols, torch.full_like(lay.row_cols, L)).amin(0)  # [R]
    K = chunk_size(B, L, L, max_batch_tokens)  # a chunk's extra cost: its primal plus its prefix, one forward
    for k0 in range(0, R, K):
        k1 = min(R, k0 + K)
        c0 = min(int(first_col[k0]), P - 1) if use_cache else 0   # nothing before c0 carries a tangent
        cache = build_prefix_cache(body, embeds, lay, c0)
        suffix = embeds[:, c0:]                                                      # [B, L - c0, d]
        cols = lay.row_cols[:, k0:k1].T                                              # [K, B]
        picked = embeds[batch_index[None, :], cols] * lay.row_valid[:, k0:k1].T[..., None]   # [K, B, d]
        tangents = suffix.new_zeros((k1 - k0,) + tuple(suffix.shape))               # [K, B, L - c0, d]
        k = torch.arange(k1 - k0, device=embeds.device)
        tangents[k[:, None], batch_index[None, :], (cols - c0).clamp(min=0)] = picked

        def hidden_at_responses(e: Tensor, cache=cache, c0=c0) -> Tensor:
            past = copy_cache(cache) if cache is not None else None
            return lay.at_responses(body_forward(body, e, lay.mask, lay.positions[:, c0:], past), c0)  # [B, M, d]

        def push(t: Tensor, f=hidden_at_responses) -> Tensor:
            return jvp(f, (suffix,), (t,))[1]

        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            dh = vmap(push)(tangents)                                                # [K, B, M, d]
        out[:, k0:k1] = torch.einsum("kbmd,bmd->bkm", dh, grads_h)
        del tangents, dh, cache
    return out


