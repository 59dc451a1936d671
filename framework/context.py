"""The model's context length: every prompt plus its response must fit, or be cut to fit when asked to.

A prompt longer than the model's context fails deep inside the model (GPT-2: ``IndexError: index out of
range in self``) or, with rotary positions, runs silently on positions the model never saw. The runner checks
each encoded prompt against :func:`context_limit` before generating: too long is a :class:`ContextError`
naming the prompt, its length and the limit, unless ``generation.truncate_prompts=true``, which cuts such
prompts' text (the end goes, instruction spans are clipped) so prompt + ``max_new_tokens`` fits, and says so.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Sequence

from tuneshift.data import DataError, EncodedPrompt, Prompt, encode_prompt

log = logging.getLogger("tuneshift")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_UNSET = 10 ** 9  # tokenizers without a limit report 1e30


class ContextError(DataError):
    """A prompt (plus its response) does not fit in the model's context."""


def context_limit(model: Any, tokenizer: Any = None) -> tuple[int | None, str]:
    """The number of positions ``model`` can attend over, and where the number comes from (None: no limit)."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    found: list[tuple[int, str]] = []
    for key in _POSITION_KEYS:
        value = getattr(text_config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value < _UNSET:
            found.append((value, f"config.{key}"))
            break
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _UNSET:
        found.append((tok_max, "tokenizer.model_max_length"))
    return min(found) if found else (None, "")


def _clip(prompt: Prompt, cut: int) -> Prompt:
    spans = tuple((s, min(e, cut)) for s, e in prompt.instruction_spans if prompt.text[s:min(e, cut)].strip())
    return dataclasses.replace(prompt, text=prompt.text[:cut], instruction_spans=spans)


def truncate_to_fit(tokenizer: Any, prompt: Prompt, chat_template: bool, budget: int) -> EncodedPrompt:
    """``prompt`` with the longest text prefix whose encoding has at most ``budget`` tokens (binary search)."""
    lo, hi = 0, len(prompt.text)  # invariant: a cut at lo fits (checked below), a cut at hi does not
    best = None
    while hi - lo > 1:
        mid = (lo + hi) // 2
        try:
            encoded = encode_prompt(tokenizer, _clip(prompt, mid), chat_template)
        except DataError:  # a clipped span on a token boundary covers no token: try a longer cut
            encoded = None
        if encoded is not None and encoded.n_prompt <= budget:
            lo, best = mid, encoded
        else:
            hi = mid
    if best is None or not prompt.text[:lo].strip():
        raise ContextError(f"prompt {prompt.id!r} cannot be cut to fit {budget} tokens (the template alone is too "
                           "long); lower generation.max_new_tokens")
    best.extras["truncated_from_chars"] = len(prompt.text)
    return best


def fit_context(encoded: Sequence[EncodedPrompt], tokenizer: Any, limit: int | None, source: str,
                max_new_tokens: int, chat_template: bool, truncate: bool, model_name: str) -> list[EncodedPrompt]:
    """``encoded`` unchanged when every prompt + ``max_new_tokens`` fits in ``limit`` positions; else an error,
    or (``truncate``) the too-long prompts cut to fit, with one warning."""
    if limit is None:
        return list(encoded)
    budget = limit - max_new_tokens
    long = [e for e in encoded if e.n_prompt > budget]
    if not long:
        return list(encoded)
    worst = max(long, key=lambda e: e.n_prompt)
    if budget < 1:
        raise ContextError(f"generation.max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                           f"{limit}-token context of model {model_name!r} ({source}); lower it")
    if not truncate:
        raise ContextError(
            f"prompt {worst.prompt.id!r} is {worst.n_prompt} tokens long: with generation.max_new_tokens="
            f"{max_new_tokens} it needs {worst.n_prompt + max_new_tokens} positions, past the context of {limit} "
            f"tokens of model {model_name!r} ({source}); {len(long)} of {len(encoded)} prompts are too long. "
            "Shorten them, lower generation.max_new_tokens, or set generation.truncate_prompts=true to cut each "
            "such prompt's end to fit")
    fitted = {id(e): truncate_to_fit(tokenizer, e.prompt, chat_template, budget) for e in long}
    log.warning("model %s: %d of %d prompts cut to fit its %d-token context (generation.truncate_prompts): %s",
                model_name, len(long), len(encoded), limit, ", ".join(e.prompt.id for e in long[:10]))
    return [fitted.get(id(e), e) for e in encoded]


__all__ = ["ContextError", "context_limit", "fit_context", "truncate_to_fit"]
