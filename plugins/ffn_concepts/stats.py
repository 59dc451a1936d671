"""Base-vs-tuned statistics of method C: concept distributions with t-tests, and the rotation itself.

Distributions (the paper's): per model and seed, among *explainable* directions (annotated ok and not
"cannot tell"), the share whose tasks contain ``writing`` / ``math`` / ``coding`` / ``translation`` /
``none`` (substring match, so ``writing`` pools daily, literary and professional writing), and the share
at each linguistic level; per group of ``group_size`` layers and over all layers (group ``"all"``).
Base vs tuned: Student's t-test (equal variances) over the seed shares, ``scipy.stats.ttest_ind(tuned, base)``.

Rotation (what the paper never measured), per layer, between the first k directions of each model, ``A``
(base) and ``B`` (tuned), rows orthonormal ``[k, d]``:

- k is capped well below the width (:func:`compared_directions`): at most ``d // 4`` unless asked for.
  Two k-dim subspaces of R^d with ``2k > d`` share at least ``2k - d`` dimensions by counting alone, so
  that many angles are 0 whatever tuning did; at ``k = d`` every angle is 0 (the comparison is vacuous,
  and asking for it warns). At ``k <= d/4`` random subspaces are still far apart (mean angle ~60 deg).
- principal angles between the two k-dimensional subspaces: ``cos theta_i = sigma_i(A B^T)``; small
  angles are taken from the sines (``sigma(B - B A^T A)``) where they are accurate (Bjorck & Golub 1973).
- a chance baseline beside every angle (:func:`chance_angles`): the i-th principal angle between random
  subspaces of the same sizes, averaged over seeded draws; also ``chance_cos2 = k/d``, the exact mean of
  ``cos^2`` for random subspaces, and the chance best-match ``|cos|``.
- for each base direction, the best-matching tuned direction by ``|cos|`` (among the k compared) and the
  Jaccard overlap of their top words.
"""
from __future__ import annotations

import functools
import warnings
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from scipy import stats as sps

from tuneshift.plugins.ffn_concepts.prompts import CANNOT_TELL, LEVELS

TASK_CATEGORIES = ("writing", "math", "coding", "translation", "none")
ALL = "all"


def group_label(layer: np.ndarray | pd.Series, group_size: int) -> np.ndarray:
    """``"0-3"``, ``"4-7"`` ... for each layer index."""
    layer = np.asarray(layer)
    lo = layer // group_size * group_size
    return np.char.add(np.char.add(lo.astype(str), "-"), (lo + group_size - 1).astype(str))


def explainable(ann: pd.DataFrame) -> pd.Series:
    return (ann["status"] == "ok") & (ann["concept"] != CANNOT_TELL)


def shares(ann: pd.DataFrame, group_size: int) -> pd.DataFrame:
    """Task and level shares per (model, seed, group) from the long annotation table.

    ``ann`` columns: model, layer, rank, seed, concept, tasks (``"; "``-joined), level, status.
    Returns rows (model, seed, group, kind ∈ {task, level}, category, share, n_explainable, n_directions).
    """
    df = ann.copy()
    df["explainable"] = explainable(df)
    df["group"] = group_label(df["layer"], group_size)
    both = pd.concat([df, df.assign(group=ALL)], ignore_index=True)
    keys = ["model", "seed", "group"]
    counts = both.groupby(keys).agg(n_directions=("rank", "size"), n_explainable=("explainable", "sum"))
    ex = both[both["explainable"]]
    tasks = ex["tasks"].fillna("")
    indicators = {("task", c): tasks.str.contains(c, regex=False) for c in TASK_CATEGORIES}
    indicators |= {("level", lv): ex["level"] == lv for lv in LEVELS}
    parts = []
    for (kind, cat), hit in indicators.items():
        s = hit.groupby([ex[k] for k in keys]).mean().rename("share")
        part = counts.join(s).reset_index()
        part["share"] = part["share"].fillna(0.0)  # no explainable direction: share 0
        part["kind"], part["category"] = kind, cat
        parts.append(part)
    out = pd.concat(parts, ignore_index=True)
    return out[["model", "seed", "group", "kind", "category", "share", "n_explainable", "n_directions"]]


def student_t(base: Sequence[float], tuned: Sequence[float]) -> tuple[float, float]:
    """Student's two-sided t-test (equal variances), ``t > 0`` when tuned is higher; NaN when undefined."""
    base, tuned = np.asarray(base, float), np.asarray(tuned, float)
    if len(base) < 2 or len(tuned) < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = sps.ttest_ind(tuned, base, equal_var=True)
    return float(res.statistic), float(res.pvalue)


def ttests(share_table: pd.DataFrame, base: str, tuned: str) -> pd.DataFrame:
    """One row per (kind, group, category): means and stds over seeds, t and p (Student, tuned vs base)."""
    rows = []
    sub = share_table[share_table["model"].isin([base, tuned])]
    for (kind, group, cat), g in sub.groupby(["kind", "group", "category"], sort=False):
        b = g.loc[g["model"] == base].sort_values("seed")["share"].to_numpy()
        t = g.loc[g["model"] == tuned].sort_values("seed")["share"].to_numpy()
        stat, p = student_t(b, t)
        rows.append(dict(kind=kind, group=group, category=cat, base_mean=b.mean() if len(b) else np.nan,
                         base_std=b.std(ddof=1) if len(b) > 1 else np.nan,
                         tuned_mean=t.mean() if len(t) else np.nan,
                         tuned_std=t.std(ddof=1) if len(t) > 1 else np.nan,
                         n_seeds_base=len(b), n_seeds_tuned=len(t), t=stat, p=p))
    return pd.DataFrame(rows)


# ---- rotation ---------------------------------------------------------------------------------------------------
ROTATION_WIDTH_SHARE = 4   # by default at most d // 4 directions are compared
CHANCE_DRAWS = 64          # random subspace pairs behind each chance baseline


class VacuousRotationWarning(UserWarning):
    """The compared subspaces are so wide that principal angles are small by dimension count alone."""


def compared_directions(available: int, d_model: int, requested: int = 0) -> int:
    """How many leading directions the rotation compares: ``requested`` (capped at ``available``) or, when
    ``requested`` is 0, ``min(available, max(1, d_model // 4))``.

    Warns (:class:`VacuousRotationWarning`) when ``2k > d_model``: then at least ``2k - d_model`` principal
    angles are 0 for any two subspaces, and at ``k = d_model`` all of them.
    """
    if requested < 0:
        raise ValueError(f"ffn_concepts.rotation_directions must be >= 0 (0: the d/4 rule), got {requested}")
    k = min(available, requested) if requested else min(available, max(1, d_model // ROTATION_WIDTH_SHARE))
    if 2 * k > d_model:
        forced = 2 * k - d_model
        warnings.warn(
            f"ffn_concepts compares {k} directions of a {d_model}-dim model: any two {k}-dim subspaces share "
            f"at least {forced} dimensions, so {forced} of the {k} principal angles are 0 whatever tuning did"
            + (" (all of them: the comparison is vacuous)" if k >= d_model else "")
            + f"; compare at most {d_model // 2} (the default rule takes d/4 = {max(1, d_model // 4)}: set "
            "rotation_directions: 0)", VacuousRotationWarning, stacklevel=2)
    return k


@functools.lru_cache(maxsize=32)
def _chance(ra: int, rb: int, d: int, draws: int, seed: int) -> tuple[np.ndarray, float]:
    gen = torch.Generator().manual_seed(seed)
    angles, best = [], []
    for _ in range(draws):
        a = torch.linalg.qr(torch.randn(d, ra, generator=gen, dtype=torch.float64))[0].T   # [ra, d]
        b = torch.linalg.qr(torch.randn(d, rb, generator=gen, dtype=torch.float64))[0].T   # [rb, d]
        angles.append(principal_angles(a, b).numpy())
        best.append(float((a @ b.T).abs().max(dim=1).values.mean()))
    return np.mean(angles, axis=0), float(np.mean(best))


def chance_angles(ra: int, rb: int, d: int, draws: int = CHANCE_DRAWS, seed: int = 0) -> tuple[np.ndarray, float]:
    """Chance baselines for subspaces of dims ``ra`` and ``rb`` in R^d: the mean (over ``draws`` seeded pairs
    of uniformly random subspaces) of each principal angle, ascending ``[min(ra, rb)]`` degrees, and of the
    mean best-match ``|cos|`` of a basis vector of the first with the basis of the second."""
    angles, best = _chance(ra, rb, d, draws, seed)
    return angles.copy(), best


def principal_angles(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Principal angles in degrees, ascending ``[min(Ra, Rb)]``, between the row spaces of ``a`` ``[Ra, d]``
    and ``b`` ``[Rb, d]`` (rows orthonormal). Computed in float64, accurate at both ends (float32 rows: ~1e-5 deg)."""
    a, b = a.double(), b.double()
    if a.shape[0] > b.shape[0]:
        a, b = b, a
    cos = torch.linalg.svdvals(a @ b.T).clamp(0, 1)  # descending -> angles ascending
    sin = torch.linalg.svdvals(a - (a @ b.T) @ b).flip(0).clamp(0, 1)  # ascending
    angle = torch.where(cos > 2 ** -0.5, torch.arcsin(sin[: cos.shape[0]]), torch.arccos(cos))
    return torch.rad2deg(angle)


def best_match(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For each row of ``a`` ``[Ra, d]``, the index ``[Ra]`` of the row of ``b`` with the largest ``|cos|``
    and that ``|cos|`` ``[Ra]`` (rows unit-norm)."""
    sim = (a.float() @ b.float().T).abs()  # [Ra, Rb]
    value, index = sim.max(dim=1)
    return index, value


def jaccard_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Jaccard overlap ``[R]`` of integer id sets ``a`` ``[R, k]`` and ``b`` ``[R, k2]``.

    Ids must be unique within a row (top-k indices are)."""
    inter = (a[:, :, None] == b[:, None, :]).any(-1).sum(-1)
    return inter / (a.shape[1] + b.shape[1] - inter)


def word_ids(*word_arrays: np.ndarray) -> list[np.ndarray]:
    """Map string arrays (any shapes) to shared integer ids, so word sets of two models compare by string."""
    flat = np.concatenate([w.ravel() for w in word_arrays])
    _, inverse = np.unique(flat, return_inverse=True)
    out, start = [], 0
    for w in word_arrays:
        out.append(inverse[start:start + w.size].reshape(w.shape))
        start += w.size
    return out


def rotation_layer(a: torch.Tensor, b: torch.Tensor, words_a: np.ndarray, words_b: np.ndarray
                   ) -> tuple[pd.DataFrame, dict]:
    """Per-direction rotation table and per-layer summary for one layer, each angle beside its chance value.

    Args:
        a, b: ``[k, d]`` base and tuned directions compared (rows orthonormal; cap them with
            :func:`compared_directions` first).
        words_a, words_b: ``[k, n]`` top words (strings) of each direction.
    """
    angles = principal_angles(a, b).numpy()
    chance, chance_best = chance_angles(a.shape[0], b.shape[0], a.shape[1])
    idx, cos = best_match(a, b)
    idx, cos = idx.numpy(), cos.numpy()
    ida, idb = word_ids(words_a, words_b)
    jac = jaccard_rows(ida, idb[idx])
    same_rank = (a.float() * b.float()).sum(1).abs().numpy() if a.shape == b.shape else np.full(len(idx), np.nan)
    r = len(idx)
    pad = lambda v: np.pad(v, (0, r - len(v)), constant_values=np.nan)  # noqa: E731
    table = pd.DataFrame({"rank": np.arange(r), "principal_angle_deg": pad(angles), "chance_angle_deg": pad(chance),
                          "best_tuned_rank": idx, "best_abs_cos": cos, "same_rank_abs_cos": same_rank,
                          "top_words_jaccard": jac})
    cos2 = np.cos(np.deg2rad(angles)) ** 2
    summary = dict(n_directions=r, d_model=a.shape[1],
                   mean_angle_deg=float(angles.mean()), chance_mean_angle_deg=float(chance.mean()),
                   median_angle_deg=float(np.median(angles)), chance_median_angle_deg=float(np.median(chance)),
                   max_angle_deg=float(angles.max()), chance_max_angle_deg=float(chance.max()),
                   mean_cos2=float(cos2.mean()), chance_cos2=min(1.0, max(a.shape[0], b.shape[0]) / a.shape[1]),
                   mean_best_abs_cos=float(cos.mean()), chance_best_abs_cos=chance_best,
                   mean_same_rank_abs_cos=float(np.nanmean(same_rank)),
                   mean_top_words_jaccard=float(jac.mean()),
                   share_matched_same_rank=float((idx == np.arange(r)).mean()))
    return table, summary


def explainable_shares(share_table: pd.DataFrame, group: str = ALL) -> pd.DataFrame:
    """Per (model, seed): the share of annotated directions that are explainable, in layer group ``group``
    (rows model, seed, share; from the ``n_explainable`` / ``n_directions`` counts of :func:`shares`)."""
    sub = share_table[share_table["group"] == group].drop_duplicates(["model", "seed"])
    return sub.assign(share=sub["n_explainable"] / sub["n_directions"])[["model", "seed", "share"]]


def explainable_ttest(share_table: pd.DataFrame, base: str, tuned: str, group: str = ALL) -> dict:
    """The explainable share, base vs tuned: means and stds over seeds, Student's t and p (as :func:`ttests`)."""
    ex = explainable_shares(share_table, group)
    b = ex.loc[ex["model"] == base].sort_values("seed")["share"].to_numpy()
    t = ex.loc[ex["model"] == tuned].sort_values("seed")["share"].to_numpy()
    stat, p = student_t(b, t)
    return dict(base_mean=b.mean() if len(b) else np.nan, base_std=b.std(ddof=1) if len(b) > 1 else np.nan,
                tuned_mean=t.mean() if len(t) else np.nan, tuned_std=t.std(ddof=1) if len(t) > 1 else np.nan,
                n_seeds_base=len(b), n_seeds_tuned=len(t), t=stat, p=p)
