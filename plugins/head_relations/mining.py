"""The vectorised core of method B: word pairs that each dimension of each attention head relates.

Definition (``docs/methods.md`` B.2-B.5; ``n`` words, ``H`` query heads, ``d_h`` head width)::

    Wq~ = diag(g_l) W_Q[h] diag(gq_l)   # [d_model, d_h]   g_l: gain of layer l's input norm
    Wk~ = diag(g_l) W_K[kv(h)] diag(gk_l)  # [d_model, d_h]  kv(h) = h // (H / H_kv)   (grouped-query attention)
    Q = E_W Wq~,  K = E_W Wk~           # [n, d_h]         E_W: static word embeddings
    N_j = sum_w Q[w,j]^2 + sum_w K[w,j]^2   energy of dim j; dims ranked by N_j descending (rank 1 = largest)
    T_q(j), T_k(j)                      # top-K words by |Q[:,j]|, |K[:,j]|
    keep (a, c) in T_q x T_k  iff  sim(a,c) > tau(a), sim(a,c) > tau(c), sim > 0, Q[a,j] K[c,j] > 0, a != c
    pairs of a dim ranked by sim descending

No RoPE, no 1/sqrt(d_h), no biases, no RMS scaling of the word vectors (the paper's simplification).

Per-head q/k norms (Gemma-3; ``qk_norm = "gain"``, the default): the model's query is
``RMSNorm_{d_h}(x W_Q[h]) * gq_l`` (then RoPE), ``gq_l`` ``[d_h]`` the norm's effective gain (``1 + w``),
shared by all heads of the layer; likewise keys with ``gk_l``. Dim j of every head is thus scaled by
``gq_l[j]`` (queries) and ``gk_l[j]`` (keys): the gains enter as the column scaling ``diag(gq_l)`` above,
which moves energies, dim ranks and, where ``gq_l[j] gk_l[j] < 0``, the sign filter. The per-word RMS
scaling of each head's q and k is left out, as the paper leaves out the RMS scaling of the word vectors.
``qk_norm = "none"`` ignores the q/k norms altogether (``gq = gk = 1``). Families without them are unaffected.

How it is computed
    Per layer and chunk of query heads: one matmul ``E_W @ [Wq~ of all heads in the chunk]`` (and one for the
    key heads they read), a stable descending sort down the word axis for all dims at once (its first K rows are
    T_q / T_k; ties go to the lower word id, i.e. the more frequent word), then for chunks of (head, dim) items
    one batched gather-matmul ``V[T_q] @ V[T_k]^T`` -> ``[items, K, K]`` of similarities and vectorised masks.
    Word ids stay integers; words become strings only when the results are written. Nothing of size
    ``n x n`` is ever formed. Memory per step: ``n x head_chunk x d_h`` floats for Q (and its sort), plus
    ``item_chunk x K x (2 D + K)`` float64 for the similarity block.

Tie-breaking (defined, so that a naive loop gives the same result): dims of equal energy by dim index; words
of equal |Q| by word id; pairs of equal similarity by their place ``i*K + c`` in ``T_q x T_k``, where
"equal" means within 1e-12 (``SIM_TIE``): ``(a, c)`` and ``(c, a)`` have the same similarity in exact
arithmetic, but a batched matmul may round the two dot products differently in the last bit.

RoPE-aware variant (``rope_delta = delta``, an extension none of the paper's anchors has)
    With rotary position embeddings the logit of a query at position m and a key at position n is
    ``(R_m q) . (R_n k)`` and depends only on ``delta = m - n``. We place the key at position 0 and the query
    at position ``delta`` and apply the model's own rotary embedding (its ``cos``/``sin`` for those positions,
    scaling included, partial rotary dims respected) to the columns of ``Wq~`` and ``Wk~`` (rotation is linear,
    so rotating the weights equals rotating every word's q and k). Energies, T_q/T_k, the sign filter and the
    per-dim split are then read from the rotated q and k: dim j of the rotated frame contributes
    ``q_rot[j] k_rot[j]`` to the logit at distance delta, and the dims still sum to the exact logit (the split
    per dim is the one of the frame where the key sits at position 0). ``delta = 0`` reduces to the plain
    method when the rotary scaling is 1.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.functional import embedding


QK_NORM_MODES = ("gain", "none")


@dataclass(frozen=True)
class MiningSettings:
    """Knobs of :func:`mine_layer` (the plugin's options map onto these)."""

    top_k: int = 100  # K words per dim on each side
    n_dims: int = 0  # 0: every dim of a head; n: only its n highest-energy dims
    head_chunk: int = 16  # query heads per matmul (rounded to whole GQA groups)
    item_chunk: int = 512  # (head, dim) items per similarity block
    rope_delta: int | None = None  # None: no RoPE (the paper); delta: pairs at relative distance delta
    qk_norm: str = "gain"  # gain: apply per-head q/k norm gains (Gemma-3) per dim | none: ignore them

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORM_MODES:
            raise ValueError(f"qk_norm must be one of {', '.join(QK_NORM_MODES)}, got {self.qk_norm!r}")
        for name in ("top_k", "head_chunk", "item_chunk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_dims < 0:
            raise ValueError(f"n_dims must be >= 0 (0 = all dims), got {self.n_dims}")


@dataclass
class LayerResult:
    """Everything one layer yields. ``energy``/``rank``/``mined`` are ``[H, d_h]``; pair arrays are ``[P]``,
    sorted by head, then dim rank, then similarity descending, then position in ``T_q x T_k``."""

    layer: int
    energy: np.ndarray  # [H, d_h] float64
    rank: np.ndarray  # [H, d_h] int, 1 = highest energy in its head
    mined: np.ndarray  # [H, d_h] bool, whether pairs were mined for this dim (n_dims)
    head: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [P]
    dim: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [P]
    q_word: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [P] word id on the query side
    k_word: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # [P] word id on the key side
    sim: np.ndarray = field(default_factory=lambda: np.zeros(0, np.float64))  # [P]


# ---- RoPE -------------------------------------------------------------------------------------------------------
def _rotary_module(model: nn.Module) -> nn.Module:
    candidates = [m for name, m in model.named_modules() if type(m).__name__.endswith("RotaryEmbedding")
                  and not name.endswith("_local")]
    if not candidates:
        raise ValueError(f"rope_delta needs a rotary-position model; {type(model).__name__} has no rotary "
                         "embedding module (absolute positions, e.g. GPT-2): leave rope_delta unset")
    return candidates[0]


def rope_cos_sin(model: nn.Module, layer: int, position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's rotary ``cos, sin`` (each ``[d_rot]``, float32, attention scaling included) at ``position``
    for ``layer`` (models with per-layer-type rotary tables, e.g. Gemma 3, get their layer's type)."""
    rotary = _rotary_module(model)
    param = next(rotary.parameters(), None) or next(rotary.buffers(), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.zeros(1, dtype=torch.float32, device=device)
    pos = torch.tensor([[position]], device=device)
    kwargs = {}
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        layer_types = getattr(model.config, "layer_types", None)
        kwargs["layer_type"] = layer_types[layer] if layer_types else None
    cos, sin = rotary(x, pos, **kwargs)
    return cos.reshape(-1).float(), sin.reshape(-1).float()


def rotate(w: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Apply a rotary rotation (HF ``rotate_half`` convention) to the last axis of ``w`` ``[..., d_h]``; only
    the first ``len(cos)`` dims rotate (partial rotary), the rest pass through."""
    r = cos.shape[-1]
    w_rot, w_pass = w[..., :r], w[..., r:]
    half = torch.cat((-w_rot[..., r // 2:], w_rot[..., : r // 2]), dim=-1)
    return torch.cat((w_rot * cos + half * sin, w_pass), dim=-1)


# ---- the core ---------------------------------------------------------------------------------------------------
def gram_matrix(words: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """``E_W^T E_W`` ``[d_model, d_model]`` in float64, summed over word chunks (no float64 copy of ``E_W``)."""
    gram = torch.zeros(words.shape[1], words.shape[1], dtype=torch.float64, device=words.device)
    for start in range(0, words.shape[0], chunk):
        block = words[start:start + chunk].double()
        gram += block.T @ block
    return gram


def _column_energy(w: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``[heads, d_h]`` energies ``sum_w (E_W w_j)^2 = w_j^T G w_j`` of the columns of ``w`` ``[heads, d, d_h]``."""
    w64 = w.double()
    return torch.einsum("hdj,de,hej->hj", w64, gram, w64)


def top_words(values: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` rows of every column by ``|values|``: ids ``[k, C]`` and signed values ``[k, C]``.

    Ordered by magnitude descending, equal magnitudes by the lower row (word) id, exactly as a stable descending
    sort would give, but through ``topk`` (about 15x cheaper than sorting the word axis). ``topk`` takes one row
    more than needed: where the (k+1)-th magnitude equals the k-th, ties straddle the cut, and those columns
    (rare with real weights) are redone with a stable sort.
    """
    n = values.shape[0]
    k = min(k, n)
    mags = values.abs()
    top = torch.topk(mags, min(k + 1, n), dim=0)  # magnitudes sorted descending; tie order unspecified
    top_vals, top_ids = top.values[:k], top.indices[:k]
    ids_by_id, perm = torch.sort(top_ids, dim=0)  # by word id, then stably by magnitude
    order = torch.sort(torch.gather(top_vals, 0, perm), dim=0, descending=True, stable=True).indices
    idx = torch.gather(ids_by_id, 0, order)
    if n > k:
        ties = top.values[k] == top.values[k - 1]
        if bool(ties.any()):
            cols = ties.nonzero().squeeze(1)
            idx[:, cols] = torch.sort(mags[:, cols], dim=0, descending=True, stable=True).indices[:k]
    return idx, torch.gather(values, 0, idx)


def head_chunks(n_heads: int, group: int, chunk: int) -> list[range]:
    """Query heads in chunks of about ``chunk`` that never split a GQA group (so each key head is projected
    once), sized evenly (9 heads, chunk 8 -> 4 + 5 rather than 8 + 1)."""
    n_groups = n_heads // group
    groups_per_chunk = max(1, chunk // group)
    n_chunks = -(-n_groups // groups_per_chunk)
    bounds = np.linspace(0, n_groups, n_chunks + 1).round().astype(int)
    return [range(int(a) * group, int(b) * group) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def mine_layer(layer: int, words: torch.Tensor, w_q: torch.Tensor, w_k: torch.Tensor, gain: torch.Tensor,
               vectors: torch.Tensor, tau: torch.Tensor, settings: MiningSettings,
               rope: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               gram: torch.Tensor | None = None,
               qk_gains: tuple[torch.Tensor, torch.Tensor] | None = None) -> LayerResult:
    """Mine one layer.

    words    [n, d_model]        static word embeddings E_W (float32, on the compute device)
    w_q      [H, d_model, d_h]   W_Q of the layer;  w_k [H_kv, d_model, d_h]
    gain     [d_model]           gain of the layer's input norm
    vectors  [n, D]              unit word vectors for similarity (float64; zero rows: unknown words)
    tau      [n]                 per-word thresholds (float64; +inf: unknown words)
    rope     (cos_q, sin_q, cos_k, sin_k) each [d_rot], or None
    gram     [d_model, d_model]  E_W^T E_W in float64 (computed here when None): the energy of a column w of
                                 ``Wq~`` is ``||E_W w||^2 = w^T G w``, exact in float64 and without an n x C pass
    qk_gains (gq, gk) each [d_h] per-head q/k norm gains (Gemma-3), applied per dim before RoPE; or None
    """
    device = words.device
    n_heads, _, d_head = w_q.shape
    group = n_heads // w_k.shape[0]
    n_sel = d_head if settings.n_dims == 0 else min(settings.n_dims, d_head)
    gain = gain.to(device, torch.float32)
    if gram is None:
        gram = gram_matrix(words)
    energy = torch.empty(n_heads, d_head, dtype=torch.float64)
    rank = torch.empty(n_heads, d_head, dtype=torch.long)
    mined = torch.zeros(n_heads, d_head, dtype=torch.bool)
    found: list[tuple[np.ndarray, ...]] = []

    for chunk in head_chunks(n_heads, group, settings.head_chunk):
        heads = torch.arange(chunk.start, chunk.stop)
        kv0, kv1 = chunk.start // group, chunk.stop // group
        wq = gain[None, :, None] * w_q[chunk.start:chunk.stop].to(device, torch.float32)  # [hc, d, d_h]
        wk = gain[None, :, None] * w_k[kv0:kv1].to(device, torch.float32)  # [kc, d, d_h]
        if qk_gains is not None:  # per-dim gains of the per-head q/k norms, before RoPE as in the model
            wq = wq * qk_gains[0].to(device, torch.float32)[None, None, :]
            wk = wk * qk_gains[1].to(device, torch.float32)[None, None, :]
        if rope is not None:
            cos_q, sin_q, cos_k, sin_k = (t.to(device) for t in rope)
            wq, wk = rotate(wq, cos_q, sin_q), rotate(wk, cos_k, sin_k)
        hc, kc = len(heads), kv1 - kv0
        kv_local = (heads // group - kv0).to(device)  # [hc] which key head of the chunk serves each query head

        e = (_column_energy(wq, gram) + _column_energy(wk, gram)[kv_local])  # [hc, d_h] float64
        order = torch.sort(-e, dim=1, stable=True).indices  # [hc, d_h] dims by energy, ties by index
        ranks = torch.empty_like(order).scatter_(1, order, torch.arange(1, d_head + 1, device=device).expand(hc, -1))
        energy[heads], rank[heads] = e.cpu(), ranks.cpu()
        sel = order[:, :n_sel]  # [hc, n_sel]
        mined[heads[:, None], sel.cpu()] = True

        q = words @ wq.permute(1, 0, 2).reshape(-1, hc * d_head)  # [n, hc*d_h]
        tq_ids, tq_val = top_words(q, settings.top_k)  # [K, hc*d_h]
        del q
        k = words @ wk.permute(1, 0, 2).reshape(-1, kc * d_head)  # [n, kc*d_h]
        tk_ids, tk_val = top_words(k, settings.top_k)  # [K, kc*d_h]
        del k
        q_cols = (torch.arange(hc, device=device)[:, None] * d_head + sel).reshape(-1)  # [M] items (head, dim)
        k_cols = (kv_local[:, None] * d_head + sel).reshape(-1)  # [M]
        tq_all, qv_all = tq_ids.T[q_cols], tq_val.T[q_cols]  # [M, K] word ids / signed Q values
        tk_all, kv_all = tk_ids.T[k_cols], tk_val.T[k_cols]  # [M, K]
        item_head = heads[:, None].expand(hc, n_sel).reshape(-1).numpy()  # [M] bookkeeping stays on the host
        item_dim, item_rank = sel.reshape(-1).cpu().numpy(), torch.gather(ranks, 1, sel).reshape(-1).cpu().numpy()
        top_k = tq_all.shape[1]

        for s0 in range(0, q_cols.numel(), settings.item_chunk):
            tq, tk = tq_all[s0:s0 + settings.item_chunk], tk_all[s0:s0 + settings.item_chunk]  # [m, K]
            qv, kv = qv_all[s0:s0 + settings.item_chunk], kv_all[s0:s0 + settings.item_chunk]  # [m, K]
            sim = torch.bmm(embedding(tq, vectors), embedding(tk, vectors).transpose(1, 2))  # [m, K, K]
            # the most selective test first, on the whole block: sim > tau(a) and sim > 0
            flat = (sim > embedding(tq, tau[:, None]).clamp_(min=0.0)).view(-1).nonzero().squeeze(1)  # [p]
            item, pos = flat // (top_k * top_k), flat % (top_k * top_k)  # pos = i*K + c, place in T_q x T_k
            i, c = pos // top_k, pos % top_k
            a, b, hit_sim = tq[item, i], tk[item, c], sim.view(-1)[flat]
            # the rest on the candidates only: sim > tau(c), Q[a,j] K[c,j] > 0, a != c
            ok = (hit_sim > tau[b]) & (qv[item, i] * kv[item, c] > 0) & (a != b)
            item, a, b, hit_sim, pos = (t[ok].cpu().numpy() for t in (item, a, b, hit_sim, pos))
            found.append((item_head[s0 + item], item_dim[s0 + item], item_rank[s0 + item], a, b, hit_sim, pos))

    result = LayerResult(layer, energy.numpy(), rank.numpy(), mined.numpy())
    if found:
        head, dim, drank, qw, kw, sim, pos = (np.concatenate(parts) for parts in zip(*found))
        order = order_pairs(head, drank, sim, pos)
        result.head, result.dim, result.q_word, result.k_word, result.sim = (
            head[order].astype(np.int64), dim[order].astype(np.int64), qw[order].astype(np.int64),
            kw[order].astype(np.int64), sim[order].astype(np.float64))
    return result


SIM_TIE = 1e-12  # similarities closer than this tie (sim(a,c) and sim(c,a) can differ in the last bit)


def order_pairs(head: np.ndarray, rank: np.ndarray, sim: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Permutation sorting pairs by head, dim rank, similarity descending and, among similarities within
    :data:`SIM_TIE` of their neighbour (a chain of near-equal values), by place ``pos`` in ``T_q x T_k``."""
    order = np.lexsort((pos, -sim, rank, head))
    h, r, s = head[order], rank[order], sim[order]
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = (h[1:] != h[:-1]) | (r[1:] != r[:-1]) | (s[:-1] - s[1:] > SIM_TIE)
    group = np.cumsum(new_group)
    return order[np.lexsort((pos[order], group))]


def head_knowledge(layer: np.ndarray, head: np.ndarray, dim: np.ndarray, word_a: np.ndarray,
                   word_b: np.ndarray, sim: np.ndarray, count: str = "dims") -> dict[str, np.ndarray]:
    """Head knowledge P_h (B.5): order-free pairs found in more than one dim of a head.

    Inputs are the kept pairs of all layers, ``[P]`` each. ``count="dims"`` counts the distinct dims holding a
    pair (the definition); ``"occurrences"`` counts raw occurrences as the paper's code does (a pair kept in
    both directions ``(a,c)`` and ``(c,a)`` of one dim counts twice there). Returns arrays ``[R]``: ``layer,
    head, word_a, word_b`` (``word_a < word_b`` as ids), ``n_dims`` (the count), ``max_sim``; sorted by layer,
    head, count descending, max_sim descending.
    """
    if count not in ("dims", "occurrences"):
        raise ValueError(f"knowledge_count must be 'dims' or 'occurrences', got {count!r}")
    a, b = np.minimum(word_a, word_b), np.maximum(word_a, word_b)
    keys = np.stack([layer, head, a, b], axis=1).astype(np.int64).reshape(-1, 4)
    pair_keys, inverse = np.unique(keys, axis=0, return_inverse=True)
    inverse = inverse.reshape(-1)
    if count == "dims":
        distinct = np.unique(np.stack([inverse, np.asarray(dim, np.int64)], axis=1), axis=0)[:, 0]
        counts = np.bincount(distinct, minlength=len(pair_keys))
    else:
        counts = np.bincount(inverse, minlength=len(pair_keys))
    max_sim = np.full(len(pair_keys), -np.inf)
    np.maximum.at(max_sim, inverse, np.asarray(sim, np.float64))
    keep = counts > 1
    out = {"layer": pair_keys[keep, 0], "head": pair_keys[keep, 1], "word_a": pair_keys[keep, 2],
           "word_b": pair_keys[keep, 3], "n_dims": counts[keep], "max_sim": max_sim[keep]}
    order = np.lexsort((-out["max_sim"], -out["n_dims"], out["head"], out["layer"]))
    return {k: v[order] for k, v in out.items()}


def qk_norm_gains(adapter, layer: int, mode: str = "gain") -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(gq, gk)`` ``[d_h]`` each: the layer's per-head q/k norm gains when ``mode`` is "gain" and the model
    has such norms (Gemma-3), else None. A model with only one of the two gets 1 for the other."""
    gq, gk = adapter.q_norm_gain(layer), adapter.k_norm_gain(layer)
    if mode == "none" or (gq is None and gk is None):
        return None
    ones = torch.ones(adapter.d_head)
    return (ones if gq is None else gq), (ones if gk is None else gk)


def mine_model(adapter, words: torch.Tensor, vectors: torch.Tensor, tau: torch.Tensor, settings: MiningSettings,
               layers: list[int] | None = None, progress: bool = False):
    """Yield a :class:`LayerResult` per layer of ``adapter``'s model (see :func:`mine_layer` for the shapes;
    ``words``, ``vectors`` and ``tau`` must already be on the compute device)."""
    layers = list(range(adapter.n_layers)) if layers is None else layers
    iterator = layers
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(layers, desc="head relations: mining heads", unit="layer", leave=False)
    with torch.no_grad():
        gram = gram_matrix(words)  # [d_model, d_model], once per model
        for layer in iterator:
            rope = None
            if settings.rope_delta is not None:
                cos_q, sin_q = rope_cos_sin(adapter.model, layer, settings.rope_delta)
                cos_k, sin_k = rope_cos_sin(adapter.model, layer, 0)
                rope = (cos_q, sin_q, cos_k, sin_k)
            yield mine_layer(layer, words, adapter.W_Q(layer), adapter.W_K(layer), adapter.ln1_gain(layer),
                             vectors, tau, settings, rope, gram, qk_norm_gains(adapter, layer, settings.qk_norm))
