"""From raw attributions to the paper's importance density and prompt score (methods.md A.2 to A.4).

All functions are pure numpy, vectorised over tokens; matrices are ``[n_prompt_rows, n_response]``.

    normalise(I, b)      A.2  per response token: clip negatives, scale to integers 0..10 by the column max,
                              then keep values > b (b = 0 for storage and pictures, b = 7 for statistics)
    threshold(S, b)      A.2  only the sparsification step, for matrices that are normalised already (the
                              authors' pickles hold S with b = 0): never normalises a second time
    density(S, p)        A.3  a_n = ||S[n, :]||_1 / (||S[n, :]||_p + 1e-7)
    prompt_score(a, m)   A.4  sum of max-normalised densities over instruction tokens / log2(2 + #instruction)

Edge cases, by design: an all-zero row has density 0; a response with no tokens scores 0 (the paper); a
prompt with no instruction token has no score (NaN), so it is left out of statistics rather than counted 0.
"""
from __future__ import annotations

import numpy as np

NORM_EPS = 1e-7     # A.2: ceil(10 * I+ / (max_n I+ + 1e-7))
DENSITY_EPS = 1e-7  # A.3: ||.||_1 / (||.||_p + 1e-7)
SCORE_EPS = 1e-9    # A.4: a_n / (max_n a_n + 1e-9)
LEVELS = 10


def _matrix(values: np.ndarray) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"expected an attribution matrix [n_prompt, n_response], got shape {arr.shape}")
    return arr


def threshold(scaled: np.ndarray, b: float) -> np.ndarray:
    """Keep entries of an already normalised matrix that are ``> b``, zero the rest. ``[N, M] -> [N, M]``"""
    scaled = _matrix(scaled)
    return np.where(scaled > b, scaled, 0.0)


def normalise(attributions: np.ndarray, b: float = 0.0) -> np.ndarray:
    """Raw attributions ``I`` to integer levels ``S`` in 0..10 per response token (column), then ``> b``.

    ``S~[n, m] = ceil(10 * max(I[n, m], 0) / (max_n max(I[n, m], 0) + 1e-7))``; ``S = S~ * (S~ > b)``.
    A column with no positive entry is all zeros. ``[N, M] -> [N, M]`` float64 holding integers.
    """
    positive = np.maximum(_matrix(attributions), 0.0)
    col_max = positive.max(axis=0, keepdims=True) if positive.shape[0] else np.zeros((1, positive.shape[1]))
    scaled = np.ceil(LEVELS * positive / (col_max + NORM_EPS))
    return threshold(scaled, b)


def density(scaled: np.ndarray, p: float = 4.0) -> np.ndarray:
    """Importance density of each prompt token: ``||S[n,:]||_1 / (||S[n,:]||_p + 1e-7)``. ``[N, M] -> [N]``

    For k equal non-zero entries it is ``k^(1 - 1/p)`` (``k^(3/4)`` at p = 4): it grows with how many response
    tokens a prompt token matters to, and is 0 for a row that matters to none.
    """
    scaled = _matrix(scaled)
    if p <= 1:
        raise ValueError(f"density exponent p must be > 1 (the paper uses 4), got {p}")
    l1 = np.abs(scaled).sum(axis=1)
    lp = (np.abs(scaled) ** p).sum(axis=1) ** (1.0 / p)
    return l1 / (lp + DENSITY_EPS)


def normalised_density(dens: np.ndarray) -> np.ndarray:
    """``a~_n = a_n / (max_n a_n + 1e-9)``: densities scaled to [0, 1] within one prompt. ``[N] -> [N]``"""
    dens = np.asarray(dens, dtype=np.float64)
    return dens / ((dens.max() if dens.size else 0.0) + SCORE_EPS)


def prompt_score(dens: np.ndarray, instruction_mask: np.ndarray, n_response: int | None = None) -> float:
    """The prompt's instruction score (A.4): ``sum_{n in instr} a~_n / log2(2 + #instr)``.

    ``dens [N]`` raw densities, ``instruction_mask [N]`` bool. Returns 0.0 for an empty response
    (``n_response == 0``, the paper's rule) and NaN for a prompt without instruction tokens.
    """
    mask = np.asarray(instruction_mask, dtype=bool)
    dens = np.asarray(dens, dtype=np.float64)
    if mask.shape != dens.shape:
        raise ValueError(f"instruction mask has shape {mask.shape} but densities have {dens.shape}")
    if n_response == 0:
        return 0.0
    count = int(mask.sum())
    if count == 0:
        return float("nan")
    return float(normalised_density(dens)[mask].sum() / np.log2(2.0 + count))


def score_matrix(scaled: np.ndarray, instruction_mask: np.ndarray, b: float = 7.0, p: float = 4.0) -> float:
    """Score of an already normalised matrix ``S`` (b = 0) at threshold ``b``: threshold, density, score."""
    scaled = _matrix(scaled)
    return prompt_score(density(threshold(scaled, b), p), instruction_mask, scaled.shape[1])


def decile_profile(dens: np.ndarray, bins: int = 10) -> np.ndarray:
    """Mean normalised density per relative-position bin of one prompt (A.7). ``[N] -> [bins]``

    Token n of N falls in bin ``floor(bins * n / N)``; a bin no token falls in is NaN (prompts shorter than
    ``bins`` tokens leave gaps rather than repeating tokens).
    """
    norm = normalised_density(dens)
    n = norm.size
    out = np.full(bins, np.nan)
    if n == 0:
        return out
    which = (np.arange(n) * bins) // n
    sums = np.bincount(which, weights=norm, minlength=bins)
    counts = np.bincount(which, minlength=bins)
    filled = counts > 0
    out[filled] = sums[filled] / counts[filled]
    return out


__all__ = ["decile_profile", "density", "normalise", "normalised_density", "prompt_score", "score_matrix",
           "threshold"]
