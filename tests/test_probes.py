"""The probe registry against plain transformers forwards and plain autograd (no nnsight involved)."""
from __future__ import annotations


import pytest
import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.data import left_pad
from tuneshift.memory import release_memory
from tuneshift.probes import Probe, ProbeError, ProbeRegistry, all_sites
from tuneshift.testing import tiny_model, tiny_tokenizer


def _setup(family: str):
    from nnsight import TransformersModel

    model, tok = tiny_model(family), tiny_tokenizer()
    model.requires_grad_(False)
    texts = ["the cat sat on the mat", "hello", "Write a poem about the sea."]
    ids, mask, pos = left_pad([torch.tensor(tok(t)["input_ids"]) for t in texts], tok.pad_token_id)
    return model, TransformersModel(model, tokenizer=tok), ModelAdapter(model), ids, mask, pos


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox"])
def test_captures_equal_plain_forward(family):
    model, lm, adapter, ids, mask, pos = _setup(family)
    probes = {"a": [Probe("logits"), Probe("layers.1.resid_post"), Probe("layers.0.attn.pattern")],
              "b": [Probe("layers.0.resid_post", reduce="mean"), Probe("embed.output", reduce="norm")]}
    out = ProbeRegistry(adapter, probes).run(lm, ids, mask, pos)
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                    output_attentions=True)
    real = mask.bool()
    assert set(out) == {"a", "b"} and set(out["a"]) == {"logits", "layers.1.resid_post", "layers.0.attn.pattern"}
    torch.testing.assert_close(out["a"]["logits"][real], ref.logits[real], atol=1e-5, rtol=1e-5)
    # hidden_states[i + 1] is the residual after layer i; the last one is after the final norm
    torch.testing.assert_close(out["a"]["layers.1.resid_post"][real],
                               _resid_after(model, ids, mask, pos, 1)[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["a"]["layers.0.attn.pattern"], ref.attentions[0], atol=1e-6, rtol=1e-5)
    h0 = ref.hidden_states[1]  # [B, T, d]
    mean = (h0 * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    torch.testing.assert_close(out["b"]["layers.0.resid_post:mean"], mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["b"]["embed.output:norm"], adapter.embedding_matrix()[ids].norm(dim=-1))
    assert all(not t.requires_grad for c in out.values() for t in c.values())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_tail_and_last_logits_skip_the_prompt_positions_and_equal_the_full_forward(family):
    """Logits read only as ``tail`` / ``last`` make the model unembed just those positions (``logits_to_keep``);
    the values equal the full forward's at the same positions. A full read or a gradient unembeds all."""
    model, lm, adapter, ids, mask, pos = _setup(family)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits         # [B, T, V]
    seen = []
    handle = model.get_output_embeddings().register_forward_hook(lambda m, i, o: seen.append(i[0].shape[1]))
    tail = ProbeRegistry(adapter, {"t": [Probe("logits", reduce="tail")], "l": [Probe("logits", reduce="last")]})
    out = tail.run(lm, ids, mask, pos, tail=3)
    resid_only = ProbeRegistry(adapter, {"r": [Probe("layers.0.resid_post")]})
    resid_only.run(lm, ids, mask, pos)
    whole = ProbeRegistry(adapter, {"w": [Probe("logits"), Probe("logits", reduce="tail")]})
    got = whole.run(lm, ids, mask, pos, tail=3)
    grad = ProbeRegistry(adapter, {"g": [Probe("layers.0.resid_post", grad=True), Probe("logits", reduce="last")]})
    handle.remove()
    assert seen[:2] == [3, 1], "tail=3 unembeds 3 positions; a trace reading no logits unembeds one"
    assert seen[2] == ids.shape[1] and grad.logits_kept(3) is None and whole.logits_kept(3) is None
    torch.testing.assert_close(out["t"]["logits:tail"], full[:, -3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["l"]["logits:last"], full[:, -1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got["w"]["logits:tail"], full[:, -3:], atol=1e-5, rtol=1e-5)


def _resid_after(model, ids, mask, pos, layer: int) -> torch.Tensor:
    """Residual stream after ``layer`` with a plain forward hook (hidden_states may be post-norm at the end)."""
    adapter = ModelAdapter(model)
    seen = {}
    handle = adapter.module(adapter.layer_path(layer)).register_forward_hook(
        lambda m, i, o: seen.setdefault("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos)
    handle.remove()
    return seen["h"]


def test_gradient_probe_equals_plain_autograd():
    model, lm, adapter, ids, mask, pos = _setup("llama")
    out = ProbeRegistry(adapter, {"g": [Probe("embed.output", grad=True), Probe("layers.0.resid_post", grad=True),
                                        Probe("layers.1.mlp.output")]}).run(lm, ids, mask, pos)["g"]
    embeds = adapter.embedding_matrix()[ids].clone().requires_grad_(True)
    logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (grad,) = torch.autograd.grad((logprobs * mask[:, 1:]).sum(), embeds)
    torch.testing.assert_close(out["embed.output:grad"], grad, atol=1e-6, rtol=1e-5)
    assert out["layers.0.resid_post:grad"].shape == ids.shape + (adapter.d_model,)
    assert out["layers.1.mlp.output"].shape == ids.shape + (adapter.d_model,)


def test_site_order_does_not_matter_and_every_site_runs():
    model, lm, adapter, ids, mask, pos = _setup("llama")
    sites = all_sites(adapter.n_layers)
    forward = ProbeRegistry(adapter, {"x": [Probe(s, reduce="norm") for s in sites]}).run(lm, ids, mask, pos)
    backward = ProbeRegistry(adapter, {"x": [Probe(s, reduce="norm") for s in reversed(sites)]}).run(lm, ids, mask, pos)
    for key, value in forward["x"].items():
        torch.testing.assert_close(value, backward["x"][key])


def test_unknown_site_fails_before_tracing():
    _, _, adapter, *_ = _setup("llama")
    with pytest.raises(ProbeError, match="valid sites"):
        ProbeRegistry(adapter, {"x": [Probe("layers.0.attn.bogus")]})
    with pytest.raises(ProbeError, match="has 2 layers"):
        ProbeRegistry(adapter, {"x": [Probe("layers.7.mlp.output")]})


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * 4096 / 2**20


def test_memory_does_not_grow_over_many_batches():
    """Each batch's captures (~1 MB of logits here) are freed: 60 batches must not accumulate them."""
    model, lm, adapter, ids, mask, pos = _setup("llama")
    ids, mask, pos = ids.repeat(8, 4), mask.repeat(8, 4), pos.repeat(8, 4)  # [24, ~40]
    registry = ProbeRegistry(adapter, {"x": [Probe("logits"), Probe("layers.1.resid_post"),
                                             Probe("embed.output", grad=True)]})
    per_batch_mb = sum(t.numel() * 4 for t in registry.run(lm, ids, mask, pos)["x"].values()) / 2**20
    for _ in range(10):
        registry.run(lm, ids, mask, pos)
    release_memory()  # freed heap back to the OS: RSS then counts what is alive, not what glibc kept
    before = _rss_mb()
    for _ in range(50):
        registry.run(lm, ids, mask, pos)
    release_memory()
    grown = _rss_mb() - before
    assert per_batch_mb > 1.0
    assert grown < 10 * per_batch_mb, f"RSS grew {grown:.1f} MB over 50 batches of {per_batch_mb:.1f} MB"


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3", "gpt2", "gpt_neox"])
def test_head_outputs_and_resid_pre_equal_hand_written_hooks(family):
    """attn.z (per head, before o_proj) and resid_pre against forward hooks on the same modules."""
    model, lm, adapter, ids, mask, pos = _setup(family)
    seen: dict[str, torch.Tensor] = {}
    o_proj = adapter.module(adapter.layer_path(1, "o"))
    layer = adapter.module(adapter.layer_path(1))
    handles = [o_proj.register_forward_pre_hook(lambda m, args: seen.__setitem__("z", args[0].detach())),
               layer.register_forward_pre_hook(lambda m, args: seen.__setitem__("pre", args[0].detach()))]
    try:
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, position_ids=pos)
    finally:
        for h in handles:
            h.remove()
    out = ProbeRegistry(adapter, {"p": [Probe("layers.1.attn.z"), Probe("blocks.1.hook_resid_pre"),
                                        Probe("blocks.1.hook_attn_out")]}).run(lm, ids, mask, pos)["p"]
    z = out["layers.1.attn.z"]
    assert z.shape == (*ids.shape, adapter.n_heads, adapter.d_head)
    torch.testing.assert_close(z.flatten(-2), seen["z"], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out["blocks.1.hook_resid_pre"], seen["pre"], atol=1e-6, rtol=1e-6)
    # heads write through W_O: the sum over heads of z_h W_O[h] (+ bias) is the attention output
    bias = adapter.b_O(1)
    recon = torch.einsum("bthe,hed->btd", z, adapter.W_O(1).to(z.dtype)) + (0 if bias is None else bias)
    real = mask.bool()
    torch.testing.assert_close(recon[real], out["blocks.1.hook_attn_out"][real], atol=1e-5, rtol=1e-4)


def test_transformer_lens_aliases_name_the_canonical_sites():
    from tuneshift.probes import TL_ALIASES, canonical_site, site_table

    assert canonical_site("blocks.3.attn.hook_pattern") == "layers.3.attn.pattern"
    assert canonical_site("hook_embed") == "embed.output" and canonical_site("logits") == "logits"
    probe = Probe("blocks.0.hook_resid_post", reduce="norm")
    assert probe.site == "layers.0.resid_post" and probe.key == "blocks.0.hook_resid_post:norm"
    table = {site: (shape, alias) for site, shape, alias in site_table()}
    assert set(TL_ALIASES.values()) <= set(table) and table["layers.{i}.attn.z"] == ("[B, T, H, d_h]",
                                                                                    "blocks.{i}.attn.hook_z")
    from tuneshift.probes import site_order

    with pytest.raises(ProbeError, match="blocks.{i}.hook_mlp_out"):  # the error lists the aliases too
        site_order(Probe("blocks.0.hook_nothing").site, 2)
