"""Principal directions of a feed-forward layer's value vectors, and the words each direction points to.

Method C, steps 1-2 (``shared/docs/methods.md``)::

    X      = W_down(l)                     # [d_ff, d_model]  row i = value vector of neuron i
    Xc     = X - mean over neurons         # [d_ff, d_model]
    Xc     = U diag(s) V^T                 # direction r = V[:, r] (a right singular vector)
    rho_r  = s_r^2 / sum_all s^2           # total variance = ||Xc||_F^2 = trace(Xc^T Xc): cheap, exact
    cos    = normalize(E_W_out) @ V_R      # [n_words, R]; top words of direction r by |cos[:, r]|

Only the first R directions are needed; two exact solvers are offered:

- ``eigh`` (default): eigendecomposition of the ``[d, d]`` covariance ``Xc^T Xc`` in float64
  (O(d_ff d^2 + d^3)); exact to float precision and the fastest on every model measured.
- ``full``: thin SVD of ``Xc`` (the reference).

There is no randomized SVD (it was removed): FFN value vectors have a flat spectrum (on SmolLM2 the first
300 of 576 directions hold 82 % of the variance, and neighbouring singular values differ by well under
1 %), so a randomized range finder converges slowly. With 10 extra columns and 4 power steps its variance
ratios were off by 6-10 % and nearly every direction's word list differed from the exact one; reaching
1e-5 of the exact directions took 64 power steps at R = 8 (1.8x the time of ``eigh``) and a sketch as
wide as d itself at R = 300 (5x). An accurate randomized SVD is slower than ``eigh`` here at every R
(``benchmarks/bench_ffn_concepts.py`` measures ``torch.svd_lowrank`` against both).

Signs are fixed by one rule for every solver (the largest-magnitude coordinate of each direction is
positive), so results are comparable across solvers and runs; every downstream use is sign-free anyway
(|cos|, subspaces). No Python loop runs over directions or words.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SVD_METHODS = ("eigh", "full")


@dataclass(frozen=True)
class Directions:
    """The first R principal directions of one layer's centred value vectors.

    Attributes:
        vectors: ``[R, d_model]`` orthonormal rows (direction r is row r), float32.
        singular_values: ``[R]`` descending.
        variance_ratio: ``[R]`` ``s_r^2 / total_variance``.
        total_variance: ``sum of all s^2`` of the centred matrix (not just the first R).
    """

    vectors: torch.Tensor
    singular_values: torch.Tensor
    variance_ratio: torch.Tensor
    total_variance: float


def _fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row of ``[R, d]`` so its largest-magnitude coordinate is positive."""
    pivot = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))  # [R, 1]
    return vectors * torch.where(pivot < 0, -1.0, 1.0).to(vectors.dtype)


def principal_directions(value_vectors: torch.Tensor, rank: int = 300, method: str = "eigh") -> Directions:
    """Principal directions of the rows of ``value_vectors`` ``[d_ff, d_model]`` (centred over rows).

    ``rank`` is capped at ``min(d_ff, d_model)``. Computation runs in float32 on the tensor's device
    (``eigh`` in float64); the result is float32 on the same device.
    """
    if method not in SVD_METHODS:
        hint = (" (the randomized solver was removed: on the flat spectra of FFN value vectors it is either "
                "inaccurate or slower than eigh)") if method == "randomized" else ""
        raise ValueError(f"svd_method {method!r} is unknown{hint}; choose one of {', '.join(SVD_METHODS)}")
    if value_vectors.ndim != 2:
        raise ValueError(f"value vectors must be [d_ff, d_model], got shape {tuple(value_vectors.shape)}")
    if rank < 1:
        raise ValueError(f"the number of directions R must be >= 1, got {rank}")
    x = value_vectors.detach().float()
    x = x - x.mean(dim=0, keepdim=True)
    rank = min(rank, *x.shape)
    total = float((x.double() ** 2).sum())
    if method == "full":
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        s, vh = s[:rank], vh[:rank]
    else:  # eigh
        xd = x.double()
        evals, evecs = torch.linalg.eigh(xd.T @ xd)  # ascending
        top = torch.arange(evals.shape[0] - 1, evals.shape[0] - 1 - rank, -1, device=x.device)
        s = evals[top].clamp_min(0).sqrt().float()
        vh = evecs[:, top].T.float()
    ratio = (s.double() ** 2 / total).float() if total > 0 else torch.zeros_like(s)
    return Directions(_fix_signs(vh).contiguous(), s, ratio, total)


@dataclass(frozen=True)
class TopWords:
    """Top words of each direction: indices into the word list, ``|cos|`` and the signed ``cos`` (the pole).

    Attributes:
        index: ``[R, k]`` word indices, best first.
        score: ``[R, k]`` ``|cos|``, descending per row.
        cos: ``[R, k]`` signed cosine (``> 0``: the word lies on the direction's positive pole).
    """

    index: torch.Tensor
    score: torch.Tensor
    cos: torch.Tensor


def normalize_rows(matrix: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``[n, d]`` rows scaled to unit L2 norm (all-zero rows stay zero), float32."""
    matrix = matrix.float()
    return matrix / matrix.norm(dim=1, keepdim=True).clamp_min(eps)


def top_words(word_vectors: torch.Tensor, directions: torch.Tensor, k: int = 15,
              chunk_size: int = 16384) -> TopWords:
    """Top-``k`` words of every direction at once by ``|cos|``, both poles merged.

    Args:
        word_vectors: ``[n_words, d]`` L2-normalised static output embeddings (:func:`normalize_rows`).
        directions: ``[R, d]`` unit rows.
        k: words per direction (capped at ``n_words``).
        chunk_size: words per matmul; ``[chunk, R]`` is the largest temporary. A running top-k merges chunks.
    """
    if word_vectors.shape[1] != directions.shape[1]:
        raise ValueError(f"word vectors have width {word_vectors.shape[1]} but directions {directions.shape[1]}")
    n_words = word_vectors.shape[0]
    k = min(k, n_words)
    directions = directions.to(word_vectors.device, torch.float32)
    best_cos: torch.Tensor | None = None  # [k', R]
    best_idx: torch.Tensor | None = None
    for start in range(0, n_words, chunk_size):
        cos = word_vectors[start:start + chunk_size] @ directions.T  # [chunk, R]
        idx = torch.arange(start, start + cos.shape[0], device=cos.device)[:, None].expand_as(cos)
        if best_cos is not None:
            cos, idx = torch.cat([best_cos, cos]), torch.cat([best_idx, idx])
        top = cos.abs().topk(min(k, cos.shape[0]), dim=0).indices  # [k, R]
        best_cos, best_idx = cos.gather(0, top), idx.gather(0, top)
    assert best_cos is not None and best_idx is not None
    return TopWords(best_idx.T.contiguous(), best_cos.abs().T.contiguous(), best_cos.T.contiguous())
