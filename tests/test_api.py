"""The Python API against independent computations: a per-token backward loop, a plain forward, the store."""
from __future__ import annotations

import pytest
import torch

import tuneshift as ts
from tuneshift.attribution import make_item, naive_attribution
from tuneshift.data import encode_prompt
from tuneshift.results import ResultStore
from tuneshift.testing import tiny_model, tiny_tokenizer


@pytest.fixture(scope="module")
def pair():
    model = tiny_model("llama").double()
    return model, tiny_tokenizer()


def test_attribute_equals_the_naive_loop_on_a_given_response(pair):
    model, tok = pair
    prompt = {"prompt": "Write a poem. It should rhyme.", "instructions": ["Write a poem."]}
    out = ts.attribute(pair, prompt, response=" the sea is blue", target="prob")
    (p,) = ts.api.as_prompts([prompt])
    enc = encode_prompt(tok, p, False)
    response = torch.tensor(tok(" the sea is blue", add_special_tokens=False)["input_ids"])
    reference = naive_attribution(model, make_item(enc.input_ids, response, enc.content_mask), "prob")
    torch.testing.assert_close(out.matrix, reference.double(), atol=1e-10, rtol=1e-8)
    assert out.matrix.shape == (int(enc.content_mask.sum()), len(response))
    assert len(out.prompt_tokens) == out.matrix.shape[0] and len(out.response_tokens) == out.matrix.shape[1]
    assert out.instruction.sum() == int(enc.instruction_mask.sum())  # "Write a poem." tokens
    levels = out.levels()
    assert levels.max() <= 10 and (levels.max(axis=0) == 10).all()  # every column reaches its own max


def test_attribute_without_a_response_uses_the_greedy_one(pair):
    model, tok = pair
    out = ts.attribute(pair, "Hello there", max_new_tokens=4)
    ids = tok("Hello there", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        greedy = model.generate(torch.tensor([[tok.bos_token_id] + ids]), max_new_tokens=4, do_sample=False,
                                pad_token_id=tok.pad_token_id)[0, len(ids) + 1:]
    expected = [t for t in greedy.tolist()]
    stop = expected.index(tok.eos_token_id) if tok.eos_token_id in expected else len(expected)
    assert out.response_tokens == tok.convert_ids_to_tokens(expected[:stop])


def test_capture_equals_a_plain_forward():
    model, tok = tiny_model("llama"), tiny_tokenizer()  # float32: eager float64 attention gives NaN on pad rows
    cache = ts.capture((model, tok), ["Hello there", "Write a poem about the sea."],
                       probes=["blocks.1.hook_resid_post", "hook_embed", ts.Probe("logits", reduce="last")],
                       batch_size=1)
    pos = (cache.attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ref = model(input_ids=cache.tokens, attention_mask=cache.attention_mask, position_ids=pos,
                    output_hidden_states=True)
    real = cache.attention_mask.bool()
    torch.testing.assert_close(cache["hook_embed"][real], ref.hidden_states[0][real])
    torch.testing.assert_close(cache["logits:last"], ref.logits[:, -1], atol=1e-5, rtol=1e-5)
    assert cache["blocks.1.hook_resid_post"].shape == (2, cache.tokens.shape[1], 64)


def test_compare_returns_what_the_run_wrote(tmp_path):
    results = ts.compare("tiny-random:llama:0", "tiny-random:llama:1", plugins={"residual_norm": {}}, limit=2,
                         out=tmp_path / "run", generation={"max_new_tokens": 3})
    store = ResultStore(tmp_path / "run")
    assert results.plugins == ["residual_norm"]
    assert results["residual_norm"]["tuned"]["norms"].equals(store.load_table("residual_norm", "tuned", "norms"))
    assert results["residual_norm"]["compare"]["summary"] == store.load_json(
        "residual_norm", "compare/base__tuned", "summary")
    assert results.report().name == "report.html"
    with pytest.raises(KeyError, match="no results of plugin 'saliency'"):
        results["saliency"]
    again = ts.compare("tiny-random:llama:0", "tiny-random:llama:1", plugins={"residual_norm": {}}, limit=2,
                       out=tmp_path / "run", generation={"max_new_tokens": 3})
    assert again.summary["timing"]["seconds_by_hook"].get("residual_norm.on_model_end") is None  # resumed


def test_bad_inputs_fail_clearly():
    with pytest.raises(ts.TuneshiftError, match="unknown plugin 'nope'"):
        ts.compare("tiny-random:llama:0", "tiny-random:llama:1", plugins=["nope"])
    with pytest.raises(ts.TuneshiftError, match="a model is a path"):
        ts.compare(3, "tiny-random:llama:1", plugins=["residual_norm"])
