"""Which response each model is scored on (``generation.response_source``), and the response cache.

What it is for
    The paper scores each model on its own greedy response (``own``). Comparing a base model with its tuned
    sibling *on the same tokens* (token distribution shift, KL, layer lens, differential attribution,
    methods.md D) needs one shared response fed to both models:

    ``own``        each model its own greedy response, in its own input format (the paper's protocol);
    ``tuned``      the pair's tuned model's greedy response, fed to both, both rendered in the tuned model's
                   input format (its ``chat_template`` setting, and its tokenizer's template): AlignTDS;
    ``base``       the same with the base model's response and input format;
    ``reference``  the dataset's ``reference`` column (JSONL ``"reference"``), in the tuned model's format.

    A model in no pair is its own source. A model whose pairs name two different sources (``a`` is the base
    of both ``b`` and ``c`` with ``tuned``) is a config error: one model has one result per plugin.

Identical tokens
    A model renders the prompt in the format model's setting with its own tokenizer (borrowing the format
    model's chat template when its own tokenizer has none, as base checkpoints often do). When its prompt ids
    equal the source's, it takes the source's response ids unchanged, so both models see identical token ids
    (the same family always does); otherwise the response text is re-tokenized with its own tokenizer
    (:func:`identical_tokens` tells a plugin which case it is in).

The cache
    ``responses/<key>.jsonl`` holds a model's own greedy responses with a fingerprint of what they depend on
    (the model spec, ``max_new_tokens``, the prompts, the input format; not ``response_source``), so a model
    whose responses another model needs generates them once: in its own run when it runs first, else in a
    first pass (:meth:`tuneshift.runner.Runner` loads it just to generate) before the model that needs them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch

from tuneshift.data import EncodedPrompt, Prompt, encode_prompt
from tuneshift.errors import ConfigError
from tuneshift.results import atomic_write_bytes

if TYPE_CHECKING:
    from tuneshift.runner import ModelRun

RESPONSE_SOURCES = ("own", "tuned", "base", "reference")
REFERENCE = "reference"


def check_response_source(source: str, prompts: Sequence[Prompt], models: Sequence[str],
                          pairs: Sequence[tuple[str, str]]) -> None:
    """Fail early, naming the fix, when ``source`` cannot work with these prompts and pairs."""
    if source not in RESPONSE_SOURCES:
        raise ConfigError(f"generation.response_source={source!r}; choose one of {', '.join(RESPONSE_SOURCES)} "
                          "(own: each model its own response; tuned/base: the pair's tuned/base response fed to "
                          "both; reference: the dataset's reference column)")
    if source == REFERENCE:
        missing = [p.id for p in prompts if not p.reference]
        if missing:
            raise ConfigError(f"generation.response_source=reference but {len(missing)} prompt(s) have no "
                              f"'reference' answer (e.g. {', '.join(missing[:3])}); give a JSONL data file with a "
                              "\"reference\" field on every line, or choose response_source=tuned")
    for key in models:
        source_of(key, source, pairs)  # raises on a conflict


def _partners(key: str, role: int, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Models that ``key`` is paired with, where ``key`` holds position ``1 - role`` and they hold ``role``."""
    return sorted({p[role] for p in pairs if p[1 - role] == key})


def source_of(key: str, source: str, pairs: Sequence[tuple[str, str]]) -> str:
    """The model key whose response ``key`` is scored on, or ``"reference"``."""
    if source == "own":
        return key
    if source == REFERENCE:
        return REFERENCE
    role = 1 if source == "tuned" else 0
    sources = set(_partners(key, role, pairs))
    if any(p[role] == key for p in pairs):
        sources.add(key)
    if len(sources) > 1:
        raise ConfigError(f"generation.response_source={source}: model {key!r} would be scored on the responses of "
                          f"{sorted(sources)} (it sits in several pairs); one model has one response per prompt, so "
                          "split the pairs into separate runs")
    return sources.pop() if sources else key


def format_model(key: str, source: str, pairs: Sequence[tuple[str, str]]) -> str:
    """The model whose input format (chat-template setting and template) ``key``'s prompts are rendered in."""
    if source == REFERENCE:
        return source_of(key, "tuned", pairs)
    return source_of(key, source, pairs)


def paired_with(key: str, pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Every model sharing a pair with ``key``."""
    return sorted(set(_partners(key, 0, pairs)) | set(_partners(key, 1, pairs)))


# ---- the cache --------------------------------------------------------------------------------------------------
def cache_path(output_dir: Path, key: str) -> Path:
    return Path(output_dir) / "responses" / f"{key}.jsonl"


def read_cache(path: Path, fp: str, prompt_ids: Sequence[str]) -> list[dict] | None:
    """The cached rows when every one has fingerprint ``fp`` and they cover ``prompt_ids`` in order."""
    if not path.is_file():
        return None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if rows and all(r.get("fingerprint") == fp for r in rows) and [r["id"] for r in rows] == list(prompt_ids):
        return rows
    return None


def write_cache(path: Path, fp: str, run: "ModelRun") -> list[dict]:
    """Write ``run``'s own responses (with its prompt ids, stop tokens and chat template) and return the rows."""
    template = getattr(run.tokenizer, "chat_template", None) if run.chat_template else None
    rows = [{"fingerprint": fp, "id": e.prompt.id, "prompt": e.prompt.text, "response": e.response_text,
             "response_ids": e.response_ids.tolist(), "prompt_ids": e.input_ids.tolist(), "stop_id": e.stop_id,
             "chat_template": run.chat_template, "chat_template_text": template} for e in run.encoded]
    atomic_write_bytes(path, ("\n".join(json.dumps(r) for r in rows) + "\n").encode())
    return rows


def apply_own(encoded: Sequence[EncodedPrompt], rows: Sequence[dict]) -> None:
    """Fill ``encoded`` with a model's own cached responses."""
    for item, row in zip(encoded, rows):
        item.response_ids = torch.tensor(row["response_ids"], dtype=torch.long)
        item.response_text = row["response"]
        item.stop_id = row.get("stop_id")


def encode_shared(tokenizer, prompts: Sequence[Prompt], chat: bool, rows: Sequence[dict] | None) -> list[EncodedPrompt]:
    """``prompts`` in the format model's setting; a tokenizer without a template borrows the source's one."""
    if chat and not getattr(tokenizer, "chat_template", None):
        template = next((r.get("chat_template_text") for r in rows or () if r.get("chat_template_text")), None)
        if template is None:
            raise ConfigError("the shared response's input format uses a chat template, but neither this model's "
                              "tokenizer nor the source model's has one; set chat_template=false on the models")
        tokenizer.chat_template = template
    return [encode_prompt(tokenizer, p, chat) for p in prompts]


def apply_shared(encoded: Sequence[EncodedPrompt], rows: Sequence[dict], tokenizer) -> None:
    """Fill ``encoded`` with another model's responses: its ids when the prompt ids agree, else re-tokenized."""
    for item, row in zip(encoded, rows):
        if item.input_ids.tolist() == row["prompt_ids"]:
            item.response_ids = torch.tensor(row["response_ids"], dtype=torch.long)
            item.stop_id = row.get("stop_id")
        else:
            item.response_ids = _tokenize(tokenizer, row["response"])
            item.stop_id = None
        item.response_text = row["response"]


def apply_reference(encoded: Sequence[EncodedPrompt], tokenizer) -> None:
    """Fill ``encoded`` with each prompt's reference answer, tokenized by the model's own tokenizer."""
    for item in encoded:
        item.response_text = item.prompt.reference or ""
        item.response_ids = _tokenize(tokenizer, item.response_text)
        item.stop_id = None


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def identical_tokens(a: Sequence[EncodedPrompt], b: Sequence[EncodedPrompt]) -> bool:
    """Whether two models' prompts and responses are the same token ids, item by item."""
    return len(a) == len(b) and all(
        x.input_ids.tolist() == y.input_ids.tolist() and x.response_ids is not None and y.response_ids is not None
        and x.response_ids.tolist() == y.response_ids.tolist() for x, y in zip(a, b))


__all__ = ["REFERENCE", "RESPONSE_SOURCES", "apply_own", "apply_reference", "apply_shared", "cache_path",
           "check_response_source", "encode_shared", "format_model", "identical_tokens", "paired_with",
           "read_cache", "source_of", "write_cache"]
