"""Interventions: probes that write. Ablate heads, project directions out, steer, patch, corrupt positions.

What it is for
    A causal test changes what a model computes at a site and measures what follows. An :class:`Intervention`
    names a probe site (:mod:`tuneshift.probes`) and a function of the value there; the probe registry applies
    every intervention of a batch in forward order inside the same one trace as the reads
    (``ProbeRegistry.run(..., interventions=[...])``), so reads downstream of a write see the changed value,
    gradients flow through the writes, and :mod:`tuneshift.evaluation` generates and scores with them on.

Operations (``R`` rows of the batch, ``T`` positions, ``d`` d_model, ``H`` heads, ``d_h`` d_head)::

    AblateHeads(layer, heads [H] | [R, H] bool, mode="zero"|"mean", mean [H, d_h])
        site layers.{i}.attn.z: z[r, :, h] <- 0 or mean[h] where heads[r, h] (the head's output before o_proj)
    ProjectOut(site, basis [d, k] | [R, d, k])   x <- x - V V^T x   (V: orthonormal columns; zero columns allowed)
    Steer(site, vector [d] | [R, d], scale=1.0, positions=None | [R, T] bool)      x <- x + scale * v
    Patch(site, source [R, T, ...], positions=None | [R, T] bool)                x <- source where positions
    CorruptPositions(site, positions [R, T] bool, fill [d] | None, noise_std=0.0, seed=0)
        x <- fill (+ noise) at the positions; fill None keeps x and adds the noise (ROME-style corruption)

Per-row parameters (a leading ``R``) give every row of a batch its own intervention, so one forward evaluates
many random draws (rows = items x draws); a leading 1 or none broadcasts. Rows that should be left alone get
neutral parameters (no head, a zero basis column, a zero vector, no position), which is how draws of different
sizes share one batch (:func:`stack`).

Generation. Position-wise operations (:class:`Patch`, :class:`CorruptPositions`, :class:`Steer` with
``positions``) refer to the tokens the batch was built from, so they act on the first forward of a generation
(``step == 0``: the prompt) and not on generated tokens; the others act at every step. When a generation loop
drops finished rows, :meth:`Intervention.select` keeps the parameters of the remaining ones.

Canonical pattern::

    from tuneshift.interventions import AblateHeads, ProjectOut
    ivs = [AblateHeads(2, heads=torch.tensor([0, 1, 0, 0], dtype=torch.bool)),
           ProjectOut("layers.3.mlp.output", basis=V)]                          # V [d, k]
    out = ProbeRegistry(adapter, {"me": [Probe("logits")]}).run(lm, ids, mask, pos, interventions=ivs)

    # in your own nnsight trace or generate loop:
    with lm.generate(inputs, max_new_tokens=8) as tracer:
        for step in tracer.iter[:8]:
            apply_interventions(lm, adapter, ivs, step)

Gotchas: writes follow nnsight's read rules (forward order; :func:`apply_interventions` sorts them);
``attn.pattern`` and ``logits`` cannot be written; a :class:`Patch` source must have the batch's exact layout
(the same tokens, the same left padding), which :func:`tuneshift.evaluation.capture_sites` provides.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.errors import TuneshiftError
from tuneshift.probes import _envoy, _site_value, canonical_site, site_order

READ_ONLY_SITES = ("attn.pattern", "logits")


class InterventionError(TuneshiftError, ValueError):
    """An intervention's site or parameters are wrong; the message says which and how to fix it."""


def _rows(tensor: torch.Tensor | None, index: torch.Tensor, dim: int) -> torch.Tensor | None:
    """``tensor`` restricted to rows ``index`` when it has per-row parameters (leading size > 1)."""
    if tensor is None or tensor.dim() <= dim or tensor.shape[0] == 1:
        return tensor
    return tensor.index_select(0, index.to(tensor.device))


@dataclass(frozen=True, eq=False)
class Intervention:
    """A write at ``site``: :meth:`apply` maps the site's value to its replacement (same shape and dtype)."""

    site: str
    position_wise = False  # True: acts on the batch's own tokens only (generation step 0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", canonical_site(self.site))
        if self.site == "logits" or self.site.endswith(READ_ONLY_SITES):
            raise InterventionError(f"site {self.site!r} cannot be written (read-only: attention patterns and "
                                    "logits); write the attention output (attn.z / attn.output) or final_norm.output")

    def active(self, step: int) -> bool:
        """Whether the intervention changes anything at generation step ``step`` (position-wise ones: step 0)."""
        return step == 0 or not self.position_wise

    def apply(self, value: torch.Tensor, step: int = 0) -> torch.Tensor:
        """The replacement of ``value`` at generation step ``step`` (0: the whole batch as given)."""
        if self.position_wise and step > 0:
            return value
        return self._apply(value)

    def _apply(self, value: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def select(self, index: torch.Tensor) -> "Intervention":
        """The same intervention for rows ``index`` only (a generation loop dropping finished rows)."""
        return self

    def _check_rows(self, value: torch.Tensor, param: torch.Tensor, name: str, dims: int) -> None:
        if param.dim() > dims and param.shape[0] not in (1, value.shape[0]):
            raise InterventionError(f"{type(self).__name__} at {self.site}: {name} has {param.shape[0]} rows but the "
                                    f"batch has {value.shape[0]}; give one row per batch row, or none to broadcast")


@dataclass(frozen=True, eq=False)
class AblateHeads(Intervention):
    """Zero- or mean-ablate attention heads: their output before ``o_proj`` replaced (site ``layers.{i}.attn.z``).

    ``heads``: ``[H]`` or ``[R, H]`` bool (which heads, per row); ``mean``: ``[H, d_h]`` the heads' mean output
    over a reference set (:func:`tuneshift.evaluation.site_means` gives it), required for ``mode="mean"``.
    """

    site: str = field(default="", init=False)
    layer: int = 0
    heads: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    mode: str = "zero"
    mean: torch.Tensor | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "site", f"layers.{self.layer}.attn.z")
        super().__post_init__()
        if self.mode not in ("zero", "mean"):
            raise InterventionError(f"AblateHeads mode={self.mode!r}: choose 'zero' or 'mean'")
        if self.mode == "mean" and self.mean is None:
            raise InterventionError("AblateHeads mode='mean' needs mean=[H, d_head] (the heads' mean output over a "
                                    "reference set, e.g. tuneshift.evaluation.site_means)")
        object.__setattr__(self, "heads", torch.as_tensor(self.heads).bool())

    def _apply(self, value: torch.Tensor) -> torch.Tensor:  # value [B, T, H, d_h]
        self._check_rows(value, self.heads, "heads", 1)
        if self.heads.shape[-1] != value.shape[-2]:
            raise InterventionError(f"AblateHeads layer {self.layer}: heads has {self.heads.shape[-1]} entries, the "
                                    f"model has {value.shape[-2]} heads")
        mask = self.heads.to(value.device).view(-1, 1, value.shape[-2], 1)  # [R | 1, 1, H, 1]
        fill = torch.zeros((), dtype=value.dtype, device=value.device) if self.mode == "zero" else \
            self.mean.to(value.device, value.dtype)  # [H, d_h]
        return torch.where(mask, fill, value)

    def select(self, index: torch.Tensor) -> "AblateHeads":
        return replace(self, heads=_rows(self.heads, index, 1))


@dataclass(frozen=True, eq=False)
class ProjectOut(Intervention):
    """Remove the components along the orthonormal columns of ``basis`` ``[d, k]`` (or ``[R, d, k]``): x - V V^T x.

    Zero columns are allowed (they remove nothing), so draws of different sizes can share one batch.
    """

    basis: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))

    def __post_init__(self) -> None:
        super().__post_init__()
        basis = torch.as_tensor(self.basis)
        if basis.dim() not in (2, 3):
            raise InterventionError(f"ProjectOut at {self.site}: basis must be [d, k] or [rows, d, k], got "
                                    f"{tuple(basis.shape)}")
        gram = basis.double().transpose(-1, -2) @ basis.double()  # [.., k, k]
        diag = torch.diagonal(gram, dim1=-2, dim2=-1)
        off = (gram - torch.diag_embed(diag)).abs()
        if basis.numel() and (off.max() > 1e-3 or torch.minimum(diag.abs(), (diag - 1).abs()).max() > 1e-3):
            raise InterventionError(f"ProjectOut at {self.site}: the basis columns must be orthonormal (or zero); "
                                    "orthonormalise them first, e.g. torch.linalg.qr(V).Q")
        object.__setattr__(self, "basis", basis)

    def _apply(self, value: torch.Tensor) -> torch.Tensor:  # value [B, T, d]
        basis = self.basis.to(value.device, value.dtype)
        self._check_rows(value, basis, "basis", 2)
        if basis.dim() == 2:
            return value - (value @ basis) @ basis.T
        coeff = torch.einsum("btd,bdk->btk", value, basis.expand(value.shape[0], -1, -1))
        return value - torch.einsum("btk,bdk->btd", coeff, basis.expand(value.shape[0], -1, -1))

    def select(self, index: torch.Tensor) -> "ProjectOut":
        return replace(self, basis=_rows(self.basis, index, 2))


def _position_mask(value: torch.Tensor, positions: torch.Tensor, who: str) -> torch.Tensor:
    """``positions`` ``[R, T]`` as a mask broadcastable to ``value`` ``[B, T, ...]``."""
    positions = positions.to(value.device).bool()
    if positions.shape[-1] != value.shape[1] or positions.shape[0] not in (1, value.shape[0]):
        raise InterventionError(f"{who}: positions {tuple(positions.shape)} do not match the batch "
                                f"{tuple(value.shape[:2])}; build them on the same left-padded layout")
    return positions.view(*positions.shape, *[1] * (value.dim() - 2))


@dataclass(frozen=True, eq=False)
class Steer(Intervention):
    """Add ``scale * vector`` (``[d]`` or ``[R, d]``) at every position, or at ``positions`` ``[R, T]`` only."""

    vector: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    scale: float = 1.0
    positions: torch.Tensor | None = None

    @property
    def position_wise(self) -> bool:  # type: ignore[override]
        return self.positions is not None

    def _apply(self, value: torch.Tensor) -> torch.Tensor:
        vector = self.vector.to(value.device, value.dtype)
        self._check_rows(value, vector, "vector", 1)
        delta = self.scale * vector.view(-1, *[1] * (value.dim() - 2), vector.shape[-1])  # [R | 1, 1, d]
        if self.positions is None:
            return value + delta
        return value + delta * _position_mask(value, self.positions, f"Steer at {self.site}")

    def select(self, index: torch.Tensor) -> "Steer":
        return replace(self, vector=_rows(self.vector, index, 1), positions=_rows(self.positions, index, 1))


@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Replace the site's value by ``source`` (another run's activations on the same tokens and layout).

    ``source``: ``[R, T, ...]`` exactly the site's shape; ``positions`` ``[R, T]`` bool limits the patch (default:
    every position). Acts on the batch's own tokens (generation step 0), not on generated ones.
    """

    source: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    positions: torch.Tensor | None = None
    position_wise = True

    def _apply(self, value: torch.Tensor) -> torch.Tensor:
        if self.source.shape[1:] != value.shape[1:] or self.source.shape[0] not in (1, value.shape[0]):
            raise InterventionError(f"Patch at {self.site}: source {tuple(self.source.shape)} does not match the "
                                    f"site {tuple(value.shape)}; capture it on the same tokens and padding")
        source = self.source.to(value.device, value.dtype)
        if self.positions is None:
            return source.expand_as(value).clone()
        return torch.where(_position_mask(value, self.positions, f"Patch at {self.site}"), source, value)

    def select(self, index: torch.Tensor) -> "Patch":
        return replace(self, source=_rows(self.source, index, 1), positions=_rows(self.positions, index, 1))


@dataclass(frozen=True, eq=False)
class CorruptPositions(Intervention):
    """Corrupt the tokens at ``positions`` ``[R, T]``: replace by ``fill`` ``[d]`` (e.g. the mean embedding), and/or
    add Gaussian noise of std ``noise_std`` (seeded; ROME's corruption when ``fill`` is None)."""

    positions: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0, dtype=torch.bool))
    fill: torch.Tensor | None = None
    noise_std: float = 0.0
    seed: int = 0
    position_wise = True

    def _apply(self, value: torch.Tensor) -> torch.Tensor:
        mask = _position_mask(value, self.positions, f"CorruptPositions at {self.site}")
        new = value if self.fill is None else self.fill.to(value.device, value.dtype).expand_as(value)
        if self.noise_std > 0:
            gen = torch.Generator(device="cpu").manual_seed(self.seed)
            noise = torch.randn(value.shape, generator=gen, dtype=torch.float32).to(value.device, value.dtype)
            new = new + self.noise_std * noise
        return torch.where(mask, new, value)

    def select(self, index: torch.Tensor) -> "CorruptPositions":
        return replace(self, positions=_rows(self.positions, index, 1))


# ---- applying writes inside a trace ---------------------------------------------------------------------------
def write_site(lm, adapter: ModelAdapter, site: str, value: torch.Tensor) -> None:
    """Replace the traced value of ``site`` by ``value`` inside an active nnsight trace of ``lm``."""
    spec = adapter.spec
    if site in ("embed.output", "final_norm.output"):
        _envoy(lm, spec.embed if site == "embed.output" else spec.final_norm).output = value
        return
    _, layer, rest = site.split(".", 2)
    i = int(layer)
    if rest == "resid_pre":
        _envoy(lm, adapter.layer_path(i)).input = value
    elif rest == "attn.z":
        _envoy(lm, adapter.layer_path(i, "o")).input = value.reshape(*value.shape[:-2], -1)
    elif rest in ("ln1.output", "mlp.output"):
        _envoy(lm, adapter.layer_path(i, "ln1" if rest == "ln1.output" else "mlp")).output = value
    else:  # attn.output, resid_post: the module may return a tuple whose first (or indexed) entry is the tensor
        envoy = _envoy(lm, adapter.layer_path(i, "attn") if rest == "attn.output" else adapter.layer_path(i))
        out = envoy.output
        index = spec.attn_output_index if rest == "attn.output" else (0 if isinstance(out, tuple) else None)
        envoy.output = value if index is None else tuple(value if j == index else o for j, o in enumerate(out))


def by_site(interventions: Sequence[Intervention], n_layers: int, step: int = 0) -> dict[str, list[Intervention]]:
    """Interventions active at ``step`` grouped by site (each group in the given order), sites in forward order;
    validates every site (also of inactive ones) before anything is traced."""
    groups: dict[str, list[Intervention]] = {}
    for iv in interventions:
        site_order(iv.site, n_layers)  # unknown or out-of-range sites fail here, before tracing
        if iv.active(step):
            groups.setdefault(iv.site, []).append(iv)
    return dict(sorted(groups.items(), key=lambda kv: site_order(kv[0], n_layers)))


def apply_at(lm, adapter: ModelAdapter, site: str, value: torch.Tensor, interventions: Sequence[Intervention],
             step: int = 0) -> torch.Tensor:
    """Apply ``interventions`` (all at ``site``) to its traced ``value`` in order, write it back, return it."""
    for iv in interventions:
        value = iv.apply(value, step)
    write_site(lm, adapter, site, value)
    return value


def apply_interventions(lm, adapter: ModelAdapter, interventions: Sequence[Intervention], step: int = 0) -> None:
    """Apply every intervention in forward order inside an active trace (or one step of ``tracer.iter``)."""
    for site, group in by_site(interventions, adapter.n_layers, step).items():
        apply_at(lm, adapter, site, _site_value(lm, adapter, site), group, step)


def select_rows(interventions: Sequence[Intervention], index: torch.Tensor) -> list[Intervention]:
    """Every intervention restricted to rows ``index``."""
    return [iv.select(index) for iv in interventions]


__all__ = ["AblateHeads", "CorruptPositions", "Intervention", "InterventionError", "Patch", "ProjectOut", "Steer",
           "apply_at", "apply_interventions", "by_site", "select_rows", "write_site"]
