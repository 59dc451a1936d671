"""Scoring one test's conditions on one model, with its per-item scores kept for a re-run.

Each test's scores ``[n_conditions, n_items]`` (``task``, and ``logprob`` when asked) are written as soon as they
are computed, beside a fingerprint of everything they depend on (the model, the prompts, the conditions' units,
the scorer and the intervention settings). A re-run after a crash, or after changing only the statistics
options, reuses them instead of generating again.
"""
from __future__ import annotations

import json
import time
from typing import Any, Sequence

import numpy as np

from tuneshift.data import EncodedPrompt
from tuneshift.evaluation import evaluate
from tuneshift.fingerprint import fingerprint, prompts_fingerprint
from tuneshift.results import atomic_write_json


def _units(units: Any) -> Any:
    if isinstance(units, frozenset):
        return sorted(units)
    return units


def score_test(ctx: Any, plugin: Any, key: str, run: Any, test: Any, items: Sequence[EncodedPrompt],
               max_new_tokens: int) -> dict[str, np.ndarray]:
    """``{"task": [C, N], "logprob": [C, N]}`` scores of ``test``'s conditions on ``run`` (cached in the store)."""
    o, store = plugin.options, ctx.store
    settings = {k: getattr(o, k) for k in ("scorer", "logprob", "head_ablation", "corruption", "noise_scale",
                                           "seed")}
    fp = fingerprint(test.name, run.key, run.spec, prompts_fingerprint(ctx.prompts), settings, max_new_tokens,
                     [[c.kind, c.size, c.draw, _units(c.units)] for c in test.conditions])
    folder = store.dir(plugin.name, key)
    meta_path, name = folder / f"scores_{test.name}.json", f"scores_{test.name}"
    if meta_path.is_file() and (folder / f"{name}.npz").is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("fingerprint") == fp:
            return store.load_arrays(plugin.name, key, name)
    started = time.perf_counter()
    result = evaluate(run, items, len(test.conditions), test.build, o.scorer, max_new_tokens, logprob=o.logprob,
                      max_rows=o.max_rows, max_tokens=o.max_tokens, progress=ctx.progress, desc=f"causal {test.name}")
    out = {"task": result.scores, **({"logprob": result.logprob} if o.logprob else {})}
    timing = {"seconds": time.perf_counter() - started, "generated_tokens": result.generated_tokens}
    store.save_arrays(plugin.name, key, name, out)
    atomic_write_json(meta_path, {"fingerprint": fp, "model": run.key, "n_conditions": len(test.conditions),
                                  "n_items": len(items), **timing})
    return out


__all__ = ["score_test"]
