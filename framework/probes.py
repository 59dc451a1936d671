"""Probes: named sites to capture, merged over every plugin into one nnsight trace per batch.

What it is for
    A plugin says *what* it wants (``Probe("layers.3.mlp.output", reduce="mean")``); the registry decides
    *how*: one ``model.trace`` per batch, sites read in forward order (nnsight raises ``OutOfOrderError``
    otherwise), under ``torch.no_grad()`` unless a probe asks for a gradient, captures detached and moved
    to the CPU (or kept on the device) and handed back per plugin. Writes (ablations, projections, steering,
    patches: :mod:`tuneshift.interventions`) join the same trace, applied in forward order before the reads.

Sites (``B`` batch, ``T`` positions, ``d`` d_model, ``H`` query heads, ``d_h`` d_head, ``V`` vocabulary)::

    embed.output                # [B, T, d]       token embeddings (as the first layer reads them)
    layers.{i}.resid_pre        # [B, T, d]       residual stream entering layer i
    layers.{i}.ln1.output       # [B, T, d]       input norm of layer i's attention
    layers.{i}.attn.z           # [B, T, H, d_h]  each head's output before the output projection (o_proj)
    layers.{i}.attn.output      # [B, T, d]       attention block output (after o_proj)
    layers.{i}.attn.pattern     # [B, H, T, T]    attention probabilities (the model runs eager attention)
    layers.{i}.mlp.output       # [B, T, d]       MLP block output
    layers.{i}.resid_post       # [B, T, d]       residual stream after layer i
    final_norm.output           # [B, T, d]
    logits                      # [B, T, V]

TransformerLens names are aliases of these (:data:`TL_ALIASES`): ``hook_embed``, ``blocks.{i}.hook_resid_pre``,
``blocks.{i}.ln1.hook_normalized``, ``blocks.{i}.attn.hook_z``, ``blocks.{i}.hook_attn_out``,
``blocks.{i}.attn.hook_pattern``, ``blocks.{i}.hook_mlp_out``, ``blocks.{i}.hook_resid_post``,
``ln_final.hook_normalized``; :func:`site_table` lists every site with its shape and alias.

Reductions (``reduce=``), applied inside the trace so only the small result is kept::

    none   full tensor
    norm   L2 norm over the last dim           [B, T] (or [B, H, T] for patterns)
    mean   mean over real (non-pad) positions  [B, d]
    last   the last position                   [B, d]   (left padding puts every prompt's end there)
    tail   the last K positions                [B, K, ...] K = the batch's ``response_tail`` (the runner
           passes ``max M_b + 1``: every row's response predictions and the token after them), so a plugin
           reading logits or residuals at response positions never holds the prompt positions

Gradient probes (``grad=True``) capture d(objective)/d(site), where the objective is the sum of the
teacher-forced log-probabilities of each row's real next tokens. Gotchas handled here: gradients are read
in reverse forward order inside ``with objective.backward():``; a frozen model needs the embeddings to
require grad; read-only traces run under ``no_grad`` (autograd is on in ``model.trace`` by default).
"""
from __future__ import annotations

import inspect
import re
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, Sequence

import nnsight
import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.errors import TuneshiftError

Reduce = Literal["none", "norm", "mean", "last", "tail"]
_LAYER_SITES = {  # per-layer site -> (forward rank, shape)
    "resid_pre": (0, "[B, T, d]"), "ln1.output": (1, "[B, T, d]"), "attn.z": (2, "[B, T, H, d_h]"),
    "attn.output": (3, "[B, T, d]"), "attn.pattern": (3, "[B, H, T, T]"), "mlp.output": (4, "[B, T, d]"),
    "resid_post": (5, "[B, T, d]"),
}
_SITE = re.compile(r"^(embed\.output|final_norm\.output|logits|layers\.(\d+)\.("
                   + "|".join(re.escape(k) for k in _LAYER_SITES) + "))$")
TL_ALIASES = {  # TransformerLens hook name -> canonical site ({i}: the layer)
    "hook_embed": "embed.output", "blocks.{i}.hook_resid_pre": "layers.{i}.resid_pre",
    "blocks.{i}.ln1.hook_normalized": "layers.{i}.ln1.output", "blocks.{i}.attn.hook_z": "layers.{i}.attn.z",
    "blocks.{i}.hook_attn_out": "layers.{i}.attn.output", "blocks.{i}.attn.hook_pattern": "layers.{i}.attn.pattern",
    "blocks.{i}.hook_mlp_out": "layers.{i}.mlp.output", "blocks.{i}.hook_resid_post": "layers.{i}.resid_post",
    "ln_final.hook_normalized": "final_norm.output",
}
_TL = re.compile(r"^blocks\.(\d+)\.(.+)$")


def canonical_site(name: str) -> str:
    """The canonical site of ``name`` (itself, or the site a TransformerLens hook name stands for)."""
    if name in TL_ALIASES:
        return TL_ALIASES[name]
    match = _TL.match(name)
    if match and f"blocks.{{i}}.{match.group(2)}" in TL_ALIASES:
        return TL_ALIASES[f"blocks.{{i}}.{match.group(2)}"].replace("{i}", match.group(1))
    return name


def site_table() -> list[tuple[str, str, str]]:
    """``(site, shape, TransformerLens alias)`` of every site, in forward order (``{i}`` for the layer)."""
    alias = {v: k for k, v in TL_ALIASES.items()}
    rows = [("embed.output", "[B, T, d]", alias["embed.output"])]
    rows += [(f"layers.{{i}}.{s}", shape, alias.get(f"layers.{{i}}.{s}", "")) for s, (_, shape) in _LAYER_SITES.items()]
    return rows + [("final_norm.output", "[B, T, d]", alias["final_norm.output"]), ("logits", "[B, T, V]", "")]


class ProbeError(TuneshiftError, ValueError):
    """A probe names a site that does not exist; the message lists the valid ones."""


@dataclass(frozen=True)
class Probe:
    """One capture request. ``device="keep"`` leaves the tensor on the model's device."""

    site: str
    reduce: Reduce = "none"
    grad: bool = False
    device: Literal["cpu", "keep"] = "cpu"
    alias: str = ""  # the TransformerLens name the probe was asked by (set from ``site``)

    def __post_init__(self) -> None:
        canonical = canonical_site(self.site)
        if canonical != self.site:
            object.__setattr__(self, "alias", self.site)
            object.__setattr__(self, "site", canonical)

    @property
    def key(self) -> str:
        """Name under which the capture is handed back: the site as asked, plus the reduction and ``grad``."""
        name = self.alias or self.site
        return name + ("" if self.reduce == "none" else f":{self.reduce}") + (":grad" if self.grad else "")


def site_order(site: str, n_layers: int) -> tuple[int, int]:
    """Forward-execution rank of ``site``; raises :class:`ProbeError` for an unknown or out-of-range site."""
    match = _SITE.match(site)
    if match is None:
        raise ProbeError(f"unknown probe site {site!r}; valid sites: "
                         + ", ".join(f"{s} ({a})" if a else s for s, _, a in site_table()))
    if site == "embed.output":
        return (-1, 0)
    if site == "final_norm.output":
        return (n_layers, 0)
    if site == "logits":
        return (n_layers + 1, 0)
    layer = int(match.group(2))
    if layer >= n_layers:
        raise ProbeError(f"probe site {site!r}: the model has {n_layers} layers (0..{n_layers - 1})")
    return (layer, _LAYER_SITES[match.group(3)][0])


def all_sites(n_layers: int) -> list[str]:
    """Every site of a model with ``n_layers`` layers, in forward order."""
    per_layer = list(_LAYER_SITES)
    return (["embed.output"] + [f"layers.{i}.{s}" for i in range(n_layers) for s in per_layer]
            + ["final_norm.output", "logits"])


def _envoy(root, path: str):
    """Walk an nnsight envoy along a dotted module path (digits index module lists)."""
    for part in path.split("."):
        root = root[int(part)] if part.isdigit() else getattr(root, part)
    return root


def _site_value(lm, adapter: ModelAdapter, site: str):
    """The traced value of ``site`` inside an active trace of ``lm``."""
    spec = adapter.spec
    if site == "embed.output":
        return _envoy(lm, spec.embed).output
    if site == "final_norm.output":
        return _envoy(lm, spec.final_norm).output
    if site == "logits":
        return lm.output.logits
    _, layer, rest = site.split(".", 2)
    i = int(layer)
    if rest == "resid_pre":
        return _envoy(lm, adapter.layer_path(i)).input
    if rest == "attn.z":  # the output projection's input, split into heads
        z = _envoy(lm, adapter.layer_path(i, "o")).input
        return z.view(*z.shape[:-1], adapter.n_heads, adapter.d_head)
    if rest == "ln1.output":
        return _envoy(lm, adapter.layer_path(i, "ln1")).output
    if rest in ("attn.output", "attn.pattern"):
        out = _envoy(lm, adapter.layer_path(i, "attn")).output
        if rest == "attn.pattern":
            return out[1]
        return out if spec.attn_output_index is None else out[spec.attn_output_index]
    if rest == "mlp.output":
        return _envoy(lm, adapter.layer_path(i, "mlp")).output
    out = _envoy(lm, adapter.layer_path(i)).output  # resid_post
    return out[0] if isinstance(out, tuple) else out


def _reduce(value, how: Reduce, mask: torch.Tensor, tail: int | None = None, pattern: bool = False):
    if how == "none":
        return value
    if how == "norm":
        return value.norm(dim=-1)
    if how == "last":
        return value[:, -1]
    if how == "tail":
        return value[:, :, -tail:] if pattern else value[:, -tail:]
    weights = mask.to(value.dtype).view(*mask.shape, *[1] * (value.dim() - 2))  # mean over real positions
    return (value * weights).sum(1) / weights.sum(1)


class Captures(dict):
    """Captured tensors of one batch for one plugin, keyed by :attr:`Probe.key`."""


class ProbeRegistry:
    """Merges the probes of several plugins and runs them as one trace per batch."""

    def __init__(self, adapter: ModelAdapter, requests: dict[str, list[Probe]]):
        self.adapter = adapter
        self.requests = {owner: list(probes) for owner, probes in requests.items() if probes}
        unique = {p for probes in self.requests.values() for p in probes}
        for p in unique:
            site_order(p.site, adapter.n_layers)  # validate now, not mid-trace
        order = lambda p: site_order(p.site, adapter.n_layers)  # noqa: E731
        self.forward = sorted((p for p in unique if not p.grad), key=order)
        self.backward = sorted((p for p in unique if p.grad), key=order, reverse=True)

    @property
    def empty(self) -> bool:
        return not self.requests

    @property
    def needs_grad(self) -> bool:
        return bool(self.backward)

    def logits_kept(self, tail: int | None) -> int | None:
        """How many last positions the model must unembed for this registry's reads (None: every position).

        The output layer is a ``[d, V]`` matmul per position, as costly as several layers for a large vocabulary.
        When no read needs the logits of the prompt positions (no gradient objective, logits read only as
        ``last`` or ``tail``, or not at all), the model is asked for ``logits_to_keep`` = that many: the same
        values at the kept positions, without unembedding the rest.
        """
        if self.backward or "logits_to_keep" not in inspect.signature(self.adapter.model.forward).parameters:
            return None
        reads = {p.reduce for p in self.forward if p.site == "logits"}
        if reads <= {"last"}:
            return 1
        return tail if reads <= {"last", "tail"} else None

    @property
    def needs_attention_pattern(self) -> bool:
        return any(p.site.endswith("attn.pattern") for p in self.forward + self.backward)

    def run(self, lm, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
            interventions: Sequence = (), step: int = 0, tail: int | None = None, remote: bool | str = False,
            **forward_kwargs) -> dict[str, Captures]:
        """One trace over a (left-padded) batch; returns ``{owner: Captures}`` with detached tensors.

        ``tail`` is the number of last positions a ``reduce="tail"`` probe keeps (query positions of patterns).
        ``interventions`` (:mod:`tuneshift.interventions`) write in forward order in the same trace, before the
        reads at their site, so every read and gradient sees them; ``step`` is the generation step they are
        applied at (0: the batch's own tokens) and ``forward_kwargs`` go to the model (a KV cache, for example).
        ``remote`` is nnsight's (:mod:`tuneshift.remote`): ``"local"`` for the serialised dry run, ``True`` to run
        the trace on the NDIF host (the model may then hold meta weights; inputs stay on the CPU).
        """
        from tuneshift.interventions import apply_at, by_site as group_writes
        from tuneshift.remote import input_device, ship_by_value

        if self.empty and not interventions:
            return {}
        if tail is None and any(p.reduce == "tail" for p in self.forward + self.backward):
            raise ProbeError("a probe asks for reduce='tail' but the batch has no responses (tail=None); tail "
                             "probes need a plugin with needs_responses = True")
        writes = group_writes(interventions, self.adapter.n_layers, step)
        device = input_device(self.adapter.model)
        if remote:
            ship_by_value()
        inputs = {"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)}
        mask = inputs["attention_mask"]
        grad_ctx = nullcontext() if self.needs_grad else torch.no_grad()
        grad_sites = {p.site for p in self.backward}
        sites = {p.site for p in self.forward} | grad_sites | ({"embed.output"} if grad_sites else set()) | set(writes)
        if grad_sites:
            sites.add("logits")
        by_site: dict[str, list[Probe]] = {}
        for probe in self.forward:
            by_site.setdefault(probe.site, []).append(probe)
        forward_kwargs.update(position_ids=position_ids.to(device), remote=remote)
        if (keep := self.logits_kept(tail)) is not None:
            forward_kwargs.setdefault("logits_to_keep", keep)  # the prompt positions' logits are never read
        with grad_ctx, lm.trace(inputs, **forward_kwargs):  # nnsight reads the block from this line
            raw = nnsight.save({})
            values = {}
            for site in sorted(sites, key=lambda s: site_order(s, self.adapter.n_layers)):  # forward order
                value = _site_value(lm, self.adapter, site)
                if site == "embed.output" and grad_sites:
                    value.requires_grad_(True)  # frozen weights: give autograd a leaf to flow to
                if site in writes:
                    value = apply_at(lm, self.adapter, site, value, writes[site], step)
                for probe in by_site.get(site, []):
                    raw[probe.key] = _reduce(value, probe.reduce, mask, tail, site.endswith("pattern")).save()
                if site in grad_sites or site == "logits":
                    values[site] = value
            if grad_sites:
                targets = inputs["input_ids"][:, 1:, None]
                logprobs = values["logits"][:, :-1].log_softmax(-1).gather(-1, targets).squeeze(-1)
                objective = (logprobs * mask[:, 1:]).sum()
                with objective.backward():
                    for probe in self.backward:  # reverse forward order
                        raw[probe.key] = _reduce(values[probe.site].grad, probe.reduce, mask, tail,
                                                 probe.site.endswith("pattern")).save()
        return {owner: Captures({p.key: _detach(raw[p.key], p.device) for p in probes})
                for owner, probes in self.requests.items()}


def _detach(value: torch.Tensor, device: str) -> torch.Tensor:
    value = value.detach()
    return value.cpu() if device == "cpu" else value
