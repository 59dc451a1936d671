"""Statistics of the causal tests: effects against matched random controls, bootstrap intervals, permutation p.

Effects are means over items of per-item score differences (scores ``[n_items]``, one per held-out prompt):

- a drop: ``drop = mean_i (s0_i - s_i)`` (``s0`` the unablated model), for the selected units and each draw of
  random units; the control effect is the mean drop over draws;
- a recovery: ``(mean_i (s_patch_i - s_from_i)) / (mean_i (s_to_i - s_from_i))``, the share of the gap between
  the model patched into (``from``) and the model the activations come from (``to``) that patching closes.

Bootstrap (percentile, ``n_boot`` resamples): items are resampled with replacement within each stratum (the task,
``Prompt.category``, so every resample keeps the organism's "mean of task scores" design), and for controls the
draws are resampled with replacement as well, jointly with the items: the interval of the control mean and of
the difference ``selected - control`` covers both sources of noise.

Permutation p-values:

- selected vs controls (:func:`control_test`): under the null, the selected unit set is one more random set,
  exchangeable with the draws; relabelling which set is "selected" gives ``p = (1 + #{d: drop_d >= drop_sel}) /
  (1 + n_draws)`` (one-sided: the selected units matter more). When every matched set is enumerated the test is
  exact; its smallest possible p is ``1 / (1 + n_draws)``. A single fixed control set (the least rotated
  directions) is compared item by item instead: paired sign flips of ``s_control - s_selected``.
- recovery (:func:`recovery_test`): per-item paired sign flips of ``s_patch - s_from`` (one-sided: patching moves
  the score towards ``to``); exact enumeration when ``2^n <= n_perm``, else ``n_perm`` random flips (+1 smoothing).
"""
from __future__ import annotations

import itertools

import numpy as np


def strata_indices(strata: np.ndarray | None, n: int) -> list[np.ndarray]:
    """Item indices of each stratum (one stratum holding everything when ``strata`` is None)."""
    if strata is None:
        return [np.arange(n)]
    strata = np.asarray(strata)
    return [np.flatnonzero(strata == s) for s in np.unique(strata)]


def bootstrap_indices(strata: np.ndarray | None, n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` item indices resampled with replacement within each stratum."""
    parts = [group[rng.integers(0, len(group), size=(n_boot, len(group)))] for group in strata_indices(strata, n)]
    return np.concatenate(parts, axis=1)


def bootstrap_weights(strata: np.ndarray | None, n: int, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``[n_boot, n]`` resampling weights (how often each item is drawn, over ``n``): ``x @ w.T`` gives the
    bootstrap means of per-item values ``x [..., n]`` without materialising the resamples."""
    idx = bootstrap_indices(strata, n, n_boot, rng)
    flat = (idx + n * np.arange(n_boot)[:, None]).ravel()
    return np.bincount(flat, minlength=n_boot * n).reshape(n_boot, n) / n


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap ``samples``."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def control_test(s0: np.ndarray, selected: np.ndarray, controls: np.ndarray, strata: np.ndarray | None = None,
                 n_boot: int = 2000, seed: int = 0, exact: bool = False, n_perm: int = 10000) -> dict:
    """Drop of the selected units vs drops of random draws (``controls [n_draws, n_items]``); see module doc."""
    s0, selected, controls = (np.asarray(x, dtype=np.float64) for x in (s0, selected, controls))
    rng = np.random.default_rng(seed)
    n, n_draws = s0.shape[0], controls.shape[0]
    d_sel = s0 - selected                    # [n]
    d_ctrl = s0[None] - controls             # [D, n]
    drop_sel, drops = float(d_sel.mean()), d_ctrl.mean(1)  # scalar, [D]
    weights = bootstrap_weights(strata, n, n_boot, rng)                    # [B, n]
    sel_b = weights @ d_sel                                                # [B]
    per_draw_b = d_ctrl @ weights.T                                        # [D, B]
    pick = rng.integers(0, n_draws, size=(n_boot, n_draws))                # draws resampled per replicate
    ctrl_b = per_draw_b[pick, np.arange(n_boot)[:, None]].mean(1)          # [B]
    spread = float(drops.std(ddof=1)) if n_draws > 1 else float("nan")
    if n_draws == 1:  # one fixed control set (e.g. the least rotated directions): paired sign flips over items
        p, floor = sign_flip_p(controls[0] - selected, n_perm, seed), 1.0 / (1 + n_perm)
    else:
        p, floor = float((1 + np.sum(drops >= drop_sel - 1e-12)) / (1 + n_draws)), 1.0 / (1 + n_draws)
    return {
        "drop_selected": drop_sel, "drop_selected_ci": interval(sel_b),
        "drop_control": float(drops.mean()), "drop_control_ci": interval(ctrl_b),
        "difference": drop_sel - float(drops.mean()), "difference_ci": interval(sel_b - ctrl_b),
        "control_std": spread, "z": (drop_sel - float(drops.mean())) / spread if spread and spread > 0 else float("nan"),
        "p_permutation": p, "p_test": "items" if n_draws == 1 else "sets", "p_floor": floor,
        "n_items": int(n), "n_draws": int(n_draws), "exact": bool(exact),
    }


def sign_flip_p(diff: np.ndarray, n_perm: int = 10000, seed: int = 0) -> float:
    """One-sided paired permutation p of ``mean(diff) > 0`` by sign flips (exact when ``2^n <= n_perm``)."""
    diff = np.asarray(diff, dtype=np.float64)
    n, observed = diff.shape[0], float(diff.mean())
    if n == 0:
        return float("nan")
    if 2 ** n <= n_perm:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))           # [2^n, n]
        return float(np.mean((signs * diff).mean(1) >= observed - 1e-12))
    rng = np.random.default_rng(seed)
    signs = rng.choice((1.0, -1.0), size=(n_perm, n))
    return float((1 + np.sum((signs * diff).mean(1) >= observed - 1e-12)) / (1 + n_perm))


def recovery_test(s_from: np.ndarray, s_to: np.ndarray, s_patch: np.ndarray, strata: np.ndarray | None = None,
                  n_boot: int = 2000, seed: int = 0, n_perm: int = 10000) -> dict:
    """Share of the ``from -> to`` gap closed by patching, with its bootstrap interval and a sign-flip p."""
    s_from, s_to, s_patch = (np.asarray(x, dtype=np.float64) for x in (s_from, s_to, s_patch))
    gap, moved = s_to - s_from, s_patch - s_from
    rng = np.random.default_rng(seed)
    weights = bootstrap_weights(strata, len(gap), n_boot, rng)
    gap_b, moved_b = weights @ gap, weights @ moved
    with np.errstate(divide="ignore", invalid="ignore"):
        rec_b = np.where(gap_b != 0, moved_b / gap_b, np.nan)
    total = float(gap.mean())
    rec_b = rec_b[np.isfinite(rec_b)]
    return {
        "recovery": float(moved.mean()) / total if total != 0 else float("nan"),
        "recovery_ci": interval(rec_b) if len(rec_b) else (float("nan"), float("nan")),
        "gap": total, "moved": float(moved.mean()), "score_from": float(s_from.mean()),
        "score_to": float(s_to.mean()), "score_patched": float(s_patch.mean()),
        "p_permutation": sign_flip_p(moved * np.sign(total or 1.0), n_perm, seed), "n_items": int(len(gap)),
    }


__all__ = ["bootstrap_indices", "bootstrap_weights", "control_test", "interval", "recovery_test", "sign_flip_p", "strata_indices"]
