"""Two models on the same tokens, one in memory at a time: a per-prompt cache one model leaves for the other.

What it is for
    Quantities that need both models' tensors at the same position (KL of the two next-token distributions,
    ||h_T - h_B|| of residual streams) cannot be reduced per model. The model of a pair that runs first (the
    *writer*, in ``model.models`` order) saves what the second (the *reader*) needs, prompt by prompt, while its
    batches stream; the reader's pass reads the same prompts back batch by batch. Memory stays one batch.

    Files: ``<run>/<plugin>/<writer>/paired/batch-<i>.safetensors`` (one tensor ``<name>/<row>`` per prompt,
    stored in the writer's own dtype, so nothing is rounded), ``index.json`` (prompt id -> file and row) and
    ``COMPLETE`` once the writer finished. A plugin deletes the cache after its comparisons unless asked to
    keep it, and reports it unusable (:meth:`tuneshift.plugin.Plugin.results_reusable`) when it is gone while
    a reader still needs it, so a resumed run recomputes the writer.
"""
from __future__ import annotations

import json
import shutil
from typing import TYPE_CHECKING, Sequence

import torch
from safetensors.torch import load_file, save_file

from tuneshift.errors import TuneshiftError
from tuneshift.plugin import Plugin, PluginError
from tuneshift.results import ResultStore, atomic_write_bytes, atomic_write_json

if TYPE_CHECKING:
    from tuneshift.runner import RunContext


class PairedCacheError(TuneshiftError):
    """The first model's cache is missing or does not match the second model's tokens."""


def pair_role(ctx: "RunContext", key: str) -> list[tuple[str, str, str, bool]]:
    """``(base, tuned, partner, is_writer)`` for every pair holding ``key``; the writer runs first."""
    order = list(ctx.models)
    roles = []
    for base, tuned in ctx.pairs:
        if key in (base, tuned):
            partner = tuned if key == base else base
            roles.append((base, tuned, partner, order.index(key) < order.index(partner)))
    return roles


class PairedCache:
    """Per-prompt tensors of ``writer`` for ``plugin``."""

    def __init__(self, store: ResultStore, plugin: str, writer: str):
        self.dir = store.dir(plugin, writer) / "paired"
        self.writer = writer
        self._index: dict[str, list] | None = None
        self._loaded: tuple[str, dict] | None = None

    # ---- writer -----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Empty the cache (a writer pass starts over)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        self._index = {}

    def write(self, batch_index: int, ids: Sequence[str], tensors: dict[str, Sequence[torch.Tensor]]) -> None:
        """One batch: ``tensors[name][row]`` is prompt ``ids[row]``'s tensor (any shape)."""
        if self._index is None:
            raise PairedCacheError("PairedCache.write before start()")
        name = f"batch-{batch_index:06d}.safetensors"
        flat = {f"{k}/{row}": t.detach().contiguous().cpu()
                for k, rows in tensors.items() for row, t in enumerate(rows)}
        tmp = self.dir / f".{name}.tmp"
        save_file(flat, str(tmp))
        tmp.replace(self.dir / name)
        for row, pid in enumerate(ids):
            self._index[pid] = [name, row]

    def finish(self, meta: dict | None = None) -> None:
        atomic_write_json(self.dir / "index.json", {"index": self._index, "meta": meta or {}})
        atomic_write_bytes(self.dir / "COMPLETE", b"")

    # ---- reader -----------------------------------------------------------------------------------------
    @property
    def complete(self) -> bool:
        return (self.dir / "COMPLETE").is_file()

    def meta(self) -> dict:
        return self._read_index()["meta"]

    def _read_index(self) -> dict:
        if not self.complete:
            raise PairedCacheError(f"the paired cache of model {self.writer!r} ({self.dir}) is missing or incomplete; "
                                   "run again (with run.resume=true the first model is recomputed)")
        data = json.loads((self.dir / "index.json").read_text())
        self._index = data["index"]
        return data

    def read(self, prompt_id: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Prompt ``prompt_id``'s tensors ``names`` (the file of the last read stays loaded)."""
        if self._index is None:
            self._read_index()
        if prompt_id not in self._index:
            raise PairedCacheError(f"prompt {prompt_id!r} is not in the paired cache of {self.writer!r}; both models "
                                   "must run on the same prompts")
        name, row = self._index[prompt_id]
        if self._loaded is None or self._loaded[0] != name:
            self._loaded = None  # free the previous file before reading the next: one batch in memory
            self._loaded = (name, load_file(str(self.dir / name)))
        return {k: self._loaded[1][f"{k}/{row}"] for k in names}

    def clear(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def cache_needed(ctx: "RunContext", plugin: str, key: str) -> bool:
    """Whether ``key`` writes for a second model whose results for ``plugin`` are not finished."""
    return any(is_writer and not ctx.store.is_done(plugin, partner) for _, _, partner, is_writer in pair_role(ctx, key))


def writer_reusable(ctx: "RunContext", plugin: str, key: str) -> bool:
    """Finished results of ``key`` are reusable unless a reader still needs its cache and it is gone."""
    return not cache_needed(ctx, plugin, key) or PairedCache(ctx.store, plugin, key).complete


def release(ctx: "RunContext", plugin: str, base: str, tuned: str) -> None:
    """After comparing ``(base, tuned)``: delete the writer's cache unless another unfinished pair reads it."""
    order = list(ctx.models)
    writer = base if order.index(base) < order.index(tuned) else tuned
    others = [(b, t) for b, t, _, is_writer in pair_role(ctx, writer) if is_writer and (b, t) != (base, tuned)]
    if all(ctx.store.is_done(plugin, ResultStore.compare_key(b, t)) for b, t in others):
        PairedCache(ctx.store, plugin, writer).clear()


class PairedPlugin(Plugin):
    """Base of a plugin that compares the two models of a pair on the same tokens through a :class:`PairedCache`.

    It needs a shared response (``generation.response_source`` other than ``own``) and reports its first
    model's results unusable when the cache a pending second model reads is gone.
    """

    needs_responses = True

    def setup(self, ctx: "RunContext") -> None:
        if ctx.pairs and ctx.generation.response_source == "own":
            raise PluginError(f"{self.name} compares base and tuned on the same tokens: set "
                              "generation.response_source=tuned (AlignTDS's protocol: the tuned model's response "
                              "fed to both), base or reference")

    def results_reusable(self, ctx: "RunContext", key: str) -> bool:
        return writer_reusable(ctx, self.name, key)


__all__ = ["PairedCache", "PairedPlugin", "PairedCacheError", "cache_needed", "pair_role", "release", "writer_reusable"]
