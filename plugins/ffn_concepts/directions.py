"""Principal directions of a feed-forward layer's value vectors, and the words each direction points to.

Method C, steps 1-2 (``shared/docs/methods.md``)::

    X      = W_down(l)                     # [d_ff, d_model]  row i = value vector of neuron i
    Xc     = X - mean over neurons         # [d_ff, d_model]
    Xc     = U diag(s) V^T                 # direction r = V[:, r] (a right singular vector)
    rho_r  = s_r^2 / sum_all s^2           # total variance = ||Xc||_F^2 = trace(Xc^T Xc): cheap, exact
    cos    = normalize(E_W_out) @ V_R      # [n_words, R]; top words of direction r by |cos[:, r]|

Only the first R directions are needed, so three solvers are offered:

- ``eigh`` (default): eigendecomposition of the ``[d, d]`` covariance ``Xc^T Xc`` in float64
  (O(d_ff d^2 + d^3)); exact to float precision and the fastest of the three on SmolLM2-135M.
- ``randomized``: Halko-Martinsson-Tropp range finder with ``oversampling`` extra columns and
  ``power_iterations`` QR-stabilised power steps; cost O(d_ff * d * (R + p) * (2q + 2)). Cheaper only when
  R << d, and accurate only where the spectrum decays: FFN value vectors have a flat one (on SmolLM2 the
  first 300 of 576 directions hold 82% of the variance), so beyond the leading directions its directions
  drift (``benchmarks/bench_ffn_concepts.py`` measures how far). Use it for large d with few directions.
- ``full``: thin SVD of ``Xc`` (the reference).

Signs are fixed by one rule for every solver (the largest-magnitude coordinate of each direction is
positive), so results are comparable across solvers and runs; every downstream use is sign-free anyway
(|cos|, subspaces). No Python loop runs over directions or words.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

SVD_METHODS = ("randomized", "eigh", "full")


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


def randomized_svd(x: torch.Tensor, rank: int, oversampling: int = 10, power_iterations: int = 4,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """First ``rank`` singular values ``[rank]`` and right singular vectors ``[rank, d]`` of ``x`` ``[n, d]``.

    Halko et al. (2011), Algorithm 4.4: a Gaussian test matrix ``[d, rank + oversampling]``, then
    ``power_iterations`` rounds of ``Q <- qr(X qr(X^T Q))`` (re-orthonormalised each half-step, so the
    small singular values are not lost to rounding), then an exact SVD of the small ``Q^T X``.
    """
    n, d = x.shape
    width = min(rank + oversampling, n, d)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(d, width, generator=gen, dtype=x.dtype).to(x.device)  # [d, k]
    q, _ = torch.linalg.qr(x @ omega)  # [n, k]
    for _ in range(power_iterations):
        z, _ = torch.linalg.qr(x.T @ q)  # [d, k]
        q, _ = torch.linalg.qr(x @ z)  # [n, k]
    _, s, vh = torch.linalg.svd(q.T @ x, full_matrices=False)  # [k], [k, d]
    return s[:rank], vh[:rank]


def principal_directions(value_vectors: torch.Tensor, rank: int = 300, method: str = "eigh",
                         oversampling: int = 10, power_iterations: int = 4, seed: int = 0) -> Directions:
    """Principal directions of the rows of ``value_vectors`` ``[d_ff, d_model]`` (centred over rows).

    ``rank`` is capped at ``min(d_ff, d_model)``. Computation runs in float32 on the tensor's device
    (``eigh`` in float64); the result is float32 on the same device.
    """
    if method not in SVD_METHODS:
        raise ValueError(f"svd_method {method!r} is unknown; choose one of {', '.join(SVD_METHODS)}")
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
    elif method == "eigh":
        xd = x.double()
        evals, evecs = torch.linalg.eigh(xd.T @ xd)  # ascending
        top = torch.arange(evals.shape[0] - 1, evals.shape[0] - 1 - rank, -1, device=x.device)
        s = evals[top].clamp_min(0).sqrt().float()
        vh = evecs[:, top].T.float()
    else:
        s, vh = randomized_svd(x, rank, oversampling, power_iterations, seed)
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
