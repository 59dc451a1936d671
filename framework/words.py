"""Word lists and static word embeddings, shared by the weight-only analyses (methods B and C).

A static embedding of a word is the **mean** of the embedding rows of its sub-tokens when the word is
tokenized as ``" " + word`` (a lone leading whitespace piece, such as SentencePiece's ``▁``, is dropped).
All words are embedded at once with one sparse averaging matrix::

    A      # [n_words, vocab]  A[w, t] = 1 / n_pieces(w) for each piece t of word w
    E_W = A @ E                # [n_words, d_model]

Word lists (string ids usable in configs):

- ``builtin``: 20,000 frequent English words with frequencies (frozen from ``wordfreq``; ships with tuneshift).
- a path to a ``word<TAB>frequency`` file such as the paper's ``SingleShareGPT_Vocab.tsv`` (most frequent first).
- ``tokenizer``: the whole-word pieces of the model's own tokenizer.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

BUILTIN_WORDS_PATH = Path(__file__).parent / "resources" / "words_en.tsv"
_WORD = re.compile(r"^[A-Za-z][A-Za-z'-]*$")


@dataclass(frozen=True)
class WordList:
    """Words, most frequent first, with relative frequencies (case variants merged into the lower case)."""

    words: tuple[str, ...]
    freqs: tuple[float, ...]
    source: str

    def __len__(self) -> int:
        return len(self.words)

    def head(self, n: int) -> "WordList":
        return WordList(self.words[:n], self.freqs[:n], self.source)


def _merge_case(pairs: list[tuple[str, float]]) -> tuple[list[str], list[float]]:
    """Merge case variants (``The``/``the``) by summing frequencies; keep alphabetic words; sort by frequency."""
    merged: dict[str, float] = {}
    for word, freq in pairs:
        if _WORD.match(word):
            key = word.lower()
            merged[key] = merged.get(key, 0.0) + freq
    ordered = sorted(merged.items(), key=lambda kv: -kv[1])
    return [w for w, _ in ordered], [f for _, f in ordered]


def read_word_file(path: str | Path) -> WordList:
    """A ``word<TAB>frequency`` file (the paper's ``SingleShareGPT_Vocab.tsv`` format)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"word list {str(path)!r} does not exist; give a word<TAB>frequency file, "
                                "'builtin' or 'tokenizer'")
    pairs = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        parts = line.rstrip("\n").split("\t")
        if not parts[0]:
            continue
        try:
            pairs.append((parts[0], float(parts[1]) if len(parts) > 1 else 0.0))
        except ValueError as err:
            raise ValueError(f"{path}:{line_no}: expected word<TAB>frequency, got {line[:60]!r}") from err
    words, freqs = _merge_case(pairs)
    return WordList(tuple(words), tuple(freqs), str(path))


def tokenizer_words(tokenizer, limit: int | None = None) -> WordList:
    """Whole-word pieces of ``tokenizer`` (pieces that start a word and are alphabetic), in id order."""
    pairs = []
    for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        if token[:1] in ("Ġ", "▁") and _WORD.match(token[1:]):
            pairs.append((token[1:], 1.0 / (len(pairs) + 1)))  # earlier BPE merges ~ more frequent
    words, freqs = _merge_case(pairs)
    return WordList(tuple(words[:limit]), tuple(freqs[:limit]), "tokenizer")


def load_word_list(source: str = "builtin", tokenizer=None, limit: int | None = None) -> WordList:
    """Load a word list by id (``builtin``, ``tokenizer``) or path, cut to the ``limit`` most frequent."""
    if source == "builtin":
        wl = read_word_file(BUILTIN_WORDS_PATH)
    elif source == "tokenizer":
        if tokenizer is None:
            raise ValueError("word list 'tokenizer' needs the model's tokenizer")
        wl = tokenizer_words(tokenizer)
    else:
        wl = read_word_file(source)
    return wl.head(limit) if limit else wl


def word_piece_ids(tokenizer, words: tuple[str, ...] | list[str]) -> list[list[int]]:
    """Token ids of each word as it appears mid-text (``" " + word``), a lone leading whitespace piece dropped."""
    encoded = tokenizer([" " + w for w in words], add_special_tokens=False)["input_ids"]
    vocab = tokenizer.get_vocab()
    blank = {vocab[t] for t in ("▁", "Ġ", " ") if t in vocab}  # lone whitespace pieces
    return [list(ids[1:]) if len(ids) > 1 and ids[0] in blank else list(ids) for ids in encoded]


def averaging_matrix(piece_ids: list[list[int]], vocab_size: int) -> torch.Tensor:
    """Sparse ``[n_words, vocab]`` matrix whose row w averages the pieces of word w."""
    rows = torch.tensor([w for w, ids in enumerate(piece_ids) for _ in ids], dtype=torch.long)
    cols = torch.tensor([t for ids in piece_ids for t in ids], dtype=torch.long)
    vals = torch.tensor([1.0 / len(ids) for ids in piece_ids for _ in ids])
    return torch.sparse_coo_tensor(torch.stack([rows, cols]), vals, (len(piece_ids), vocab_size),
                                   check_invariants=False).coalesce()


def static_embeddings(tokenizer, matrix: torch.Tensor, words: tuple[str, ...] | list[str]) -> torch.Tensor:
    """``[n_words, d_model]`` mean of each word's sub-token rows of ``matrix`` (E_in or E_out), in float32."""
    avg = averaging_matrix(word_piece_ids(tokenizer, words), matrix.shape[0]).to(matrix.device)
    return torch.sparse.mm(avg, matrix.float())
