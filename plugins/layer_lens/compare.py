"""Per pair: both models' lens statistics side by side, residual differences, commitment depth tests."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from scipy import stats


def residual_difference(h_base: torch.Tensor, h_tuned: torch.Tensor) -> np.ndarray:
    """``||h_T - h_B|| / ||h_B||`` and ``cos(h_T, h_B)`` in float64. ``[n, L, d] x2 -> [n, L, 2]``"""
    b, t = h_base.double(), h_tuned.double()
    rel = (t - b).norm(dim=-1) / b.norm(dim=-1).clamp_min(1e-300)
    cos = torch.nn.functional.cosine_similarity(t, b, dim=-1, eps=1e-300)
    return torch.stack([rel, cos], -1).cpu().numpy()


def compare_models(store, plugin: str, base: str, tuned: str) -> tuple[dict[str, pd.DataFrame], dict]:
    """The comparison's tables and summary from both models' stored lens results and the pair's differences."""
    key = store.compare_key(base, tuned)
    pos = {k: store.load_table(plugin, k, "positions") for k in (base, tuned)}
    lens = {k: store.load_arrays(plugin, k, "lens") for k in (base, tuned)}
    diff = store.load_arrays(plugin, key, "resid_diff")
    if not pos[base][["id", "m"]].equals(pos[tuned][["id", "m"]]):
        raise ValueError("layer_lens: the two models were scored on different positions")
    layers = lens[tuned]["layers"].tolist()
    if lens[base]["layers"].tolist() != layers:
        raise ValueError("layer_lens: the two models were lensed at different layers (different depths?)")
    by_layer = pd.DataFrame({
        "layer": layers, "kl_base": lens[base]["kl"].mean(0), "kl_tuned": lens[tuned]["kl"].mean(0),
        "top1_agreement_base": lens[base]["agree"].mean(0), "top1_agreement_tuned": lens[tuned]["agree"].mean(0),
        "rel_norm": diff["rel_norm"].mean(0), "cos": diff["cos"].mean(0)})
    cb, ct = pos[base]["commitment_layer"].to_numpy(), pos[tuned]["commitment_layer"].to_numpy()
    counts = pd.DataFrame({"layer": layers, "base": [(cb == layer).sum() for layer in layers],
                           "tuned": [(ct == layer).sum() for layer in layers]})
    p = float(stats.wilcoxon(ct, cb).pvalue) if np.any(ct != cb) else 1.0
    adl = store.load_table(plugin, key, "adl")
    adl_top = adl[adl["rank"] < 5].reset_index(drop=True) if len(adl) else adl
    inner = slice(0, max(len(layers) - 1, 1))
    rel = by_layer["rel_norm"].to_numpy()
    summary = {"n_positions": int(len(cb)), "commitment_base": float(cb.mean()), "commitment_tuned": float(ct.mean()),
               "commitment_p": p, "lens_kl_base": float(by_layer["kl_base"].to_numpy()[inner].mean()),
               "lens_kl_tuned": float(by_layer["kl_tuned"].to_numpy()[inner].mean()),
               "max_rel_norm": float(np.nanmax(rel)), "max_rel_norm_layer": int(layers[int(np.nanargmax(rel))]),
               "first_rel_norm": float(rel[0]), "adl_headline": adl_headline(adl, layers)}
    return {"by_layer": by_layer, "commitment": counts, "adl_top": adl_top}, summary


def adl_headline(adl: pd.DataFrame, layers: list[int]) -> dict:
    """The mean difference at the last template token (else the first response token), middle lensed layer:
    its norm and its top 5 tokens."""
    if not len(adl):
        return {}
    middle = len(layers) // 2
    for slot in ("template:-1", "response:0", "plain:1"):
        rows = adl[(adl["slot"] == slot) & (adl["layer_index"] == middle)].sort_values("rank").head(5)
        if len(rows):
            token = rows["slot_token"].iloc[0]
            return {"slot": slot, "slot_token": token, "layer": int(layers[middle]),
                    "norm": float(rows["diff_norm"].iloc[0]), "tokens": rows["token"].tolist(),
                    "decoded_with": str(rows["decoded_with"].iloc[0])}
    return {}


__all__ = ["adl_headline", "compare_models", "residual_difference"]
