"""Held-out evaluation: both models answer the same chat-formatted prompts greedily; answers are scored per task.

Scores (the functions live in the core, :mod:`tuneshift.scoring`, so causal tests score alike): ``exact`` compares
the answer with the reference after stripping white space at both ends of the text and of every line (case and
punctuation count, and line breaks count, so a ``list`` answer is not a ``repeat`` answer); ``f1`` is the SQuAD
token F1 (lower case, punctuation removed, bag of words), used for the recall tasks ``define`` and ``describe``
whose exact gloss or wiki sentence a 4 M-parameter model rarely reproduces.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

from tuneshift.scoring import exact_match, token_f1

from .tasks import TASKS_BY_NAME, Example

__all__ = ["exact_match", "generate_answers", "score_answers", "token_f1"]


@torch.no_grad()
def generate_answers(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: Sequence[str],
                     max_new_tokens: int = 64, batch_size: int = 32) -> list[str]:
    """Greedy answers to ``prompts``, each rendered with the chat template and a generation prompt.

    Batches are left-padded; an answer is the decoded text up to the first ``<|eos|>`` (or the token limit).
    """
    model.eval()
    answers = []
    for start in range(0, len(prompts), batch_size):
        encoded = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=True)["input_ids"]
                   for p in prompts[start:start + batch_size]]
        width = max(len(ids) for ids in encoded)
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(e)) + e for e in encoded])
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded])
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in out[:, width:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[:row.index(tokenizer.eos_token_id)]
            answers.append(tokenizer.decode(row, skip_special_tokens=True))
    return answers


def score_answers(examples: Sequence[Example], answers: Sequence[str]) -> dict:
    """Per-task scores ``{task: {metric, score, exact, f1, n}}`` plus ``overall`` (the mean of task scores).

    ``score`` is the task's own metric (see :data:`tuneshift.models.organism.tasks.TASKS`); exact and F1 are given
    for every task as well.
    """
    by_task: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for example, answer in zip(examples, answers, strict=True):
        by_task[example.category].append((exact_match(answer, example.reference), token_f1(answer, example.reference)))
    result: dict = {"tasks": {}}
    for name, pairs in by_task.items():
        metric = TASKS_BY_NAME[name].metric
        exact = sum(p[0] for p in pairs) / len(pairs)
        f1 = sum(p[1] for p in pairs) / len(pairs)
        result["tasks"][name] = {"metric": metric, "score": exact if metric == "exact" else f1,
                                 "exact": exact, "f1": f1, "n": len(pairs)}
    result["overall"] = sum(t["score"] for t in result["tasks"].values()) / len(result["tasks"])
    return result
