"""Method C statistics: principal angles on hand-worked cases, matching, Jaccard, shares, Student t-tests."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from tuneshift.plugins.ffn_concepts.stats import (ALL, VacuousRotationWarning, best_match, chance_angles,
                                                  compared_directions, group_label, jaccard_rows, principal_angles,
                                                  rotation_layer, shares, student_t, ttests, word_ids)

E = torch.eye(6)


def test_identical_subspaces_give_zero_angles_whatever_the_basis():
    a = E[:3]
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))
    b = q @ a  # another orthonormal basis of the same subspace
    assert torch.allclose(principal_angles(a, b), torch.zeros(3, dtype=torch.float64), atol=1e-4)  # float32 basis


def test_orthogonal_subspaces_give_ninety_degrees():
    assert torch.allclose(principal_angles(E[:3], E[3:]), torch.full((3,), 90.0, dtype=torch.float64))


@pytest.mark.parametrize("theta", [1e-3, 0.5, 30.0, 60.0, 89.0])
def test_known_rotation(theta):
    """span(e0, e1) vs span(cos t e0 + sin t e2, e1): angles (0, t), also for tiny t (taken from the sines)."""
    t = math.radians(theta)
    b = torch.stack([math.cos(t) * E[0] + math.sin(t) * E[2], E[1]])
    got = principal_angles(E[:2], b)
    assert torch.allclose(got, torch.tensor([0.0, theta], dtype=torch.float64), atol=1e-6)


def test_angles_with_different_ranks_and_hand_case():
    # span(e0) inside span(e0, e1): one angle, 0; span((e0+e1)/sqrt2) vs span(e0, e2): 45 degrees
    assert torch.allclose(principal_angles(E[:2], E[:1]), torch.zeros(1, dtype=torch.float64))
    v = ((E[0] + E[1]) / math.sqrt(2))[None]
    assert torch.allclose(principal_angles(v, torch.stack([E[0], E[2]])), torch.tensor([45.0], dtype=torch.float64))


def test_best_match_and_jaccard_on_hand_data():
    a = torch.stack([E[0], E[1], (E[2] + E[3]) / math.sqrt(2)])
    b = torch.stack([E[3], -E[0], E[1] * 0.6 + E[4] * 0.8])
    idx, cos = best_match(a, b)
    assert idx.tolist() == [1, 2, 0]
    assert torch.allclose(cos, torch.tensor([1.0, 0.6, 1 / math.sqrt(2)]))
    ja = np.array([[1, 2, 3], [4, 5, 6]])
    jb = np.array([[3, 2, 9], [7, 8, 9]])
    assert np.allclose(jaccard_rows(ja, jb), [2 / 4, 0.0])
    wa, wb = word_ids(np.array([["cat", "dog"]]), np.array([["dog", "emu"]]))
    assert wa[0, 1] == wb[0, 0] and wa[0, 0] != wb[0, 1]


def test_rotation_layer_of_a_model_with_itself_and_of_a_swap():
    a = E[:4]
    words = np.array([["a", "b"], ["c", "d"], ["e", "f"], ["g", "h"]])
    table, summary = rotation_layer(a, a, words, words)
    assert np.allclose(table["principal_angle_deg"], 0, atol=1e-6)
    assert (table["best_tuned_rank"] == np.arange(4)).all() and np.allclose(table["top_words_jaccard"], 1)
    swapped = a[[1, 0, 2, 3]]
    table, summary = rotation_layer(a, swapped, words, words[[1, 0, 2, 3]])
    assert table["best_tuned_rank"].tolist() == [1, 0, 2, 3]
    assert np.allclose(table["top_words_jaccard"], 1) and summary["share_matched_same_rank"] == 0.5
    assert summary["chance_cos2"] == pytest.approx(4 / 6) and summary["mean_cos2"] == pytest.approx(1.0)


def test_compared_directions_rule_and_warning(recwarn):
    assert compared_directions(300, 256) == 64                  # the d/4 cap
    assert compared_directions(300, 4096) == 300                # R itself when R < d/4
    assert compared_directions(8, 256, requested=100) == 8      # never more than were computed
    assert compared_directions(300, 3) == 1
    assert not recwarn.list
    with pytest.warns(VacuousRotationWarning, match="at least 88 dimensions.*88 of the 172"):
        compared_directions(300, 256, requested=172)
    with pytest.warns(VacuousRotationWarning, match="all of them: the comparison is vacuous"):
        compared_directions(300, 256, requested=256)
    with pytest.raises(ValueError, match="rotation_directions must be >= 0"):
        compared_directions(300, 256, requested=-1)


def test_chance_angles_by_hand():
    """Random lines: in the plane the angle is uniform on [0, 90] (mean 45 deg, E|cos| = 2/pi); in R^3 |cos|
    is uniform on [0, 1] (mean angle = 1 rad, E|cos| = 1/2)."""
    angle, best = chance_angles(1, 1, 2, draws=4000)
    assert angle[0] == pytest.approx(45.0, abs=1.5) and best == pytest.approx(2 / math.pi, abs=0.015)
    angle, best = chance_angles(1, 1, 3, draws=4000)
    assert angle[0] == pytest.approx(math.degrees(1.0), abs=1.5) and best == pytest.approx(0.5, abs=0.015)
    # two 5-dim subspaces of R^8 share >= 2 dimensions: the first two chance angles are 0, the rest are not
    angles, _ = chance_angles(5, 5, 8, draws=16)
    assert np.allclose(angles[:2], 0, atol=1e-5) and (angles[2:] > 5).all()
    assert (np.diff(angles) >= 0).all()


def test_rotation_layer_puts_chance_beside_every_angle():
    gen = torch.Generator().manual_seed(0)
    a = torch.linalg.qr(torch.randn(32, 4, generator=gen))[0].T
    b = torch.linalg.qr(torch.randn(32, 4, generator=gen))[0].T
    table, summary = rotation_layer(a, b, np.array([["w"]] * 4), np.array([["w"]] * 4))
    want, best = chance_angles(4, 4, 32)
    assert np.allclose(table["chance_angle_deg"], want)
    assert summary["chance_mean_angle_deg"] == pytest.approx(want.mean())
    assert summary["chance_max_angle_deg"] == pytest.approx(want.max())
    assert summary["chance_best_abs_cos"] == pytest.approx(best) and summary["chance_cos2"] == 4 / 32
    assert list(table.columns[1:3]) == ["principal_angle_deg", "chance_angle_deg"]


def test_student_t_matches_scipy_and_hand_value():
    base, tuned = [0.1, 0.2, 0.3], [0.3, 0.4, 0.5]
    t, p = student_t(base, tuned)
    # mean difference 0.2, pooled variance 0.01, standard error sqrt(0.01 * (1/3 + 1/3))
    assert t == pytest.approx(0.2 / math.sqrt(0.01 * 2 / 3))
    ref = sps.ttest_ind(tuned, base, equal_var=True)
    assert (t, p) == pytest.approx((ref.statistic, ref.pvalue))
    rng = np.random.default_rng(0)
    b, u = rng.random(5), rng.random(5) + 0.3
    assert student_t(b, u) == pytest.approx(tuple(sps.ttest_ind(u, b, equal_var=True)))
    assert all(math.isnan(x) for x in student_t([0.5], [0.2, 0.3]))


def _ann(model, seed, layer, concept, tasks, level, status="ok"):
    return dict(model=model, seed=seed, layer=layer, rank=0, concept=concept, tasks=tasks, level=level, status=status)


def test_shares_pool_writing_and_skip_unexplainable_rows():
    rows = [
        _ann("base", 0, 0, "poems", "literary writing", "semantics"),
        _ann("base", 0, 1, "emails", "daily writing; professional writing", "semantics"),
        _ann("base", 0, 2, "python", "coding", "syntax"),
        _ann("base", 0, 3, "cannot tell", "", ""),  # not explainable
        _ann("base", 0, 5, "", "", "", status="failed"),  # not explainable
        _ann("base", 0, 6, "numbers", "solving math problems", "semantics"),
    ]
    table = shares(pd.DataFrame(rows), group_size=4)
    def get(kind, group, cat):
        return table[(table["kind"] == kind) & (table["group"] == group) & (table["category"] == cat)].iloc[0]
    assert get("task", ALL, "writing")["share"] == pytest.approx(2 / 4)
    assert get("task", ALL, "coding")["share"] == pytest.approx(1 / 4)
    assert get("task", ALL, "math")["share"] == pytest.approx(1 / 4)
    assert get("task", ALL, "none")["share"] == 0
    assert get("task", ALL, "writing")["n_explainable"] == 4 and get("task", ALL, "writing")["n_directions"] == 6
    assert get("level", "0-3", "semantics")["share"] == pytest.approx(2 / 3)
    assert get("level", "4-7", "semantics")["share"] == pytest.approx(1.0)
    assert group_label(np.array([0, 3, 4, 9]), 4).tolist() == ["0-3", "0-3", "4-7", "8-11"]


def test_ttests_over_seed_shares():
    rows = []
    # per model, per seed: 4 directions of layer 0; 1 = serves writing
    for model, per_seed in (("base", [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 0, 0]]),
                            ("tuned", [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])):
        for seed, flags in enumerate(per_seed):
            for r, flag in enumerate(flags):
                rows.append(dict(model=model, seed=seed, layer=0, rank=r, concept="c",
                                 tasks="daily writing" if flag else "coding", level="semantics", status="ok"))
    table = ttests(shares(pd.DataFrame(rows), 4), "base", "tuned")
    row = table[(table["category"] == "writing") & (table["group"] == ALL)].iloc[0]
    base, tuned = [0.25, 0.5, 0.25], [0.75, 0.5, 1.0]
    ref = sps.ttest_ind(tuned, base, equal_var=True)
    assert row["base_mean"] == pytest.approx(np.mean(base)) and row["tuned_mean"] == pytest.approx(np.mean(tuned))
    assert (row["t"], row["p"]) == pytest.approx((ref.statistic, ref.pvalue))
    assert row["n_seeds_base"] == 3
