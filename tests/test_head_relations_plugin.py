"""head_relations end to end through the runner on two tiny random Llama models (glove backend on a file)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tuneshift.plugin import PluginError, build_plugins
from tuneshift.cli import run_config as run
from tuneshift.words import load_word_list
from tuneshift.plugins.head_relations import HeadRelationsPlugin
from conftest import tiny_pair_config


def _glove(tmp_path, n_words=1500, dim=6):
    words = load_word_list("builtin", limit=n_words).words
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((len(words), dim))
    vecs[:, 0] += 1.5  # a shared component: similarities are mostly positive, as with real word vectors
    path = tmp_path / "vectors.txt"
    path.write_text("".join(f"{w} " + " ".join(f"{x:.5f}" for x in v) + "\n" for w, v in zip(words, vecs)
                            if w != "the"))  # one frequent word unknown to the backend
    return path


def _cfg(tmp_path, **options):
    plugin = {"word_limit": 1500, "top_k": 25, "baseline_size": 300, "similarity": "glove",
              "similarity_path": str(_glove(tmp_path)), "threshold_std": 1.0, "layer_group_size": 1, **options}
    return tiny_pair_config(tmp_path, {"head_relations": plugin}, limit=2, max_new_tokens=2)


def test_end_to_end(tmp_path):
    run(_cfg(tmp_path))
    out = tmp_path / "job" / "head_relations"
    dims = pd.read_parquet(out / "base" / "dims.parquet")
    assert len(dims) == 2 * 4 * 16  # layers x heads x d_head
    assert set(dims.columns) >= {"model", "layer", "head", "kv_head", "dim", "rank", "energy", "pairs", "sims"}
    assert (dims.groupby(["layer", "head"])["rank"].apply(sorted).map(list) == [list(range(1, 17))] * 8).all()
    assert dims["kv_head"].tolist() == (dims["head"] // 2).tolist()
    assert dims["n_pairs"].sum() > 0 and (dims["n_pairs"] == dims["pairs"].map(len)).all()
    assert not dims["pairs"].explode().dropna().str.contains(r"(?:^the=|=the$)").any()  # unknown word never passes
    sims = dims["sims"].explode().dropna().astype(float)
    assert (sims > 0).all()
    know = pd.read_parquet(out / "tuned" / "knowledge.parquet")
    assert (know["n_dims"] > 1).all() and (know["word_a"] < know["word_b"]).all()
    cmp = out / "compare" / "base__tuned"
    over = pd.read_parquet(cmp / "overlap.parquet")
    assert over["layer"].tolist() == [0, 1] and over["jaccard"].between(0, 1).all()
    stats = pd.read_parquet(cmp / "verb_stats.parquet")
    assert set(stats["verb_set"]) == {"instruction", "general"} and set(stats["group"]) == {0, 1}
    page = (cmp / "view.html").read_text()
    assert "Layer 1" in page and "data:image/png;base64" in page and 'class="pair added"' in page
    assert (cmp / "overlap.png").stat().st_size > 1000 and (cmp / "verb_shares.png").stat().st_size > 1000
    summary = json.loads((out / "base" / "summary.json").read_text())
    assert 0.99 < summary["word_coverage"] < 1.0 and summary["n_words"] == 1500


def test_options_validate_and_fail_clearly(tmp_path):
    with pytest.raises(PluginError, match="top_k"):
        build_plugins({"head_relations": {"top_k": "many"}})
    with pytest.raises(ValueError, match="similarity 'word2vec' is unknown"):
        build_plugins({"head_relations": {"similarity": "word2vec"}})
    plugin = build_plugins({"head_relations": {"similarity": "glove", "similarity_path": "/nope.txt"}})[0]
    assert isinstance(plugin, HeadRelationsPlugin)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plugin.setup(None)  # fails before any model loads
