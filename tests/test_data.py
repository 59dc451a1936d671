"""Prompt datasets and the alignment of instruction spans onto tokens of different tokenizers."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tuneshift.data import (DataError, Prompt, encode_prompt, left_pad, load_final_dataset, load_jsonl, load_prompts,
                            sentence_spans)
from tuneshift.testing import tiny_tokenizer

REFERENCE = Path(os.environ.get("TUNESHIFT_REFERENCE",
                            Path(__file__).resolve().parents[2] / "shared" / "reference")) / "datasets"


def _whitespace_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with a different segmentation than byte-level BPE (and a BOS token)."""
    words = "<unk> <bos> Write a poem about the sea . Mood : calm and hopeful".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", unk_token="<unk>", pad_token="<unk>")


PROMPT = Prompt("p1", "Write a poem about the sea.\nMood: calm and hopeful", ((0, 27),))


@pytest.mark.parametrize("make_tokenizer", [tiny_tokenizer, _whitespace_tokenizer])
def test_instruction_tokens_follow_character_offsets(make_tokenizer):
    tok = make_tokenizer()
    enc = encode_prompt(tok, PROMPT)
    assert enc.input_ids[0] == tok.bos_token_id and not enc.instruction_mask[0]  # BOS, as in the paper
    text = tok.decode(enc.input_ids[enc.instruction_mask]).replace(" ", "")
    assert text == "Writeapoemaboutthesea."
    context = tok.decode(enc.input_ids[enc.content_mask & ~enc.instruction_mask]).replace(" ", "")
    assert context.replace("\n", "") == "Mood:calmandhopeful"


def test_chat_template_shifts_offsets_onto_the_content():
    tok = tiny_tokenizer()
    enc = encode_prompt(tok, PROMPT, chat_template=True)
    assert enc.tokens[0] == "<|user|>" and enc.tokens[-1] == "<|assistant|>"
    assert not enc.content_mask[0] and not enc.content_mask[-1]
    assert tok.decode(enc.input_ids[enc.instruction_mask]) == "Write a poem about the sea."


def test_span_errors_name_the_prompt(tmp_path):
    with pytest.raises(DataError, match="'p2'.*outside"):
        Prompt("p2", "short", ((0, 50),))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x1", "prompt": "Translate this.", "instructions": ["Summarize"]}) + "\n")
    with pytest.raises(DataError, match="'x1'.*does not occur"):
        load_jsonl(bad)
    with pytest.raises(DataError, match="does not exist"):
        load_prompts("jsonl", str(tmp_path / "missing.jsonl"))
    with pytest.raises(DataError, match="unknown dataset format 'csv'"):
        load_prompts("csv")


def test_sentences_split_after_punctuation_and_colon():
    text = "Rewrite this. Be brief! Why? Input: the text"
    assert [text[s:e] for s, e in sentence_spans(text)] == ["Rewrite this.", "Be brief!", "Why?", "Input:", "the text"]


def test_builtin_set_covers_the_task_kinds():
    prompts = load_prompts("builtin")
    assert len(prompts) >= 40
    kinds = {p.category for p in prompts}
    assert {"writing", "coding", "math", "translation", "qa", "classification"} <= kinds
    assert all(p.instruction_spans for p in prompts)
    tok = tiny_tokenizer()
    assert all(encode_prompt(tok, p).instruction_mask.any() for p in prompts)


@pytest.mark.skipif(not (REFERENCE / "FinalDataset.tsv").is_file(), reason="shared reference data not present")
def test_final_dataset_spans_are_whole_sentences():
    prompts = {p.id: p for p in load_final_dataset(REFERENCE / "FinalDataset.tsv")}
    assert len(prompts) == 632
    assert sum(p.split == "self_instruct" for p in prompts.values()) == 252
    # an annotated fragment ("can you suggest ... San Francisco?") becomes its whole sentence
    p = prompts["lima_author_48"]
    assert p.instruction_text[0].startswith("My friends are visiting California soon, can you suggest")
    # the three sentences of user_oriented_task_0, each its own span; its "Input:" label adds nothing
    assert prompts["user_oriented_task_0"].instruction_text == [
        "The sentence you are given might be too wordy, complicated, or unclear.",
        "Rewrite the sentence and make your writing clearer by keeping it concise.",
        "Whenever possible, break complex sentences into multiple sentences and eliminate unnecessary words."]
    # a line break ends every sentence, so no span holds a newline or an Input:/Output: label
    texts = [t for p in prompts.values() for t in p.instruction_text]
    assert not any("\n" in t or "Output:" in t or t.startswith("Input:") for t in texts)


def test_left_pad_positions_count_real_tokens():
    ids, mask, pos = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]
