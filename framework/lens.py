"""The logit lens: a layer's residual stream read through the model's own final norm and unembedding.

``lens_l = softmax(unembed(final_norm(resid_post_l)))`` (methods.md D.2; nostalgebraist's logit lens, the
untrained baseline of tuned-lens). For the last layer it is the model's own output distribution, which the
tests check. Gemma's final logit soft-capping is applied as in the model's forward.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from tuneshift.adapters import ModelAdapter
from tuneshift.attribution.items import head_logits


def logit_lens(model: nn.Module, adapter: ModelAdapter | None = None) -> Callable[[Tensor], Tensor]:
    """``hidden [..., d] -> logits [..., V]`` through ``model``'s final norm and output layer (no autograd)."""
    adapter = adapter or ModelAdapter(model)
    norm = adapter.module(adapter.spec.final_norm)
    param = next(model.get_output_embeddings().parameters())  # the head's own (also when fetched for a remote model)

    @torch.no_grad()
    def to_logits(hidden: Tensor) -> Tensor:
        return head_logits(model, norm(hidden.to(device=param.device, dtype=param.dtype)))

    return to_logits


__all__ = ["logit_lens"]
