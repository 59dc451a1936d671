"""The ffn_concepts plugin end to end: hooks on tiny models with a stand-in context, then the real runner."""
from __future__ import annotations

import types

import numpy as np
import pandas as pd
import pytest
import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.loggers import Logger
from tuneshift.plugin import PluginError, build_options, build_plugins
from tuneshift.results import ResultStore
from tuneshift.testing import tiny_model, tiny_tokenizer
from tuneshift.plugins.ffn_concepts import FFNConceptsOptions, FFNConceptsPlugin, stats

R = 8


class RecordingLogger(Logger):
    def __init__(self):
        self.calls = []

    def log_metrics(self, metrics, prefix=""):
        self.calls.append(("metrics", prefix, metrics))

    def log_table(self, key, table):
        self.calls.append(("table", key, table))

    def log_image(self, key, path):
        self.calls.append(("image", key, path))

    def log_html(self, key, path):
        self.calls.append(("html", key, path))


def _run(key, family, seed):
    model = tiny_model(family, seed)
    return types.SimpleNamespace(key=key, name=f"{family}-{seed}", model=model, tokenizer=tiny_tokenizer(),
                                 adapter=ModelAdapter(model), device=torch.device("cpu"))


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffn")
    ctx = types.SimpleNamespace(store=ResultStore(root / "run"), logger=RecordingLogger(), cfg=None, progress=False)
    plugin = FFNConceptsPlugin(FFNConceptsOptions(n_directions=R, seeds=3, word_limit=3000, annotate_top=6,
                                                  cache_dir=str(root / "cache")))
    plugin.setup(ctx)
    plugin.on_model_end(ctx, _run("base", "gpt2", 0))
    plugin.on_model_end(ctx, _run("tuned", "gpt2", 1))
    plugin.on_model_end(ctx, _run("same", "gpt2", 0))
    plugin.on_compare(ctx, "base", "tuned")
    plugin.on_compare(ctx, "base", "same")
    plugin.teardown(ctx)
    ctx.cache_root = root / "cache"
    return ctx


def test_per_model_outputs(pair_run):
    store = pair_run.store
    table = store.load_table("ffn_concepts", "base", "directions")
    assert len(table) == 2 * R and set(table["layer"]) == {0, 1}
    assert {"variance_ratio", "top_words", "top_cos", "concept", "tasks", "level", "status", "error",
            "concepts_by_seed", "n_explainable_seeds"} <= set(table.columns)
    assert all(len(w) == 15 for w in table["top_words"])
    assert (table["variance_ratio"].diff().fillna(0)[table["rank"] > 0] <= 1e-7).all()  # descending per layer
    assert (table.loc[table["rank"] >= 6, "status"] == "not_annotated").all()
    assert (table.loc[table["rank"] < 6, "status"] == "ok").all()
    ann = store.load_table("ffn_concepts", "base", "annotations")
    assert len(ann) == 2 * 6 * 3 and sorted(ann["seed"].unique()) == [0, 1, 2]
    arrays = store.load_arrays("ffn_concepts", "base", "directions")
    assert arrays["vectors"].shape == (2, R, 64) and arrays["top_index"].shape == (2, R, 15)
    v = arrays["vectors"][0]
    assert np.allclose(v @ v.T, np.eye(R), atol=1e-5)
    html = (store.dir("ffn_concepts", "base") / "view_layer0.html").read_text()
    assert html.startswith("<!doctype html>") and "<script" not in html and "src=" not in html
    assert html.count("not annotated") == 2 and "failed" not in html  # ranks 6 and 7 (annotate_top=6)
    assert not (pair_run.cache_root / "annotations.sqlite").exists()  # the offline annotator is not cached


def test_compare_outputs(pair_run):
    store, cmp = pair_run.store, ResultStore.compare_key("base", "tuned")
    rotation = store.load_table("ffn_concepts", cmp, "rotation")
    assert len(rotation) == 2 * R and rotation["principal_angle_deg"].between(0, 90).all()
    layers = store.load_table("ffn_concepts", cmp, "rotation_layers")
    assert layers["chance_cos2"].tolist() == [R / 64] * 2
    ttests = store.load_table("ffn_concepts", cmp, "ttests")
    assert {"task", "level"} == set(ttests["kind"]) and "all" in set(ttests["group"])
    assert (ttests["n_seeds_base"] == 3).all()
    shares = store.load_table("ffn_concepts", cmp, "shares")
    assert set(shares["model"]) == {"base", "tuned"}
    folder = store.dir("ffn_concepts", cmp)
    for name in ("principal_angles.png", "task_shares.png", "level_shares.png", "view_layer1.html"):
        assert (folder / name).stat().st_size > 1000, name
    html = (folder / "view_layer0.html").read_text()
    assert "base" in html and "tuned" in html and "Jaccard" in html
    logged = {(kind, key) for kind, key, _ in pair_run.logger.calls}
    assert ("image", "ffn_concepts/compare/base__tuned/principal_angles") in logged
    assert ("table", "ffn_concepts/base/directions") in logged


def test_a_model_compared_with_itself_has_not_rotated(pair_run):
    rot = pair_run.store.load_table("ffn_concepts", ResultStore.compare_key("base", "same"), "rotation")
    assert np.allclose(rot["principal_angle_deg"], 0, atol=1e-3)
    assert (rot["best_tuned_rank"] == rot["rank"]).all() and np.allclose(rot["top_words_jaccard"], 1)
    tt = pair_run.store.load_table("ffn_concepts", ResultStore.compare_key("base", "same"), "ttests")
    assert np.allclose(tt["base_mean"], tt["tuned_mean"])


def test_rotation_compares_proper_subspaces(tmp_path, recwarn):
    """R = d_model directions span the whole space (every angle 0): only d/4 of them are compared."""
    ctx = types.SimpleNamespace(store=ResultStore(tmp_path / "run"), logger=RecordingLogger(), cfg=None,
                                progress=False)
    plugin = FFNConceptsPlugin(FFNConceptsOptions(n_directions=64, annotate=False, word_limit=2000, layers=[0]))
    plugin.on_model_end(ctx, _run("base", "gpt2", 0))
    plugin.on_model_end(ctx, _run("tuned", "gpt2", 1))
    plugin.on_compare(ctx, "base", "tuned")
    layers = ctx.store.load_table("ffn_concepts", ResultStore.compare_key("base", "tuned"), "rotation_layers")
    assert layers["n_directions"].tolist() == [16] and not [w for w in recwarn.list if "ffn" in str(w.message)]
    # random independent models: the angles sit at the chance level, far from 0
    assert layers["mean_angle_deg"].iloc[0] == pytest.approx(layers["chance_mean_angle_deg"].iloc[0], abs=8)
    page = (ctx.store.dir("ffn_concepts", ResultStore.compare_key("base", "tuned")) / "view_layer0.html").read_text()
    assert page.count("not compared") == 50 - 16   # html_rows 50: ranks 16..49 are beyond the compared 16
    plugin.options.rotation_directions = 64
    with pytest.warns(stats.VacuousRotationWarning, match="vacuous"):
        plugin.on_compare(ctx, "base", "tuned")
    layers = ctx.store.load_table("ffn_concepts", ResultStore.compare_key("base", "tuned"), "rotation_layers")
    assert layers["n_directions"].tolist() == [64] and layers["max_angle_deg"].iloc[0] < 1e-2


def test_options_validation():
    assert build_options(FFNConceptsPlugin, {"n_directions": 12}).n_directions == 12
    with pytest.raises(PluginError, match="n_directions"):
        build_options(FFNConceptsPlugin, {"R": 12})
    with pytest.raises(ValueError, match="svd_method"):
        FFNConceptsPlugin(FFNConceptsOptions(svd_method="lanczos"))
    plugin = build_plugins({"ffn_concepts": {"annotator": "nope"}})[0]
    with pytest.raises(ValueError, match="unknown annotator 'nope'"):
        plugin.setup(None)


def test_runner_end_to_end(tmp_path):
    """The real runner, tiny random Llama pair from the repo's config, weights only."""
    pytest.importorskip("tuneshift.runner")
    from omegaconf import OmegaConf

    from tuneshift.config import validate
    from tuneshift.cli import run_config as run

    model_cfg = OmegaConf.load(__import__("tuneshift.paths").paths.CONF_DIR / "model/tiny_random.yaml")
    cfg = validate({"model": OmegaConf.to_container(model_cfg), "data": {"limit": 2},
                    "run": {"name": "t", "root": str(tmp_path), "progress": False, "report": False},
                    "logger": {"kind": "local"},
                    "plugins": {"ffn_concepts": {"n_directions": 6, "seeds": 2, "word_limit": 2000,
                                                 "cache_dir": str(tmp_path / "cache")}}})
    summary = run(cfg, tmp_path / "out")
    assert set(summary["ffn_concepts"]) >= {"base", "tuned", "base__tuned"}
    store = ResultStore(tmp_path / "out")
    assert len(store.load_table("ffn_concepts", "tuned", "directions")) == 2 * 6
    assert pd.read_parquet(store.dir("ffn_concepts", "compare/base__tuned") / "rotation.parquet").shape[0] == 12
