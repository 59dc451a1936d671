"""Method C numeric core: value vectors per family, SVD solvers against the full SVD, top words."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.testing import tiny_model
from tuneshift.plugins.ffn_concepts.directions import normalize_rows, principal_directions, top_words

FAMILIES = ("llama", "gpt2", "gpt_neox")


def _plant_spectrum(adapter: ModelAdapter, layer: int, seed: int = 0) -> torch.Tensor:
    """Write value vectors with a decaying spectrum into the down projection, in the family's own layout.

    Returns the planted ``[d_ff, d_model]`` matrix. GPT-2's Conv1D stores ``[d_ff, d]``, nn.Linear ``[d, d_ff]``:
    reading it back through ``W_down`` must give rows = value vectors for every family.
    """
    gen = torch.Generator().manual_seed(seed)
    d_ff, d = adapter.d_ff, adapter.d_model
    u, _ = torch.linalg.qr(torch.randn(d_ff, d, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(d, d, generator=gen))
    s = 0.85 ** torch.arange(d, dtype=torch.float32)
    x = (u * s) @ v.T + 0.3 * torch.randn(1, d, generator=gen)  # a common offset: centring must remove it
    weight = adapter.module(adapter.layer_path(layer, "down")).weight
    with torch.no_grad():
        weight.copy_(x if adapter.spec.conv1d else x.T)
    return x


@pytest.mark.parametrize("family", FAMILIES)
def test_value_vectors_are_rows_of_w_down_for_every_family(family):
    adapter = ModelAdapter(tiny_model(family))
    planted = _plant_spectrum(adapter, 1)
    assert torch.equal(adapter.W_down(1), planted)
    full = principal_directions(adapter.W_down(1), 8, "full")
    centred = planted - planted.mean(0)
    assert full.total_variance == pytest.approx(float((centred.double() ** 2).sum()), rel=1e-6)
    # direction r explains exactly s_r^2 of the neurons' centred variance
    proj = centred @ full.vectors.T  # [d_ff, 8]
    assert torch.allclose((proj ** 2).sum(0) / full.total_variance, full.variance_ratio, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_eigh_matches_full_svd(family):
    adapter = ModelAdapter(tiny_model(family))
    x = _plant_spectrum(adapter, 0, seed=3)
    r = 24
    full = principal_directions(adapter.W_down(0), r, "full")
    fast = principal_directions(adapter.W_down(0), r, "eigh")
    assert fast.vectors.shape == (r, adapter.d_model)
    assert fast.total_variance == pytest.approx(full.total_variance, rel=1e-6)
    assert torch.allclose(fast.variance_ratio, full.variance_ratio, rtol=1e-4, atol=1e-7)
    # same directions up to sign, and the shared sign rule makes them equal outright
    assert (fast.vectors * full.vectors).sum(1).abs().min() > 1 - 1e-4
    assert torch.allclose(fast.vectors, full.vectors, atol=1e-2)
    # top words agree (sets, per direction) against random unit "word" vectors
    words = normalize_rows(torch.randn(500, x.shape[1], generator=torch.Generator().manual_seed(1)))
    a, b = top_words(words, full.vectors, 10), top_words(words, fast.vectors, 10)
    assert torch.equal(a.index.sort(1).values, b.index.sort(1).values)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_raw_random_weights_eigh_exact(family):
    """Unplanted random weights have a flat spectrum, as trained FFNs do: eigh is still exact."""
    adapter = ModelAdapter(tiny_model(family))
    full = principal_directions(adapter.W_down(1), 16, "full")
    eig = principal_directions(adapter.W_down(1), 16, "eigh")
    assert torch.allclose(eig.variance_ratio, full.variance_ratio, rtol=1e-5)
    assert (eig.vectors * full.vectors).sum(1).abs().min() > 1 - 1e-4


def test_ratios_use_total_variance_and_rank_is_capped():
    x = torch.randn(40, 12, generator=torch.Generator().manual_seed(0))
    capped = principal_directions(x, 300, "full")
    assert capped.vectors.shape == (12, 12)
    assert float(capped.variance_ratio.sum()) == pytest.approx(1.0, abs=1e-5)
    part = principal_directions(x, 3, "eigh")
    assert part.vectors.shape == (3, 12)
    assert torch.allclose(part.variance_ratio, capped.variance_ratio[:3], rtol=1e-3)
    assert float(part.variance_ratio.sum()) < 0.5  # denominators are the total, not the first R
    assert torch.allclose(part.vectors @ part.vectors.T, torch.eye(3), atol=1e-5)


def test_sign_rule_is_deterministic():
    x = torch.randn(30, 8, generator=torch.Generator().manual_seed(2))
    d = principal_directions(x, 5, "full")
    pivots = d.vectors.gather(1, d.vectors.abs().argmax(1, keepdim=True))
    assert (pivots > 0).all()
    flipped = principal_directions(-x, 5, "full")  # the same directions; signs must not depend on the input's
    assert torch.allclose(d.vectors, flipped.vectors, atol=1e-5)


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="svd_method"):
        principal_directions(torch.zeros(4, 3), 2, "qr")
    with pytest.raises(ValueError, match="randomized solver was removed.*eigh, full"):
        principal_directions(torch.zeros(4, 3), 2, "randomized")
    with pytest.raises(ValueError, match=r"\[d_ff, d_model\]"):
        principal_directions(torch.zeros(4), 2)


def test_top_words_chunked_equals_brute_force():
    gen = torch.Generator().manual_seed(0)
    words = normalize_rows(torch.randn(203, 16, generator=gen))
    dirs, _ = torch.linalg.qr(torch.randn(16, 5, generator=gen))
    dirs = dirs.T  # [5, 16]
    cos = (words @ dirs.T).numpy()  # [203, 5]
    expected = np.argsort(-np.abs(cos), axis=0)[:7].T  # [5, 7]
    for chunk in (1, 7, 64, 10_000):
        got = top_words(words, dirs, 7, chunk_size=chunk)
        assert np.array_equal(got.index.numpy(), expected), chunk
        assert np.allclose(got.cos.numpy(), np.take_along_axis(cos.T, expected, 1), atol=1e-6)
        assert np.allclose(got.score.numpy(), np.abs(got.cos.numpy()))
    assert top_words(words[:4], dirs, 7).index.shape == (5, 4)  # k capped at the number of words
