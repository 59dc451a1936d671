"""The paper's statistics over prompt scores (methods.md A.6, A.7): Tables 1 and 2, density deciles.

Inputs are plain pandas DataFrames with one row per (model, prompt):

    scores   columns ``id``, ``split``, ``score`` (NaN: no score, left out), ``n_response``
    ratings  columns ``id``, ``rating`` (>= 2 followed, 1 not followed, anything else unrated)

Table 1 compares, for one model (the tuned one in the paper), prompts whose response was rated followed
against not followed; Table 2 compares base and tuned on the same prompts. Both use Welch's t-test,
one-sided with the alternative that the first group's mean is smaller (scipy ``ttest_ind(equal_var=False,
alternative="less")``), per dataset split.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
from scipy import stats as sps

FOLLOWED_MIN_RATING = 2
NOT_FOLLOWED_RATING = 1
MIN_OUTPUT_TOKENS = 5  # Table 1 drops outputs shorter than this


def welch_less(smaller: Iterable[float], larger: Iterable[float]) -> float:
    """p-value of Welch's t-test that ``mean(smaller) < mean(larger)``; NaN when a group has < 2 values."""
    x = np.asarray(list(smaller), dtype=np.float64)
    y = np.asarray(list(larger), dtype=np.float64)
    if x.size < 2 or y.size < 2:
        return float("nan")
    return float(sps.ttest_ind(x, y, equal_var=False, alternative="less").pvalue)


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def table1(scores: pd.DataFrame, ratings: pd.DataFrame, min_output_tokens: int = MIN_OUTPUT_TOKENS) -> dict:
    """Followed vs not followed, per split: ``{split: {followed_mean, unfollowed_mean, n_followed,
    n_unfollowed, p}}`` with p from :func:`welch_less` (unfollowed < followed).

    Unrated prompts (rating not 1 and not >= 2), outputs shorter than ``min_output_tokens`` and prompts
    without a score (NaN) are left out.
    """
    merged = scores.merge(ratings[["id", "rating"]], on="id", how="inner")
    merged = merged[(merged["n_response"] >= min_output_tokens) & merged["score"].notna()]
    followed = merged["rating"] >= FOLLOWED_MIN_RATING
    unfollowed = merged["rating"] == NOT_FOLLOWED_RATING
    out = {}
    for split in sorted(merged["split"].unique()):
        in_split = merged["split"] == split
        yes = merged.loc[in_split & followed, "score"].to_numpy()
        no = merged.loc[in_split & unfollowed, "score"].to_numpy()
        out[split] = {"followed_mean": _mean(yes), "unfollowed_mean": _mean(no), "n_followed": int(len(yes)),
                      "n_unfollowed": int(len(no)), "p": welch_less(no, yes)}
    return out


def table2(base: pd.DataFrame, tuned: pd.DataFrame) -> dict:
    """Base vs tuned on the prompts both scored, per split: ``{split: {base_mean, tuned_mean, n, p}}`` with p
    from :func:`welch_less` (base < tuned); ``n`` counts prompts (the same ones on both sides)."""
    both = base[["id", "split", "score"]].merge(tuned[["id", "score"]], on="id", suffixes=("_base", "_tuned"))
    both = both[both["score_base"].notna() & both["score_tuned"].notna()]
    out = {}
    for split in sorted(both["split"].unique()):
        rows = both[both["split"] == split]
        b, t = rows["score_base"].to_numpy(), rows["score_tuned"].to_numpy()
        out[split] = {"base_mean": _mean(b), "tuned_mean": _mean(t), "n": int(len(rows)), "p": welch_less(b, t)}
    return out


def decile_table(profiles: dict[str, np.ndarray]) -> pd.DataFrame:
    """Mean normalised density per relative-position decile (A.7), one column per model.

    ``profiles[model]`` is ``[n_prompts, bins]`` (rows from :func:`tuneshift.plugins.saliency.density.decile_profile`);
    each bin averages over the prompts that have a token in it. Returns columns ``decile`` and one per model.
    """
    frame = {}
    for model, rows in profiles.items():
        rows = np.asarray(rows, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            counts = np.sum(~np.isnan(rows), axis=0)
            sums = np.nansum(rows, axis=0)
            frame[model] = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    bins = len(next(iter(frame.values()))) if frame else 10
    return pd.DataFrame({"decile": np.arange(1, bins + 1), **frame})


__all__ = ["decile_table", "table1", "table2", "welch_less"]
