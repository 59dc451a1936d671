"""head_relations similarity: thresholds tau by hand, GloVe/word2vec files, the offline PPMI backend."""
from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from tuneshift.plugins.head_relations import corpus, similarity
from tuneshift.plugins.head_relations.similarity import (PPMIBackend, PPMIParams, WordVectors, available_backends,
                                               count_cooccurrences, make_backend, ppmi_matrix, randomized_svd,
                                               read_vector_file, thresholds)


def test_tau_by_hand():
    # word 0 = (1,0); baseline = words 0..2: (1,0), (0,1), (-1,0) -> sims of word 0: 1, 0, -1
    vecs = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.6, 0.8], [0.0, 0.0]], dtype=torch.float64)
    present = torch.tensor([True, True, True, True, False])
    tau = thresholds(vecs, present, n_baseline=3, multiplier=1.96)
    std0 = math.sqrt(2 / 3)  # population std of (1, 0, -1)
    assert tau[0] == pytest.approx(0 + 1.96 * std0)
    assert tau[1] == pytest.approx(1 / 3 + 1.96 * math.sqrt(2 / 9))  # sims 0, 1, 0
    sims3 = [0.6, 0.8, -0.6]
    m = sum(sims3) / 3
    assert tau[3] == pytest.approx(m + 1.96 * math.sqrt(sum((s - m) ** 2 for s in sims3) / 3))
    assert math.isinf(tau[4])  # an unknown word never passes
    # a missing baseline word is left out of the baseline instead of counting as similarity 0
    present2 = torch.tensor([True, False, True, True, False])
    tau2 = thresholds(vecs, present2, n_baseline=3, multiplier=1.0)
    assert tau2[0] == pytest.approx(0 + 1.0)  # sims 1, -1: mean 0, std 1
    with pytest.raises(ValueError, match="baseline"):
        thresholds(vecs, torch.zeros(5, dtype=torch.bool), n_baseline=3)


def test_word_vectors_lookup_is_case_aware_and_normalised():
    vocab = {"Paris": 0, "the": 1, "NASA": 2}
    matrix = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, 2.0]], dtype=np.float32)
    wv = WordVectors.from_table(["paris", "the", "nasa", "zebra"], vocab, matrix)
    np.testing.assert_allclose(wv.vectors, [[0.6, 0.8], [1, 0], [0, 1], [0, 0]])
    assert wv.present.tolist() == [True, True, True, False]


def test_glove_and_word2vec_text_files(tmp_path):
    glove = tmp_path / "g.txt"
    glove.write_text("the 1 0 0\ncat 0 1 0\n. . . 0 0 1\nDog 0 2 0\n")  # a token with spaces, as in GloVe 840B
    vocab, matrix = read_vector_file(glove)
    assert list(vocab) == ["the", "cat", ". . .", "Dog"] and matrix.shape == (4, 3)
    w2v = tmp_path / "w.txt"
    w2v.write_text("2 3\nthe 1 0 0\ncat 0 1 0\n")
    vocab, matrix = read_vector_file(w2v, wanted={"cat"})
    assert list(vocab) == ["cat"] and matrix.tolist() == [[0, 1, 0]]
    backend = make_backend("glove", path=str(glove))
    wv = backend.lookup(["cat", "dog", "bird"])
    assert wv.present.tolist() == [True, True, False]
    assert float(wv.vectors[0] @ wv.vectors[1]) == pytest.approx(1.0)


def test_clear_errors():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_backend("glove", path="/no/such/glove.840B.300d.txt")
    with pytest.raises(ValueError, match="similarity_path"):
        make_backend("glove")
    with pytest.raises(ValueError, match="available: glove, ppmi"):
        make_backend("word2vec_binary")
    with pytest.raises(ValueError, match="unknown ppmi parameters"):
        make_backend("ppmi", dims=3)
    assert {"glove", "ppmi"} <= set(available_backends())


def test_cooccurrence_and_ppmi_by_hand():
    docs = [["a", "b", "c"], ["a", "b"]]
    vocab, cooc = count_cooccurrences(docs, PPMIParams(window=2, min_count=1))
    assert vocab == ["a", "b", "c"]
    # doc 1: (a,b) and (b,c) at distance 1 (weight 1), (a,c) at distance 2 (weight 1/2); doc 2: (a,b). Symmetric.
    np.testing.assert_allclose(cooc.toarray(), [[0, 2, 0.5], [2, 0, 1], [0.5, 1, 0]])
    ppmi = ppmi_matrix(cooc, alpha=1.0).toarray()
    # total 7, row sums a 2.5, b 3, c 1.5
    assert ppmi[0, 1] == pytest.approx(math.log(2 * 7 / (2.5 * 3)))
    assert ppmi[1, 2] == pytest.approx(math.log(1 * 7 / (3 * 1.5)))
    assert ppmi[0, 2] == 0.0  # log(3.5 / 3.75) < 0 is clipped
    # windows never cross documents, and min_count drops rare words
    vocab, cooc = count_cooccurrences([["a", "b"], ["c", "a"], ["a"]], PPMIParams(window=5, min_count=2))
    assert vocab == ["a"] and cooc.nnz == 0


def test_randomized_svd_matches_exact():
    rng = np.random.default_rng(0)
    low = rng.standard_normal((80, 6)) @ rng.standard_normal((6, 70))
    m = sp.csr_matrix(low + 0.01 * rng.standard_normal((80, 70)))
    u, s = randomized_svd(m, 6, n_iter=3)
    u_ref, s_ref, _ = np.linalg.svd(m.toarray(), full_matrices=False)
    np.testing.assert_allclose(s, s_ref[:6], rtol=1e-3)
    np.testing.assert_allclose(np.abs(np.sum(u * u_ref[:, :6], axis=0)), np.ones(6), atol=1e-3)


def test_ppmi_backend_builds_once_and_caches(tmp_path, monkeypatch):
    text = ["the cat sat on the mat", "the dog sat on the log", "a cat and a dog", "the mat and the log"] * 5
    monkeypatch.setattr(corpus, "documents", lambda sources: iter(text))
    monkeypatch.setattr(corpus, "fingerprint", lambda sources: "tiny-corpus")
    backend = make_backend("ppmi", cache_dir=str(tmp_path), dim=3, window=2, min_count=1, n_iter=2)
    wv = backend.lookup(["cat", "dog", "unicorn"])
    assert wv.present.tolist() == [True, True, False] and wv.vectors.shape == (3, 3)
    cached = list(tmp_path.glob("ppmi-*.npz"))
    assert len(cached) == 1
    monkeypatch.setattr(similarity, "build_ppmi_vectors", lambda params: pytest.fail("rebuilt despite the cache"))
    again = PPMIBackend(cache_dir=str(tmp_path), dim=3, window=2, min_count=1, n_iter=2).lookup(["cat", "dog"])
    np.testing.assert_allclose(again.vectors, wv.vectors[:2])
    other = PPMIBackend(cache_dir=str(tmp_path), dim=2, window=2, min_count=1, n_iter=2)
    assert other.cache_path() != cached[0]  # parameters are part of the key


def test_corpus_tokenizer():
    assert corpus.tokenize("Don't panic -- it's well-known; 42 x") == ["don't", "panic", "it's", "well-known", "x"]
