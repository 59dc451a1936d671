"""head_relations core: the vectorised miner equals a deliberately naive loop over heads, dims and pairs.

The naive reference (plugins/head_relations/reference.py) is plain Python loops over words, heads, dims and
pairs. Tiny random models of two families: Llama (4 query heads over 2 key/value heads: grouped-query
attention) and Phi-3 (fused qkv). Word vectors are random unit vectors with some words missing, so every filter
(co-occurrence thresholds, sign, sim > 0, a != c, missing words) is exercised.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.testing import tiny_model, tiny_tokenizer
from tuneshift.words import load_word_list, static_embeddings
from tuneshift.plugins.head_relations.mining import (MiningSettings, head_knowledge, mine_layer, mine_model, rope_cos_sin,
                                           rotate)
from tuneshift.plugins.head_relations.reference import naive_layer, naive_tau
from tuneshift.plugins.head_relations.similarity import thresholds

N_WORDS, N_BASE, DIM, K = 160, 60, 5, 12


def _inputs(family: str, seed: int = 0):
    model = tiny_model(family)
    adapter = ModelAdapter(model)
    words = load_word_list("builtin", limit=N_WORDS).words
    e_w = static_embeddings(tiny_tokenizer(), adapter.embedding_matrix(), words)
    gen = torch.Generator().manual_seed(seed)
    vectors = torch.randn(N_WORDS, DIM, generator=gen, dtype=torch.float64)
    vectors = vectors / vectors.norm(dim=1, keepdim=True)
    present = torch.rand(N_WORDS, generator=gen) > 0.15
    vectors[~present] = 0.0
    return model, adapter, e_w, vectors, present


def _compare(result, naive):
    for (h, j), (energy, rank, pairs) in naive.items():
        assert result.energy[h, j] == pytest.approx(energy, rel=1e-4), (h, j)
        assert result.rank[h, j] == rank, (h, j)
        assert bool(result.mined[h, j]) == (pairs is not None)
        sel = (result.head == h) & (result.dim == j)
        got = list(zip(result.q_word[sel].tolist(), result.k_word[sel].tolist()))
        assert got == [(a, c) for a, c, _ in (pairs or [])], (h, j)
        np.testing.assert_allclose(result.sim[sel], [s for _, _, s in (pairs or [])], rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_vectorised_equals_naive(family):
    _, adapter, e_w, vectors, present = _inputs(family)
    tau = thresholds(vectors, present, N_BASE, 1.96)
    ref_tau = naive_tau(vectors.numpy(), present.numpy(), N_BASE, 1.96)
    np.testing.assert_allclose(tau.numpy(), ref_tau, rtol=1e-12)
    settings = MiningSettings(top_k=K, head_chunk=1, item_chunk=7)  # item chunks that split heads
    results = list(mine_model(adapter, e_w, vectors, tau, settings))
    assert [r.layer for r in results] == list(range(adapter.n_layers))
    n_pairs = 0
    for r in results:
        naive = naive_layer(adapter, r.layer, e_w, vectors.numpy(), ref_tau, K)
        _compare(r, naive)
        n_pairs += len(r.sim)
    assert n_pairs > 20  # the test data really exercises the filters
    for r in results:  # every pair passes every filter; unknown words never appear
        assert present[r.q_word].all() and present[r.k_word].all()
        assert (r.q_word != r.k_word).all()


def test_top_n_dims_and_gqa_sharing():
    _, adapter, e_w, vectors, present = _inputs("llama", seed=1)
    tau = thresholds(vectors, present, N_BASE, 1.0)
    settings = MiningSettings(top_k=K, n_dims=3, head_chunk=4)
    result = next(mine_model(adapter, e_w, vectors, tau, settings))
    _compare(result, naive_layer(adapter, 0, e_w, vectors.numpy(), tau.tolist(), K, n_dims=3))
    assert result.mined.sum(1).tolist() == [3] * adapter.n_heads
    assert set(result.rank[result.mined].tolist()) == {1, 2, 3}


def test_head_chunks_keep_gqa_groups_whole_and_even():
    from tuneshift.plugins.head_relations.mining import head_chunks

    assert head_chunks(9, 3, 8) == [range(0, 6), range(6, 9)]  # SmolLM2: 9 heads over 3 kv heads
    assert head_chunks(9, 3, 16) == [range(0, 9)]
    assert head_chunks(32, 1, 8) == [range(0, 8), range(8, 16), range(16, 24), range(24, 32)]
    assert head_chunks(4, 2, 1) == [range(0, 2), range(2, 4)]  # never splits a group
    assert head_chunks(9, 1, 8) == [range(0, 4), range(4, 9)]  # even, not 8 + 1


def test_chunk_sizes_do_not_change_results():
    _, adapter, e_w, vectors, present = _inputs("llama")
    tau = thresholds(vectors, present, N_BASE, 1.96)
    runs = [list(mine_model(adapter, e_w, vectors, tau, MiningSettings(top_k=K, head_chunk=hc, item_chunk=ic)))
            for hc, ic in ((1, 1), (2, 5), (4, 10_000))]
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            np.testing.assert_array_equal(a.rank, b.rank)
            np.testing.assert_allclose(a.energy, b.energy, rtol=1e-6)
            for name in ("head", "dim", "q_word", "k_word", "sim"):
                np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_rope_delta_zero_is_plain_and_delta_changes_pairs():
    model, adapter, e_w, vectors, present = _inputs("llama")
    tau = thresholds(vectors, present, N_BASE, 1.0)
    plain = list(mine_model(adapter, e_w, vectors, tau, MiningSettings(top_k=K)))
    zero = list(mine_model(adapter, e_w, vectors, tau, MiningSettings(top_k=K, rope_delta=0)))
    for a, b in zip(plain, zero):
        np.testing.assert_array_equal(a.rank, b.rank)
        for name in ("head", "dim", "q_word", "k_word"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    far = list(mine_model(adapter, e_w, vectors, tau, MiningSettings(top_k=K, rope_delta=7)))
    assert any(not np.array_equal(a.energy, b.energy) for a, b in zip(plain, far))
    rope = (*rope_cos_sin(model, 0, 7), *rope_cos_sin(model, 0, 0))
    _compare(far[0], naive_layer(adapter, 0, e_w, vectors.numpy(), tau.tolist(), K, rope=rope))


def test_rope_rotation_gives_the_models_relative_logit():
    """Rotating W_q by delta and W_k by 0 reproduces q_m . k_n of the model's own RoPE with m - n = delta."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    model = tiny_model("llama")
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 16), torch.randn(1, 1, 1, 16)
    rotary = model.model.rotary_emb
    cos_m, sin_m = rotary(q, torch.tensor([[12]]))
    cos_n, sin_n = rotary(q, torch.tensor([[5]]))
    q_m, _ = apply_rotary_pos_emb(q, q, cos_m, sin_m)
    _, k_n = apply_rotary_pos_emb(k, k, cos_n, sin_n)
    ours = (rotate(q, *rope_cos_sin(model, 0, 7)) * rotate(k, *rope_cos_sin(model, 0, 0))).sum()
    assert float(ours) == pytest.approx(float((q_m * k_n).sum()), rel=1e-5)


def test_rope_on_absolute_positions_fails_clearly():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="rotary"):
        rope_cos_sin(model, 0, 3)


def test_hand_worked_filters():
    """Two words per side, 2-d word vectors, one head of width 1: every filter decided by hand."""
    # words 0..3; E_W is 1-d so Q[w] = 2 * e[w], K[w] = e[w] (gain 1)
    e_w = torch.tensor([[1.0], [-3.0], [2.0], [0.5]])
    w_q, w_k, gain = torch.tensor([[[2.0]]]), torch.tensor([[[1.0]]]), torch.ones(1)
    # T_q = T_k = top-2 by |.|: words 1 (|-3|) and 2 (|2|)
    c = math.cos
    vectors = torch.tensor([[1.0, 0.0], [c(0.3), math.sin(0.3)], [c(0.5), math.sin(0.5)], [0.0, 1.0]],
                           dtype=torch.float64)
    sim12 = c(0.2)  # 0.980
    tau = torch.tensor([0.0, 0.5, 0.5, 0.0], dtype=torch.float64)
    settings = MiningSettings(top_k=2)
    r = mine_layer(0, e_w, w_q, w_k, gain, vectors, tau, settings)
    assert r.energy[0, 0] == pytest.approx(4 * (1 + 9 + 4 + 0.25) + (1 + 9 + 4 + 0.25))
    # (1,2) and (2,1): sim 0.98 > taus, but Q[1]K[2] = -6*2 < 0 and Q[2]K[1] < 0: the sign filter drops both;
    # (1,1), (2,2): a == c. Nothing is kept.
    assert len(r.sim) == 0
    e_w2 = torch.tensor([[1.0], [3.0], [2.0], [0.5]])  # same signs now
    r = mine_layer(0, e_w2, w_q, w_k, gain, vectors, tau, settings)
    assert list(zip(r.q_word, r.k_word)) == [(1, 2), (2, 1)]
    np.testing.assert_allclose(r.sim, [sim12, sim12])
    # raise tau(2) above sim12: the pair fails the co-occurrence filter on word 2's side
    r = mine_layer(0, e_w2, w_q, w_k, gain, vectors, torch.tensor([0.0, 0.5, 0.99, 0.0], dtype=torch.float64),
                   settings)
    assert len(r.sim) == 0
    # a word missing from the similarity vocabulary (zero vector, tau = +inf) never passes
    missing = vectors.clone()
    missing[2] = 0.0
    r = mine_layer(0, e_w2, w_q, w_k, gain, missing, tau.clone().index_fill_(0, torch.tensor([2]), math.inf),
                   settings)
    assert len(r.sim) == 0


def test_head_knowledge_counts_dims_not_directions():
    # head 0: pair {5,7} in dims 0 (both directions) and 2 -> 2 dims; pair {1,2} only in dim 1 twice -> 1 dim
    layer = np.zeros(6, np.int64)
    head = np.zeros(6, np.int64)
    dim = np.array([0, 0, 2, 1, 1, 3])
    qw = np.array([5, 7, 7, 1, 2, 9])
    kw = np.array([7, 5, 5, 2, 1, 8])
    sim = np.array([0.9, 0.9, 0.8, 0.7, 0.7, 0.6])
    k = head_knowledge(layer, head, dim, qw, kw, sim, "dims")
    assert list(zip(k["word_a"], k["word_b"], k["n_dims"])) == [(5, 7, 2)]
    assert k["max_sim"].tolist() == [0.9]
    occ = head_knowledge(layer, head, dim, qw, kw, sim, "occurrences")  # the paper's code: raw counts
    assert sorted(zip(occ["word_a"], occ["word_b"], occ["n_dims"])) == [(1, 2, 2), (5, 7, 3)]
    with pytest.raises(ValueError, match="knowledge_count"):
        head_knowledge(layer, head, dim, qw, kw, sim, "pairs")


def test_top_words_breaks_ties_by_word_id():
    from tuneshift.plugins.head_relations.mining import top_words

    gen = torch.Generator().manual_seed(0)
    values = torch.randint(-4, 5, (50, 30), generator=gen).float()  # many exact ties, also at the k-th place
    values[:, 0] = torch.randn(50, generator=gen)  # and a column without ties
    idx, vals = top_words(values, 7)
    ref = torch.sort(values.abs(), dim=0, descending=True, stable=True).indices[:7]
    assert torch.equal(idx, ref)
    assert torch.equal(vals, torch.gather(values, 0, ref))


def test_pair_order_ties_within_tolerance_go_by_place():
    from tuneshift.plugins.head_relations.mining import order_pairs

    head = np.zeros(5, np.int64)
    rank = np.array([1, 1, 1, 1, 2])
    sim = np.array([0.5, 0.5 + 1e-15, 0.7, 0.4, 0.9])  # (a,c) and (c,a) may differ in the last bit
    pos = np.array([5, 3, 8, 1, 0])
    assert order_pairs(head, rank, sim, pos).tolist() == [2, 1, 0, 3, 4]


def test_gemma3_qk_norm_gains_enter_per_dim():
    """Gemma-3's per-head q/k norm gains scale dim j of every q (k) by gq[j] (gk[j]): the miner equals the
    naive loop with the gains, and the gains move energies and ranks against qk_norm="none"."""
    from tuneshift.plugins.head_relations.mining import qk_norm_gains

    _, adapter, e_w, vectors, present = _inputs("gemma3")
    tau = thresholds(vectors, present, N_BASE, 1.96)
    with_gain = list(mine_model(adapter, e_w, vectors, tau, MiningSettings(top_k=K, head_chunk=2, item_chunk=9)))
    plain = list(mine_model(adapter, e_w, vectors, tau, MiningSettings(top_k=K, qk_norm="none")))
    for layer, (g, p) in enumerate(zip(with_gain, plain)):
        _compare(g, naive_layer(adapter, layer, e_w, vectors.numpy(), tau.tolist(), K))
        _compare(p, naive_layer(adapter, layer, e_w, vectors.numpy(), tau.tolist(), K, qk_norm="none"))
        gq, gk = qk_norm_gains(adapter, layer)
        # energies by hand: N_j = gq_j^2 * sum_w Q_plain^2 + gk_j^2 * sum_w K_plain^2, from the plain miner's parts
        wq = adapter.ln1_gain(layer)[None, :, None] * adapter.W_Q(layer)
        q_part = ((e_w.double() @ wq.double()) ** 2).sum(1)                     # [H, d_h]
        k_part = p.energy - q_part.numpy()
        np.testing.assert_allclose(g.energy, gq.double().numpy() ** 2 * q_part.numpy()
                                   + gk.double().numpy() ** 2 * k_part, rtol=1e-4)
        assert (g.rank != p.rank).sum() > adapter.n_heads * adapter.d_head // 4   # many dims change rank
    assert qk_norm_gains(ModelAdapter(tiny_model("llama")), 0) is None
    with pytest.raises(ValueError, match="qk_norm must be one of gain, none"):
        MiningSettings(qk_norm="rms")
