"""Which prompt tokens are instruction tokens (methods.md A.5): sentences, the annotation, the token edges.

Three steps, each the authors' rule (``utils.annotate`` and ``match_instruct_context`` of their code); with
them their released attributions give the paper's Tables 1-2 to 4 decimals, so none is cosmetic:

1. :func:`sentence_spans`: the prompt is split into lines at every newline first, then each line into
   sentences after ``. ! ? :`` followed by white space. A line break always ends a sentence, so an
   ``Input:`` or ``Output:`` label on the next line never joins an instruction sentence.
2. :func:`annotated_spans`: each fragment of an annotation (split at ``|||`` and at newlines, then into
   sentences the same way) is replaced by the FIRST prompt sentence that contains it, located at its FIRST
   occurrence in the prompt; an ``Input:`` prefix of that sentence is stripped, and a sentence that is then
   empty or only a label (``Input:``, ``Output:``) adds nothing. Each sentence stays its own span: a
   separator between two instruction sentences is never instruction.
3. :func:`align_spans`: each span marks the tokens that overlap it on character offsets (robust for any
   tokenizer), minus leading and trailing tokens that are only white space (``▁``, ``Ġ``, ``<0x0A>``,
   Gemma's ``\\n`` pieces) or an opening quote glued to a space (``▁"``, ``Ġ"``). :func:`token_surfaces`
   gives each token's text for that test from the tokenizer's own decoder, for SentencePiece, byte-level
   BPE and Gemma pieces alike.
"""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np
from tuneshift.errors import TuneshiftError

SENTENCE_END = re.compile(r"(?<=[.!?:])\s+")  # the authors' sent_tokenize: split after . ! ? : + white space
LABELS = frozenset({"Input:", "Output:"})       # a sentence that is only a label is never instruction
INPUT_PREFIX = "Input:"
OPEN_QUOTE = ' "'                               # an opening quote glued to a space (SentencePiece ``▁"``)

Span = tuple[int, int]


class DataError(TuneshiftError, ValueError):
    """A dataset or a prompt does not match what tuneshift expects; the message names the item and the fix.

    (Defined here, the lowest module that raises it; ``tuneshift.data`` re-exports it.)
    """


def sentence_spans(text: str) -> list[Span]:
    """Non-empty sentences of ``text`` as ``[start, end)`` offsets: lines first, then ``. ! ? :`` + space.

    ``"Do it.\\nInput: x"`` gives ``"Do it."``, ``"Input:"``, ``"x"``; white space inside a line before the
    first word stays in its sentence (the authors' ``re.split`` keeps it), white space after ``. ! ? :``
    does not.
    """
    spans: list[Span] = []
    line_start = 0
    for line in text.split("\n"):
        start = 0
        for match in SENTENCE_END.finditer(line):
            spans.append((line_start + start, line_start + match.start()))
            start = match.end()
        spans.append((line_start + start, line_start + len(line)))
        line_start += len(line) + 1
    return [(s, e) for s, e in spans if e > s]


def _fragment_sentences(annotation: str) -> list[str]:
    """The annotation's instruction part (before ``&&&``) as sentences: split at ``|||``, newlines, A.5's rule."""
    pieces = annotation.split("&&&")[0].replace("\n", "|||").split("|||")
    return [sentence for piece in pieces for sentence in SENTENCE_END.split(piece) if sentence]


def _loose_find(haystack: str, needle: str) -> bool:
    """Whether ``needle`` occurs in ``haystack`` up to runs of white space (a fallback for hand-made data)."""
    words = needle.split()
    return bool(words) and re.search(r"\s+".join(map(re.escape, words)), haystack) is not None


def annotated_spans(text: str, annotation: str, prompt_id: str = "?") -> tuple[Span, ...]:
    """Instruction spans of ``text`` from an annotation ``"sentence|||sentence...&&&context"`` (A.5, step 2).

    Every fragment sentence maps to the first prompt sentence containing it verbatim (else, for hand-made
    data, up to white space); that sentence, without an ``Input:`` prefix, is located at its first occurrence
    in ``text``. Returns sorted distinct spans, one per instruction sentence (never merged into one range).
    """
    sentences = [text[s:e] for s, e in sentence_spans(text)]
    chosen: list[str] = []
    for fragment in _fragment_sentences(annotation):
        match = next((s for s in sentences if fragment in s), None)
        if match is None:
            match = next((s for s in sentences if _loose_find(s, fragment)), None)
        if match is None:
            raise DataError(
                f"prompt {prompt_id!r}: annotated instruction {fragment[:80]!r} is not part of any sentence of "
                "the prompt (sentences end at a newline or after . ! ? : and a space); an annotation must quote "
                "the prompt's own sentences or pieces of them")
        if match.startswith(INPUT_PREFIX):
            match = match[len(INPUT_PREFIX):].strip()
        if match and match not in LABELS and match not in chosen:
            chosen.append(match)
    spans = {(text.find(s), text.find(s) + len(s)) for s in chosen}
    return tuple(sorted(spans))


def substring_span(text: str, piece: str, prompt_id: str = "?") -> Span:
    """Character span of ``piece`` in ``text`` (first exact occurrence, else up to white space), or an error."""
    piece = piece.strip()
    start = text.find(piece) if piece else -1
    if start >= 0:
        return start, start + len(piece)
    pattern = r"\s+".join(re.escape(w) for w in piece.split())
    found = re.search(pattern, text) if pattern else None
    if found is None:
        raise DataError(f"prompt {prompt_id!r}: instruction {piece[:80]!r} does not occur in the prompt "
                               "text; an instruction must be a verbatim substring of the prompt (or give "
                               "instruction_spans)")
    return found.span()


# ---- tokens ---------------------------------------------------------------------------------------------------
def token_surfaces(tokenizer, tokens: Sequence[str]) -> list[str]:
    """Each token's text as the tokenizer's own decoder writes it (``▁the`` and ``Ġthe`` are ``" the"``,
    ``<0x0A>`` and ``Ċ`` are ``"\\n"``), decoded after an anchor so that no decoder strips a leading space."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    if decoder is None:
        return [t.replace("\u2581", " ") for t in tokens]
    return [decoder.decode(["a", t])[1:] for t in tokens]


def edge_tokens(surfaces: Sequence[str]) -> np.ndarray:
    """Tokens a span's edges shed (A.5 step 3): only white space, or an opening quote glued to a space.

    ``[n_tokens]`` bool. An empty surface (a lone ``▁`` the decoder drops) counts as white space.
    """
    return np.array([s.strip() == "" or s == OPEN_QUOTE for s in surfaces], dtype=bool)


def align_spans(starts: np.ndarray, ends: np.ndarray, spans: Iterable[Span], edges: np.ndarray,
                prompt_id: str = "?", text: str = "") -> np.ndarray:
    """Instruction mask over tokens: for each span, the tokens overlapping it minus shed edge tokens.

    ``starts, ends [n_tokens]`` character offsets of each token in the prompt's coordinates (a token with
    ``end <= start``, such as a special token, never counts); ``edges [n_tokens]`` from :func:`edge_tokens`.
    Each span is trimmed on its own, so white space between two instruction sentences stays context.
    Returns ``[n_tokens]`` bool. A span that overlaps no token raises :class:`DataError`.
    """
    starts, ends = np.asarray(starts), np.asarray(ends)
    real = ends > starts
    mask = np.zeros(starts.shape, dtype=bool)
    for s, e in spans:
        hit = np.flatnonzero(real & (starts < e) & (ends > s))
        if hit.size == 0:
            raise DataError(f"prompt {prompt_id!r}: instruction span {text[s:e]!r} covers no token; "
                                   "check the dataset's instruction annotation against the prompt text")
        lo, hi = int(hit[0]), int(hit[-1]) + 1
        while lo < hi and (edges[lo] or not real[lo]):
            lo += 1
        while hi > lo and (edges[hi - 1] or not real[hi - 1]):
            hi -= 1
        mask[lo:hi] |= real[lo:hi]
    return mask


__all__ = ["DataError", "align_spans", "annotated_spans", "edge_tokens", "sentence_spans",
           "substring_span", "token_surfaces"]
