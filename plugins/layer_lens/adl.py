"""The activation-difference lens (Minder et al., ICLR 2026; methods.md D.3), in pieces one model at a time.

The mean over texts of ``h_T - h_B`` at a layer and a position equals the difference of the two models'
means, so each model only sums its own residual streams per *slot*:

- ``template:+j``  the j-th chat-template token before the prompt's text (BOS, ``<|user|>``, ...);
- ``template:-j``  the j-th template token before the response (``<|assistant|>`` is ``template:-1``);
- ``response:k``   the k-th token of the shared response (k < ``adl_positions``);
- ``plain:k``      the k-th position of a plain text (BOS + text, no template; the first ``adl_positions``).

The second model of the pair decodes each mean difference through its own logit lens into its top tokens.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch

from tuneshift.probes import Probe, ProbeRegistry


class SlotMeans:
    """Running float64 sums of ``resid_post`` per slot and lensed layer over the batches of one model."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.tokens: dict[str, int] = {}

    def _add(self, label: str, vector: torch.Tensor, token: int) -> None:  # vector [L', d]
        if label not in self.sums:
            self.sums[label], self.counts[label], self.tokens[label] = torch.zeros_like(vector, dtype=torch.float64,
                                                                                        device="cpu"), 0, token
        self.sums[label] += vector.double().cpu()
        self.counts[label] += 1
        if self.tokens[label] != token:
            self.tokens[label] = -1  # the slot holds different tokens in different prompts

    def add_batch(self, batch, resid: dict[int, torch.Tensor], layers: Sequence[int], n_response: int) -> None:
        """Slots of every row of ``batch`` (left-padded prompt + response); ``resid[i]`` is ``[B, T, d]``."""
        stacked = torch.stack([resid[i] for i in layers], 2)                          # [B, T, L', d]
        T = stacked.shape[1]
        for b, item in enumerate(batch.items):
            P, M = item.n_prompt, item.n_response
            start = T - P - M
            content = torch.nonzero(item.content_mask).flatten()
            first, last = (int(content[0]), int(content[-1])) if len(content) else (P, P - 1)
            ids = item.input_ids.tolist()
            for j in range(first):
                self._add(f"template:+{j}", stacked[b, start + j], ids[j])
            for j in range(last + 1, P):
                self._add(f"template:{j - P}", stacked[b, start + j], ids[j])
            for k in range(min(n_response, M)):
                self._add(f"response:{k}", stacked[b, start + P + k], -1)

    def arrays(self, plain: tuple[np.ndarray, int]) -> dict[str, np.ndarray]:
        labels = sorted(self.sums, key=_slot_order)
        means = np.stack([(self.sums[s] / self.counts[s]).numpy() for s in labels]) if labels else np.zeros((0,))
        plain_means, plain_count = plain
        labels += [f"plain:{k}" for k in range(plain_means.shape[0])]
        if plain_means.shape[0]:
            means = np.concatenate([means, plain_means]) if means.size else plain_means
        counts = [self.counts[s] for s in labels if s in self.counts] + [plain_count] * plain_means.shape[0]
        tokens = [self.tokens.get(s, -1) for s in labels]
        return {"labels": np.array(labels, dtype=str), "means": means, "counts": np.array(counts),
                "tokens": np.array(tokens)}


def _slot_order(label: str) -> tuple[int, int]:
    kind, _, index = label.partition(":")
    return ({"template": 0, "response": 1, "plain": 2}[kind], int(index) if int(index) >= 0 else 1000 + int(index))


@torch.no_grad()
def plain_text_means(run, texts: list[list[int]], layers: Sequence[int], n: int,
                     batch_size: int) -> tuple[np.ndarray, int]:
    """Mean ``resid_post`` at the first ``n`` positions of each plain text with at least ``n`` tokens.

    ``[n, L', d]`` float64 and the number of texts; every text is cut to exactly ``n`` tokens, so no padding.
    """
    kept = [t[:n] for t in texts if len(t) >= n]
    d = run.adapter.d_model
    if not kept:
        return np.zeros((0, len(layers), d)), 0
    registry = ProbeRegistry(run.adapter, {"adl": [Probe(f"layers.{i}.resid_post") for i in layers]})
    total = torch.zeros(n, len(layers), d, dtype=torch.float64)
    for start in range(0, len(kept), batch_size):
        ids = torch.tensor(kept[start:start + batch_size], dtype=torch.long)
        mask = torch.ones_like(ids)
        pos = torch.arange(n).expand_as(ids)
        got = registry.run(run.nnsight, ids, mask, pos, remote=run.remote)["adl"]
        total += torch.stack([got[f"layers.{i}.resid_post"] for i in layers], 2).double().sum(0)
    return (total / len(kept)).numpy(), len(kept)


@torch.no_grad()
def decode(base: dict[str, np.ndarray], tuned: dict[str, np.ndarray], lens: Callable, tokenizer, top_k: int,
           decoder: str, chunk: int = 64) -> pd.DataFrame:
    """Top tokens of ``lens(mean_T - mean_B)`` for every slot both models have, per lensed layer.

    Every (slot, layer) difference goes through the lens in batches of ``chunk`` vectors (one unembedding each).
    """
    b_index = {s: i for i, s in enumerate(base["labels"].tolist())}
    slots = [(i, s) for i, s in enumerate(tuned["labels"].tolist()) if s in b_index]
    if not slots:
        return pd.DataFrame()
    diffs = torch.from_numpy(np.stack([tuned["means"][i] - base["means"][b_index[s]] for i, s in slots]))  # [S, L, d]
    S, L, d = diffs.shape
    flat = diffs.reshape(S * L, d)
    probs, ids = [], []
    for start in range(0, S * L, chunk):
        p = torch.softmax(lens(flat[start:start + chunk]).double(), -1)                   # [c, V]
        values, index = p.topk(min(top_k, p.shape[-1]), dim=-1)
        probs.append(values.cpu())
        ids.append(index.cpu())
    probs, ids = torch.cat(probs).view(S, L, -1), torch.cat(ids).view(S, L, -1)
    norms = diffs.norm(dim=-1)                                                             # [S, L]
    text = {t: tokenizer.decode([t]) for t in set(ids.flatten().tolist())}
    rows = []
    for k, (i, slot) in enumerate(slots):
        token = int(tuned["tokens"][i])
        slot_token = tokenizer.decode([token]) if token >= 0 else ""
        for layer in range(L):
            for rank in range(ids.shape[-1]):
                t = int(ids[k, layer, rank])
                rows.append({"slot": slot, "kind": slot.split(":")[0], "slot_token": slot_token,
                             "layer_index": layer, "rank": rank, "token_id": t, "token": text[t],
                             "prob": float(probs[k, layer, rank]), "diff_norm": float(norms[k, layer]),
                             "decoded_with": decoder})
    return pd.DataFrame(rows)


__all__ = ["SlotMeans", "decode", "plain_text_means"]
