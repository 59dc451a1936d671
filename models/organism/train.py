"""Pre-training and supervised fine-tuning of the organism's small Llama, on CPU, fp32, eager.

Pre-training sees packed plain text: documents joined by ``<|eos|>``, cut into rows that each start with
``<|bos|>`` (so a prompt that starts with BOS, as every tokenized prompt does, is in distribution).
SFT sees one chat-formatted example per row, right-padded within length-bucketed batches, with the loss on
the response tokens and the closing ``<|eos|>`` only (:func:`sft_features`), so the model learns to answer
and to stop, not to predict the prompts.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from .tasks import Example
from .tokenizer import render_chat

IGNORE_INDEX = -100


@dataclass(frozen=True)
class ModelSize:
    """Shape of the Llama: layers, hidden width, attention heads and FFN width."""

    layers: int = 4
    hidden: int = 256
    heads: int = 4
    intermediate: int = 688


@dataclass(frozen=True)
class Schedule:
    """One optimisation run: AdamW with linear warm-up then cosine decay to ``min_lr_ratio * lr``."""

    steps: int
    batch_size: int
    lr: float
    warmup: int
    weight_decay: float = 0.1
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    log_every: int = 50
    replay_batch_size: int = 0   # plain-text rows replayed at every step (SFT only; 0: none)


def build_model(tokenizer: PreTrainedTokenizerFast, size: ModelSize, max_positions: int, seed: int) -> LlamaForCausalLM:
    """A freshly initialised Llama with tied input/output embeddings (keeps the fp16 folder small)."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=size.hidden, intermediate_size=size.intermediate,
                         num_hidden_layers=size.layers, num_attention_heads=size.heads,
                         num_key_value_heads=size.heads, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, bos_id: int, eos_id: int) -> torch.Tensor:
    """Rows of ``seq_len`` tokens: ``<|bos|>`` then the next ``seq_len - 1`` tokens of the stream of documents,
    each document followed by ``<|eos|>``. The incomplete last row is dropped. Shape ``[rows, seq_len]``."""
    stream = torch.tensor([t for tokens in token_lists for t in (*tokens, eos_id)], dtype=torch.long)
    body = seq_len - 1
    rows = stream[: len(stream) // body * body].view(-1, body)
    return torch.cat([torch.full((len(rows), 1), bos_id, dtype=torch.long), rows], dim=1)


def pretraining_batches(rows: torch.Tensor, batch_size: int, seed: int) -> Iterator[dict[str, torch.Tensor]]:
    """Endless batches of whole rows, reshuffled every epoch; labels equal the inputs (causal LM)."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(rows), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            ids = rows[order[start:start + batch_size]]
            yield {"input_ids": ids, "labels": ids}


def sft_features(tokenizer: PreTrainedTokenizerFast, prompt: str, response: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat-formatted example and its labels: ``-100`` on ``<|bos|><|user|>prompt<|eos|>
    <|assistant|>``, the token ids on ``response<|eos|>``.

    The two parts are tokenized separately; special tokens split the text for the pre-tokenizer, so this
    equals tokenizing the whole rendered chat (tested).
    """
    prompt_ids = tokenizer(render_chat(tokenizer, prompt), add_special_tokens=False).input_ids
    response_ids = tokenizer(response + tokenizer.eos_token, add_special_tokens=False).input_ids
    return prompt_ids + response_ids, [IGNORE_INDEX] * len(prompt_ids) + response_ids


def sft_dataset(tokenizer: PreTrainedTokenizerFast, examples: Sequence[Example],
                max_len: int) -> list[tuple[list[int], list[int]]]:
    """Features of every example that fits in ``max_len`` tokens (longer ones are dropped, not truncated)."""
    features = (sft_features(tokenizer, e.prompt, e.reference) for e in examples)
    return [f for f in features if len(f[0]) <= max_len]


def sft_batches(dataset: Sequence[tuple[list[int], list[int]]], batch_size: int, pad_id: int,
                seed: int, bucket_batches: int = 50) -> Iterator[dict[str, torch.Tensor]]:
    """Endless right-padded batches. Each epoch is shuffled, then cut into pools of ``bucket_batches`` batches
    whose examples are sorted by length, so a batch holds examples of similar length and pads little."""
    rng = random.Random(seed)
    pool_size = batch_size * bucket_batches
    while True:
        order = list(range(len(dataset)))
        rng.shuffle(order)
        batches = []
        for start in range(0, len(order), pool_size):
            pool = sorted(order[start:start + pool_size], key=lambda i: len(dataset[i][0]))
            batches += [pool[i:i + batch_size] for i in range(0, len(pool) - batch_size + 1, batch_size)]
        rng.shuffle(batches)
        for batch in batches:
            yield collate([dataset[i] for i in batch], pad_id)


def collate(items: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad ids with ``pad_id`` and labels with ``-100``.

    No attention mask is needed: with right padding, causal attention never lets a real token see a pad, and
    pads carry no loss. Leaving the mask out keeps SDPA on its fast causal path.
    """
    width = max(len(ids) for ids, _ in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    for row, (item_ids, item_labels) in enumerate(items):
        ids[row, :len(item_ids)] = torch.tensor(item_ids)
        labels[row, :len(item_labels)] = torch.tensor(item_labels)
    return {"input_ids": ids, "labels": labels}


def lr_factor(step: int, schedule: Schedule) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up, then cosine decay."""
    if step < schedule.warmup:
        return (step + 1) / schedule.warmup
    progress = (step - schedule.warmup) / max(1, schedule.steps - schedule.warmup)
    return schedule.min_lr_ratio + (1 - schedule.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(model: LlamaForCausalLM, batches: Iterator[dict[str, torch.Tensor]], schedule: Schedule, name: str,
          replay: Iterator[dict[str, torch.Tensor]] | None = None) -> list[dict[str, float]]:
    """Run ``schedule.steps`` AdamW steps (no weight decay on norms) and return the logged loss curve: one entry
    per ``log_every`` steps with the mean loss of those steps and the elapsed seconds.

    With ``replay`` (plain-text batches), each step minimises ``loss + replay_loss``; the replayed text keeps SFT
    from erasing the language model, and its mean is logged as ``replay_loss``.
    """
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": schedule.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=schedule.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, schedule))
    model.train()
    curve, window, replay_window, start = [], [], [], time.time()
    for step in range(schedule.steps):
        loss = model(**next(batches)).loss
        total = loss
        if replay is not None:
            replay_loss = model(**next(replay)).loss
            total = loss + replay_loss
            replay_window.append(replay_loss.item())
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        scheduler.step()
        window.append(loss.item())
        if (step + 1) % schedule.log_every == 0 or step + 1 == schedule.steps:
            entry = {"step": step + 1, "loss": sum(window) / len(window), "seconds": time.time() - start}
            if replay_window:
                entry["replay_loss"] = sum(replay_window) / len(replay_window)
            curve.append(entry)
            print(f"[{name}] " + " ".join(f"{k} {v:.4g}" for k, v in entry.items()), flush=True)
            window, replay_window = [], []
    model.eval()
    return curve


@torch.no_grad()
def mean_loss(model: LlamaForCausalLM, rows: torch.Tensor, batch_size: int = 16) -> float:
    """Mean next-token loss of ``model`` on packed text ``rows`` (used on held-out pre-training rows)."""
    model.eval()
    losses = [model(input_ids=rows[i:i + batch_size], labels=rows[i:i + batch_size]).loss.item()
              for i in range(0, len(rows), batch_size)]
    return sum(losses) / len(losses)
