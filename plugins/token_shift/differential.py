"""Differential attribution (methods.md D.4): which prompt tokens drive the tokens that tuning changed.

``D[n, m] = I_T[n, m] - I_B[n, m]``: gradient x input of ``log p_T(y_m) - log p_B(y_m)`` on identical token ids
(by linearity the difference of the two models' exact attributions with target = log-prob, so each model is
attributed alone, one in memory at a time). Reported at the positions token distribution shift marks
shifted, against the unshifted ones: the instruction share of ``|D|`` per position,
``sum_{n in instruction} |D[n, m]| / sum_n |D[n, m]|``.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats


def instruction_share(D: np.ndarray, instruction: np.ndarray) -> np.ndarray:
    """Share of ``|D[:, m]|`` on instruction rows, per response position. ``[N, M], [N] -> [M]`` (NaN: no mass)"""
    mass = np.abs(D)
    total = mass.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, mass[np.asarray(instruction, bool)].sum(0) / np.where(total > 0, total, 1), np.nan)


def position_rows(pid: str, D: np.ndarray, instruction: np.ndarray, classes: np.ndarray) -> list[dict]:
    """One row per response position of one prompt: its class, instruction share of |D|, and |D| mass."""
    share = instruction_share(D, instruction)
    mass = np.abs(D).sum(0)
    return [{"id": pid, "m": m, "class": str(classes[m]), "instruction_share": float(share[m]),
             "abs_mass": float(mass[m]), "signed_instruction": float(D[np.asarray(instruction, bool), m].sum())}
            for m in range(D.shape[1])]


def welch(rows: pd.DataFrame) -> dict[str, float]:
    """Instruction share at shifted vs unshifted positions: means, counts, Welch's two-sided t-test."""
    a = rows.loc[rows["class"] == "shifted", "instruction_share"].dropna().to_numpy()
    b = rows.loc[rows["class"] == "unshifted", "instruction_share"].dropna().to_numpy()
    out = {"mean_shifted": float(a.mean()) if len(a) else float("nan"),
           "mean_unshifted": float(b.mean()) if len(b) else float("nan"), "n_shifted": int(len(a)),
           "n_unshifted": int(len(b)), "t": float("nan"), "p": float("nan")}
    if len(a) > 1 and len(b) > 1:
        test = stats.ttest_ind(a, b, equal_var=False)
        out.update(t=float(test.statistic), p=float(test.pvalue))
    return out


def per_prompt(rows: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: mean instruction share of |D| at shifted and at unshifted positions."""
    out = []
    for pid, group in rows.groupby("id", sort=False):
        out.append({"id": pid,
                    "share_shifted": float(group.loc[group["class"] == "shifted", "instruction_share"].mean()),
                    "share_unshifted": float(group.loc[group["class"] == "unshifted", "instruction_share"].mean()),
                    "n_shifted": int((group["class"] == "shifted").sum()), "n_positions": len(group)})
    return pd.DataFrame(out)


__all__ = ["instruction_share", "per_prompt", "position_rows", "welch"]
