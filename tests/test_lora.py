"""LoRA pairs: a tiny LoRA trained on a tiny random model loads as the tuned side, merged in memory only."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from tuneshift.cli import run_config as run
from tuneshift.config import validate
from tuneshift.loading import CACHE_DIR, ModelLoadError, ModelSpec, load_model
from tuneshift.results import ResultStore
from tuneshift.testing import tiny_model, tiny_tokenizer


def _train_lora(folder, family="llama", steps=30):
    """A rank-4 LoRA on q/v/down projections, trained to repeat one sentence (so B A is far from zero)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = tiny_model(family, 0)
    targets = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj"]}[family]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0,
                                                  fan_in_fan_out=family == "gpt2"))
    tok = tiny_tokenizer()
    ids = torch.tensor([tok("the cat sat on the mat and the dog sat on the log")["input_ids"]] * 4)
    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(input_ids=ids, labels=ids).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(folder)
    return peft_model, ids


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_adapter_loads_merged_in_memory(tmp_path, family):
    peft_model, ids = _train_lora(tmp_path / "adapter", family)
    before = sorted(p.name for p in (CACHE_DIR / "tiny-random").iterdir()) if (CACHE_DIR / "tiny-random").is_dir() \
        else []
    model, tok = load_model(ModelSpec(path=f"tiny-random:{family}:0", adapter=str(tmp_path / "adapter")))
    base, _ = load_model(ModelSpec(path=f"tiny-random:{family}:0"))
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits          # peft's own unmerged forward
        got = model(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert (got - plain).abs().max() > 1e-2                   # the adapter changed the model
    assert type(model).__name__ == type(base).__name__        # a plain model: every probe site and adapter view
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                         "adapter_model.safetensors"]
    after = sorted(p.name for p in (CACHE_DIR / "tiny-random").iterdir())
    assert set(after) - set(before) <= {f"{family}-0"}        # nothing merged written anywhere
    assert not model.training and not any(p.requires_grad for p in model.parameters())


def test_lora_pair_runs_with_token_shift(tmp_path):
    _train_lora(tmp_path / "adapter")
    cfg = validate(OmegaConf.create({
        "model": {"name": "lora", "models": {"base": {"name": "b", "path": "tiny-random:llama:0"},
                                             "tuned": {"name": "b+lora", "path": "tiny-random:llama:0",
                                                       "adapter": str(tmp_path / "adapter")}},
                  "pairs": [["base", "tuned"]]},
        "data": {"limit": 3}, "generation": {"max_new_tokens": 4, "response_source": "tuned"},
        "run": {"root": str(tmp_path), "name": "job", "batch_size": 2, "progress": False, "report": False},
        "plugins": {"token_shift": {"attribution": False}, "layer_lens": {}},
    }))
    run(cfg)
    summary = ResultStore(tmp_path / "job").load_json("token_shift", "compare/base__tuned", "summary")
    assert summary["mean_kl_tb"] > 1e-4 and summary["n_positions"] > 0


def test_a_folder_without_adapter_config_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="not a peft adapter folder"):
        load_model(ModelSpec(path="tiny-random:llama:0", adapter=str(tmp_path)))
