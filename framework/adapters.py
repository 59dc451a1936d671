"""Model-family adapters: one declarative mapping per architecture from common names to modules and weights.

What it is for
    Plugins speak of ``embed``, ``layers.{i}.attn``, ``W_Q``, ``W_down`` ...; each transformers architecture
    spells these differently (``model.layers.0.self_attn.q_proj``, ``transformer.h.0.attn.c_attn``,
    ``gpt_neox.layers.0.attention.query_key_value``). An :class:`ArchSpec` is the one place where a family's
    spelling lives; :class:`ModelAdapter` turns it into weights in one convention for every family.

Weight convention (TransformerLens style, ``x @ W``)::

    W_Q(l)    # [n_heads,    d_model, d_head]
    W_K(l)    # [n_kv_heads, d_model, d_head]   query head h reads key head h // (n_heads // n_kv_heads)
    W_V(l)    # [n_kv_heads, d_model, d_head]
    W_O(l)    # [n_heads,    d_head,  d_model]
    W_gate(l) # [d_model, d_ff] or None          (gated MLPs only)
    W_in(l)   # [d_model, d_ff]                  (``up`` / ``fc_in`` / ``c_fc``)
    W_down(l) # [d_ff, d_model]                  row i = what neuron i writes into the residual stream
    ln1_gain(l), final_norm_gain()  # [d_model]  effective gain (Gemma's ``1 + w`` applied)
    q_norm_gain(l), k_norm_gain(l)  # [d_head] or None: per-head RMSNorm of q and k (Gemma-3), shared by heads
    q_norm_eps(l), k_norm_eps(l)    # its epsilon
    embedding_matrix()              # [vocab, d_model]  E_in
    unembedding_matrix()            # [vocab, d_model]  E_out (rows of lm_head)

Adding a family is a new :class:`ArchSpec` entry passed to :func:`register_arch` (or added to ``ARCHS``); no
change in the core. An unknown ``model_type`` fails at load time with :class:`UnsupportedArchitectureError`,
which lists the supported ones and shows such an entry.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from tuneshift.errors import TuneshiftError
from tuneshift.registry import Registry

Fused = Literal["none", "qkv_concat", "qkv_per_head", "conv1d_qkv"]


@dataclass(frozen=True)
class ArchSpec:
    """How one architecture names its parts. Paths are relative to the ``*ForCausalLM`` module.

    ``{i}``-free per-layer paths (``attn``, ``q`` ...) are relative to the layer module ``{layers}.{i}``.
    """

    family: str
    model_types: tuple[str, ...]
    embed: str
    layers: str
    final_norm: str
    lm_head: str
    attn: str
    mlp: str
    ln1: str
    ln2: str | None
    o: str
    down: str
    up: str
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None  # fused projection
    fused_qkv: Fused = "none"
    gate: str | None = None
    gate_up: str | None = None  # fused [gate; up] (Phi-3)
    conv1d: bool = False  # GPT-2's Conv1D stores weights as [in, out]
    norm_offset: float = 0.0  # Gemma RMSNorms scale by (1 + w)
    positions: Literal["rotary", "absolute"] = "rotary"
    position_embed: str | None = None  # absolute position table (GPT-2 ``transformer.wpe``)
    attn_output_index: int | None = 0  # attention modules return (out, weights); None: a bare tensor
    q_norm: str | None = None  # per-head RMSNorm of the queries (Gemma-3: ``self_attn.q_norm``), in the layer
    k_norm: str | None = None  # per-head RMSNorm of the keys


_LLAMA_LIKE = dict(
    embed="model.embed_tokens", layers="model.layers", final_norm="model.norm", lm_head="lm_head",
    attn="self_attn", mlp="mlp", ln1="input_layernorm", ln2="post_attention_layernorm",
    q="self_attn.q_proj", k="self_attn.k_proj", v="self_attn.v_proj", o="self_attn.o_proj",
    gate="mlp.gate_proj", up="mlp.up_proj", down="mlp.down_proj",
)

ARCHS: Registry[ArchSpec] = Registry("architecture", group="tuneshift.architectures")


def register_arch(spec: ArchSpec) -> ArchSpec:
    """Register ``spec`` for each of its ``model_types`` (a user's family needs only this call)."""
    for model_type in spec.model_types:
        ARCHS.register(model_type, spec)
    return spec


for _spec in (
    ArchSpec(family="llama", model_types=("llama",), **_LLAMA_LIKE),
    ArchSpec(family="mistral", model_types=("mistral",), **_LLAMA_LIKE),
    ArchSpec(family="qwen2", model_types=("qwen2",), **_LLAMA_LIKE),
    ArchSpec(family="gemma", model_types=("gemma",), norm_offset=1.0, **_LLAMA_LIKE),
    # Gemma2/3: ``post_attention_layernorm`` normalises the attention *output*; the MLP's input norm is
    # ``pre_feedforward_layernorm``.
    ArchSpec(family="gemma2", model_types=("gemma2",), norm_offset=1.0,
             **{**_LLAMA_LIKE, "ln2": "pre_feedforward_layernorm"}),
    # Gemma-3 also normalises each head's q and k: q = RMSNorm_{d_head}(x W_Q) * (1 + w_q), before RoPE.
    ArchSpec(family="gemma3", model_types=("gemma3_text", "gemma3"), norm_offset=1.0,
             **{**_LLAMA_LIKE, "ln2": "pre_feedforward_layernorm", "q_norm": "self_attn.q_norm",
                "k_norm": "self_attn.k_norm"}),
    ArchSpec(family="phi3", model_types=("phi3",),
             **{**_LLAMA_LIKE, "q": None, "k": None, "v": None, "gate": None, "up": "mlp.gate_up_proj",
                "qkv": "self_attn.qkv_proj", "fused_qkv": "qkv_concat", "gate_up": "mlp.gate_up_proj"}),
    ArchSpec(family="gpt2", model_types=("gpt2",), embed="transformer.wte", layers="transformer.h",
             final_norm="transformer.ln_f", lm_head="lm_head", attn="attn", mlp="mlp", ln1="ln_1", ln2="ln_2",
             qkv="attn.c_attn", fused_qkv="conv1d_qkv", o="attn.c_proj", up="mlp.c_fc", down="mlp.c_proj",
             conv1d=True, positions="absolute", position_embed="transformer.wpe"),
    ArchSpec(family="gpt_neox", model_types=("gpt_neox",), embed="gpt_neox.embed_in", layers="gpt_neox.layers",
             final_norm="gpt_neox.final_layer_norm", lm_head="lm_head", attn="attention", mlp="mlp",
             ln1="input_layernorm", ln2="post_attention_layernorm", qkv="attention.query_key_value",
             fused_qkv="qkv_per_head", o="attention.dense", up="mlp.dense_h_to_4h", down="mlp.dense_4h_to_h"),
):
    register_arch(_spec)


class UnsupportedArchitectureError(TuneshiftError, ValueError):
    """Raised when no :class:`ArchSpec` is registered for a model's ``config.model_type``."""


def spec_for(model_type: str) -> ArchSpec:
    """The registered spec of ``model_type``, or an error that lists the supported ones and shows the fix."""
    if model_type in ARCHS:
        return ARCHS.get(model_type)
    raise UnsupportedArchitectureError(
        f"tuneshift has no adapter for model_type {model_type!r}. Supported: {', '.join(ARCHS.available())}.\n"
        "To add one, register a mapping from common names to the model's module paths, e.g.:\n"
        "    from tuneshift.adapters import ArchSpec, register_arch\n"
        f"    register_arch(ArchSpec(family={model_type!r}, model_types=({model_type!r},),\n"
        "        embed='model.embed_tokens', layers='model.layers', final_norm='model.norm', lm_head='lm_head',\n"
        "        attn='self_attn', mlp='mlp', ln1='input_layernorm', ln2='post_attention_layernorm',\n"
        "        q='self_attn.q_proj', k='self_attn.k_proj', v='self_attn.v_proj', o='self_attn.o_proj',\n"
        "        gate='mlp.gate_proj', up='mlp.up_proj', down='mlp.down_proj'))\n"
        "(see docs/adapters.md)."
    )


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    """``root.get_submodule`` with an error that names the family's mapping when a path is wrong."""
    try:
        return root.get_submodule(path)
    except AttributeError as err:
        raise UnsupportedArchitectureError(
            f"module path {path!r} not found in {type(root).__name__}; the adapter mapping is wrong for this model"
        ) from err


class ModelAdapter:
    """Weights and module paths of one loaded causal LM under common names (see module docstring).

    Weights are returned as views or fresh tensors on the model's device and dtype, without grad.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config
        self.spec = spec_for(self.config.model_type)
        cfg = self.config
        self.n_layers: int = len(self.module(self.spec.layers))
        self.d_model: int = cfg.hidden_size if hasattr(cfg, "hidden_size") else cfg.n_embd
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_head: int = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        down = self.module(self.layer_path(0, "down")).weight.shape  # shapes only: a meta (remote) model has them
        self.d_ff: int = down[0] if self.spec.conv1d else down[1]
        self.vocab_size: int = self.module(self.spec.embed).weight.shape[0]
        self.positions = self.spec.positions
        self._validate()

    # ---- module paths -------------------------------------------------------------------------------------
    def layer_path(self, i: int, part: str | None = None) -> str:
        """Full module path of layer ``i`` or of ``part`` (an ArchSpec field name such as ``"attn"``) in it."""
        base = f"{self.spec.layers}.{i}"
        return base if part is None else f"{base}.{getattr(self.spec, part)}"

    def module(self, path: str) -> nn.Module:
        try:
            return get_submodule(self.model, path)
        except UnsupportedArchitectureError as err:  # name the mapping at fault (a user's register_arch entry)
            raise UnsupportedArchitectureError(f"{err} (ArchSpec family {self.spec.family!r}, model_type "
                                               f"{self.config.model_type!r})") from err

    def _validate(self) -> None:
        """Resolve every mapped module now, so a wrong mapping fails at load time with the family's name."""
        for field in ("embed", "final_norm", "lm_head"):
            self.module(getattr(self.spec, field))
        for part in ("attn", "mlp", "ln1", "ln2", "q", "k", "v", "qkv", "o", "gate", "gate_up", "up", "down",
                     "q_norm", "k_norm"):
            if getattr(self.spec, part) is not None:
                self.module(self.layer_path(0, part))

    # ---- raw weights ----------------------------------------------------------------------------------------
    def tensor(self, path: str, name: str = "weight") -> torch.Tensor | None:
        """Parameter ``name`` of module ``path``, detached; read from accelerate's offload map when the model
        was dispatched with parts on "cpu"/"disk" offload (those parameters sit on the meta device)."""
        value = getattr(self.module(path), name, None)
        if value is None or value.device.type != "meta":
            return None if value is None else value.detach()
        parts = path.split(".")
        for cut in range(len(parts), -1, -1):  # the nearest module whose accelerate hook holds the weights
            owner = get_submodule(self.model, ".".join(parts[:cut])) if cut else self.model
            weights = getattr(getattr(owner, "_hf_hook", None), "weights_map", None)
            if weights is None:
                continue
            try:
                return weights[".".join(parts[cut:] + [name])].detach()
            except KeyError:
                continue
        raise UnsupportedArchitectureError(f"{path}.{name} is on the meta device and no accelerate offload map "
                                           "holds it; load the model with real weights (device_map with devices)")

    def _linear_in_out(self, path: str) -> torch.Tensor:
        """Weight of a projection as ``[in, out]`` (nn.Linear stores ``[out, in]``; GPT-2's Conv1D ``[in, out]``)."""
        weight = self.tensor(path)
        return weight if self.spec.conv1d else weight.T

    def _linear_bias(self, path: str) -> torch.Tensor | None:
        return self.tensor(path, "bias")

    def _qkv_in_out(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Q, K, V weights of layer ``i`` as ``[d_model, heads * d_head]`` each, fused projections split."""
        s = self.spec
        if s.fused_qkv == "none":
            return tuple(self._linear_in_out(self.layer_path(i, p)) for p in ("q", "k", "v"))  # type: ignore[return-value]
        w = self._linear_in_out(self.layer_path(i, "qkv"))  # [d_model, out]
        q_out, kv_out = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        if s.fused_qkv in ("qkv_concat", "conv1d_qkv"):  # out = [q | k | v]
            return w[:, :q_out], w[:, q_out:q_out + kv_out], w[:, q_out + kv_out:]
        # GPT-NeoX: out is laid out per head as [head, (q|k|v), d_head]
        w = w.reshape(self.d_model, self.n_heads, 3, self.d_head)
        return tuple(w[:, :, j].reshape(self.d_model, -1) for j in range(3))  # type: ignore[return-value]

    def _qkv_bias(self, i: int) -> tuple[torch.Tensor | None, ...]:
        s = self.spec
        if s.fused_qkv == "none":
            return tuple(self._linear_bias(self.layer_path(i, p)) for p in ("q", "k", "v"))
        b = self._linear_bias(self.layer_path(i, "qkv"))
        if b is None:
            return (None, None, None)
        q_out, kv_out = self.n_heads * self.d_head, self.n_kv_heads * self.d_head
        if s.fused_qkv in ("qkv_concat", "conv1d_qkv"):
            return b[:q_out], b[q_out:q_out + kv_out], b[q_out + kv_out:]
        b = b.reshape(self.n_heads, 3, self.d_head)
        return tuple(b[:, j].reshape(-1) for j in range(3))

    # ---- attention ------------------------------------------------------------------------------------------
    def W_Q(self, i: int) -> torch.Tensor:
        """``[n_heads, d_model, d_head]``"""
        return self._qkv_in_out(i)[0].reshape(self.d_model, self.n_heads, self.d_head).permute(1, 0, 2)

    def W_K(self, i: int) -> torch.Tensor:
        """``[n_kv_heads, d_model, d_head]``"""
        return self._qkv_in_out(i)[1].reshape(self.d_model, self.n_kv_heads, self.d_head).permute(1, 0, 2)

    def W_V(self, i: int) -> torch.Tensor:
        """``[n_kv_heads, d_model, d_head]``"""
        return self._qkv_in_out(i)[2].reshape(self.d_model, self.n_kv_heads, self.d_head).permute(1, 0, 2)

    def b_QKV(self, i: int) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Biases ``[n_heads*d_head]``, ``[n_kv_heads*d_head]`` x2, or None (Llama has none, Qwen2 has q/k/v)."""
        return self._qkv_bias(i)  # type: ignore[return-value]

    def W_O(self, i: int) -> torch.Tensor:
        """``[n_heads, d_head, d_model]``"""
        return self._linear_in_out(self.layer_path(i, "o")).reshape(self.n_heads, self.d_head, self.d_model)

    def b_O(self, i: int) -> torch.Tensor | None:
        return self._linear_bias(self.layer_path(i, "o"))

    def kv_head_of(self, head: torch.Tensor | int) -> torch.Tensor | int:
        """Key/value head serving query head ``head`` under grouped-query attention."""
        return head // (self.n_heads // self.n_kv_heads)

    # ---- MLP ------------------------------------------------------------------------------------------------
    def W_gate(self, i: int) -> torch.Tensor | None:
        """``[d_model, d_ff]`` or None for non-gated MLPs."""
        if self.spec.gate_up is not None:
            return self._linear_in_out(self.layer_path(i, "gate_up")).chunk(2, dim=1)[0]
        return None if self.spec.gate is None else self._linear_in_out(self.layer_path(i, "gate"))

    def W_in(self, i: int) -> torch.Tensor:
        """``[d_model, d_ff]`` (up / fc_in)."""
        if self.spec.gate_up is not None:
            return self._linear_in_out(self.layer_path(i, "gate_up")).chunk(2, dim=1)[1]
        return self._linear_in_out(self.layer_path(i, "up"))

    def b_in(self, i: int) -> torch.Tensor | None:
        return None if self.spec.gate_up is not None else self._linear_bias(self.layer_path(i, "up"))

    def W_down(self, i: int) -> torch.Tensor:
        """``[d_ff, d_model]``: row i is the value vector neuron i writes into the residual stream."""
        return self._linear_in_out(self.layer_path(i, "down"))

    def b_down(self, i: int) -> torch.Tensor | None:
        return self._linear_bias(self.layer_path(i, "down"))

    # ---- norms and embeddings -------------------------------------------------------------------------------
    def _gain(self, path: str) -> torch.Tensor:
        return self.tensor(path) + self.spec.norm_offset

    def ln1_gain(self, i: int) -> torch.Tensor:
        """``[d_model]`` effective gain of the norm in front of layer ``i``'s attention."""
        return self._gain(self.layer_path(i, "ln1"))

    def ln2_gain(self, i: int) -> torch.Tensor:
        """``[d_model]`` effective gain of the norm in front of layer ``i``'s MLP."""
        return self._gain(self.layer_path(i, "ln2"))

    def final_norm_gain(self) -> torch.Tensor:
        return self._gain(self.spec.final_norm)

    def q_norm_gain(self, i: int) -> torch.Tensor | None:
        """``[d_head]`` effective gain of the per-head query norm of layer ``i`` (Gemma's ``1 + w``), or None.

        The model's query of head h is ``RMSNorm(x W_Q[h]) * q_norm_gain`` (then RoPE): dim j of every head
        is scaled by ``q_norm_gain[j]`` after each head's q is scaled to unit RMS."""
        return None if self.spec.q_norm is None else self._gain(self.layer_path(i, "q_norm"))

    def k_norm_gain(self, i: int) -> torch.Tensor | None:
        """``[d_head]`` effective gain of the per-head key norm of layer ``i``, or None (see :meth:`q_norm_gain`)."""
        return None if self.spec.k_norm is None else self._gain(self.layer_path(i, "k_norm"))

    def q_norm_eps(self, i: int) -> float | None:
        """Epsilon of the per-head query norm (inside its square root), or None without one."""
        return None if self.spec.q_norm is None else float(self._eps(self.layer_path(i, "q_norm")))

    def k_norm_eps(self, i: int) -> float | None:
        return None if self.spec.k_norm is None else float(self._eps(self.layer_path(i, "k_norm")))

    def _eps(self, path: str) -> float:
        module = self.module(path)
        for name in ("eps", "variance_epsilon"):
            if hasattr(module, name):
                return getattr(module, name)
        raise UnsupportedArchitectureError(f"norm {path!r} has no eps attribute")

    def embedding_matrix(self) -> torch.Tensor:
        """``[vocab, d_model]`` input embeddings E_in (unscaled: Gemma multiplies by sqrt(d_model) at run time)."""
        return self.tensor(self.spec.embed)

    def unembedding_matrix(self) -> torch.Tensor:
        """``[vocab, d_model]`` output embeddings E_out (lm_head rows; the same tensor when tied)."""
        return self.tensor(self.spec.lm_head)

    @property
    def tied_embeddings(self) -> bool:
        try:
            return self.embedding_matrix().data_ptr() == self.unembedding_matrix().data_ptr()
        except UnsupportedArchitectureError:  # a remote model's weights are meta: its config says
            return bool(getattr(self.config, "tie_word_embeddings", False))

    def describe(self) -> dict:
        """A JSON-able summary for logs and results."""
        return {
            "family": self.spec.family, "model_type": self.config.model_type, "n_layers": self.n_layers,
            "d_model": self.d_model, "n_heads": self.n_heads, "n_kv_heads": self.n_kv_heads, "d_head": self.d_head,
            "d_ff": self.d_ff, "vocab_size": self.vocab_size, "positions": self.positions,
            "tied_embeddings": self.tied_embeddings,
            "n_params": sum(p.numel() for p in self.model.parameters()),
        }


def supported_architectures() -> list[str]:
    return ARCHS.available()


__all__ = [
    "ArchSpec", "ARCHS", "ModelAdapter", "UnsupportedArchitectureError", "register_arch", "spec_for",
    "supported_architectures",
]
