"""The evaluation hook: a held-out task score (or any scorer) with interventions active, for many conditions at once.

What it is for
    "Task score with heads X ablated" is one call: :func:`task_score`. A causal test scores many conditions (the
    selected units and dozens of random draws) on the same items: :func:`evaluate` lays every (condition, item)
    row out in length-sorted, left-padded chunks, asks the caller's ``build(rows)`` for the chunk's per-row
    interventions (:mod:`tuneshift.interventions`), and generates or teacher-forces through the probe
    registry, so each forward evaluates many draws.

Generation is greedy, exactly as the evaluation's (and the runner's) ``model.generate(do_sample=False)``: the
prompt in one forward, then one token per step with the KV cache, argmax of the logits, a row stops at its first
stop token (the generation config's EOS ids and the tokenizer's), at most ``max_new_tokens``. Finished rows are
dropped from the batch (and from the interventions' per-row parameters), so a long answer does not make the short
ones pay. No logits processors run (the runner and the organism's evaluation use none either).

Teacher-forced scoring (scorer ``logprob``): the prompt followed by the reference tokens and the stop token in one
forward; the score is their mean log-probability (float64 log-softmax).

Canonical pattern::

    from tuneshift.evaluation import task_score
    from tuneshift.interventions import AblateHeads
    base = task_score(run, prompts, scorer="organism")                       # run: a ModelRun
    ablated = task_score(run, prompts, [AblateHeads(2, heads=torch.tensor([1, 0, 0, 0]).bool())])
    print(base.mean(), ablated.mean())
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from tuneshift.data import EncodedPrompt, left_pad
from tuneshift.errors import TuneshiftError
from tuneshift.generation import stop_ids
from tuneshift.interventions import Intervention, select_rows
from tuneshift.probes import Probe, ProbeRegistry
from tuneshift.scoring import SCORERS, Scorer


class EvaluationError(TuneshiftError, ValueError):
    """Items cannot be scored as asked (no reference answer, an unknown scorer); the message says the fix."""


@dataclass
class Rows:
    """A chunk of (condition, item) rows as one left-padded batch (what ``build`` receives)."""

    condition: torch.Tensor       # [R] condition index of each row
    item: torch.Tensor            # [R] item index of each row
    input_ids: torch.Tensor       # [R, T]
    attention_mask: torch.Tensor  # [R, T]
    position_ids: torch.Tensor    # [R, T]
    lengths: torch.Tensor         # [R] real tokens of each row
    n_prompt: torch.Tensor        # [R] prompt tokens of each row (the rest is the reference, teacher-forced)

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def offsets(self) -> torch.Tensor:
        """``[R]`` where each row's first real token sits (left padding)."""
        return self.width - self.lengths

    def place(self, per_item: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[R, T, ...]``: each row's item values ``per_item[i]`` ``[n_i, ...]`` (over its own tokens from the
        first; at most its length) right-aligned like its tokens; zeros elsewhere."""
        first = per_item[int(self.item[0])]
        out = torch.zeros((len(self.item), self.width, *first.shape[1:]), dtype=first.dtype)
        for r, (i, offset) in enumerate(zip(self.item.tolist(), self.offsets.tolist())):
            values = per_item[i]
            out[r, offset:offset + values.shape[0]] = values
        return out

    def token_mask(self, per_row: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
        """``[R, T]`` bool: row r marks the tokens ``per_row[r]`` (indices over the row's own tokens, from 0)."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        for r, (indices, offset) in enumerate(zip(per_row, self.offsets.tolist())):
            mask[r, offset + torch.as_tensor(indices, dtype=torch.long)] = True
        return mask


Build = Callable[[Rows], Sequence[Intervention]]


@dataclass
class EvalResult:
    """Scores ``[n_conditions, n_items]`` and, for text scorers, the answers ``[n_conditions][n_items]``."""

    scores: np.ndarray
    answers: list[list[str]] | None = None
    generated_tokens: int = 0

    def mean(self) -> np.ndarray:
        return self.scores.mean(axis=1)


def _scorer(scorer: str | Scorer) -> Scorer:
    return SCORERS.get(scorer) if isinstance(scorer, str) else scorer


def reference_ids(tokenizer, items: Sequence[EncodedPrompt], with_stop: bool = True) -> list[torch.Tensor]:
    """Each item's reference answer as token ids (plus the stop token), tokenized on its own."""
    missing = [e.prompt.id for e in items if e.prompt.reference is None]
    if missing:
        raise EvaluationError(f"{len(missing)} prompts have no reference answer (e.g. {missing[0]!r}); scoring needs "
                              "a 'reference' field in the dataset (the organism's heldout_prompts.jsonl has one)")
    stop = [tokenizer.eos_token_id] if with_stop and tokenizer.eos_token_id is not None else []
    return [torch.tensor(tokenizer(e.prompt.reference, add_special_tokens=False)["input_ids"] + stop,
                         dtype=torch.long) for e in items]


def chunks(lengths: Sequence[int], n_conditions: int, max_rows: int, max_tokens: int):
    """(condition, item) index tensors of each chunk: rows sorted by length (longest first), at most ``max_rows``
    rows and ``max_tokens`` padded tokens each."""
    order = sorted(((c, i) for c in range(n_conditions) for i in range(len(lengths))),
                   key=lambda ci: (-lengths[ci[1]], ci[1], ci[0]))
    start = 0
    while start < len(order):
        width = lengths[order[start][1]]
        size = max(1, min(max_rows, max_tokens // max(width, 1)))
        part = order[start:start + size]
        start += len(part)
        yield torch.tensor([c for c, _ in part]), torch.tensor([i for _, i in part])


@torch.no_grad()
def greedy_generate(run, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    interventions: Sequence[Intervention] = (), max_new_tokens: int = 64,
                    stops: Sequence[int] | None = None) -> list[torch.Tensor]:
    """Greedy responses (without the stop token) of a left-padded batch with ``interventions`` at every step."""
    from transformers import DynamicCache

    stops = torch.tensor(sorted(stop_ids(run.model, run.tokenizer) if stops is None else stops), dtype=torch.long)
    registry = ProbeRegistry(run.adapter, {"eval": [Probe("logits", reduce="last")]})
    cache = DynamicCache(config=run.model.config)
    rows = input_ids.shape[0]
    out = torch.zeros((rows, max_new_tokens), dtype=torch.long)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long)
    alive = torch.arange(rows)
    ivs, mask, pos = list(interventions), attention_mask, position_ids
    step_ids = input_ids
    for step in range(max_new_tokens):
        logits = registry.run(run.nnsight, step_ids, mask, pos, ivs, step=step, past_key_values=cache,
                              use_cache=True, logits_to_keep=1)["eval"]["logits:last"]  # [R_alive, V]
        nxt = logits.argmax(-1)
        out[alive, step] = nxt
        done = torch.isin(nxt, stops)
        lengths[alive[done]] = step
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        if bool(done.any()):
            keep = (~done).nonzero().squeeze(1)
            cache.batch_select_indices(keep.to(run.device))
            alive, nxt, mask, pos, ivs = alive[keep], nxt[keep], mask[keep], pos[keep], select_rows(ivs, keep)
        mask = torch.cat([mask, torch.ones((len(alive), 1), dtype=mask.dtype)], dim=1)
        pos = pos[:, -1:] + 1
        step_ids = nxt[:, None]
    return [out[r, :lengths[r]].clone() for r in range(rows)]


@torch.no_grad()
def _reference_logprobs(run, rows: Rows, interventions: Sequence[Intervention]) -> torch.Tensor:
    """``[R]`` mean log-probability of each row's reference tokens (everything after its prompt)."""
    n_ref = rows.lengths - rows.n_prompt  # [R]
    keep = int(n_ref.max()) + 1
    registry = ProbeRegistry(run.adapter, {"eval": [Probe("logits")]})
    logits = registry.run(run.nnsight, rows.input_ids, rows.attention_mask, rows.position_ids, interventions,
                          logits_to_keep=keep)["eval"]["logits"]  # [R, keep, V], the last `keep` positions
    logp = logits.double().log_softmax(-1)
    j = torch.arange(keep - 1)  # kept index j predicts the token at kept index j + 1
    token_lp = logp[:, :-1].gather(-1, rows.input_ids[:, -keep + 1:, None]).squeeze(-1)  # [R, keep - 1]
    used = j[None, :] >= (keep - 1 - n_ref)[:, None]
    return (token_lp * used).sum(1) / n_ref.clamp(min=1)


def evaluate(run, items: Sequence[EncodedPrompt], n_conditions: int, build: Build | None = None,
             scorer: str | Scorer = "organism", max_new_tokens: int = 64, max_rows: int = 128,
             max_tokens: int = 16384, progress: bool = False, keep_answers: bool = False,
             desc: str = "evaluate") -> EvalResult:
    """Score ``items`` under ``n_conditions`` conditions; ``build(rows)`` gives a chunk's interventions.

    ``run`` is a :class:`~tuneshift.runner.ModelRun` (model, tokenizer, adapter, nnsight). Rows of a chunk mix
    conditions and items; ``build`` turns ``rows.condition`` / ``rows.item`` into per-row intervention
    parameters (or returns broadcast ones). Returns scores ``[n_conditions, n_items]`` (float64).
    """
    scorer = _scorer(scorer)
    teacher = scorer.kind == "logprob"
    refs = reference_ids(run.tokenizer, items)  # also checks every item has a reference
    seqs = [torch.cat([e.input_ids, refs[i]]) if teacher else e.input_ids for i, e in enumerate(items)]
    lengths = [int(s.numel()) for s in seqs]
    scores = np.zeros((n_conditions, len(items)), dtype=np.float64)
    answers = [[""] * len(items) for _ in range(n_conditions)] if keep_answers and not teacher else None
    generated = 0
    parts = list(chunks(lengths, n_conditions, max_rows, max_tokens))
    for cond, item in tqdm(parts, desc=desc, disable=not progress, leave=False):
        ids, mask, pos = left_pad([seqs[i] for i in item.tolist()], run.tokenizer.pad_token_id)
        rows = Rows(cond, item, ids, mask, pos, torch.tensor([lengths[i] for i in item.tolist()]),
                    torch.tensor([items[i].n_prompt for i in item.tolist()]))
        ivs = list(build(rows)) if build is not None else []
        if teacher:
            scores[cond.numpy(), item.numpy()] = _reference_logprobs(run, rows, ivs).numpy()
            continue
        responses = greedy_generate(run, ids, mask, pos, ivs, max_new_tokens)
        for c, i, resp in zip(cond.tolist(), item.tolist(), responses):
            text = run.tokenizer.decode(resp, skip_special_tokens=True)
            prompt = items[i].prompt
            scores[c, i] = scorer.score(text, prompt.reference, prompt.category)
            generated += int(resp.numel())
            if answers is not None:
                answers[c][i] = text
    return EvalResult(scores, answers, generated)


def task_score(run, items: Sequence[EncodedPrompt], interventions: Sequence[Intervention] = (),
               scorer: str | Scorer = "organism", max_new_tokens: int = 64, **kwargs) -> np.ndarray:
    """``[n_items]`` scores of ``items`` with ``interventions`` (broadcast over rows) active: one call."""
    fixed = list(interventions)
    return evaluate(run, items, 1, lambda rows: fixed, scorer, max_new_tokens, **kwargs).scores[0]


@torch.no_grad()
def capture_sites(run, sequences: Sequence[torch.Tensor], sites: Sequence[str], max_rows: int = 64,
                  build: Build | None = None) -> dict[str, list[torch.Tensor]]:
    """Each sequence's activations at ``sites`` over its own tokens: ``{site: [tensor [n_i, ...]]}`` (CPU).

    The source of a :class:`~tuneshift.interventions.Patch` (place it into a chunk with :meth:`Rows.place`);
    ``build`` may add interventions (one condition: ``rows.condition`` is all zeros).
    """
    registry = ProbeRegistry(run.adapter, {"c": [Probe(s) for s in sites]})
    lengths = [int(s.numel()) for s in sequences]
    out: dict[str, list[torch.Tensor]] = {s: [torch.empty(0)] * len(sequences) for s in sites}
    for cond, item in chunks(lengths, 1, max_rows, 1 << 30):
        ids, mask, pos = left_pad([sequences[i] for i in item.tolist()], run.tokenizer.pad_token_id)
        rows = Rows(cond, item, ids, mask, pos, torch.tensor([lengths[i] for i in item.tolist()]),
                    torch.tensor([lengths[i] for i in item.tolist()]))
        captured = registry.run(run.nnsight, ids, mask, pos, list(build(rows)) if build else [])["c"]
        for site in sites:
            value = captured[Probe(site).key]
            for r, (i, offset) in enumerate(zip(item.tolist(), rows.offsets.tolist())):
                out[site][i] = value[r, offset:].clone()
    return out


@torch.no_grad()
def site_means(run, sequences: Sequence[torch.Tensor], sites: Sequence[str], max_rows: int = 64) -> dict[str, torch.Tensor]:
    """Mean activation at each site over every real token of ``sequences`` (token-weighted), e.g. for mean
    ablation: ``{"layers.2.attn.z": [H, d_h], ...}`` (float32, summed in float64)."""
    registry = ProbeRegistry(run.adapter, {"m": [Probe(s, reduce="mean") for s in sites]})
    lengths = [int(s.numel()) for s in sequences]
    sums: dict[str, torch.Tensor] = {}
    for _, item in chunks(lengths, 1, max_rows, 1 << 30):
        ids, mask, pos = left_pad([sequences[i] for i in item.tolist()], run.tokenizer.pad_token_id)
        captured = registry.run(run.nnsight, ids, mask, pos)["m"]
        weights = mask.sum(1).double()  # [R] real tokens per row
        for site in sites:
            value = captured[Probe(site, reduce="mean").key].double()  # [R, ...] per-row means
            total = torch.einsum("r,r...->...", weights, value)
            sums[site] = sums[site] + total if site in sums else total
    count = float(sum(lengths))
    return {site: (total / count).float() for site, total in sums.items()}


__all__ = ["EvalResult", "EvaluationError", "Rows", "capture_sites", "chunks", "evaluate", "greedy_generate",
           "reference_ids", "site_means", "task_score"]
