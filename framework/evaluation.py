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
forward; the score is their mean log-probability.

Canonical pattern::

    from tuneshift.evaluation import task_score
    from tuneshift.interventions import AblateHeads
    base = task_score(run, prompts, scorer="organism")                       # run: a ModelRun
    ablated = task_score(run, prompts, [AblateHeads(2, heads=torch.tensor([1, 0, 0, 0]).bool())])
    print(base.mean(), ablated.mean())
"""
from __future__ import annotations

import gc
import inspect
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

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
    """A chunk of (condition, item) rows as one batch (what ``build`` receives).

    Layout: each row's prompt is left-padded so every prompt ends at column ``prompt_width``; with references
    (teacher-forced scoring), each row's reference follows its prompt, right-padded."""

    condition: torch.Tensor       # [R] condition index of each row
    item: torch.Tensor            # [R] item index of each row
    input_ids: torch.Tensor       # [R, T]
    attention_mask: torch.Tensor  # [R, T]
    position_ids: torch.Tensor    # [R, T]
    lengths: torch.Tensor         # [R] real tokens of each row (prompt + reference)
    n_prompt: torch.Tensor        # [R] prompt tokens of each row
    offsets: torch.Tensor         # [R] column of each row's first real token

    @property
    def width(self) -> int:
        return int(self.input_ids.shape[1])

    @property
    def prompt_width(self) -> int:
        return int((self.offsets + self.n_prompt).max())

    def place(self, per_item: Sequence[torch.Tensor]) -> torch.Tensor:
        """``[R, T, ...]``: each row's item values ``per_item[i]`` ``[n_i, ...]`` (over its own tokens from the
        first, at most ``lengths[r]`` of them) laid out like its tokens; zeros elsewhere."""
        first = per_item[int(self.item[0])]
        out = torch.zeros((len(self.item), self.width, *first.shape[1:]), dtype=first.dtype)
        for r, (i, offset, n) in enumerate(zip(self.item.tolist(), self.offsets.tolist(), self.lengths.tolist())):
            values = per_item[i][:n]
            out[r, offset:offset + values.shape[0]] = values
        return out

    def token_mask(self, per_row: Sequence[Sequence[int] | torch.Tensor]) -> torch.Tensor:
        """``[R, T]`` bool: row r marks the tokens ``per_row[r]`` (indices over the row's own tokens, from 0)."""
        mask = torch.zeros(self.input_ids.shape, dtype=torch.bool)
        for r, (indices, offset) in enumerate(zip(per_row, self.offsets.tolist())):
            mask[r, offset + torch.as_tensor(indices, dtype=torch.long)] = True
        return mask


def layout(prompts: Sequence[torch.Tensor], references: Sequence[torch.Tensor] | None, pad_id: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``ids, mask, positions [R, T]`` and ``offsets [R]``: prompts left-padded to end in one column, references
    (if any) right after, right-padded; positions count each row's real tokens."""
    ids, mask, _ = left_pad(prompts, pad_id)
    offsets = ids.shape[1] - torch.tensor([int(p.numel()) for p in prompts])
    if references is not None:
        width = max(int(r.numel()) for r in references)
        tail = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        tail_mask = torch.zeros((len(prompts), width), dtype=mask.dtype)
        for r, ref in enumerate(references):
            tail[r, :ref.numel()], tail_mask[r, :ref.numel()] = ref, 1
        ids, mask = torch.cat([ids, tail], 1), torch.cat([mask, tail_mask], 1)
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), offsets


Build = Callable[[Rows], Sequence[Intervention]]


@dataclass
class EvalResult:
    """Scores ``[n_conditions, n_items]``; with ``logprob=True`` also the reference log-probabilities ``[C, N]``;
    with ``keep_answers`` the generated answers ``[n_conditions][n_items]``."""

    scores: np.ndarray
    logprob: np.ndarray | None = None
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


def chunks(lengths: Sequence[int], n_conditions: int, max_rows: int, max_tokens: int,
           tails: Sequence[int] | None = None):
    """(condition, item) index tensors of each chunk: rows sorted by length (longest first; then by ``tails``,
    the reference lengths), at most ``max_rows`` rows and ``max_tokens`` padded tokens each."""
    tails = tails or [0] * len(lengths)
    order = sorted(((c, i) for c in range(n_conditions) for i in range(len(lengths))),
                   key=lambda ci: (-lengths[ci[1]], -tails[ci[1]], ci[1], ci[0]))
    start = 0
    while start < len(order):
        width = lengths[order[start][1]] + max(tails)
        size = max(1, min(max_rows, max_tokens // max(width, 1)))
        part = order[start:start + size]
        start += len(part)
        yield torch.tensor([c for c, _ in part]), torch.tensor([i for _, i in part])


def _cache(run):
    from transformers import DynamicCache

    arg = "cache" if "cache" in inspect.signature(run.model.forward).parameters else "past_key_values"
    return DynamicCache(config=run.model.config), arg


@torch.no_grad()
def _prefill(run, ids, mask, pos, ivs, n_ref: torch.Tensor | None, cache=None, cache_arg: str = "cache"):
    """The first forward: ``(next-token logits [R, V] at each prompt's end, reference mean log-probs [R] | None)``.

    With references, the logits of the last ``M + 1`` columns are kept (M = the reference width): column 0 is the
    prompt's last position, columns j predict reference token j."""
    kwargs = {"use_cache": True, cache_arg: cache} if cache is not None else {}
    if n_ref is None:
        out = ProbeRegistry(run.adapter, {"e": [Probe("logits", reduce="last")]}).run(
            run.nnsight, ids, mask, pos, ivs, step=0, logits_to_keep=1, **kwargs)["e"]["logits:last"]
        return out, None
    width = int(n_ref.max())
    logits = ProbeRegistry(run.adapter, {"e": [Probe("logits")]}).run(
        run.nnsight, ids, mask, pos, ivs, step=0, logits_to_keep=width + 1, **kwargs)["e"]["logits"]
    logp = logits[:, :-1].log_softmax(-1)  # float32 log-softmax is stable; summed in float64 below
    token_lp = logp.gather(-1, ids[:, -width:, None]).squeeze(-1).double()  # [R, M]
    used = torch.arange(width)[None, :] < n_ref[:, None]
    return logits[:, 0], (token_lp * used).sum(1) / n_ref.clamp(min=1)


@torch.no_grad()
def greedy_generate(run, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    interventions: Sequence[Intervention] = (), max_new_tokens: int = 64,
                    stops: Sequence[int] | None = None, n_ref: torch.Tensor | None = None):
    """Greedy responses (without the stop token) of a left-padded batch with ``interventions`` at every step.

    With ``n_ref`` (the reference length of each row, laid out by :func:`layout` after the prompts), the first
    forward also scores the references teacher-forced; returns ``(responses, logprobs [R])`` then. The cache is
    cut back to the prompts before decoding, so the answers are those of the prompts alone."""
    stops = torch.tensor(sorted(stop_ids(run.model, run.tokenizer) if stops is None else stops), dtype=torch.long)
    registry = ProbeRegistry(run.adapter, {"eval": [Probe("logits", reduce="last")]})
    cache, cache_arg = _cache(run)
    if n_ref is not None and hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()  # sliding-window layers keep what the crop below must be able to undo
    logits, ref_lp = _prefill(run, input_ids, attention_mask, position_ids, interventions, n_ref, cache, cache_arg)
    prompt_width = input_ids.shape[1] - (0 if n_ref is None else int(n_ref.max()))
    if n_ref is not None:
        cache.crop(-int(n_ref.max()))  # back to the prompts: negative = tokens removed (every transformers 5)
        for layer in getattr(cache, "layers", ()):
            if getattr(layer, "record_past", False):
                layer.record_past = False
    rows = input_ids.shape[0]
    out = torch.zeros((rows, max_new_tokens), dtype=torch.long)
    lengths = torch.full((rows,), max_new_tokens, dtype=torch.long)
    alive = torch.arange(rows)
    ivs, mask, pos = list(interventions), attention_mask[:, :prompt_width], position_ids[:, :prompt_width]
    nxt = torch.empty(0, dtype=torch.long)  # step 0 decodes from the prompt's logits
    for step in range(max_new_tokens):
        if step:
            logits = registry.run(run.nnsight, nxt[:, None], mask, pos, ivs, step=step, use_cache=True,
                                  logits_to_keep=1, **{cache_arg: cache})["eval"]["logits:last"]  # [R_alive, V]
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
    responses = [out[r, :lengths[r]].clone() for r in range(rows)]
    return responses if n_ref is None else (responses, ref_lp)


def evaluate(run, items: Sequence[EncodedPrompt], n_conditions: int, build: Build | None = None,
             scorer: str | Scorer = "organism", max_new_tokens: int = 64, logprob: bool = False,
             max_rows: int = 128, max_tokens: int = 16384, progress: bool = False, keep_answers: bool = False,
             desc: str = "evaluate") -> EvalResult:
    """Score ``items`` under ``n_conditions`` conditions; ``build(rows)`` gives a chunk's interventions.

    ``run`` is a :class:`~tuneshift.runner.ModelRun` (model, tokenizer, adapter, nnsight). Rows of a chunk mix
    conditions and items; ``build`` turns ``rows.condition`` / ``rows.item`` into per-row intervention
    parameters (or returns broadcast ones). A text scorer generates; ``logprob=True`` (or the scorer ``logprob``)
    also scores the references teacher-forced, in the same first forward. Scores are float64 ``[C, N]``.
    """
    scorer = _scorer(scorer)
    generate = scorer.kind != "logprob"
    logprob = logprob or not generate
    refs = reference_ids(run.tokenizer, items)  # also checks every item has a reference
    prompt_len = [e.n_prompt for e in items]
    ref_len = [int(r.numel()) for r in refs] if logprob else None
    if logprob:  # bound the kept logits ([rows, M + 1, vocab] floats) to about 512 MB
        max_rows = max(1, min(max_rows, (1 << 27) // ((max(ref_len) + 1) * run.adapter.vocab_size)))
    scores = np.zeros((n_conditions, len(items)), dtype=np.float64)
    logprobs = np.zeros_like(scores) if logprob else None
    answers = [[""] * len(items) for _ in range(n_conditions)] if keep_answers and generate else None
    generated = 0
    parts = list(chunks(prompt_len, n_conditions, max_rows, max_tokens, ref_len))
    for cond, item in tqdm(parts, desc=desc, disable=not progress, leave=False):
        its = item.tolist()
        ids, mask, pos, offsets = layout([items[i].input_ids for i in its], [refs[i] for i in its] if logprob else None,
                                         run.tokenizer.pad_token_id)
        n_ref = torch.tensor([ref_len[i] for i in its]) if logprob else None
        rows = Rows(cond, item, ids, mask, pos, torch.tensor([prompt_len[i] for i in its]) + (0 if n_ref is None
                    else n_ref), torch.tensor([prompt_len[i] for i in its]), offsets)
        ivs = list(build(rows)) if build is not None else []
        if not generate:
            logprobs[cond.numpy(), item.numpy()] = _prefill(run, ids, mask, pos, ivs, n_ref)[1].numpy()
            continue
        out = greedy_generate(run, ids, mask, pos, ivs, max_new_tokens, n_ref=n_ref)
        responses, ref_lp = out if logprob else (out, None)
        if ref_lp is not None:
            logprobs[cond.numpy(), item.numpy()] = ref_lp.numpy()
        for c, i, resp in zip(cond.tolist(), its, responses):
            text = run.tokenizer.decode(resp, skip_special_tokens=True)
            prompt = items[i].prompt
            scores[c, i] = scorer.score(text, prompt.reference, prompt.category)
            generated += int(resp.numel())
            if answers is not None:
                answers[c][i] = text
    if not generate:
        scores = logprobs
    return EvalResult(scores, logprobs, answers, generated)


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
        ids, mask, pos, offsets = layout([sequences[i] for i in item.tolist()], None, run.tokenizer.pad_token_id)
        n = torch.tensor([lengths[i] for i in item.tolist()])
        rows = Rows(cond, item, ids, mask, pos, n, n, offsets)
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


@contextmanager
def loaded_model(key: str, spec, chat_template: bool | None = None) -> Iterator:
    """A :class:`~tuneshift.runner.ModelRun` of ``spec`` for a hook that needs a model again (e.g. ``on_compare``),
    freed on exit so that one model is in memory at a time. ``chat_template`` None: the spec's setting."""
    from tuneshift.adapters import ModelAdapter
    from tuneshift.loading import load_model
    from tuneshift.runner import ModelRun

    model, tokenizer = load_model(spec)
    chat = spec.chat_template if chat_template is None else chat_template
    run = ModelRun(key, spec.name, spec, model, tokenizer, ModelAdapter(model), bool(chat))
    try:
        yield run
    finally:
        run.model = run.lm = None
        del model, run
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


__all__ = ["EvalResult", "EvaluationError", "Rows", "capture_sites", "chunks", "evaluate", "greedy_generate",
           "layout", "loaded_model", "reference_ids", "site_means", "task_score"]
