"""``run.remote``: traces shipped as nnsight remote requests give the results of a local run.

Two paths, both without a server: ``remote="local"`` (nnsight's own dry run: the request is serialised and
deserialised with the user's modules hidden, then run here) and ``remote="ndif"`` against the stand-in server of
``tests/fake_ndif.py`` (a separate process with no tuneshift, serving real copies of the weights while the client
holds meta weights only). Results are compared file by file with a local run of the same job.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.cli import run_config
from tuneshift.errors import ConfigError
from tuneshift.interventions import AblateHeads, ProjectOut, Steer
from tuneshift.plugin import Plugin
from tuneshift.probes import Probe, ProbeRegistry
from tuneshift.remote import nnsight_remote
from tuneshift.testing import tiny_model, tiny_tokenizer

TRACE_PLUGINS = {"residual_norm": {}, "token_shift": {"attribution": False}, "layer_lens": {"adl_positions": 2}}


def _result_files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.suffix in (".parquet", ".npz"))


def assert_same_results(a: Path, b: Path, atol: float = 0.0) -> int:
    """Every table and array under run folder ``a`` equals the one under ``b``; returns how many were compared."""
    files = _result_files(a)
    assert files and files == _result_files(b)
    for rel in files:
        if rel.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(a / rel), pd.read_parquet(b / rel), check_exact=atol == 0,
                                          atol=atol or None, rtol=0 if atol else None)
            continue
        x, y = np.load(a / rel), np.load(b / rel)
        assert x.files == y.files, rel
        for key in x.files:
            if x[key].dtype.kind in "fc":
                np.testing.assert_allclose(x[key], y[key], rtol=0, atol=atol, err_msg=f"{rel}:{key}")
            else:
                np.testing.assert_array_equal(x[key], y[key], err_msg=f"{rel}:{key}")
    return len(files)


def test_local_dry_run_of_remote_requests_equals_the_local_run(tiny_pair_cfg, tmp_path):
    folders = {}
    for mode in ("off", "local"):
        cfg = tiny_pair_cfg(TRACE_PLUGINS, limit=3, remote=mode)
        cfg.generation.response_source = "tuned"  # generation too goes through nnsight's remote path
        cfg.run.name = mode
        run_config(cfg, tmp_path / mode)
        folders[mode] = tmp_path / mode
    assert assert_same_results(folders["off"], folders["local"]) >= 20


def test_registry_remote_dry_run_with_writes_and_gradients():
    torch.manual_seed(0)
    model = tiny_model("llama", 0)
    adapter = ModelAdapter(model)
    from nnsight import TransformersModel

    lm = TransformersModel(model, tokenizer=tiny_tokenizer())
    probes = {"a": [Probe("layers.0.resid_post", reduce="norm"), Probe("blocks.1.attn.hook_z"),
                    Probe("logits", reduce="tail")],
              "g": [Probe("layers.1.mlp.output", grad=True, reduce="mean"), Probe("embed.output", grad=True)]}
    registry = ProbeRegistry(adapter, probes)
    d = adapter.d_model
    writes = [AblateHeads(0, heads=torch.tensor([True] + [False] * (adapter.n_heads - 1))),
              ProjectOut("layers.1.mlp.output", basis=torch.linalg.qr(torch.randn(d, 2))[0]),
              Steer("layers.0.resid_post", vector=torch.randn(d), scale=2.0)]
    ids = torch.randint(5, 200, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    here = registry.run(lm, ids, mask, pos, interventions=writes, tail=3)
    shipped = registry.run(lm, ids, mask, pos, interventions=writes, tail=3, remote="local")
    plain = registry.run(lm, ids, mask, pos, tail=3)
    for owner in here:
        for key in here[owner]:
            assert torch.equal(here[owner][key], shipped[owner][key]), (owner, key)
    assert not torch.allclose(here["a"]["logits:tail"], plain["a"]["logits:tail"])  # the writes took effect


def test_ndif_requests_through_a_server_without_tuneshift_equal_the_local_run(tmp_path):
    """The client holds meta weights; every trace (generation, probes, the lens' head) is a request."""
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    script = Path(__file__).with_name("fake_ndif.py")
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "out")], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    assert assert_same_results(out / "off", out / "ndif") >= 20
    log = json.loads((out / "requests.json").read_text())
    requests = log["requests"]
    assert {r["repo"] for r in requests} == {"tiny-org/base", "tiny-org/tuned"}
    # tuned: 2 generation batches, 2 probe batches, 1 plain-text batch, 1 lens head fetch; base: all but generation
    assert len(requests) == 10
    assert all(r["bytes"] < 200_000 for r in requests)  # code and inputs only; the weights never travel
    assert all(r["env"]["attn_implementation"] for r in requests)
    assert log["capture_max_abs_diff"] == 0.0  # tuneshift.capture(..., remote="ndif")
    assert "HF_HUB_OFFLINE=0" in log["offline"]  # offline, NDIF's model key cannot be resolved: said, no traceback
    assert "No module named 'tuneshift'" in log["control"]  # unshipped code fails on the server: the check bites
    models = json.loads((out / "ndif" / "summary.json").read_text())["models"]
    assert models["tuned"]["n_params"] == json.loads((out / "off" / "summary.json").read_text())["models"]["tuned"][
        "n_params"]


@pytest.mark.parametrize("plugins, mode, words", [
    ({"saliency": {}}, "local", ["plugin saliency", "differentiates", "remote session"]),
    ({"head_relations": {}}, "ndif", ["plugin head_relations", "weights", "run.remote=off"]),
    ({"ffn_concepts": {}}, "local", ["plugin ffn_concepts", "dry run"]),
    ({"causal": {}}, "local", ["plugin causal", "KV cache"]),
    ({"token_shift": {}}, "local", ["plugins.token_shift.attribution=false"]),
    ({"residual_norm": {}}, "ndif", ["model 'base'", "tiny-random:llama:0", "hub"]),
    ({"residual_norm": {}}, "cloud", ["run.remote='cloud'", "off", "local", "ndif"]),
])
def test_remote_refuses_what_it_cannot_run_before_anything_loads(tiny_pair_cfg, tmp_path, plugins, mode, words):
    cfg = tiny_pair_cfg(plugins, remote=mode)
    with pytest.raises(ConfigError) as err:
        run_config(cfg, tmp_path / "job")
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "job").exists()


def test_plugin_remote_capability_defaults():
    class ProbesOnly(Plugin):
        name = "probes_only"
        runs_remote = True

    class Unmarked(Plugin):
        name = "unmarked"

    assert ProbesOnly().remote_blocker() is None
    assert "runs_remote = True" in Unmarked().remote_blocker()
    assert [nnsight_remote(m) for m in ("off", "local", "ndif")] == [False, "local", True]
