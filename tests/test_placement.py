"""Placement: a model split over two "devices" (CPU and disk offload through accelerate, the code path of
``device_map="auto"`` on several GPUs) gives the same results as the single-device run."""
from __future__ import annotations

import numpy as np
import pytest

import tuneshift as ts
from tuneshift.testing import save_tiny_model

PLUGINS = {"residual_norm": {}, "saliency": {"html_prompts": 0},
           "ffn_concepts": {"n_directions": 4, "annotate": False, "word_limit": 500}}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("placement")
    return root, save_tiny_model(root / "base", "llama", 0), save_tiny_model(root / "tuned", "llama", 1)


def _split(path, root, name):
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
                  "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}
    return ts.ModelSpec(name=name, path=str(path), device_map=device_map, offload_folder=str(root / f"off-{name}"))


def test_a_split_model_gives_the_single_device_results(folders):
    root, base, tuned = folders
    kw = dict(plugins=PLUGINS, limit=3, generation={"max_new_tokens": 4})
    whole = ts.compare(ts.ModelSpec(name="b", path=str(base)), ts.ModelSpec(name="t", path=str(tuned)),
                       out=root / "whole", **kw)
    split = ts.compare(_split(base, root, "b"), _split(tuned, root, "t"), out=root / "split", **kw)
    for plugin, key, table, column in [("residual_norm", "tuned", "norms", "mean_norm"),
                                       ("saliency", "tuned", "scores", "score"),
                                       ("saliency", "base", "densities", "density"),
                                       ("ffn_concepts", "tuned", "directions", "variance_ratio")]:
        np.testing.assert_allclose(split[plugin][key][table][column].to_numpy(dtype=float),
                                   whole[plugin][key][table][column].to_numpy(dtype=float), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(split["saliency"]["tuned"]["matrices"]["S_0"], whole["saliency"]["tuned"]["matrices"]["S_0"])
