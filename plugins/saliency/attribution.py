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

import math
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Target = Literal["prob", "logprob", "logit"]
Mode = Literal["auto", "vjp", "jvp"]
TARGETS: tuple[str, ...] = ("prob", "logprob", "logit")
MODES: tuple[str, ...] = ("auto", "vjp", "jvp")

# Cost of one JVP token-pass relative to one VJP token-pass (body only, frozen weights), measured on
# SmolLM2-135M on the project's CPU, one thread, a 91-token prompt and a 64-token response: 3.6 vs 2.8 ms
# per predicted token-pass (forward mode under vmap pays for weight transposes, zero-tangent products and a
# primal per chunk). :func:`plan_modes` compares the two paths with it.
JVP_RELATIVE_COST = 1.3


class AttributionError(ValueError):
    """Inputs to the attribution do not fit (shapes, empty prompt, unknown option); the message says which."""


@dataclass(frozen=True)
class AttributionItem:
    """One prompt to attribute.

    ``prompt_ids``    # [P] model input before the response (template and BOS included)
    ``response_ids``  # [M] the response, teacher-forced
    ``rows``          # [P] bool, prompt positions to attribute (e.g. the prompt's content tokens, no BOS)
    """

    prompt_ids: Tensor
    response_ids: Tensor
    rows: Tensor

    @property
    def n_prompt(self) -> int:
        return int(self.prompt_ids.numel())

    @property
    def n_response(self) -> int:
        return int(self.response_ids.numel())

    @property
    def n_rows(self) -> int:
        return int(self.rows.sum())


def make_item(prompt_ids: Tensor, response_ids: Tensor, rows: Tensor | None = None) -> AttributionItem:
    """Validate and build an :class:`AttributionItem`; ``rows`` defaults to every prompt position."""
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).cpu()
    response_ids = torch.as_tensor(response_ids, dtype=torch.long).reshape(-1).cpu()
    if prompt_ids.numel() == 0:
        raise AttributionError("empty prompt: the response must be conditioned on at least one token (BOS)")
    rows = torch.ones_like(prompt_ids, dtype=torch.bool) if rows is None else torch.as_tensor(rows).bool().cpu()
    if rows.shape != prompt_ids.shape:
        raise AttributionError(f"rows mask has shape {tuple(rows.shape)} but the prompt has "
                               f"{prompt_ids.numel()} tokens; give one flag per prompt token")
    return AttributionItem(prompt_ids, response_ids, rows)


# ---- the model split into body and head ----------------------------------------------------------------------
def model_body(model: nn.Module) -> nn.Module:
    """The decoder without its output layer (``LlamaModel``, ``GPT2Model`` ...); its output is final-normed."""
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise AttributionError(f"{type(model).__name__} has no separate base model (decoder body); attribution "
                               "needs a *ForCausalLM with a `base_model` and an output embedding")
    return body


def head_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """Logits from final hidden states ``[..., d]`` exactly as the model's own forward makes them ``[..., V]``."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2/3
        logits = torch.tanh(logits / cap) * cap
    return logits


def target_values(logits: Tensor, targets: Tensor, target: Target) -> Tensor:
    """``f`` of each target token: probability, log-probability or logit. ``[..., V], [...] -> [...]``"""
    if target == "logit":
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # softmax in at least fp32
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp.exp() if target == "prob" else logp


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise AttributionError(f"unknown attribution target {target!r}; choose one of {', '.join(TARGETS)}")


def _body_forward(body: nn.Module, embeds: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
    """Final hidden states ``[B, T, d]`` of the body for ``embeds [B, T, d]``."""
    kwargs = {"cache": cache, "use_cache": cache is not None} if cache is not None else {"use_cache": False}
    return body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs).last_hidden_state


# ---- batch layout ---------------------------------------------------------------------------------------------
@dataclass
class _Layout:
    """Prompts from column 0, responses from column ``P``, pads between and after (see module docstring)."""

    ids: Tensor          # [B, L]  L = P + M_max - 1
    mask: Tensor         # [B, L]  1 on real tokens
    positions: Tensor    # [B, L]  position ids counting real tokens
    targets: Tensor      # [B, M_max] response ids (pad where a row's response ended)
    resp_valid: Tensor   # [B, M_max] bool
    row_cols: Tensor     # [B, R_max] column of each row's k-th attributed prompt token (0 where absent)
    row_valid: Tensor    # [B, R_max] bool
    pred_cols: Tensor    # [B, M_max] column whose output predicts response token m
    P: int
    M: int

    def at_responses(self, hidden: Tensor, offset: int = 0) -> Tensor:
        """``hidden [..., B, W, d]`` (columns from ``offset``) at the predicting columns: ``[..., B, M, d]``."""
        cols = (self.pred_cols - offset).clamp(min=0)                              # [B, M]
        index = cols[..., None].expand(*hidden.shape[:-3], -1, -1, hidden.shape[-1])
        return hidden.gather(-2, index)


def _layout(items: Sequence[AttributionItem], pad_id: int, device: torch.device) -> _Layout:
    B = len(items)
    P = max(it.n_prompt for it in items)
    M = max(it.n_response for it in items)
    R = max(it.n_rows for it in items)
    L = P + max(M - 1, 0)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    targets = torch.full((B, M), pad_id, dtype=torch.long)
    resp_valid = torch.zeros((B, M), dtype=torch.bool)
    row_cols = torch.zeros((B, R), dtype=torch.long)
    row_valid = torch.zeros((B, R), dtype=torch.bool)
    for b, it in enumerate(items):
        ids[b, :it.n_prompt] = it.prompt_ids
        mask[b, :it.n_prompt] = 1
        m = it.n_response
        if m > 1:
            ids[b, P:P + m - 1] = it.response_ids[:-1]
            mask[b, P:P + m - 1] = 1
        targets[b, :m] = it.response_ids
        resp_valid[b, :m] = True
        cols = torch.nonzero(it.rows).flatten()
        row_cols[b, :cols.numel()] = cols
        row_valid[b, :cols.numel()] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    pred_cols = (P - 1 + torch.arange(M)).repeat(B, 1)
    pred_cols[:, 0] = torch.tensor([it.n_prompt - 1 for it in items])  # response token 0: the prompt's end
    return _Layout(ids.to(device), mask.to(device), positions.to(device), targets.to(device),
                   resp_valid.to(device), row_cols.to(device), row_valid.to(device), pred_cols.to(device), P, M)


def _embed(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(ids)


def _output_cotangents(model: nn.Module, hidden: Tensor, lay: _Layout, target: Target) -> Tensor:
    """``g[b, m] = d f_m / d h`` at the column predicting response token m, zero past a row's end. ``[B, M, d]``

    ``hidden [B, M, d]`` are the body's outputs at those columns. One backward through the output layer at the
    M response columns only: the vocabulary-sized matmul is never repeated per response token.
    """
    hidden = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        values = target_values(head_logits(model, hidden), lay.targets, target)     # [B, M]
        (grad,) = torch.autograd.grad((values * lay.resp_valid).sum(), hidden)
    return grad.detach()


def _response_cotangents(body: nn.Module, model: nn.Module, lay: _Layout, embeds: Tensor,
                         target: Target) -> Tensor:
    """:func:`_output_cotangents` after one body forward without autograd. ``[B, M, d]``"""
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        hidden = lay.at_responses(_body_forward(body, embeds, lay.mask, lay.positions))  # [B, M, d]
    return _output_cotangents(model, hidden, lay, target)


# ---- the two exact paths --------------------------------------------------------------------------------------
def chunk_size(batch: int, length: int, overhead_tokens: float, max_batch_tokens: int) -> int:
    """Directions per vectorised pass: memory-bounded, and sized for causal truncation.

    A chunk of K directions wastes about K/2 token-passes per direction (it runs on the prefix of its last
    direction) and costs one extra pass of ``overhead_tokens`` (its own forward); the sum is smallest at
    ``K = sqrt(2 * overhead_tokens)``. Memory caps ``K * batch * length`` at ``max_batch_tokens``.
    """
    best = max(1, round(math.sqrt(2.0 * max(overhead_tokens, 1.0))))
    return max(1, min(best, max_batch_tokens // max(1, batch * length)))


def _vjp_batch(model: nn.Module, body: nn.Module, lay: _Layout, embeds: Tensor, target: Target,
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
    cache = _prefix_cache(body, embeds, lay, c0)
    K = chunk_size(B, P + M - 1 - c0, 1.5 * (P - c0 + M / 2), max_batch_tokens)
    grads_h: Tensor | None = None
    for m1 in range(M, 0, -K):
        m0 = max(0, m1 - K)
        width = P + m1 - 1                            # response tokens [m0, m1) need columns [0, width)
        leaf = embeds[:, c0:width].detach().requires_grad_(True)                     # [B, W, d]
        with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
            past = _copy_cache(cache) if cache is not None else None
            hidden = _body_forward(body, leaf, lay.mask[:, :width], lay.positions[:, c0:width], past)  # [B, W, d]
            if grads_h is None:                       # first chunk: every response column present
                grads_h = _output_cotangents(model, lay.at_responses(hidden.detach(), c0), lay, target)  # [B, M, d]
            k = torch.arange(m1 - m0, device=embeds.device)
            cot = hidden.new_zeros((m1 - m0,) + tuple(hidden.shape))                   # [K, B, W, d]
            cot[k[:, None], batch_index[None, :], lay.pred_cols[:, m0:m1].T - c0] = grads_h[:, m0:m1].transpose(0, 1)
            (grad,) = torch.autograd.grad(hidden, leaf, cot, is_grads_batched=True)   # [K, B, W, d]
        out[:, c0:, m0:m1] = torch.einsum("kbpd,bpd->bpk", grad[:, :, :P - c0], embeds[:, c0:P])
        del leaf, hidden, cot, grad, past
    return out


def _prefix_cache(body: nn.Module, embeds: Tensor, lay: _Layout, upto: int):
    """Key/value cache of the body over columns ``[0, upto)`` (no autograd), or None when ``upto`` is 0."""
    from transformers import DynamicCache

    if upto == 0:
        return None
    cache = DynamicCache(config=body.config)
    with torch.no_grad():
        body(inputs_embeds=embeds[:, :upto], attention_mask=lay.mask[:, :upto],
             position_ids=lay.positions[:, :upto], cache=cache, use_cache=True)
    return cache


def _copy_cache(cache):
    """A fresh cache object holding the same (immutable, shared) prefix tensors, so updates stay local."""
    from transformers import DynamicCache

    fresh = DynamicCache(config=None)
    for i, layer in enumerate(cache.layers):
        fresh.update(layer.keys, layer.values, i)
    return fresh


def _supports_prefix_cache(model: nn.Module) -> bool:
    """Whether the JVP path may run the untouched prefix once through a key/value cache.

    Sliding-window families keep a model-specific cache layout; they run without it (exact either way).
    """
    return sliding_window(model) is None


def _jvp_batch(model: nn.Module, body: nn.Module, lay: _Layout, embeds: Tensor, grads_h: Tensor,
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
        cache = _prefix_cache(body, embeds, lay, c0)
        suffix = embeds[:, c0:]                                                      # [B, L - c0, d]
        cols = lay.row_cols[:, k0:k1].T                                              # [K, B]
        picked = embeds[batch_index[None, :], cols] * lay.row_valid[:, k0:k1].T[..., None]   # [K, B, d]
        tangents = suffix.new_zeros((k1 - k0,) + tuple(suffix.shape))               # [K, B, L - c0, d]
        k = torch.arange(k1 - k0, device=embeds.device)
        tangents[k[:, None], batch_index[None, :], (cols - c0).clamp(min=0)] = picked

        def hidden_at_responses(e: Tensor, cache=cache, c0=c0) -> Tensor:
            past = _copy_cache(cache) if cache is not None else None
            return lay.at_responses(_body_forward(body, e, lay.mask, lay.positions[:, c0:], past), c0)  # [B, M, d]

        def push(t: Tensor, f=hidden_at_responses) -> Tensor:
            return jvp(f, (suffix,), (t,))[1]

        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            dh = vmap(push)(tangents)                                                # [K, B, M, d]
        out[:, k0:k1] = torch.einsum("kbmd,bmd->bkm", dh, grads_h)
        del tangents, dh, cache
    return out


# ---- planning -------------------------------------------------------------------------------------------------
def vjp_cost(n_prompt: int, n_response: int) -> float:
    """Token-passes of the VJP path: response token m runs on a prefix of ``n_prompt + m`` positions."""
    return float(n_response * n_prompt + n_response * (n_response - 1) / 2)


def jvp_cost(n_prompt: int, n_response: int, row_positions: Sequence[int]) -> float:
    """Token-passes of the JVP path: the tangent of position n runs over positions ``n .. n_prompt+M-2``."""
    length = n_prompt + max(n_response - 1, 0)
    return JVP_RELATIVE_COST * float(sum(length - int(p) for p in row_positions))


def plan_modes(items: Sequence[AttributionItem], mode: Mode = "auto") -> list[str]:
    """``"vjp"`` or ``"jvp"`` per item: the forced ``mode``, or with ``"auto"`` the path with fewer token-passes."""
    if mode not in MODES:
        raise AttributionError(f"unknown attribution mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return [mode] * len(items)
    plans = []
    for it in items:
        rows = torch.nonzero(it.rows).flatten().tolist()
        plans.append("jvp" if jvp_cost(it.n_prompt, it.n_response, rows) < vjp_cost(it.n_prompt, it.n_response)
                     else "vjp")
    return plans


def sliding_window(model: nn.Module) -> int | None:
    """The smallest attention window of ``model`` in tokens, or None when every layer sees the whole prefix."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ()
    if window and (not types or any("sliding" in str(t) for t in types)):
        return int(window)
    return None


def _padded_waste(path: str, group: Sequence[AttributionItem]) -> float:
    """Token-passes of ``group`` run together (padded to its largest shapes) over those of its prompts alone."""
    P = max(it.n_prompt for it in group)
    M = max(it.n_response for it in group)
    if path == "vjp":   # every prompt runs M_max directions over P_max-long prompts
        alone = sum(vjp_cost(it.n_prompt, it.n_response) for it in group)
        together = len(group) * vjp_cost(P, M)
    else:               # every prompt runs R_max directions over the padded length
        alone = sum(it.n_rows * (it.n_prompt + it.n_response - 1) for it in group)
        together = len(group) * max(it.n_rows for it in group) * (P + M - 1)
    return together / max(alone, 1.0)


def _groups(path: str, indices: list[int], items: Sequence[AttributionItem], max_batch_prompts: int,
            max_batch_tokens: int, window: int | None = None, max_waste: float = 1.15) -> Iterator[list[int]]:
    """Prompts of one path in groups of similar shapes that share each pass.

    Sorted by the number of directions (response tokens for VJPs, attributed rows for JVPs) then length; a
    prompt joins the current group only while padding costs at most ``max_waste`` times running its members
    alone. With a sliding ``window`` shorter than a group's padded length, prompts run one at a time.
    """
    key = (lambda i: (items[i].n_response, items[i].n_prompt)) if path == "vjp" else \
        (lambda i: (items[i].n_rows, items[i].n_prompt + items[i].n_response))
    group: list[int] = []
    for i in sorted(indices, key=key):
        trial = group + [i]
        shapes = [items[j] for j in trial]
        P = max(it.n_prompt for it in shapes)
        M = max(it.n_response for it in shapes)
        too_wide = window is not None and P + M > window
        if group and (len(trial) > max_batch_prompts or len(trial) * (P + M) > max_batch_tokens or too_wide
                      or _padded_waste(path, shapes) > max_waste):
            yield group
            trial = [i]
        group = trial
    if group:
        yield group


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
    _check_target(target)
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
    try:
        for path in ("vjp", "jvp"):
            chosen = [i for i, p in zip(todo, plans) if p == path]
            for group in _groups(path, chosen, items, max_batch_prompts, max_batch_tokens, window,
                                 max_padding_waste):
                batch = [items[i] for i in group]
                lay = _layout(batch, pad_token_id, device)
                embeds = _embed(model, lay.ids)                                   # [B, L, d]
                if path == "vjp":
                    full = _vjp_batch(model, body, lay, embeds, target, max_batch_tokens,
                                      prefix_cache and _supports_prefix_cache(model))  # [B, P, M]
                    for b, i in enumerate(group):
                        cols = lay.row_cols[b, lay.row_valid[b]]
                        results[i] = full[b, cols, :items[i].n_response].float().cpu()
                else:
                    grads_h = _response_cotangents(body, model, lay, embeds, target)  # [B, M, d]
                    rows = _jvp_batch(model, body, lay, embeds, grads_h, max_batch_tokens,
                                      prefix_cache and _supports_prefix_cache(model))  # [B, R, M]
                    for b, i in enumerate(group):
                        results[i] = rows[b, :items[i].n_rows, :items[i].n_response].float().cpu()
                if progress is not None:
                    progress(len(group))
    finally:
        model.train(was_training)
        if attention not in (None, "eager", "sdpa"):
            model.set_attn_implementation(attention)
    return results  # type: ignore[return-value]


def naive_attribution(model: nn.Module, item: AttributionItem, target: Target = "prob") -> Tensor:
    """The slow reference: per response token, one full forward and one backward. ``[n_rows, n_response]``

    This is the authors' algorithm (without parameter gradients); tests and benchmarks compare against it.
    """
    _check_target(target)
    device = next(model.parameters()).device
    ids = torch.cat([item.prompt_ids, item.response_ids[:-1]]).to(device)[None]    # [1, T]
    P = item.n_prompt
    out = torch.zeros(item.n_rows, item.n_response)
    rows = torch.nonzero(item.rows).flatten().to(device)
    for m in range(item.n_response):
        emb = _embed(model, ids).requires_grad_(True)
        with torch.enable_grad():
            logits = model(inputs_embeds=emb, use_cache=False).logits[0, P - 1 + m]
            value = target_values(logits, item.response_ids[m].to(device), target)
            (grad,) = torch.autograd.grad(value, emb)
        out[:, m] = (grad[0, rows] * emb[0, rows].detach()).sum(-1).float().cpu()
    return out


__all__ = [
    "AttributionError", "AttributionItem", "Mode", "Target", "attribute", "head_logits", "jvp_cost", "make_item",
    "model_body", "naive_attribution", "plan_modes", "target_values", "vjp_cost",
]

