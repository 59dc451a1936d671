"""Token distribution shift statistics (methods.md D.1) from the per-position table of a pair.

The table (``positions.parquet`` of the comparison) has one row per scored position of the shared response:
``id, category, m, n_response, is_stop, token_id, token, is_format, rank_base, p_base, p_tuned, kl_tb, kl_bt``.
Everything here is pandas/scipy over that table, so the tests check it against hand-made tables.
"""
from __future__ import annotations

import unicodedata

import numpy as np
import pandas as pd
from scipy import stats

CLASSES = ("unshifted", "marginal", "shifted")


def classify(rank: np.ndarray, marginal_max_rank: int = 3) -> np.ndarray:
    """AlignTDS classes: rank 1 unshifted, 2..``marginal_max_rank`` marginal, above shifted."""
    rank = np.asarray(rank)
    return np.where(rank <= 1, "unshifted", np.where(rank <= marginal_max_rank, "marginal", "shifted"))


def is_format_token(text: str, special: bool = False) -> bool:
    """Formatting rather than content: white space or line breaks, punctuation or symbols only, or a special token.

    These carry an answer's layout (line breaks of a list, the colon after a label, the stop token), which
    AlignTDS found alignment changes most; letters or digits anywhere make a token content.
    """
    if special:
        return True
    stripped = text.strip()
    if not stripped:
        return True
    return all(unicodedata.category(ch)[0] in "PSZ" for ch in stripped)


def relative_position(m: np.ndarray, n_response: np.ndarray) -> np.ndarray:
    """``m / M`` in [0, 1] (0: the first response token; the stop token at ``m = M`` gives 1)."""
    return np.asarray(m, dtype=float) / np.maximum(np.asarray(n_response, dtype=float), 1.0)


def shares(table: pd.DataFrame) -> dict[str, float]:
    """Share of each class over the rows of ``table`` (NaN for an empty table)."""
    n = len(table)
    return {c: (float((table["class"] == c).sum()) / n if n else float("nan")) for c in CLASSES}


def per_prompt(table: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt: counts, class shares and mean KL both ways."""
    rows = []
    for (pid, category), group in table.groupby(["id", "category"], sort=False):
        rows.append({"id": pid, "category": category, "n_positions": len(group),
                     **{f"share_{c}": v for c, v in shares(group).items()},
                     "mean_kl_tb": float(group["kl_tb"].mean()), "mean_kl_bt": float(group["kl_bt"].mean())})
    return pd.DataFrame(rows)


def by_relative_position(table: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """Class shares and mean KL(T||B) over ``bins`` equal bins of the relative position in the response."""
    rel = relative_position(table["m"], table["n_response"])
    index = np.minimum((rel * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        group = table[index == b]
        rows.append({"bin": b, "from": b / bins, "to": (b + 1) / bins, "n": len(group),
                     **{f"share_{c}": v for c, v in shares(group).items()},
                     "mean_kl_tb": float(group["kl_tb"].mean()) if len(group) else float("nan")})
    return pd.DataFrame(rows)


def by_absolute_position(table: pd.DataFrame, first: int = 10) -> pd.DataFrame:
    """Shifted share and mean KL at response positions 0..``first``-1 (stop tokens left out)."""
    rows = []
    content = table[~table["is_stop"]]
    for m in range(first):
        group = content[content["m"] == m]
        rows.append({"m": m, "n": len(group), "share_shifted": shares(group)["shifted"],
                     "mean_kl_tb": float(group["kl_tb"].mean()) if len(group) else float("nan")})
    return pd.DataFrame(rows)


def earliness(table: pd.DataFrame) -> dict[str, float]:
    """Do shifted positions come earlier? Median relative position of shifted vs other positions, one-sided
    Mann-Whitney U (shifted < other)."""
    rel = relative_position(table["m"], table["n_response"])
    shifted = table["class"].to_numpy() == "shifted"
    a, b = rel[shifted], rel[~shifted]
    if len(a) == 0 or len(b) == 0:
        return {"median_shifted": float("nan"), "median_other": float("nan"), "p": float("nan"), "n_shifted": len(a),
                "n_other": len(b)}
    test = stats.mannwhitneyu(a, b, alternative="less")
    return {"median_shifted": float(np.median(a)), "median_other": float(np.median(b)), "u": float(test.statistic),
            "p": float(test.pvalue), "n_shifted": int(len(a)), "n_other": int(len(b))}


def top_shifted_tokens(table: pd.DataFrame, n: int = 30) -> pd.DataFrame:
    """The tokens most often shifted: count shifted, count overall, their shifted share, whether formatting."""
    shifted = table[table["class"] == "shifted"]
    counts = shifted.groupby("token_id").size().rename("n_shifted")
    total = table.groupby("token_id").size().rename("n_total")
    first = table.drop_duplicates("token_id").set_index("token_id")[["token", "is_format"]]
    out = pd.concat([counts, total], axis=1).dropna().join(first)
    out["n_shifted"] = out["n_shifted"].astype(int)
    out["share_shifted"] = out["n_shifted"] / out["n_total"]
    out = out.reset_index().sort_values(["n_shifted", "token_id"], ascending=[False, True])
    return out.head(n).reset_index(drop=True)


def format_enrichment(table: pd.DataFrame) -> dict[str, float]:
    """Are shifted positions formatting tokens more often than the others? Fisher's exact test on 2 x 2."""
    fmt = table["is_format"].to_numpy(bool)
    shifted = table["class"].to_numpy() == "shifted"
    grid = np.array([[np.sum(fmt & shifted), np.sum(~fmt & shifted)],
                     [np.sum(fmt & ~shifted), np.sum(~fmt & ~shifted)]])
    odds, p = stats.fisher_exact(grid, alternative="greater") if grid.sum() else (float("nan"), float("nan"))
    return {"format_share_of_shifted": float(grid[0, 0] / max(grid[0].sum(), 1)) if grid[0].sum() else float("nan"),
            "format_share_of_other": float(grid[1, 0] / max(grid[1].sum(), 1)) if grid[1].sum() else float("nan"),
            "shift_rate_format": float(grid[0, 0] / max(grid[:, 0].sum(), 1)) if grid[:, 0].sum() else float("nan"),
            "shift_rate_content": float(grid[0, 1] / max(grid[:, 1].sum(), 1)) if grid[:, 1].sum() else float("nan"),
            "odds_ratio": float(odds), "p": float(p), "n": int(grid.sum())}


def by_category(table: pd.DataFrame, n_tokens: int = 5) -> pd.DataFrame:
    """Per task (``category``): positions, class shares, the formatting share of its shifted positions and its
    most often shifted tokens."""
    rows = []
    for category, group in table.groupby("category", sort=True):
        shifted = group[group["class"] == "shifted"]
        top = shifted["token"].value_counts().head(n_tokens)
        rows.append({"category": category, "n_positions": len(group), **{f"share_{c}": v for c, v in
                                                                          shares(group).items()},
                     "format_share_of_shifted": float(shifted["is_format"].mean()) if len(shifted) else float("nan"),
                     "stop_shift_rate": float((group[group["is_stop"]]["class"] == "shifted").mean())
                     if group["is_stop"].any() else float("nan"),
                     "mean_kl_tb": float(group["kl_tb"].mean()),
                     "top_shifted": ", ".join(f"{t!r}x{c}" for t, c in top.items())})
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame, bins: int = 10) -> dict:
    """Every headline number of a pair."""
    return {"n_positions": int(len(table)), "n_prompts": int(table["id"].nunique()), **{f"share_{c}": v for c, v in
                                                                                          shares(table).items()},
            "mean_kl_tb": float(table["kl_tb"].mean()), "mean_kl_bt": float(table["kl_bt"].mean()),
            "median_kl_tb": float(table["kl_tb"].median()),
            "stop_shift_rate": float((table[table["is_stop"]]["class"] == "shifted").mean())
            if table["is_stop"].any() else float("nan"),
            "earliness": earliness(table), "format": format_enrichment(table)}


__all__ = ["CLASSES", "by_absolute_position", "by_category", "by_relative_position", "classify", "earliness",
           "format_enrichment", "is_format_token", "per_prompt", "relative_position", "shares", "summary",
           "top_shifted_tokens"]
