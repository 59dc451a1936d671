"""Planning: which exact path each prompt takes, and which prompts share a vectorised pass."""
from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import nn

from tuneshift.attribution.items import MODES, AttributionError, AttributionItem, Mode

# Cost of one JVP token-pass relative to one VJP token-pass (body only, frozen weights), measured on
# SmolLM2-135M on the project's CPU, one thread, a 91-token prompt and a 64-token response: 3.6 vs 2.8 ms
# per predicted token-pass (forward mode under vmap pays for weight transposes, zero-tangent products and a
# primal per chunk). :func:`plan_modes` compares the two paths with it.
JVP_RELATIVE_COST = 1.3



# ---- planning -------------------------------------------------------------------------------------------------
def vjp_cost(n_prompt: int, n_response: int) -> float:
    """Token-passes of the VJP path: response token m runs on a prefix of ``n_prompt + m`` positions."""
    return float(n_response * n_prompt + n_response * (n_response - 1) / 2)


def jvp_cost(n_prompt: int, n_response: int, row_positions: Sequence[int]) -> float:
    """Token-passes of the JVP path: the tangent of position n runs over positions ``n .. n_prompt+M-2``."""
    length = n_prompt + max(n_response - 1, 0)
    return JVP_RELATIVE_COST * float(sum(length - int(p) for p in row_positions))


def plan_modes(items: Sequence[AttributionItem], mode: Mode = "auto") -> list[str]:
    """``"vjp"`` or ``"jvp"`` per item: the forced ``mode``, or with ``"auto"`` the path with fewer token-passes."""
    if mode not in MODES:
        raise AttributionError(f"unknown attribution mode {mode!r}; choose one of {', '.join(MODES)}")
    if mode != "auto":
        return [mode] * len(items)
    plans = []
    for it in items:
        rows = torch.nonzero(it.rows).flatten().tolist()
        plans.append("jvp" if jvp_cost(it.n_prompt, it.n_response, rows) < vjp_cost(it.n_prompt, it.n_response)
                     else "vjp")
    return plans


def sliding_window(model: nn.Module) -> int | None:
    """The smallest attention window of ``model`` in tokens, or None when every layer sees the whole prefix."""
    cfg = model.config
    window = getattr(cfg, "sliding_window", None)
    types = getattr(cfg, "layer_types", None) or ()
    if window and (not types or any("sliding" in str(t) for t in types)):
        return int(window)
    return None


def _padded_waste(path: str, group: Sequence[AttributionItem]) -> float:
    """Token-passes of ``group`` run together (padded to its largest shapes) over those of its prompts alone."""
    P = max(it.n_prompt for it in group)
    M = max(it.n_response for it in group)
    if path == "vjp":   # every prompt runs M_max directions over P_max-long prompts
        alone = sum(vjp_cost(it.n_prompt, it.n_response) for it in group)
        together = len(group) * vjp_cost(P, M)
    else:               # every prompt runs R_max directions over the padded length
        alone = sum(it.n_rows * (it.n_prompt + it.n_response - 1) for it in group)
        together = len(group) * max(it.n_rows for it in group) * (P + M - 1)
    return together / max(alone, 1.0)


def prompt_groups(path: str, indices: list[int], items: Sequence[AttributionItem], max_batch_prompts: int,
            max_batch_tokens: int, window: int | None = None, max_waste: float = 1.15) -> Iterator[list[int]]:
    """Prompts of one path in groups of similar shapes that share each pass.

    Sorted by the number of directions (response tokens for VJPs, attributed rows for JVPs) then length; a
    prompt joins the current group only while padding costs at most ``max_waste`` times running its members
    alone. With a sliding ``window`` shorter than a group's padded length, prompts run one at a time.
    """
    key = (lambda i: (items[i].n_response, items[i].n_prompt)) if path == "vjp" else \
        (lambda i: (items[i].n_rows, items[i].n_prompt + items[i].n_response))
    group: list[int] = []
    for i in sorted(indices, key=key):
        trial = group + [i]
        shapes = [items[j] for j in trial]
        P = max(it.n_prompt for it in shapes)
        M = max(it.n_response for it in shapes)
        too_wide = window is not None and P + M > window
        if group and (len(trial) > max_batch_prompts or len(trial) * (P + M) > max_batch_tokens or too_wide
                      or _padded_waste(path, shapes) > max_waste):
            yield group
            trial = [i]
        group = trial
    if group:
        yield group


