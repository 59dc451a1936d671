"""layer_lens against hand-written hooks and a naive per-prompt loop on a tiny random pair."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from tuneshift.adapters import ModelAdapter
from tuneshift.cli import run_config as run
from tuneshift.config import validate
from tuneshift.data import Prompt, encode_prompt, load_prompts
from tuneshift.distributions import commitment_depth, kl_divergence, lens_stats, paired_token_stats, token_stats
from tuneshift.lens import logit_lens
from tuneshift.loading import ModelSpec, load_model
from tuneshift.results import ResultStore
from tuneshift.testing import tiny_model

N_PROMPTS, N_NEW, ADL_N = 4, 5, 3


def _cfg(tmp_path, family):
    return validate(OmegaConf.create({
        "model": {"name": "tiny", "models": {"base": {"name": "b", "path": f"tiny-random:{family}:0"},
                                             "tuned": {"name": "t", "path": f"tiny-random:{family}:1"}},
                  "pairs": [["base", "tuned"]]},
        "data": {"limit": N_PROMPTS},
        "generation": {"max_new_tokens": N_NEW, "response_source": "tuned", "chat_template": True},
        "run": {"root": str(tmp_path), "name": "job", "batch_size": 3, "progress": False, "report": False},
        "plugins": {"layer_lens": {"adl_positions": ADL_N, "adl_top_k": 3}},
    }))


def _residuals(model, ids):
    """resid_post of every layer through forward hooks on the decoder layers, and the logits. ``[L, T, d]``"""
    adapter = ModelAdapter(model)
    saved = []
    hooks = [adapter.module(adapter.layer_path(i)).register_forward_hook(
        lambda mod, args, out: saved.append((out[0] if isinstance(out, tuple) else out)[0].detach()))
        for i in range(adapter.n_layers)]
    try:
        with torch.no_grad():
            logits = model(ids[None]).logits[0]
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(saved), logits


def _naive_lens(model, h):
    """final norm, then the unembedding matrix by hand (and Gemma's soft-cap)."""
    adapter = ModelAdapter(model)
    with torch.no_grad():
        logits = adapter.module(adapter.spec.final_norm)(h) @ model.get_output_embeddings().weight.T
        cap = getattr(model.config, "final_logit_softcapping", None)
        return torch.tanh(logits / cap) * cap if cap else logits


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_lens_of_the_last_layer_is_the_output(family):
    model = tiny_model(family, 0)
    ids = torch.randint(5, 200, (9,))
    resid, logits = _residuals(model, ids)
    torch.testing.assert_close(logit_lens(model)(resid[-1]), logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logit_lens(model)(resid[0]), _naive_lens(model, resid[0]), rtol=1e-5, atol=1e-5)


def test_distribution_helpers_against_loops():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 50, generator=g) * 3, torch.randn(7, 50, generator=g)
    targets = torch.randint(0, 50, (7,), generator=g)
    got = token_stats(a, targets, 3, max_elements=100)  # chunks of 2 positions
    kl = kl_divergence(a, b, max_elements=100)
    for n in range(7):
        p, q = a[n].double().softmax(-1), b[n].double().softmax(-1)
        assert got["rank"][n] == 1 + sum(float(a[n, v]) > float(a[n, targets[n]]) for v in range(50))
        assert float(got["logp"][n]) == pytest.approx(float(p[targets[n]].log()), rel=1e-12)
        assert float(kl[n]) == pytest.approx(float((p * (p / q).log()).sum()), rel=1e-10)
        assert float(got["entropy"][n]) == pytest.approx(float(-(p * p.log()).sum()), rel=1e-10)
    top1 = torch.tensor([[1, 2, 3, 3], [3, 3, 3, 3], [3, 1, 3, 3], [1, 1, 1, 2]])
    assert commitment_depth(top1, torch.tensor([3, 3, 3, 2])).tolist() == [2, 0, 2, 3]


def test_paired_and_lens_statistics_against_loops():
    """paired_token_stats (own + another model, chunked) and lens_stats (several layers and none) in float64
    against per-position loops over the vocabulary."""
    g = torch.Generator().manual_seed(1)
    own, other = torch.randn(7, 50, generator=g) * 3, torch.randn(7, 50, generator=g) * 2
    targets = torch.randint(0, 50, (7,), generator=g)
    mine, (vs,) = paired_token_stats(own, [other], targets, 4, max_elements=300)  # chunks of 1 position
    plain = token_stats(own, targets, 4)
    for key in plain:
        torch.testing.assert_close(mine[key], plain[key], rtol=0, atol=0)
    W = torch.randint(-2, 3, (50, 6), generator=g).float()       # small integers: float32 logits are exact
    hidden = torch.randint(-2, 3, (7, 3, 6), generator=g).float()
    got = lens_stats(hidden, own, lambda h: h @ W.T, targets, max_elements=600)  # chunks of 2 positions
    empty = lens_stats(hidden[:, :0], own, lambda h: h @ W.T, targets)
    assert empty["kl"].shape == (7, 0)
    for n in range(7):
        p, q = own[n].double().softmax(-1), other[n].double().softmax(-1)
        y = int(targets[n])
        assert int(vs["rank"][n]) == 1 + sum(float(other[n, v]) > float(other[n, y]) for v in range(50))
        assert float(vs["logp"][n]) == pytest.approx(float(q[y].log()), rel=1e-12)
        assert float(vs["kl_own_other"][n]) == pytest.approx(sum(float(p[v] * (p[v] / q[v]).log()) for v in range(50)),
                                                              rel=1e-10)
        assert float(vs["kl_other_own"][n]) == pytest.approx(sum(float(q[v] * (q[v] / p[v]).log()) for v in range(50)),
                                                              rel=1e-10)
        assert float(got["final_logp"][n]) == float(empty["final_logp"][n]) == pytest.approx(float(p[y].log()), rel=1e-12)
        for layer in range(3):
            z = (hidden[n, layer] @ W.T).double()
            lens = z.softmax(-1)
            assert float(got["kl"][n, layer]) == pytest.approx(float((p * (p / lens).log()).sum()), rel=1e-10)
            assert float(got["logp"][n, layer]) == pytest.approx(float(lens[y].log()), rel=1e-12)
            assert int(got["top1"][n, layer]) == int(z.argmax())


@pytest.mark.parametrize("family", ["llama"])
def test_layer_lens_equals_a_naive_loop(tmp_path, family):
    run(_cfg(tmp_path, family))
    store = ResultStore(tmp_path / "job")
    base, tok = load_model(ModelSpec(path=f"tiny-random:{family}:0"))
    tuned, _ = load_model(ModelSpec(path=f"tiny-random:{family}:1"))
    prompts = load_prompts("builtin", limit=N_PROMPTS)
    rows = [json.loads(line) for line in (tmp_path / "job" / "responses" / "tuned.jsonl").read_text().splitlines()]
    L = ModelAdapter(base).n_layers
    kl_naive, depth_naive, rel_naive, cos_naive = {"base": [], "tuned": []}, {"base": [], "tuned": []}, [], []
    slot_sums = {"base": 0.0, "tuned": 0.0}
    for prompt, row in zip(prompts, rows):
        enc = encode_prompt(tok, prompt, True)
        ids = torch.cat([enc.input_ids, torch.tensor(row["response_ids"], dtype=torch.long)])
        cols = [enc.n_prompt - 1 + m for m in range(len(row["response_ids"]) + (row["stop_id"] is not None))]
        h = {}
        for name, model in (("base", base), ("tuned", tuned)):
            resid, logits = _residuals(model, ids)
            h[name] = resid[:, cols]                                                       # [L, n, d]
            final = logits[cols].double().log_softmax(-1)
            top1 = []
            for layer in range(L):
                lens = _naive_lens(model, resid[layer, cols]).double().log_softmax(-1)
                kl_naive[name].append((final.exp() * (final - lens)).sum(-1))
                top1.append(lens.argmax(-1))
            top1 = torch.stack(top1, 1)                                                    # [n, L]
            for n in range(len(cols)):
                depth_naive[name].append(min(k for k in range(L) if all(top1[n, j] == top1[n, -1]
                                                                        for j in range(k, L))))
            slot_sums[name] = slot_sums[name] + resid[:, enc.n_prompt - 1].double()  # template:-1
        diff = (h["tuned"] - h["base"]).double()
        rel_naive.append((diff.norm(dim=-1) / h["base"].double().norm(dim=-1)).T)
        cos_naive.append(torch.nn.functional.cosine_similarity(h["tuned"].double(), h["base"].double(), dim=-1).T)
    for name in ("base", "tuned"):
        lens_np = store.load_arrays("layer_lens", name, "lens")
        per_prompt = [torch.stack(kl_naive[name][k * L:(k + 1) * L], 1) for k in range(len(prompts))]
        expected = torch.cat(per_prompt).numpy()                                           # [N, L]
        np.testing.assert_allclose(lens_np["kl"][:, :-1], expected[:, :-1], rtol=1e-4, atol=1e-8)
        assert np.abs(expected[:, -1]).max() < 1e-8 and (lens_np["kl"][:, -1] == 0).all()
        positions = store.load_table("layer_lens", name, "positions")
        assert positions["commitment_layer"].tolist() == depth_naive[name]
    diff = store.load_arrays("layer_lens", "compare/base__tuned", "resid_diff")
    np.testing.assert_allclose(diff["rel_norm"], torch.cat(rel_naive).numpy(), rtol=1e-5)
    np.testing.assert_allclose(diff["cos"], torch.cat(cos_naive).numpy(), rtol=1e-5, atol=1e-7)

    # activation-difference lens at the last template token, decoded with the tuned model's lens
    adl = store.load_table("layer_lens", "compare/base__tuned", "adl")
    mean_diff = (slot_sums["tuned"] - slot_sums["base"]) / len(prompts)                 # [L, d]
    for layer in range(L):
        probs = _naive_lens(tuned, mean_diff[layer].float()[None]).double().softmax(-1)[0]
        top = adl[(adl["slot"] == "template:-1") & (adl["layer_index"] == layer)].sort_values("rank")
        assert top["token_id"].iloc[0] == int(probs.argmax())
        assert top["prob"].iloc[0] == pytest.approx(float(probs.max()), rel=1e-4)
    assert set(adl["decoded_with"]) == {"tuned"}
    # plain text: BOS + prompt text, the first ADL_N positions
    plain_b, plain_t = [], []
    for prompt in prompts:
        ids = encode_prompt(tok, Prompt("p", prompt.text, ()), False).input_ids[:ADL_N]
        plain_b.append(_residuals(base, ids)[0].double())
        plain_t.append(_residuals(tuned, ids)[0].double())
    means_t = store.load_arrays("layer_lens", "tuned", "adl_means")
    k = means_t["labels"].tolist().index("plain:1")
    np.testing.assert_allclose(means_t["means"][k], torch.stack(plain_t).mean(0)[:, 1].numpy(), rtol=1e-5, atol=1e-6)
    summary = store.load_json("layer_lens", "compare/base__tuned", "summary")
    assert summary["n_positions"] == len(depth_naive["tuned"])
    assert summary["commitment_tuned"] == pytest.approx(np.mean(depth_naive["tuned"]))
    assert (tmp_path / "job" / "layer_lens" / "compare" / "base__tuned" / "kl_by_layer.png").is_file()
    assert not (tmp_path / "job" / "layer_lens" / "base" / "paired").exists()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma", "gemma2", "gemma3", "phi3", "gpt2", "gpt_neox"])
def test_both_plugins_on_every_other_family(tmp_path, family):
    """token_shift (KL, ranks, D) and layer_lens (lens KL) in one shared trace, against naive loops."""
    cfg = _cfg(tmp_path, family)
    cfg.plugins["token_shift"] = validate(OmegaConf.create({"plugins": {"token_shift": {"html_prompts": 1}}})
                                          ).plugins["token_shift"]
    run(cfg)
    store = ResultStore(tmp_path / "job")
    base, tok = load_model(ModelSpec(path=f"tiny-random:{family}:0"))
    tuned, _ = load_model(ModelSpec(path=f"tiny-random:{family}:1"))
    prompts = load_prompts("builtin", limit=N_PROMPTS)
    rows = [json.loads(line) for line in (tmp_path / "job" / "responses" / "tuned.jsonl").read_text().splitlines()]
    table = store.load_table("token_shift", "compare/base__tuned", "positions")
    lens_kl = store.load_arrays("layer_lens", "base", "lens")["kl"]
    D = store.load_arrays("token_shift", "compare/base__tuned", "differential")
    at = 0
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        enc = encode_prompt(tok, prompt, True)
        resp = row["response_ids"] + ([row["stop_id"]] if row["stop_id"] is not None else [])
        ids = torch.cat([enc.input_ids, torch.tensor(row["response_ids"], dtype=torch.long)])
        resid, logits_b = _residuals(base, ids)
        _, logits_t = _residuals(tuned, ids)
        got = table[table["id"] == prompt.id].sort_values("m")
        for m, y in enumerate(resp):
            c = enc.n_prompt - 1 + m
            lb, lt = logits_b[c].double().log_softmax(-1), logits_t[c].double().log_softmax(-1)
            lens = _naive_lens(base, resid[0, c][None]).double().log_softmax(-1)[0]
            assert got.iloc[m]["kl_tb"] == pytest.approx(float((lt.exp() * (lt - lb)).sum()), rel=1e-4, abs=1e-8)
            assert got.iloc[m]["rank_base"] == 1 + int((lb > lb[y]).sum())
            assert lens_kl[at + m, 0] == pytest.approx(float((lb.exp() * (lb - lens)).sum()), rel=1e-4, abs=1e-8)
        at += len(resp)
        if i == 0 and row["response_ids"]:
            from tuneshift.attribution import make_item, naive_attribution

            item = make_item(enc.input_ids, torch.tensor(row["response_ids"]), enc.content_mask)
            naive = (naive_attribution(tuned, item, "logprob") - naive_attribution(base, item, "logprob")).numpy()
            np.testing.assert_allclose(D["D_0"], naive, rtol=1e-3, atol=1e-4 * (np.abs(naive).max() + 1e-12))
