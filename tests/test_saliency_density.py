"""plugins/saliency/density.py: normalisation, density and score on hand-worked examples (methods.md A.2-A.4)."""
from __future__ import annotations

import numpy as np
import pytest

from tuneshift.plugins.saliency.density import (decile_profile, density, normalise, normalised_density, prompt_score,
                                      score_matrix, threshold)


def test_normalise_by_hand():
    raw = np.array([[1.0, -1.0, 3.0],
                    [2.0, 0.0, 3.0],
                    [0.5, -2.0, 0.0]])
    # column 0: max 2 -> ceil(10 * [0.5, 1, 0.25]) = [5, 10, 3]; column 1: nothing positive -> 0;
    # column 2: two maxima -> 10 each
    want = np.array([[5, 0, 10], [10, 0, 10], [3, 0, 0]], dtype=float)
    assert np.array_equal(normalise(raw), want)
    assert np.array_equal(normalise(raw, b=7), np.where(want > 7, want, 0))
    # the 1e-7 guard: a column whose max is tiny is not scaled up to 10
    assert normalise(np.array([[1e-8]]))[0, 0] == 1.0  # ceil(10 * 1e-8 / 1.1e-7) = ceil(0.909)


@pytest.mark.parametrize("k", [1, 2, 3, 5, 16])
def test_k_equal_entries_give_k_to_the_three_quarters(k):
    row = np.zeros((1, 20))
    row[0, :k] = 8.0
    assert density(row)[0] == pytest.approx(k ** 0.75, rel=1e-6)
    assert density(row, p=2)[0] == pytest.approx(k ** 0.5, rel=1e-6)


def test_all_zero_row_has_zero_density_and_mixed_rows_by_hand():
    scaled = np.array([[0, 0, 0], [10, 5, 0]], dtype=float)
    l1, l4 = 15.0, (10 ** 4 + 5 ** 4) ** 0.25
    assert np.allclose(density(scaled), [0.0, l1 / (l4 + 1e-7)])


def test_prompt_score_by_hand():
    dens = np.array([2.0, 1.0, 0.0, 4.0])
    instr = np.array([True, True, False, False])
    # a~ = [0.5, 0.25, 0, 1] (max 4); instruction sum 0.75; log2(2 + 2) = 2
    assert prompt_score(dens, instr, n_response=3) == pytest.approx(0.375, rel=1e-8)
    assert np.allclose(normalised_density(dens), dens / (4 + 1e-9))


def test_empty_response_scores_zero_and_no_instruction_is_nan():
    assert prompt_score(np.zeros(3), np.array([True, False, False]), n_response=0) == 0.0
    assert np.isnan(prompt_score(np.array([1.0, 2.0]), np.array([False, False]), n_response=4))
    assert score_matrix(np.zeros((3, 0)), np.array([True, False, False])) == 0.0


def test_threshold_never_normalises_again():
    """The authors' matrices are normalised already; some columns peak below 10 (the max sat on a token
    they dropped). Re-thresholding must keep those values, not rescale the column to 10."""
    stored = np.array([[8.0, 10.0],
                       [5.0, 9.0],
                       [0.0, 2.0]])
    assert np.array_equal(threshold(stored, 7), [[8, 10], [0, 9], [0, 0]])
    assert not np.array_equal(normalise(stored, 7), threshold(stored, 7))  # normalising would turn 8 into 10
    instr = np.array([True, False, False])
    dens = density(threshold(stored, 7))
    assert score_matrix(stored, instr, b=7) == pytest.approx(dens[0] / (dens.max() + 1e-9) / np.log2(3))


def test_decile_profile_by_hand():
    dens = np.arange(20, dtype=float)           # a~_n = n / 19: tokens 2i and 2i+1 fall in bin i
    prof = decile_profile(dens)
    want = np.array([(2 * i + 2 * i + 1) / 2 / (19 + 1e-9) for i in range(10)])
    assert np.allclose(prof, want)
    short = decile_profile(np.array([1.0, 2.0, 4.0]))  # 3 tokens: bins 0, 3, 6; others empty
    assert np.allclose(short[[0, 3, 6]], np.array([1, 2, 4]) / (4 + 1e-9))
    assert np.isnan(short[[1, 2, 4, 5, 7, 8, 9]]).all()


def test_bad_shapes_fail_clearly():
    with pytest.raises(ValueError, match="attribution matrix"):
        density(np.zeros(3))
    with pytest.raises(ValueError, match="instruction mask"):
        prompt_score(np.zeros(3), np.zeros(2, dtype=bool), 1)
    with pytest.raises(ValueError, match="p must be > 1"):
        density(np.zeros((2, 2)), p=1)
