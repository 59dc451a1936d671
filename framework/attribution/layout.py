"""The batch layout of the attribution passes (see the package docstring) and the body forward."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor, nn

from tuneshift.attribution.items import AttributionItem


def body_forward(body: nn.Module, embeds: Tensor, mask: Tensor, positions: Tensor, cache=None) -> Tensor:
    """Final hidden states ``[B, T, d]`` of the body for ``embeds [B, T, d]``."""
    kwargs = {"cache": cache, "use_cache": cache is not None} if cache is not None else {"use_cache": False}
    return body(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, **kwargs).last_hidden_state



# ---- batch layout ---------------------------------------------------------------------------------------------
@dataclass
class Layout:
    """Prompts from column 0, responses from column ``P``, pads between and after (see module docstring)."""

    ids: Tensor          # [B, L]  L = P + M_max - 1
    mask: Tensor         # [B, L]  1 on real tokens
    positions: Tensor    # [B, L]  position ids counting real tokens
    targets: Tensor      # [B, M_max] response ids (pad where a row's response ended)
    resp_valid: Tensor   # [B, M_max] bool
    row_cols: Tensor     # [B, R_max] column of each row's k-th attributed prompt token (0 where absent)
    row_valid: Tensor    # [B, R_max] bool
    pred_cols: Tensor    # [B, M_max] column whose output predicts response token m
    P: int
    M: int

    def at_responses(self, hidden: Tensor, offset: int = 0) -> Tensor:
        """``hidden [..., B, W, d]`` (columns from ``offset``) at the predicting columns: ``[..., B, M, d]``."""
        cols = (self.pred_cols - offset).clamp(min=0)                              # [B, M]
        index = cols[..., None].expand(*hidden.shape[:-3], -1, -1, hidden.shape[-1])
        return hidden.gather(-2, index)


def build_layout(items: Sequence[AttributionItem], pad_id: int, device: torch.device) -> Layout:
    B = len(items)
    P = max(it.n_prompt for it in items)
    M = max(it.n_response for it in items)
    R = max(it.n_rows for it in items)
    L = P + max(M - 1, 0)
    ids = torch.full((B, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.long)
    targets = torch.full((B, M), pad_id, dtype=torch.long)
    resp_valid = torch.zeros((B, M), dtype=torch.bool)
    row_cols = torch.zeros((B, R), dtype=torch.long)
    row_valid = torch.zeros((B, R), dtype=torch.bool)
    for b, it in enumerate(items):
        ids[b, :it.n_prompt] = it.prompt_ids
        mask[b, :it.n_prompt] = 1
        m = it.n_response
        if m > 1:
            ids[b, P:P + m - 1] = it.response_ids[:-1]
            mask[b, P:P + m - 1] = 1
        targets[b, :m] = it.response_ids
        resp_valid[b, :m] = True
        cols = torch.nonzero(it.rows).flatten()
        row_cols[b, :cols.numel()] = cols
        row_valid[b, :cols.numel()] = True
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    pred_cols = (P - 1 + torch.arange(M)).repeat(B, 1)
    pred_cols[:, 0] = torch.tensor([it.n_prompt - 1 for it in items])  # response token 0: the prompt's end
    return Layout(ids.to(device), mask.to(device), positions.to(device), targets.to(device),
                   resp_valid.to(device), row_cols.to(device), row_valid.to(device), pred_cols.to(device), P, M)


def embed(model: nn.Module, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(ids)


