"""Adapters against hook-free recomputations on every tiny family (plain PyTorch forward hooks, no nnsight).

One real forward pass per family records, with ``register_forward_hook``, each layer's norm inputs/outputs
and attention/MLP block outputs. Each block is then recomputed from the adapter's weights alone
(``W_Q/W_K/W_V/W_O``, ``b_QKV/b_O``, ``W_gate/W_in/W_down``, biases, gains, embeddings) and compared.

Attention: every family gets the *full* recompute (q/k/v per head, position scheme, causal softmax with
grouped-query heads via ``kv_head_of``, then ``W_O``): llama, mistral, qwen2, gemma, gemma2, gemma3, phi3,
gpt2, gpt_neox, plus a Phi-3 with partial rotary. What is taken from the model rather than the adapter, being
position/scoring scheme rather than weights: cos/sin from the model's own rotary embedding and the family's own
``apply_rotary_pos_emb`` (handles NeoX's / Phi-3's partial rotary); Gemma3's per-head ``q_norm``/``k_norm``
gains come from the adapter (``q_norm_gain``/``k_norm_gain``, ``1 + w``), Gemma2/3's ``query_pre_attn_scalar`` and Gemma2's logit softcap (config), and per-layer sliding
windows (the attention module's ``sliding_window``; the sequence is longer than Gemma3's tiny window of 8, so
the window is exercised). No family needs the per-projection fallback.
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import sys

import pytest
import torch
import transformers
from transformers.activations import ACT2FN

from tuneshift import adapters
from tuneshift.adapters import ARCHS, ModelAdapter, UnsupportedArchitectureError, register_arch
from tuneshift.testing import TINY_FAMILIES, tiny_config, tiny_model, tiny_tokenizer

B, T = 2, 12  # T > Gemma3's tiny sliding window (8)
ATOL, RTOL = 1e-5, 1e-4
PHI3_PARTIAL = "phi3_partial_rotary"  # Phi-3 with partial_rotary_factor 0.5 (tiny_model's phi3 rotates fully)
GEMMA = ("gemma", "gemma2", "gemma3")


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=RTOL)


# ---- models and one hooked forward pass ---------------------------------------------------------------------

def _build(name: str) -> torch.nn.Module:
    if name != PHI3_PARTIAL:
        return tiny_model(name)
    cfg = tiny_config("phi3", tiny_tokenizer())
    cfg.rope_parameters = {**cfg.rope_parameters, "partial_rotary_factor": 0.5}
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


@dataclasses.dataclass
class Run:
    model: torch.nn.Module
    adapter: ModelAdapter
    ids: torch.Tensor      # [B, T]
    logits: torch.Tensor   # [B, T, vocab]
    acts: dict[str, torch.Tensor]  # "<path>.in" / "<path>.out" -> [B, T, d_model]


@functools.lru_cache(maxsize=None)
def _run(name: str) -> Run:
    """Forward a random batch (no padding, positions 0..T-1) with hooks on every mapped module."""
    model = _build(name)
    adapter = ModelAdapter(model)
    acts: dict[str, torch.Tensor] = {}

    def hook(path: str, output_index: int | None = None):
        def fn(_module, args, output):
            acts[f"{path}.in"] = args[0].detach() if args else None
            acts[f"{path}.out"] = (output if output_index is None else output[output_index]).detach()
        return fn

    s = adapter.spec
    paths = {s.embed: None, s.final_norm: None}
    for i in range(adapter.n_layers):
        paths |= {adapter.layer_path(i, "ln1"): None, adapter.layer_path(i, "ln2"): None,
                  adapter.layer_path(i, "mlp"): None, adapter.layer_path(i, "attn"): s.attn_output_index}
    handles = [adapter.module(p).register_forward_hook(hook(p, idx)) for p, idx in paths.items()]
    ids = torch.randint(0, adapter.vocab_size, (B, T), generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits
    finally:
        for h in handles:
            h.remove()
    return Run(model, adapter, ids, logits, acts)


ALL = TINY_FAMILIES + (PHI3_PARTIAL,)


# ---- hook-free recomputations -------------------------------------------------------------------------------

def recompute_mlp(adapter: ModelAdapter, layer: int, x: torch.Tensor) -> torch.Tensor:
    """x [B, T, d_model] (ln2 output) -> MLP output [B, T, d_model], from the adapter's weights only."""
    cfg = adapter.config
    act = ACT2FN[getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", None)
                 or cfg.activation_function]
    b_in, b_down, W_gate = adapter.b_in(layer), adapter.b_down(layer), adapter.W_gate(layer)
    pre = x @ adapter.W_in(layer) + (0 if b_in is None else b_in)                 # [B, T, d_ff]
    hidden = act(pre) if W_gate is None else act(x @ W_gate) * pre               # [B, T, d_ff]
    return hidden @ adapter.W_down(layer) + (0 if b_down is None else b_down)   # [B, T, d_model]


def _heads(x: torch.Tensor, W: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, d_model], W [heads, d_model, d_head], b [heads*d_head] | None -> [B, heads, T, d_head]."""
    out = torch.einsum("btm,hmd->bhtd", x, W)
    return out if b is None else out + b.reshape(W.shape[0], 1, W.shape[2])


def _rotate(model: torch.nn.Module, attn: torch.nn.Module, q: torch.Tensor, k: torch.Tensor):
    """Apply the family's rotary embedding (its own cos/sin and ``apply_rotary_pos_emb``) to q, k [B, H, T, d]."""
    rotary = model.base_model.rotary_emb
    position_ids = torch.arange(q.shape[2])[None]                                # [1, T]
    extra = {"layer_type": attn.layer_type} if "layer_type" in inspect.signature(rotary.forward).parameters else {}
    cos, sin = rotary(q, position_ids, **extra)                                  # [1, T, rotary_dim] each
    return sys.modules[type(attn).__module__].apply_rotary_pos_emb(q, k, cos, sin)


def head_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    """Per-head RMSNorm written out: ``x / sqrt(mean_j x_j^2 + eps) * gain`` over the last (d_head) axis."""
    return x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt() * gain


def recompute_attention(run: Run, layer: int, x: torch.Tensor) -> torch.Tensor:
    """x [B, T, d_model] (ln1 output) -> attention block output [B, T, d_model]."""
    model, adapter, cfg = run.model, run.adapter, run.adapter.config
    attn = adapter.module(adapter.layer_path(layer, "attn"))
    b_q, b_k, b_v = adapter.b_QKV(layer)
    q = _heads(x, adapter.W_Q(layer), b_q)                                       # [B, n_heads, T, d_head]
    k = _heads(x, adapter.W_K(layer), b_k)                                       # [B, n_kv_heads, T, d_head]
    v = _heads(x, adapter.W_V(layer), b_v)                                       # [B, n_kv_heads, T, d_head]
    if adapter.q_norm_gain(layer) is not None:  # Gemma3: RMS norms over each head's q and k, before rotary
        q = head_norm(q, adapter.q_norm_gain(layer), adapter.q_norm_eps(layer))
        k = head_norm(k, adapter.k_norm_gain(layer), adapter.k_norm_eps(layer))
    if adapter.positions == "rotary":
        q, k = _rotate(model, attn, q, k)
    kv = adapter.kv_head_of(torch.arange(adapter.n_heads))                      # [n_heads] -> kv head index
    k, v = k[:, kv], v[:, kv]                                                    # [B, n_heads, T, d_head]

    scale = (getattr(cfg, "query_pre_attn_scalar", None) or adapter.d_head) ** -0.5
    scores = q @ k.transpose(-1, -2) * scale                                    # [B, n_heads, T, T]
    if (cap := getattr(cfg, "attn_logit_softcapping", None)) is not None:
        scores = torch.tanh(scores / cap) * cap
    window = attn.sliding_window if hasattr(attn, "sliding_window") else getattr(cfg, "sliding_window", None)
    i, j = torch.arange(q.shape[2])[:, None], torch.arange(q.shape[2])[None, :]  # query, key positions
    allowed = (j <= i) & ((i - j < window) if window else True)                  # [T, T]
    pattern = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    z = pattern @ v                                                              # [B, n_heads, T, d_head]
    b_O = adapter.b_O(layer)
    out = torch.einsum("bhtd,hdm->btm", z, adapter.W_O(layer))                   # [B, T, d_model]
    return out if b_O is None else out + b_O


def recompute_norm(adapter: ModelAdapter, module: torch.nn.Module, x: torch.Tensor, gain: torch.Tensor):
    """RMSNorm ``x / rms(x) * gain`` or, for nn.LayerNorm (GPT-2/NeoX), LayerNorm with gain and the module's bias."""
    cfg = adapter.config
    if isinstance(module, torch.nn.LayerNorm):
        eps = getattr(cfg, "layer_norm_eps", None) or cfg.layer_norm_epsilon
        centred = x - x.mean(-1, keepdim=True)
        return centred / (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt() * gain + module.bias
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps) * gain


# ---- tests --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_weight_shapes(name):
    a = _run(name).adapter
    H, K, d, dh, ff = a.n_heads, a.n_kv_heads, a.d_model, a.d_head, a.d_ff
    assert a.W_Q(0).shape == (H, d, dh) and a.W_O(0).shape == (H, dh, d)
    assert a.W_K(0).shape == a.W_V(0).shape == (K, d, dh)
    assert a.W_in(0).shape == (d, ff) and a.W_down(0).shape == (ff, d)
    assert a.W_gate(0) is None or a.W_gate(0).shape == (d, ff)
    assert a.embedding_matrix().shape == a.unembedding_matrix().shape == (a.vocab_size, d)
    assert a.tied_embeddings == bool(a.config.tie_word_embeddings)


@pytest.mark.parametrize("name", ALL)
def test_mlp_recomputed_from_weights(name):
    run = _run(name)
    for layer in range(run.adapter.n_layers):
        x = run.acts[f"{run.adapter.layer_path(layer, 'ln2')}.out"]
        _close(recompute_mlp(run.adapter, layer, x), run.acts[f"{run.adapter.layer_path(layer, 'mlp')}.out"])


@pytest.mark.parametrize("name", ALL)
def test_attention_recomputed_from_weights(name):
    run = _run(name)
    for layer in range(run.adapter.n_layers):
        x = run.acts[f"{run.adapter.layer_path(layer, 'ln1')}.out"]
        _close(recompute_attention(run, layer, x), run.acts[f"{run.adapter.layer_path(layer, 'attn')}.out"])


def test_attention_recompute_sees_a_wrong_head_split(scratch_archs):
    """The comparison is sharp: NeoX's per-head fused q|k|v read as Phi-3's [q | k | v] no longer matches."""
    reference = _run("gpt_neox")
    register_arch(dataclasses.replace(scratch_archs["gpt_neox"], family="neox_misread", model_types=("neox_misread",),
                                      fused_qkv="qkv_concat"))
    model = tiny_model("gpt_neox")  # same seed, same weights as the reference run
    model.config.model_type = "neox_misread"
    wrong = Run(model, ModelAdapter(model), reference.ids, reference.logits, reference.acts)
    x = reference.acts[f"{wrong.adapter.layer_path(0, 'ln1')}.out"]
    with pytest.raises(AssertionError):
        _close(recompute_attention(wrong, 0, x), reference.acts[f"{wrong.adapter.layer_path(0, 'attn')}.out"])


@pytest.mark.parametrize("name", ALL)
def test_norm_gains(name):
    """Norm outputs from the adapter's effective gains (checks Gemma's ``1 + w`` offset)."""
    run = _run(name)
    a = run.adapter
    sites = [(a.spec.final_norm, a.final_norm_gain())]
    for layer in range(a.n_layers):
        sites += [(a.layer_path(layer, "ln1"), a.ln1_gain(layer)), (a.layer_path(layer, "ln2"), a.ln2_gain(layer))]
    for path, gain in sites:
        _close(recompute_norm(a, a.module(path), run.acts[f"{path}.in"], gain), run.acts[f"{path}.out"])


def test_gemma3_query_and_key_norms():
    """The model's q and k (after q_norm/k_norm, before RoPE) from the adapter alone; x W_Q without them is
    far off, and every family without such norms reports None."""
    model = tiny_model("gemma3")
    a = ModelAdapter(model)
    ids = torch.randint(5, 500, (B, T), generator=torch.Generator().manual_seed(0))
    seen: dict[str, torch.Tensor] = {}
    hooks = [a.module(a.layer_path(1, part)).register_forward_hook(
        lambda _m, inputs, out, part=part: seen.update({part: out, f"{part}.in": inputs[0]}))
        for part in ("ln1", "q_norm", "k_norm")]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    x = seen["ln1"]                                                              # [B, T, d_model]
    q_raw, k_raw = _heads(x, a.W_Q(1), None), _heads(x, a.W_K(1), None)          # [B, H, T, d_head]
    _close(head_norm(q_raw, a.q_norm_gain(1), a.q_norm_eps(1)), seen["q_norm"])
    _close(head_norm(k_raw, a.k_norm_gain(1), a.k_norm_eps(1)), seen["k_norm"])
    gain = a.module(a.layer_path(1, "q_norm")).weight + 1.0                      # Gemma's 1 + w
    assert torch.equal(a.q_norm_gain(1), gain) and a.q_norm_gain(1).shape == (a.d_head,)
    assert float((q_raw - seen["q_norm"]).norm() / seen["q_norm"].norm()) > 0.3    # x W_Q alone is not q
    for family in ("llama", "gemma2", "qwen2", "gpt2"):
        other = ModelAdapter(tiny_model(family))
        assert other.q_norm_gain(0) is None and other.k_norm_gain(0) is None and other.q_norm_eps(0) is None


@pytest.mark.parametrize("name", ALL)
def test_embeddings_and_unembedding(name):
    run = _run(name)
    a = run.adapter
    # Gemma's embedding module multiplies by sqrt(d_model); embedding_matrix() is the unscaled table (documented)
    scale = a.d_model ** 0.5 if name in GEMMA else 1.0
    embedded = run.acts[f"{a.spec.embed}.out"]                                  # [B, T, d_model]
    _close(embedded, a.embedding_matrix()[run.ids] * scale)
    # the first layer reads token embeddings (+ GPT-2's absolute position table)
    resid_pre = embedded
    if a.spec.position_embed is not None:
        resid_pre = resid_pre + a.module(a.spec.position_embed).weight[:T]
    _close(run.acts[f"{a.layer_path(0, 'ln1')}.in"], resid_pre)
    # logits = final_norm_output @ E_out^T (no lm_head bias; Gemma2 soft-caps the logits)
    assert getattr(a.module(a.spec.lm_head), "bias", None) is None
    logits = run.acts[f"{a.spec.final_norm}.out"] @ a.unembedding_matrix().T    # [B, T, vocab]
    if (cap := getattr(a.config, "final_logit_softcapping", None)) is not None:
        logits = torch.tanh(logits / cap) * cap
    _close(logits, run.logits)


# ---- unknown and user-registered architectures --------------------------------------------------------------

@pytest.fixture
def scratch_archs(monkeypatch):
    """A private copy of the registry, so registrations made by a test do not leak."""
    monkeypatch.setattr(adapters, "ARCHS", ARCHS.copy())
    return adapters.ARCHS


def test_unknown_architecture_lists_supported_and_shows_register_arch():
    model = tiny_model("llama")
    model.config.model_type = "nope"
    with pytest.raises(UnsupportedArchitectureError) as err:
        ModelAdapter(model)
    message = str(err.value)
    assert "'nope'" in message and "register_arch" in message and "ArchSpec" in message
    assert all(model_type in message for model_type in ARCHS)


def test_wrong_user_mapping_fails_at_construction_naming_the_path(scratch_archs):
    register_arch(dataclasses.replace(scratch_archs["llama"], family="broken", model_types=("broken",),
                                      o="self_attn.out_proj"))
    model = tiny_model("llama")
    model.config.model_type = "broken"
    with pytest.raises(UnsupportedArchitectureError, match=r"model\.layers\.0\.self_attn\.out_proj") as err:
        ModelAdapter(model)
    assert "broken" in str(err.value)  # the message names the mapping at fault


def test_registering_a_new_family_needs_no_core_change(scratch_archs):
    register_arch(dataclasses.replace(scratch_archs["llama"], family="my_llama", model_types=("my_llama",)))
    model, reference = tiny_model("llama"), _run("llama")
    model.config.model_type = "my_llama"
    adapter = ModelAdapter(model)
    assert adapter.describe()["family"] == "my_llama"
    x = reference.acts[f"{adapter.layer_path(0, 'ln2')}.out"]  # same seed, same weights as the llama run
    _close(recompute_mlp(adapter, 0, x), reference.acts[f"{adapter.layer_path(0, 'mlp')}.out"])
    assert "my_llama" in adapters.supported_architectures()
