"""Exact gradient x input attribution of each response token to each prompt token (methods.md A.1), fast.

What it computes
    ``I[n, m] = < d f(y_m | x, y_<m) / d e_n , e_n >`` for every attributed prompt position ``n`` and every
    response token ``m``, teacher-forced on ``prompt + response``; ``e_n`` is the input embedding row the
    model reads at position ``n`` (the output of its embedding module) and ``f`` the response token's
    probability (the paper), log-probability or logit (``target``).

Why it is fast (and still exact)
    * **One output-layer pass.** ``f_m`` depends on the body's last hidden state ``h_m`` only, so
      ``g_m = d f_m / d h_m`` for every response position comes from a single small backward through the
      unembedding (``lm_head``), applied at the response positions alone. Every later pass runs the model
      *body* only (``model.base_model``, final norm included), never the vocabulary-sized output layer.
    * **min(N, M)-ish passes, chosen per prompt.** Either M vector-Jacobian products through the body (one
      per response token, cotangent ``g_m`` at its position) or R forward-mode Jacobian-vector products (one
      per attributed prompt token, tangent ``e_n`` at position ``n``; each gives a whole row ``I[n, :]`` as
      ``<dh_m, g_m>``). :func:`plan_modes` picks the cheaper per prompt from a token-pass cost model.
    * **Vectorised.** VJPs run batched through one autograd graph (``is_grads_batched``), JVPs through
      ``torch.func.vmap(jvp)`` with the primal computed once; several prompts share each pass (a direction
      carries one vector per prompt), in chunks of at most ``max_batch_tokens`` vectorised positions.
    * **Causal truncation.** The VJP of response token m needs the prefix up to its position only: each VJP
      chunk runs on the shortest prefix that holds it. A JVP of position n changes nothing before n: each JVP
      chunk first runs the untouched prefix once without tangents (a key/value cache) and pushes tangents
      through the rest only. Leading columns that are not attributed (BOS, a chat template's system prompt)
      go into such a cache for the VJPs too, so they are never differentiated.
    * **Cost-aware batching.** Chunk sizes balance truncation against each chunk's extra forward
      (:func:`chunk_size`); prompts share a pass only while padding them to common shapes wastes little.
    * **Frozen weights.** Gradients are taken w.r.t. the input embeddings alone; no parameter gradient is
      ever allocated, and autograd state is freed after each chunk.

Batch layout (built here from per-prompt ids, independent of the runner's batches)::

    column:  0 ............... P-1 | P ............ P+M-2
    row b:   BOS x_1..x_N  pad..   | y_1 ...... y_{M_b-1} pad..
             (pads between each prompt and its response, and after the response; the last response token
              is never an input; position ids count real tokens only)

so response token m >= 1 (0-based) is predicted at column ``P - 1 + m`` in every row (token 0 at the
prompt's last column, ``P_b - 1``; ``_Layout.pred_cols`` holds both), and no query row is ever fully
masked (left padding makes the pad rows attend to nothing, which gives NaN in some dtypes and attention
kernels, and a NaN times a zero cotangent is still NaN). Sliding-window attention measures distances in
columns, so a model whose window is shorter than a batch's padded length runs one prompt a pass (no pads).

Attention: PyTorch's fused SDPA kernels have no forward-mode derivative (nor batching rules for their
backward, which VJPs under ``vmap`` would then run one direction at a time), so every pass runs under
``sdpa_kernel(SDPBackend.MATH)``, SDPA's reference implementation in plain differentiable ops; eager
attention needs nothing, and other implementations (flash attention) are switched to SDPA for the call.

Threads: on a busy machine, tiny models run far faster with ``torch.set_num_threads(1)`` (intra-op threads
spin-wait for each other on every small op); the caller decides.

:func:`naive_attribution` is the slow reference (the authors' algorithm: one full forward and backward per
response token) used by the tests and benchmarks.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from tuneshift.attribution.items import (MODES, TARGETS, AttributionError, AttributionItem, Mode, Target, check_target,
                                         head_logits, make_item, model_body, target_values)
from tuneshift.attribution.layout import build_layout, embed
from tuneshift.attribution.passes import jvp_batch, response_cotangents, supports_prefix_cache, vjp_batch
from tuneshift.attribution.plan import jvp_cost, plan_modes, prompt_groups, sliding_window, vjp_cost
from tuneshift.memory import trim_heap


# ---- public entry points --------------------------------------------------------------------------------------
def attribute(model: nn.Module, items: Sequence[AttributionItem], *, target: Target = "prob",
              mode: Mode = "auto", max_batch_tokens: int = 16384, max_batch_prompts: int = 8,
              pad_token_id: int | None = None, prefix_cache: bool = True,
              max_padding_waste: float = 1.15, progress: Callable[[int], None] | None = None) -> list[Tensor]:
    """Gradient x input matrices, one ``[n_rows, n_response]`` float32 CPU tensor per item (same order).

    ``max_batch_tokens`` bounds the positions one vectorised pass processes (directions x prompts x length);
    memory grows with it (about ``max_batch_tokens * (d_ff + heads * length) * 4`` bytes per layer in flight).
    Prompts share a pass (up to ``max_batch_prompts``) while padding them to common shapes costs at most
    ``max_padding_waste`` times running them alone. ``prefix_cache`` runs columns that no direction of a
    chunk touches once into a key/value cache (exact either way; off only to check that). ``progress`` is
    called with the number of items finished after each group.
    """
    check_target(target)
    if max_batch_tokens < 1 or max_batch_prompts < 1:
        raise AttributionError("max_batch_tokens and max_batch_prompts must be positive")
    body = model_body(model)
    device = next(model.parameters()).device
    if pad_token_id is None:
        pad_token_id = getattr(model.config, "pad_token_id", None)
        pad_token_id = 0 if pad_token_id is None else int(pad_token_id)
    window = sliding_window(model)
    results: list[Tensor | None] = [None] * len(items)
    for i, it in enumerate(items):  # nothing to attribute: an empty matrix of the right shape
        if it.n_response == 0 or it.n_rows == 0:
            results[i] = torch.zeros(it.n_rows, it.n_response)
    todo = [i for i in range(len(items)) if results[i] is None]
    plans = plan_modes([items[i] for i in todo], mode)
    was_training, attention = model.training, getattr(model.config, "_attn_implementation", None)
    model.eval()
    if attention not in (None, "eager", "sdpa"):  # e.g. flash_attention_2: no forward-mode derivative
        model.set_attn_implementation("sdpa")
    cache = prefix_cache and supports_prefix_cache(model)
    try:
        for path in ("vjp", "jvp"):
            chosen = [i for i, p in zip(todo, plans) if p == path]
            for group in prompt_groups(path, chosen, items, max_batch_prompts, max_batch_tokens, window,
                                 max_padding_waste):
                matrices = _group_matrices(model, body, path, [items[i] for i in group], pad_token_id, device,
                                           target, max_batch_tokens, cache)
                for i, matrix in zip(group, matrices):
                    results[i] = matrix
                trim_heap()  # give the pass's temporaries back to the OS (tuneshift.memory explains why)
                if progress is not None:
                    progress(len(group))
    finally:
        model.train(was_training)
        if attention not in (None, "eager", "sdpa"):
            model.set_attn_implementation(attention)
    return results  # type: ignore[return-value]


def _group_matrices(model: nn.Module, body: nn.Module, path: str, batch: list[AttributionItem], pad_token_id: int,
                    device: torch.device, target: Target, max_batch_tokens: int, cache: bool) -> list[Tensor]:
    """One group's matrices ``[n_rows, n_response]`` (own float32 CPU copies: the batch's buffers die here)."""
    lay = build_layout(batch, pad_token_id, device)
    embeds = embed(model, lay.ids)                                                   # [B, L, d]
    if path == "vjp":
        full = vjp_batch(model, body, lay, embeds, target, max_batch_tokens, cache)  # [B, P, M]
        return [full[b, lay.row_cols[b, lay.row_valid[b]], :it.n_response].float().cpu()
                for b, it in enumerate(batch)]
    grads_h = response_cotangents(body, model, lay, embeds, target)                  # [B, M, d]
    rows = jvp_batch(model, body, lay, embeds, grads_h, max_batch_tokens, cache)     # [B, R, M]
    return [rows[b, :it.n_rows, :it.n_response].to("cpu", torch.float32, copy=True) for b, it in enumerate(batch)]


def naive_attribution(model: nn.Module, item: AttributionItem, target: Target = "prob") -> Tensor:
    """The slow reference: per response token, one full forward and one backward. ``[n_rows, n_response]``

    This is the authors' algorithm (without parameter gradients); tests and benchmarks compare against it.
    """
    check_target(target)
    device = next(model.parameters()).device
    ids = torch.cat([item.prompt_ids, item.response_ids[:-1]]).to(device)[None]    # [1, T]
    P = item.n_prompt
    out = torch.zeros(item.n_rows, item.n_response)
    rows = torch.nonzero(item.rows).flatten().to(device)
    for m in range(item.n_response):
        emb = embed(model, ids).requires_grad_(True)
        with torch.enable_grad():
            logits = model(inputs_embeds=emb, use_cache=False).logits[0, P - 1 + m]
            value = target_values(logits, item.response_ids[m].to(device), target)
            (grad,) = torch.autograd.grad(value, emb)
        out[:, m] = (grad[0, rows] * emb[0, rows].detach()).sum(-1).float().cpu()
    return out


__all__ = [
    "MODES", "TARGETS", "AttributionError", "AttributionItem", "Mode", "Target", "attribute", "head_logits",
    "jvp_cost", "make_item", "model_body", "naive_attribution", "plan_modes", "sliding_window", "target_values",
    "vjp_cost",
]
