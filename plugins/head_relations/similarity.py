"""Word similarity for the co-occurrence filter of method B: pluggable word-vector backends and thresholds tau.

What it is for
    Method B keeps a word pair only when the two words "co-occur": their cosine similarity under static word
    vectors beats each word's own threshold ``tau(w) = mean_u sim(w, u) + m * std_u sim(w, u)`` over a
    baseline set ``u`` of frequent words (m = 1.96, 3,000 words in the paper, which used GloVe 840B-300d).

Backends (a string-keyed registry, inseq style; ``available_backends()`` lists the ids)
    ``glove``  word vectors from a GloVe or word2vec **text** file given by path (``.txt`` or ``.txt.gz``;
               a word2vec ``N D`` header line is skipped). Only the rows of the requested words are kept.
    ``ppmi``   the offline default: vectors learnt from co-occurrence counts over the offline English corpus
               of :mod:`tuneshift.plugins.head_relations.corpus` (positive PMI with context-distribution smoothing,
               then a randomized truncated SVD), built once and cached on disk under ``cache_dir``, keyed
               by a hash of the corpus bytes and every parameter.

A backend answers :meth:`SimilarityBackend.lookup` with :class:`WordVectors`: L2-normalised rows, and a
``present`` mask. **A word missing from the backend's vocabulary never passes the filter**: its row is zero
(similarity 0 with everything, and the filter needs ``sim > 0``) and its threshold is ``+inf``. Missing words
are also left out of the baseline set, so they do not drag the other words' thresholds toward 0.

Lookup is case-aware for cased vocabularies (GloVe 840B is cased): the word as given, then lower case,
Capitalised and UPPER case, the first one found wins.

Adding a backend::

    @BACKENDS.register
    class MyVectors(SimilarityBackend):
        name = "mine"
        def __init__(self, path: str = "", **_: object): ...
        def lookup(self, words): return WordVectors.from_table(words, self.vocab, self.matrix)
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Iterable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from tuneshift.plugins.head_relations import corpus
from tuneshift.registry import Registry

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "~/.cache/tuneshift"


# ---- word vectors ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WordVectors:
    """Vectors of a word list, row i for word i.

    vectors  # [n_words, D] float32, unit rows; all-zero rows where ``present`` is False
    present  # [n_words] bool, whether the backend knows the word
    """

    vectors: np.ndarray
    present: np.ndarray

    @staticmethod
    def from_table(words: Sequence[str], vocab: dict[str, int], matrix: np.ndarray) -> "WordVectors":
        """Rows of ``matrix`` (any scale) for ``words`` via ``vocab``, case-aware, normalised to unit length."""
        rows = np.full(len(words), -1, dtype=np.int64)
        for i, word in enumerate(words):
            for form in (word, word.lower(), word.capitalize(), word.upper()):
                if form in vocab:
                    rows[i] = vocab[form]
                    break
        out = np.zeros((len(words), matrix.shape[1]), dtype=np.float32)
        found = rows >= 0
        out[found] = matrix[rows[found]]
        norms = np.linalg.norm(out, axis=1)
        present = found & (norms > 0)
        out[present] /= norms[present, None]
        out[~present] = 0.0
        return WordVectors(out, present)


def thresholds(vectors: torch.Tensor, present: torch.Tensor, n_baseline: int, multiplier: float = 1.96,
               chunk: int = 4096) -> torch.Tensor:
    """Per-word threshold ``tau`` ``[n_words]`` (float64; ``+inf`` for missing words).

    ``vectors`` [n_words, D] unit rows (zero for missing), ``present`` [n_words] bool; the baseline set is the
    words among the first ``n_baseline`` (the most frequent) that are present. ``tau(w) = mean + multiplier *
    std`` of ``sim(w, u)`` over the baseline ``u`` (population std, ``ddof=0``, as ``np.std`` in the paper's
    code; ``w`` itself counts when it is in the baseline). Chunked over words: memory ``chunk x n_baseline``.
    """
    vecs = vectors.double()
    base = vecs[:n_baseline][present[:n_baseline]]
    if base.shape[0] == 0:
        raise ValueError("no baseline word has a word vector: the similarity backend knows none of the "
                         f"{n_baseline} most frequent words of the word list")
    tau = torch.empty(vecs.shape[0], dtype=torch.float64, device=vecs.device)
    for start in range(0, vecs.shape[0], chunk):
        sims = vecs[start:start + chunk] @ base.T  # [chunk, n_base]
        tau[start:start + chunk] = sims.mean(1) + multiplier * sims.std(1, correction=0)
    return tau.masked_fill(~present.to(tau.device), float("inf"))


# ---- registry -------------------------------------------------------------------------------------------------
class SimilarityBackend:
    """A source of static word vectors; subclasses register under their ``name``."""

    name: ClassVar[str] = ""

    def lookup(self, words: Sequence[str]) -> WordVectors:
        """Unit word vectors for ``words`` (zero rows for words the backend does not know)."""
        raise NotImplementedError

    def describe(self) -> dict:
        """A JSON-able description for results and logs."""
        return {"backend": self.name}


BACKENDS: Registry[type[SimilarityBackend]] = Registry(
    "similarity backend", group="tuneshift.similarity",
    how_to_add="A backend subclasses SimilarityBackend and is registered with @BACKENDS.register.")


def available_backends() -> list[str]:
    return BACKENDS.available()


def make_backend(name: str, **params: Any) -> SimilarityBackend:
    """Instantiate backend ``name`` with ``params``; an unknown name fails with the list of known ones."""
    return BACKENDS.get(name)(**params)


# ---- glove / word2vec text files ------------------------------------------------------------------------------
def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return path.open(encoding="utf-8", errors="replace")


def read_vector_file(path: str | Path, wanted: Iterable[str] | None = None) -> tuple[dict[str, int], np.ndarray]:
    """Read a GloVe / word2vec text file: ``word v1 ... vD`` per line (a word2vec ``N D`` header is skipped).

    Only words in ``wanted`` are kept (all when None), so a 2.2M-word GloVe file needs memory only for the
    word list. A token with inner spaces (a few lines of GloVe 840B) is the line minus its last D fields.
    Returns ``(vocab word -> row, matrix [n_kept, D] float32)``; a repeated word keeps its first row.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"word-vector file {str(path)!r} does not exist; the 'glove' similarity backend "
                                "needs a GloVe/word2vec text file (e.g. glove.840B.300d.txt) given as "
                                "similarity_path, or use the offline backend similarity=ppmi")
    wanted_set = set(wanted) if wanted is not None else None
    vocab: dict[str, int] = {}
    rows: list[np.ndarray] = []
    dim = None
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, 1):
            parts = line.rstrip("\n").rstrip(" ").split(" ")
            if line_no == 1 and len(parts) == 2 and all(p.isdigit() for p in parts):
                dim = int(parts[1])  # word2vec header "N D"
                continue
            if dim is None:
                dim = len(parts) - 1
                if dim < 1:
                    raise ValueError(f"{path}:1: expected 'word v1 ... vD', got {line[:60]!r}")
            if len(parts) < dim + 1:
                raise ValueError(f"{path}:{line_no}: expected a word and {dim} numbers, got {len(parts)} fields")
            word = " ".join(parts[:-dim])
            if (wanted_set is None or word in wanted_set) and word not in vocab:
                vocab[word] = len(rows)
                rows.append(np.asarray(parts[-dim:], dtype=np.float32))
    if dim is None:
        raise ValueError(f"word-vector file {path} is empty")
    matrix = np.stack(rows) if rows else np.zeros((0, dim), dtype=np.float32)
    return vocab, matrix


@BACKENDS.register
class GloveBackend(SimilarityBackend):
    """Word vectors from a GloVe / word2vec text file (the paper used GloVe 840B-300d)."""

    name = "glove"

    def __init__(self, path: str = "", **_: Any):
        if not path:
            raise ValueError("similarity backend 'glove' needs similarity_path: a GloVe/word2vec text file")
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            read_vector_file(self.path)  # raises the clear FileNotFoundError

    def lookup(self, words: Sequence[str]) -> WordVectors:
        forms = {f for w in words for f in (w, w.lower(), w.capitalize(), w.upper())}
        vocab, matrix = read_vector_file(self.path, forms)
        return WordVectors.from_table(words, vocab, matrix)

    def describe(self) -> dict:
        return {"backend": self.name, "path": str(self.path)}


# ---- ppmi: offline co-occurrence vectors ----------------------------------------------------------------------
@dataclass(frozen=True)
class PPMIParams:
    """Parameters of the offline vectors (every field is part of the cache key)."""

    dim: int = 300  # SVD rank
    window: int = 5  # symmetric window, words on each side
    min_count: int = 5  # words rarer than this in the corpus get no vector
    max_vocab: int = 60000  # at most this many words (the most frequent) get vectors
    alpha: float = 0.75  # context-distribution smoothing P(c)^alpha (Levy et al. 2015)
    eig_power: float = 0.5  # word vectors U * S^eig_power
    weighting: str = "harmonic"  # co-occurrence weight of distance d: "harmonic" 1/d (GloVe) or "uniform"
    n_iter: int = 4  # power iterations of the randomized SVD
    sources: tuple[str, ...] = corpus.SOURCES
    seed: int = 0

    def key(self, corpus_hash: str) -> str:
        blob = json.dumps({"corpus": corpus_hash, "params": self.__dict__, "version": 1}, sort_keys=True,
                          default=list)
        return hashlib.sha1(blob.encode()).hexdigest()[:16]


def count_cooccurrences(docs: Iterable[list[str]], params: PPMIParams) -> tuple[list[str], sp.csr_matrix]:
    """Vocabulary (most frequent first) and the symmetric weighted co-occurrence matrix ``[V, V]``.

    Vectorised over each window offset d: pairs ``(t_i, t_{i+d})`` inside one document, weight 1/d
    (``harmonic``) or 1, both directions.
    """
    token_docs = [d for d in docs if d]
    counts = Counter(t for d in token_docs for t in d)
    vocab = [w for w, c in counts.most_common(params.max_vocab) if c >= params.min_count]
    index = {w: i for i, w in enumerate(vocab)}
    ids = np.fromiter((index.get(t, -1) for d in token_docs for t in d), dtype=np.int64)
    doc_of = np.repeat(np.arange(len(token_docs)), [len(d) for d in token_docs])
    n = len(vocab)
    total = sp.csr_matrix((n, n), dtype=np.float64)
    for d in range(1, params.window + 1):
        a, b = ids[:-d], ids[d:]
        keep = (a >= 0) & (b >= 0) & (doc_of[:-d] == doc_of[d:])
        weight = 1.0 / d if params.weighting == "harmonic" else 1.0
        m = sp.coo_matrix((np.full(int(keep.sum()), weight), (a[keep], b[keep])), shape=(n, n)).tocsr()
        total = total + m + m.T
    return vocab, total


def ppmi_matrix(cooc: sp.csr_matrix, alpha: float = 0.75) -> sp.csr_matrix:
    """Positive PMI with smoothed context probabilities: ``max(0, log P(w,c) / (P(w) P_alpha(c)))``."""
    cooc = cooc.tocsr()
    cooc.eliminate_zeros()
    total = cooc.sum()
    p_w = np.asarray(cooc.sum(1)).ravel() / total
    c = np.asarray(cooc.sum(0)).ravel() ** alpha
    p_c = c / c.sum()
    coo = cooc.tocoo()
    pmi = np.log(coo.data / total) - np.log(p_w[coo.row]) - np.log(p_c[coo.col])
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (coo.row[keep], coo.col[keep])), shape=cooc.shape)


def randomized_svd(matrix: sp.csr_matrix, rank: int, n_iter: int = 4, oversample: int = 20,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Top-``rank`` left singular vectors ``[n, rank]`` and values ``[rank]`` (Halko et al. 2011, with QR
    re-orthonormalisation after each power iteration). Only sparse x dense products: memory ``n x (rank+20)``.

    Sparse products run in scipy, the dense QR/SVD in torch (numpy's QR is ~10x slower under this machine's
    OpenBLAS settings).
    """
    n_rows, n_cols = matrix.shape
    k = min(rank + oversample, min(n_rows, n_cols))
    rng = np.random.default_rng(seed)
    a = matrix.astype(np.float32)
    at = a.T.tocsr()

    def orth(x: np.ndarray) -> np.ndarray:
        """Orthonormal basis of the columns of ``x``: Cholesky-QR in float64 (two gemms; 2-3x faster than
        Householder QR here), Householder QR when the Gram matrix is too ill-conditioned."""
        y = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64))
        r, info = torch.linalg.cholesky_ex(y.T @ y, upper=True)
        if int(info) != 0:
            return np.ascontiguousarray(torch.linalg.qr(y)[0].float().numpy())
        return np.ascontiguousarray(torch.linalg.solve_triangular(r, y, upper=True, left=False).float().numpy())

    q = orth(a @ rng.standard_normal((n_cols, k), dtype=np.float32))
    for _ in range(n_iter):  # orthonormalise once per A A^T: cond grows by (s_1/s_k)^2 only, fine in float64
        q = orth(a @ (at @ q))
    b = torch.from_numpy(np.ascontiguousarray((at @ q).T, dtype=np.float64))  # [k, n_cols] = Q^T A
    u_b, s, _ = torch.linalg.svd(b, full_matrices=False)
    u = torch.from_numpy(q).double() @ u_b
    rank = min(rank, k)
    return u[:, :rank].float().numpy(), s[:rank].float().numpy()


def build_ppmi_vectors(params: PPMIParams) -> tuple[list[str], np.ndarray]:
    """Vocabulary and word vectors ``[V, dim]`` (float32, not normalised) from the offline corpus."""
    start = time.perf_counter()
    log.info("head relations: building PPMI word vectors from the offline corpus (once; cached afterwards)")
    vocab, cooc = count_cooccurrences((corpus.tokenize(t) for t in corpus.documents(params.sources)), params)
    u, s = randomized_svd(ppmi_matrix(cooc, params.alpha), params.dim, params.n_iter, seed=params.seed)
    log.info("ppmi vectors: %d words x %d dims in %.1f s", len(vocab), u.shape[1], time.perf_counter() - start)
    return vocab, u * (s ** params.eig_power)[None, :]


@BACKENDS.register
class PPMIBackend(SimilarityBackend):
    """Offline default: PPMI + truncated SVD word vectors over the offline corpus, cached on disk."""

    name = "ppmi"

    def __init__(self, cache_dir: str = DEFAULT_CACHE_DIR, **params: Any):
        fields = PPMIParams.__dataclass_fields__
        unknown = sorted(set(params) - set(fields) - {"path"})
        if unknown:
            raise ValueError(f"unknown ppmi parameters {unknown}; known: {', '.join(fields)}")
        params.pop("path", None)
        if "sources" in params:
            params["sources"] = tuple(params["sources"])
        self.params = PPMIParams(**params)
        self.cache_dir = Path(cache_dir).expanduser()
        self._table: tuple[dict[str, int], np.ndarray] | None = None

    def cache_path(self) -> Path:
        return self.cache_dir / f"ppmi-{self.params.key(corpus.fingerprint(self.params.sources))}.npz"

    def table(self) -> tuple[dict[str, int], np.ndarray]:
        """``(vocab, vectors)``, read from the cache or built once and written there atomically."""
        if self._table is None:
            path = self.cache_path()
            if path.is_file():
                with np.load(path, allow_pickle=False) as data:
                    words, matrix = str(data["vocab"]).split("\n"), data["vectors"]
            else:
                words, matrix = build_ppmi_vectors(self.params)
                from tuneshift.results import atomic_write_bytes

                buffer = io.BytesIO()
                np.savez(buffer, vocab=np.array("\n".join(words)), vectors=matrix.astype(np.float32))
                atomic_write_bytes(path, buffer.getvalue())
            self._table = ({w: i for i, w in enumerate(words)}, matrix)
        return self._table

    def lookup(self, words: Sequence[str]) -> WordVectors:
        vocab, matrix = self.table()
        return WordVectors.from_table(words, vocab, matrix)

    def describe(self) -> dict:
        return {"backend": self.name, "cache": str(self.cache_path()), **self.params.__dict__}


__all__ = [
    "DEFAULT_CACHE_DIR", "GloveBackend", "PPMIBackend", "PPMIParams", "SimilarityBackend", "WordVectors",
    "available_backends", "build_ppmi_vectors", "count_cooccurrences", "make_backend", "ppmi_matrix",
    "randomized_svd", "read_vector_file", "thresholds",
]
