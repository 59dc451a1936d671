"""Runner and plugin lifecycle: hook order, registry, option validation, resume, the example plugin."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from tuneshift.errors import RunFolderError
from tuneshift.plugin import HOOK_ORDER, PLUGINS, Plugin, PluginError, build_plugins
from tuneshift.probes import Probe
from tuneshift.results import ResultStore
from tuneshift.cli import run_config as run
from conftest import tiny_pair_config

CALLS: list[tuple] = []
FAIL_ON_MODEL = {"key": ""}  # simulates a crash without changing the plugin's options (its fingerprint)


@dataclass
class RecorderOptions:
    label: str = "recorder"


class Recorder(Plugin):
    """Records every hook call with the data it received."""

    name = "test_recorder"
    Options = RecorderOptions
    needs_responses = True

    def setup(self, ctx):
        CALLS.append(("setup",))

    def on_run_start(self, ctx):
        CALLS.append(("on_run_start",))

    def on_model_start(self, ctx, model):
        CALLS.append(("on_model_start", model.key))
        if model.key == FAIL_ON_MODEL["key"]:
            raise RuntimeError("boom")

    def probes(self, model):
        CALLS.append(("probes", model.key))
        return [Probe("layers.0.mlp.output", reduce="last")]

    def on_batch(self, ctx, model, batch, captures):
        CALLS.append(("on_batch", model.key, batch.index, tuple(captures)))
        assert captures["layers.0.mlp.output:last"].shape == (len(batch.items), model.adapter.d_model)
        assert all(item.response_ids is not None for item in batch.items)

    def on_model_end(self, ctx, model):
        CALLS.append(("on_model_end", model.key))
        ctx.store.save_json(self.name, model.key, "n", {"prompts": len(model.encoded)})

    def on_compare(self, ctx, base, tuned):
        CALLS.append(("on_compare", base, tuned))

    def on_run_end(self, ctx):
        CALLS.append(("on_run_end",))

    def teardown(self, ctx):
        CALLS.append(("teardown",))


PLUGINS.register(Recorder)


def _cfg(tmp_path, plugins, **run):
    return tiny_pair_config(tmp_path, plugins, limit=5, max_new_tokens=4, **run)


def test_hook_order_and_resume(tmp_path):
    CALLS.clear()
    run(_cfg(tmp_path, {"test_recorder": {}}))
    names = [c[0] for c in CALLS]
    assert names == ["setup", "on_run_start",
                     "on_model_start", "probes", "on_batch", "on_batch", "on_batch", "on_model_end",
                     "on_model_start", "probes", "on_batch", "on_batch", "on_batch", "on_model_end",
                     "on_compare", "on_run_end", "teardown"]
    assert [n for n in HOOK_ORDER if n in names] == list(dict.fromkeys(names))  # documented order
    assert ("on_compare", "base", "tuned") in CALLS
    assert (tmp_path / "job" / "responses" / "base.jsonl").is_file()

    CALLS.clear()  # same job again: everything is done, nothing is recomputed
    run(_cfg(tmp_path, {"test_recorder": {}}))
    assert [c[0] for c in CALLS] == ["setup", "on_run_start", "on_run_end", "teardown"]

    CALLS.clear()  # a changed setting never writes into the folder of other settings
    cfg = _cfg(tmp_path, {"test_recorder": {}})
    cfg.generation.max_new_tokens = 3
    before = (tmp_path / "job" / "settings.json").read_text()
    with pytest.raises(RunFolderError, match="holds results of other settings"):
        run(cfg)
    assert (tmp_path / "job" / "settings.json").read_text() == before and CALLS == [("setup",)]
    run(cfg, tmp_path / "job-changed")  # its own folder: everything that depended on it is computed
    assert ("on_model_end", "base") in CALLS and ("on_compare", "base", "tuned") in CALLS


def test_interrupted_run_resumes_where_it_stopped(tmp_path):
    CALLS.clear()
    FAIL_ON_MODEL["key"] = "tuned"
    try:
        with pytest.raises(RuntimeError, match="boom"):
            run(_cfg(tmp_path, {"test_recorder": {}}))
    finally:
        FAIL_ON_MODEL["key"] = ""
    assert CALLS[-1] == ("teardown",)  # teardown runs after an error
    assert (tmp_path / "job" / "test_recorder" / "base" / "_DONE").is_file()
    CALLS.clear()
    run(_cfg(tmp_path, {"test_recorder": {}}))
    assert ("on_model_start", "base") not in CALLS and ("on_model_start", "tuned") in CALLS


def test_unknown_plugin_and_bad_options_fail_clearly():
    with pytest.raises(PluginError, match="unknown plugin 'nope'.*available: .*residual_norm"):
        build_plugins({"nope": {}})
    with pytest.raises(PluginError, match="bad options for plugin 'residual_norm'.*include_embeddings"):
        build_plugins({"residual_norm": {"include_embedings": True}})
    with pytest.raises(PluginError, match="residual_norm"):
        build_plugins({"residual_norm": {"include_embeddings": "maybe"}})


def test_example_plugin_matches_a_plain_forward(tmp_path):
    """residual_norm's per-layer mean norm equals a hand loop over a plain transformers forward."""
    from tuneshift.adapters import ModelAdapter
    from tuneshift.data import encode_prompt, load_prompts
    from tuneshift.loading import ModelSpec, load_model

    cfg = _cfg(tmp_path, {"residual_norm": {}})
    cfg.model.pairs = []
    cfg.model.models = {"base": cfg.model.models.base}
    run(cfg)
    got = ResultStore(tmp_path / "job").load_table("residual_norm", "base", "norms")
    model, tok = load_model(ModelSpec(path="tiny-random:llama:0"))
    adapter = ModelAdapter(model)
    sums, count = np.zeros(adapter.n_layers + 1), 0
    for prompt in load_prompts("builtin", limit=5):
        ids = encode_prompt(tok, prompt).input_ids[None]
        with torch.no_grad():
            hidden = [adapter.embedding_matrix()[ids]]
            for layer in range(adapter.n_layers):
                hidden.append(_layer_output(model, adapter, ids, layer))
        sums += np.array([h.norm(dim=-1).sum().item() for h in hidden])
        count += ids.shape[1]
    np.testing.assert_allclose(got["mean_norm"].to_numpy(), sums / count, rtol=1e-5)


def _layer_output(model, adapter, ids, layer):
    seen = {}
    hook = adapter.module(adapter.layer_path(layer)).register_forward_hook(
        lambda m, i, o: seen.setdefault("h", o[0] if isinstance(o, tuple) else o))
    model(input_ids=ids)
    hook.remove()
    return seen["h"]
