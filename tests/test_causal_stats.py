"""Statistics and matched controls of the causal plugin against scipy, enumeration and hand-worked examples."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from scipy import stats as sps

from tuneshift.plugins.causal.controls import (matched_direction_sets, matched_head_sets, random_token_sets,
                                               rank_matched_direction_sets)
from tuneshift.plugins.causal.stats import (bootstrap_indices, bootstrap_weights, control_test, recovery_test,
                                            sign_flip_p)


def test_set_level_permutation_p_on_a_hand_worked_example():
    s0 = np.ones(4)
    selected = np.array([0.0, 0.0, 1.0, 1.0])                 # drop 0.5
    controls = np.array([[1, 1, 1, 1], [0, 1, 1, 1], [0, 0, 0, 1.0]])  # drops 0, 0.25, 0.75
    out = control_test(s0, selected, controls, n_boot=500)
    assert out["drop_selected"] == 0.5 and out["drop_control"] == pytest.approx(1 / 3)
    assert out["difference"] == pytest.approx(0.5 - 1 / 3)
    assert out["p_permutation"] == pytest.approx((1 + 1) / (1 + 3))  # one draw (0.75) at least as large
    assert out["p_floor"] == 0.25 and out["p_test"] == "sets"
    tie = control_test(s0, selected, np.array([[0, 0, 1, 1.0]]), n_boot=200)  # a single control: item sign flips
    assert tie["p_test"] == "items" and tie["p_permutation"] == pytest.approx(1.0)


def test_bootstrap_interval_of_the_selected_drop_matches_scipy():
    rng = np.random.default_rng(1)
    s0, sel = rng.random(120), rng.random(120) * 0.6
    ours = control_test(s0, sel, rng.random((5, 120)), n_boot=20000, seed=3)["drop_selected_ci"]
    ref = sps.bootstrap(((s0 - sel),), np.mean, n_resamples=20000, method="percentile", random_state=4)
    assert ours[0] == pytest.approx(ref.confidence_interval.low, abs=0.01)
    assert ours[1] == pytest.approx(ref.confidence_interval.high, abs=0.01)


def test_control_interval_covers_the_spread_of_draws():
    """With identical items but very different draws, the control interval comes from resampling draws."""
    s0 = np.ones(10)
    controls = np.repeat(np.linspace(0, 1, 20)[:, None], 10, axis=1)  # draw d: every item scores d / 19
    out = control_test(s0, np.zeros(10), controls, n_boot=4000)
    drops = 1 - np.linspace(0, 1, 20)
    se = drops.std(ddof=0) / math.sqrt(20)
    assert out["drop_control"] == pytest.approx(0.5)
    assert out["drop_control_ci"][1] - out["drop_control_ci"][0] == pytest.approx(2 * 1.96 * se, rel=0.15)


def test_stratified_resampling_keeps_each_stratum_size():
    strata = np.array(["a"] * 3 + ["b"] * 5)
    idx = bootstrap_indices(strata, 8, 200, np.random.default_rng(0))
    assert idx.shape == (200, 8)
    assert np.isin(idx[:, :3], [0, 1, 2]).all() and np.isin(idx[:, 3:], [3, 4, 5, 6, 7]).all()
    weights = bootstrap_weights(strata, 8, 200, np.random.default_rng(0))
    x = np.arange(8.0)
    np.testing.assert_allclose(weights @ x, x[idx].mean(1))


def test_sign_flip_p_equals_scipy_exact_permutation_test():
    diff = np.array([0.3, -0.1, 0.5, 0.2, 0.0, 0.4, -0.2, 0.25])
    ref = sps.permutation_test((diff,), np.mean, permutation_type="samples", alternative="greater",
                               n_resamples=np.inf).pvalue
    assert sign_flip_p(diff, n_perm=10000) == pytest.approx(ref)
    assert sign_flip_p(np.r_[diff, diff, diff], n_perm=20000, seed=1) == pytest.approx(
        sps.permutation_test((np.r_[diff, diff, diff],), np.mean, permutation_type="samples", alternative="greater",
                             n_resamples=20000, random_state=2).pvalue, abs=0.01)


def test_recovery_is_the_share_of_the_gap_closed():
    s_from, s_to = np.zeros(6), np.ones(6)
    s_patch = np.array([1, 1, 0, 0, 1, 0.0])
    out = recovery_test(s_from, s_to, s_patch, n_boot=1000)
    assert out["recovery"] == pytest.approx(0.5) and out["gap"] == 1.0
    assert out["p_permutation"] == pytest.approx(1 / 8)  # exact: 3 positive items out of 6, flips of 2^3 only matter
    down = recovery_test(s_to, s_from, 1 - s_patch, n_boot=500)  # a negative gap: moving down is recovering
    assert down["recovery"] == pytest.approx(0.5) and down["p_permutation"] == pytest.approx(1 / 8)


def test_matched_head_sets_keep_layers_and_enumerate_small_spaces():
    heads = [(layer, h) for layer in range(4) for h in range(4)]
    rng = np.random.default_rng(0)
    sets, exact = matched_head_sets([(2, 3)], heads, 39, rng)
    assert exact and sorted(sets) == sorted(frozenset({(2, h)}) for h in range(3))
    sets, exact = matched_head_sets([(2, 3), (0, 1)], heads, 39, rng)
    assert exact and len(sets) == 15 and all(sorted(x[0] for x in s) == [0, 2] for s in sets)
    selected = [(0, 1), (0, 3), (2, 3), (3, 3)]
    sets, exact = matched_head_sets(selected, heads, 39, rng)
    assert not exact and len(sets) == 39
    assert all(sorted(x[0] for x in s) == [0, 0, 2, 3] for s in sets)
    assert len(set(sets)) > 20  # 6 * 4 * 4 = 96 sets: mostly distinct draws
    free, _ = matched_head_sets(selected, heads, 50, rng, match_layers=False)
    assert any(sorted(x[0] for x in s) != [0, 0, 2, 3] for s in free) and all(len(s) == 4 for s in free)


def test_matched_direction_and_token_draws():
    pool = [(layer, r) for layer in range(3) for r in range(10)]
    sets, exact = matched_direction_sets([(0, 1), (0, 2), (2, 5)], pool, 30, np.random.default_rng(0))
    assert not exact and all(sorted(u[0] for u in s) == [0, 0, 2] for s in sets)
    n_space = math.comb(10, 2) * 10
    assert n_space > 30
    draws = random_token_sets([[3, 4, 5], [7], []], [2, 1, 0], 5, np.random.default_rng(0))
    assert len(draws) == 5 and all(len(d[0]) == 2 and set(d[0]) <= {3, 4, 5} and d[1] == [7] and d[2] == []
                                   for d in draws)
    every = {tuple(d[0]) for d in random_token_sets([[3, 4, 5]], [2], 200, np.random.default_rng(1))}
    assert every == set(itertools.combinations([3, 4, 5], 2))


def test_rank_matched_directions_stay_near_each_selected_rank_in_its_layer():
    pool = [(layer, r) for layer in range(2) for r in range(40)]
    selected = [(0, 30), (0, 31), (1, 5)]
    draws = rank_matched_direction_sets(selected, pool, 200, np.random.default_rng(0), window=3)
    for d in draws:
        assert len(d) == 3
        layer0 = sorted(r for layer, r in d if layer == 0)
        layer1 = [r for layer, r in d if layer == 1]
        assert len(layer0) == 2 and all(27 <= r <= 34 for r in layer0) and len(layer1) == 1 and 2 <= layer1[0] <= 8
    assert len({frozenset(d) for d in draws}) > 50
