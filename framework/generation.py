"""Batches and responses: left-padded batches of prompt (+ response) ids, and greedy generation.

``make_batches`` lays prompts out the way every trace and every plugin sees them (left padding, position ids
counting real tokens). ``generate_responses`` fills each prompt's ``response_ids`` with the model's greedy
response, without its stop token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from tuneshift import remote
from tuneshift.data import EncodedPrompt, left_pad

if TYPE_CHECKING:
    from tuneshift.runner import ModelRun


@dataclass
class Batch:
    """Prompts (with responses when generated) as one left-padded batch."""

    index: int
    items: list[EncodedPrompt]
    input_ids: torch.Tensor  # [B, T] prompt + response, left-padded
    attention_mask: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]

    @property
    def response_tail(self) -> int | None:
        """Positions at the end of the batch that hold every row's response predictions: ``max M_b + 1``.

        Row b's logits at its last ``M_b + 1`` positions predict its response tokens and then the token after
        them (its stop token), because left padding ends every row at the last column. None without responses.
        """
        lengths = [e.n_response for e in self.items if e.response_ids is not None]
        return min(max(lengths) + 1, int(self.input_ids.shape[1])) if lengths else None


@dataclass
class ResponsePositions:
    """Where each response token of a batch is predicted, within the batch's last ``tail`` positions.

    One entry per scored position (``N`` of them): ``rows [N]`` (row of the batch), ``cols [N]`` (index into the
    ``tail`` slice of a ``reduce="tail"`` capture), ``m [N]`` (0-based index of the predicted token in its
    response; ``M_b`` for the stop token), ``targets [N]`` (the predicted token ids), ``is_stop [N]`` bool.
    """

    rows: torch.Tensor
    cols: torch.Tensor
    m: torch.Tensor
    targets: torch.Tensor
    is_stop: torch.Tensor

    def of_row(self, b: int) -> torch.Tensor:
        """Entry indices of row ``b`` (in response order)."""
        return torch.nonzero(self.rows == b).flatten()

    def columns(self, batch: "Batch") -> dict[str, np.ndarray]:
        """The columns a per-position table starts with: ``id, category, m, n_response, is_stop, token_id``."""
        rows = self.rows.numpy()
        per_row = lambda values: np.array(values, dtype=object)[rows]  # noqa: E731
        return {"id": per_row([e.prompt.id for e in batch.items]),
                "category": per_row([e.prompt.category for e in batch.items]), "m": self.m.numpy(),
                "n_response": np.array([e.n_response for e in batch.items], dtype=np.int64)[rows],
                "is_stop": self.is_stop.numpy(), "token_id": self.targets.numpy()}


def response_positions(batch: "Batch", tail: int, include_stop: bool = True) -> ResponsePositions:
    """Row b's logit at tail index ``tail - 1 - M_b + m`` predicts its response token m; at ``tail - 1`` the stop."""
    rows, cols, ms, targets, stops = [], [], [], [], []
    for b, item in enumerate(batch.items):
        M = item.n_response
        ids = item.response_ids.tolist() if M else []
        if include_stop and item.stop_id is not None:
            ids = ids + [item.stop_id]
        n = len(ids)
        rows += [b] * n
        cols += [tail - 1 - M + m for m in range(n)]
        ms += list(range(n))
        targets += ids
        stops += [m == M for m in range(n)]
    as_long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return ResponsePositions(as_long(rows), as_long(cols), as_long(ms), as_long(targets),
                             torch.tensor(stops, dtype=torch.bool))


def make_batches(items: list[EncodedPrompt], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Consecutive batches of prompt (+ response) ids, left-padded with position ids over real tokens."""
    for index, start in enumerate(range(0, len(items), batch_size)):
        chunk = items[start:start + batch_size]
        seqs = [e.input_ids if e.response_ids is None else torch.cat([e.input_ids, e.response_ids]) for e in chunk]
        ids, mask, pos = left_pad(seqs, pad_id)
        yield Batch(index, chunk, ids, mask, pos)


def stop_ids(model, tokenizer) -> set[int]:
    """Token ids that end a response: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id if model.generation_config is not None else None
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


@torch.no_grad()
def generate_responses(run: "ModelRun", max_new_tokens: int, batch_size: int, progress: bool) -> None:
    """Greedy responses of ``run.model`` to its own prompts, in place (``response_ids`` without the stop token)."""
    stops = stop_ids(run.model, run.tokenizer)
    pad = run.tokenizer.pad_token_id
    batches = list(make_batches(run.encoded, batch_size, pad))
    for batch in tqdm(batches, desc=f"generate {run.name}", disable=not progress, leave=False):
        options = dict(do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=pad,
                       eos_token_id=sorted(stops) or None, top_p=None, top_k=None, temperature=None)
        if run.remote:  # shipped like any trace (tuneshift.remote): same greedy ids
            out = remote.generate(run.nnsight, batch.input_ids, batch.attention_mask, run.remote, **options)
        else:
            out = run.model.generate(input_ids=batch.input_ids.to(run.device),
                                     attention_mask=batch.attention_mask.to(run.device), **options)
        new = out[:, batch.input_ids.shape[1]:].cpu()
        for item, row in zip(batch.items, new):
            stop_at = [i for i, t in enumerate(row.tolist()) if t in stops]
            item.response_ids = row[: stop_at[0] if stop_at else len(row)].clone()
            item.stop_id = int(row[stop_at[0]]) if stop_at else None
            item.response_text = run.tokenizer.decode(item.response_ids, skip_special_tokens=True)


__all__ = ["Batch", "ResponsePositions", "generate_responses", "make_batches", "response_positions", "stop_ids"]
