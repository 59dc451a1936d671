"""What is attributed: one prompt and its teacher-forced response, and the target differentiated."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from tuneshift.errors import TuneshiftError

Target = Literal["prob", "logprob", "logit"]
Mode = Literal["auto", "vjp", "jvp"]
TARGETS: tuple[str, ...] = ("prob", "logprob", "logit")
MODES: tuple[str, ...] = ("auto", "vjp", "jvp")

class AttributionError(TuneshiftError, ValueError):
    """Inputs to the attribution do not fit (shapes, empty prompt, unknown option); the message says which."""


@dataclass(frozen=True)
class AttributionItem:
    """One prompt to attribute.

    ``prompt_ids``    # [P] model input before the response (template and BOS included)
    ``response_ids``  # [M] the response, teacher-forced
    ``rows``          # [P] bool, prompt positions to attribute (e.g. the prompt's content tokens, no BOS)
    """

    prompt_ids: Tensor
    response_ids: Tensor
    rows: Tensor

    @property
    def n_prompt(self) -> int:
        return int(self.prompt_ids.numel())

    @property
    def n_response(self) -> int:
        return int(self.response_ids.numel())

    @property
    def n_rows(self) -> int:
        return int(self.rows.sum())


def make_item(prompt_ids: Tensor, response_ids: Tensor, rows: Tensor | None = None) -> AttributionItem:
    """Validate and build an :class:`AttributionItem`; ``rows`` defaults to every prompt position."""
    prompt_ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1).cpu()
    response_ids = torch.as_tensor(response_ids, dtype=torch.long).reshape(-1).cpu()
    if prompt_ids.numel() == 0:
        raise AttributionError("empty prompt: the response must be conditioned on at least one token (BOS)")
    rows = torch.ones_like(prompt_ids, dtype=torch.bool) if rows is None else torch.as_tensor(rows).bool().cpu()
    if rows.shape != prompt_ids.shape:
        raise AttributionError(f"rows mask has shape {tuple(rows.shape)} but the prompt has "
                               f"{prompt_ids.numel()} tokens; give one flag per prompt token")
    return AttributionItem(prompt_ids, response_ids, rows)


# ---- the model split into body and head ----------------------------------------------------------------------
def model_body(model: nn.Module) -> nn.Module:
    """The decoder without its output layer (``LlamaModel``, ``GPT2Model`` ...); its output is final-normed."""
    body = getattr(model, "base_model", None)
    if body is None or body is model:
        raise AttributionError(f"{type(model).__name__} has no separate base model (decoder body); attribution "
                               "needs a *ForCausalLM with a `base_model` and an output embedding")
    return body


def head_logits(model: nn.Module, hidden: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Logits from final hidden states ``[..., d]`` exactly as the model's own forward makes them ``[..., V]``.

    With ``dtype`` the output layer's result is cast to it before the soft-cap (the matmul stays in the
    model's dtype: its weights are never copied).
    """
    logits = model.get_output_embeddings()(hidden)
    if dtype is not None:
        logits = logits.to(dtype)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:  # Gemma 2/3
        logits = torch.tanh(logits / cap) * cap
    return logits


def target_values(logits: Tensor, targets: Tensor, target: Target) -> Tensor:
    """``f`` of each target token: probability, log-probability or logit, in float64. ``[..., V], [...] -> [...]``

    Always float64, whatever the model's dtype: for a confident token (p near 1) the derivative
    ``p * (onehot - softmax)`` holds ``1 - p``, which float32 rounds away (up to 4 % of a column's maximum on
    the organism, enough to move integer levels of S). Only these M x V values are cast; autograd hands
    the gradient back to the model in its own dtype.
    """
    logits = logits.to(torch.float64)
    if target == "logit":
        return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return logp.exp() if target == "prob" else logp


def check_target(target: str) -> None:
    if target not in TARGETS:
        raise AttributionError(f"unknown attribution target {target!r}; choose one of {', '.join(TARGETS)}")



