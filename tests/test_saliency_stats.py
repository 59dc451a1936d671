"""plugins/saliency/stats.py: Welch tests against scipy and the textbook formula; Tables 1 and 2 on hand data."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from tuneshift.plugins.saliency.stats import decile_table, table1, table2, welch_less


def _welch_by_formula(x, y) -> float:
    """One-sided p (mean x < mean y) from Welch's t and the Welch-Satterthwaite degrees of freedom."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    vx, vy = x.var(ddof=1) / x.size, y.var(ddof=1) / y.size
    t = (x.mean() - y.mean()) / math.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (x.size - 1) + vy ** 2 / (y.size - 1))
    return float(sps.t.cdf(t, df))


def test_welch_less_matches_scipy_and_formula():
    x, y = [0.1, 0.4, 0.35, 0.2, 0.3], [0.5, 0.9, 0.45, 0.7]
    p = welch_less(x, y)
    assert p == pytest.approx(sps.ttest_ind(x, y, equal_var=False, alternative="less").pvalue, rel=1e-12)
    assert p == pytest.approx(_welch_by_formula(x, y), rel=1e-9)
    assert p < 0.05 and welch_less(y, x) > 0.95  # direction matters
    assert math.isnan(welch_less([1.0], [1.0, 2.0]))


def _scores():
    return pd.DataFrame({
        "id": ["a1", "a2", "a3", "a4", "a5", "a6", "b1", "b2", "b3", "b4"],
        "split": ["lima"] * 6 + ["mtbench"] * 4,
        "score": [0.9, 0.8, 0.7, 0.2, 0.3, np.nan, 0.5, 0.6, 0.1, 0.4],
        "n_response": [10, 10, 10, 10, 3, 10, 10, 10, 10, 10],
    })


def test_table1_by_hand():
    ratings = pd.DataFrame({"id": ["a1", "a2", "a3", "a4", "a5", "a6", "b1", "b2", "b3", "b4"],
                            "rating": [4, 2, 3, 1, 1, 1, 2, -1, 1, 1]})
    got = table1(_scores(), ratings)
    # lima: followed a1 a2 a3; not followed a4 (a5 too short, a6 no score)
    assert got["lima"]["n_followed"] == 3 and got["lima"]["n_unfollowed"] == 1
    assert got["lima"]["followed_mean"] == pytest.approx(0.8)
    assert got["lima"]["unfollowed_mean"] == pytest.approx(0.2)
    assert math.isnan(got["lima"]["p"])  # one unfollowed prompt: no variance, no test
    # mtbench: followed b1; b2 unrated; not followed b3 b4
    assert (got["mtbench"]["n_followed"], got["mtbench"]["n_unfollowed"]) == (1, 2)
    assert got["mtbench"]["unfollowed_mean"] == pytest.approx(0.25)


def test_table2_by_hand():
    base = _scores()
    tuned = base.assign(score=base["score"] + np.array([0.1, 0.3, 0.2, 0.0, 0.1, 0.1, 0.2, 0.1, 0.3, 0.2]))
    got = table2(base, tuned)
    lima_b = [0.9, 0.8, 0.7, 0.2, 0.3]  # a6 has no score on either side
    lima_t = [1.0, 1.1, 0.9, 0.2, 0.4]
    assert got["lima"]["n"] == 5
    assert got["lima"]["base_mean"] == pytest.approx(np.mean(lima_b))
    assert got["lima"]["tuned_mean"] == pytest.approx(np.mean(lima_t))
    assert got["lima"]["p"] == pytest.approx(
        sps.ttest_ind(lima_b, lima_t, equal_var=False, alternative="less").pvalue)
    assert got["mtbench"]["n"] == 4


def test_decile_table_averages_over_prompts_with_a_token_in_the_bin():
    rows = np.array([[1.0, np.nan, 0.5], [0.0, 0.4, np.nan]])
    got = decile_table({"base": rows})
    assert list(got["decile"]) == [1, 2, 3]
    assert np.allclose(got["base"], [0.5, 0.4, 0.5])
