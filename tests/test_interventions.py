"""Every intervention against a hand-written torch forward hook doing the same thing on a plain forward."""
from __future__ import annotations

import pytest
import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.data import left_pad
from tuneshift.interventions import (AblateHeads, CorruptPositions, InterventionError, Patch, ProjectOut, Steer,
                                     apply_interventions)
from tuneshift.probes import Probe, ProbeRegistry
from tuneshift.testing import tiny_model, tiny_tokenizer

FAMILIES = ["llama", "qwen2", "gemma3", "phi3", "gpt2", "gpt_neox"]


pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = ["the cat sat on the mat", "hello", "Write a poem about the sea."]


def _setup(family: str, seed: int = 0):
    from nnsight import TransformersModel

    model, tok = tiny_model(family, seed), tiny_tokenizer()
    ids, mask, pos = left_pad([torch.tensor(tok(t)["input_ids"]) for t in TEXTS], tok.pad_token_id)
    return model, TransformersModel(model, tokenizer=tok), ModelAdapter(model), ids, mask, pos


def _hooked(model, hooks, ids, mask, pos, **kwargs):
    """Logits of a plain forward with ``hooks`` = [(module, "pre" | "post", fn)] registered."""
    handles = [m.register_forward_pre_hook(fn) if kind == "pre" else m.register_forward_hook(fn)
               for m, kind, fn in hooks]
    try:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs).logits
    finally:
        for h in handles:
            h.remove()


def _logits(lm, adapter, ids, mask, pos, ivs, **kwargs):
    return ProbeRegistry(adapter, {"t": [Probe("logits")]}).run(lm, ids, mask, pos, ivs, **kwargs)["t"]["logits"]


def _close(a, b, mask):
    real = mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-4)


def _set_first(output, value):
    """A module output with its tensor (first entry of a tuple, or the tensor itself) replaced."""
    return (value, *output[1:]) if isinstance(output, tuple) else value


def _first(output):
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_head_ablation_equals_pre_hook_on_the_output_projection(family, mode):
    model, lm, adapter, ids, mask, pos = _setup(family)
    H, dh = adapter.n_heads, adapter.d_head
    heads = torch.tensor([[True, False, False, True], [False, False, False, False], [False, True, True, True]])
    mean = torch.randn(H, dh)

    def pre(module, args):
        z = args[0].clone()  # [B, T, H * d_h]
        for r in range(z.shape[0]):
            for h in range(H):
                if heads[r, h]:
                    z[r, :, h * dh:(h + 1) * dh] = 0.0 if mode == "zero" else mean[h]
        return (z, *args[1:])

    o_proj = adapter.module(adapter.layer_path(1, "o"))
    want = _hooked(model, [(o_proj, "pre", pre)], ids, mask, pos)
    got = _logits(lm, adapter, ids, mask, pos, [AblateHeads(1, heads, mode=mode, mean=mean)])
    _close(got, want, mask)
    plain = _hooked(model, [], ids, mask, pos)
    assert not torch.allclose(got[0], plain[0], atol=1e-4)  # the test can fail: the ablation changed row 0
    torch.testing.assert_close(got[1][mask[1].bool()], plain[1][mask[1].bool()], atol=1e-5, rtol=1e-4)


def _orthonormal(d: int, k: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(d, k, generator=gen)).Q


@pytest.mark.parametrize("family", FAMILIES)
def test_projecting_out_equals_forward_hooks_on_mlp_and_residual(family):
    model, lm, adapter, ids, mask, pos = _setup(family)
    d = adapter.d_model
    per_row = torch.stack([_orthonormal(d, 3, 0), _orthonormal(d, 3, 1), torch.zeros(d, 3)])  # row 2: no-op
    per_row[1, :, 2] = 0.0  # a zero column removes nothing
    shared = _orthonormal(d, 5, 2)

    def mlp_hook(module, args, out):
        return torch.stack([out[r] - out[r] @ per_row[r] @ per_row[r].T for r in range(out.shape[0])])

    def layer_hook(module, args, out):
        h = _first(out)
        return _set_first(out, h - (h @ shared) @ shared.T)

    hooks = [(adapter.module(adapter.layer_path(0, "mlp")), "post", mlp_hook),
             (adapter.module(adapter.layer_path(1)), "post", layer_hook)]
    want = _hooked(model, hooks, ids, mask, pos)
    ivs = [ProjectOut("layers.1.resid_post", shared), ProjectOut("blocks.0.hook_mlp_out", per_row)]  # any order
    _close(_logits(lm, adapter, ids, mask, pos, ivs), want, mask)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "gemma3"])
def test_steering_equals_hooks_at_every_position_and_at_chosen_positions(family):
    model, lm, adapter, ids, mask, pos = _setup(family)
    d = adapter.d_model
    vec, per_row = torch.randn(d), torch.randn(3, d)
    where = torch.zeros(ids.shape, dtype=torch.bool)
    where[0, -2:], where[2, 3] = True, True

    def pre(module, args, kwargs):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        hidden = hidden + 2.5 * vec
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": hidden}
        return (hidden, *args[1:]), kwargs

    def attn_hook(module, args, out):
        h = _first(out).clone()
        for r in range(h.shape[0]):
            h[r, where[r]] += per_row[r]
        return _set_first(out, h)

    layer = adapter.module(adapter.layer_path(1))
    handle = layer.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        want = _hooked(model, [(adapter.module(adapter.layer_path(0, "attn")), "post", attn_hook)], ids, mask, pos)
    finally:
        handle.remove()
    ivs = [Steer("layers.1.resid_pre", vec, scale=2.5), Steer("layers.0.attn.output", per_row, positions=where)]
    _close(_logits(lm, adapter, ids, mask, pos, ivs), want, mask)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_patching_from_another_model_equals_forward_hooks(family):
    """Source captured from a second model on the same tokens, patched in (everywhere, and at some positions)."""
    model, lm, adapter, ids, mask, pos = _setup(family)
    other, _, other_adapter, *_ = _setup(family, seed=1)
    seen = {}
    handles = [other_adapter.module(other_adapter.layer_path(0)).register_forward_hook(
                   lambda m, a, o: seen.__setitem__("resid", _first(o).detach().clone())),
               other_adapter.module(other_adapter.layer_path(1, "mlp")).register_forward_hook(
                   lambda m, a, o: seen.__setitem__("mlp", o.detach().clone()))]
    with torch.no_grad():
        other(input_ids=ids, attention_mask=mask, position_ids=pos)
    for h in handles:
        h.remove()
    where = torch.zeros(ids.shape, dtype=torch.bool)
    where[:, -1] = True

    def mlp_hook(module, args, out):
        return torch.where(where[..., None], seen["mlp"], out)

    hooks = [(adapter.module(adapter.layer_path(0)), "post", lambda m, a, o: _set_first(o, seen["resid"])),
             (adapter.module(adapter.layer_path(1, "mlp")), "post", mlp_hook)]
    want = _hooked(model, hooks, ids, mask, pos)
    ivs = [Patch("layers.0.resid_post", seen["resid"]), Patch("layers.1.mlp.output", seen["mlp"], positions=where)]
    _close(_logits(lm, adapter, ids, mask, pos, ivs), want, mask)
    # patching the whole residual stream after the last layer gives the other model's final residual
    full = ProbeRegistry(adapter, {"t": [Probe("layers.1.resid_post")]}).run(
        lm, ids, mask, pos, [Patch("layers.0.resid_post", seen["resid"])])["t"]["layers.1.resid_post"]
    assert full.shape == seen["resid"].shape


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_corrupting_positions_equals_an_embedding_hook(family):
    model, lm, adapter, ids, mask, pos = _setup(family)
    where = torch.zeros(ids.shape, dtype=torch.bool)
    where[0, 2:4], where[2, -1] = True, True
    fill = adapter.embedding_matrix().mean(0)
    noise = 0.3 * torch.randn(ids.shape + (adapter.d_model,), generator=torch.Generator().manual_seed(7))

    def embed_hook(module, args, out):
        out = out.clone()
        out[where] = fill + noise[where]
        return out

    want = _hooked(model, [(adapter.module(adapter.spec.embed), "post", embed_hook)], ids, mask, pos)
    got = _logits(lm, adapter, ids, mask, pos, [CorruptPositions("embed.output", where, fill, noise_std=0.3, seed=7)])
    _close(got, want, mask)


def test_reads_downstream_see_the_writes_and_reads_at_the_site_see_the_new_value():
    model, lm, adapter, ids, mask, pos = _setup("llama")
    basis = _orthonormal(adapter.d_model, 4, 3)
    seen = {}

    def mlp_hook(module, args, out):
        new = out - (out @ basis) @ basis.T
        seen["mlp"] = new
        return new

    handle = adapter.module(adapter.layer_path(1)).register_forward_pre_hook(
        lambda m, args, kwargs: seen.__setitem__("pre", (kwargs.get("hidden_states", args[0] if args else None))),
        with_kwargs=True)
    _hooked(model, [(adapter.module(adapter.layer_path(0, "mlp")), "post", mlp_hook)], ids, mask, pos)
    handle.remove()
    out = ProbeRegistry(adapter, {"r": [Probe("layers.0.mlp.output"), Probe("layers.1.resid_pre")]}).run(
        lm, ids, mask, pos, [ProjectOut("layers.0.mlp.output", basis)])["r"]
    torch.testing.assert_close(out["layers.0.mlp.output"], seen["mlp"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out["layers.1.resid_pre"], seen["pre"], atol=1e-6, rtol=1e-5)
    assert (out["layers.0.mlp.output"] @ basis).abs().max() < 1e-5


def test_gradients_flow_through_interventions():
    model, lm, adapter, ids, mask, pos = _setup("llama")
    heads = torch.tensor([True, False, True, False])
    vec = torch.randn(adapter.d_model)
    out = ProbeRegistry(adapter, {"g": [Probe("embed.output", grad=True)]}).run(
        lm, ids, mask, pos, [AblateHeads(0, heads), Steer("layers.1.resid_pre", vec)])["g"]["embed.output:grad"]

    def pre(module, args):
        z = args[0].clone()
        z.view(*z.shape[:-1], adapter.n_heads, adapter.d_head)[:, :, heads] = 0.0
        return (z,)

    def steer(module, args, kwargs):
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + vec}
        return (args[0] + vec, *args[1:]), kwargs

    handles = [adapter.module(adapter.layer_path(0, "o")).register_forward_pre_hook(pre),
               adapter.module(adapter.layer_path(1)).register_forward_pre_hook(steer, with_kwargs=True)]
    embeds = adapter.embedding_matrix()[ids].clone().requires_grad_(True)
    try:
        logits = model(inputs_embeds=embeds, attention_mask=mask, position_ids=pos).logits
    finally:
        for h in handles:
            h.remove()
    logprobs = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    (grad,) = torch.autograd.grad((logprobs * mask[:, 1:]).sum(), embeds)
    torch.testing.assert_close(out, grad, atol=1e-6, rtol=1e-5)


def test_invalid_interventions_fail_with_the_fix():
    with pytest.raises(InterventionError, match="read-only"):
        Steer("layers.0.attn.pattern", torch.zeros(4))
    with pytest.raises(InterventionError, match="orthonormal"):
        ProjectOut("layers.0.mlp.output", torch.ones(8, 2))
    with pytest.raises(InterventionError, match="mean="):
        AblateHeads(0, torch.ones(4, dtype=torch.bool), mode="mean")
    model, lm, adapter, ids, mask, pos = _setup("llama")
    with pytest.raises(InterventionError, match="same tokens"):
        _logits(lm, adapter, ids, mask, pos, [Patch("layers.0.resid_post", torch.zeros(3, 2, adapter.d_model))])
    from tuneshift.probes import ProbeError

    with pytest.raises(ProbeError, match="has 2 layers"):
        _logits(lm, adapter, ids, mask, pos, [AblateHeads(5, torch.ones(4, dtype=torch.bool))])


def test_interventions_inside_an_nnsight_generate_loop_equal_hooked_generate():
    model, lm, adapter, ids, mask, pos = _setup("llama")
    tok = tiny_tokenizer()
    heads = torch.tensor([False, True, True, False])
    vec = torch.randn(adapter.d_model)
    ivs = [AblateHeads(1, heads), Steer("layers.0.mlp.output", vec, scale=0.5)]
    n = 5
    with lm.generate({"input_ids": ids, "attention_mask": mask}, max_new_tokens=n, min_new_tokens=n,
                     do_sample=False, pad_token_id=tok.pad_token_id) as tracer:
        for step in tracer.iter[:n]:
            apply_interventions(lm, adapter, ivs, step)
        result = tracer.result.save()

    def pre(module, args):
        z = args[0].clone()
        z.view(*z.shape[:-1], adapter.n_heads, adapter.d_head)[:, :, heads] = 0.0
        return (z,)

    handles = [adapter.module(adapter.layer_path(1, "o")).register_forward_pre_hook(pre),
               adapter.module(adapter.layer_path(0, "mlp")).register_forward_hook(lambda m, a, o: o + 0.5 * vec)]
    try:
        with torch.no_grad():
            want = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                  do_sample=False, pad_token_id=tok.pad_token_id)
    finally:
        for h in handles:
            h.remove()
    assert torch.equal(result, want)
