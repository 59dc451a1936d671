"""Hydra composition against the schema, clear config errors, and the `tuneshift` command end to end."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tuneshift.paths import CONF_DIR
from tuneshift.config import register_configs
from tuneshift.loading import ModelLoadError, ModelSpec, resolve_path
from tuneshift.plugin import build_plugins

CONF = CONF_DIR


def _compose(*overrides: str):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
def test_every_model_config_composes_and_validates(model):
    cfg = _compose(f"model={model}")
    for pair in cfg.model.pairs:
        assert set(pair) <= set(cfg.model.models)
    for spec in cfg.model.models.values():
        OmegaConf.to_object(spec)  # a valid ModelSpec


@pytest.mark.parametrize("group", ["data", "logger", "plugins"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        override = f"{group}=[{option}]" if group == "plugins" else f"{group}={option}"
        cfg = _compose(override)
        if group == "plugins":
            build_plugins({option: cfg.plugins[option]})  # options valid against the plugin's schema


def test_typos_and_wrong_types_fail_with_the_key_named():
    with pytest.raises(ConfigCompositionException) as err:
        _compose("run.bach_size=3")
    assert "Key 'bach_size' not in 'RunConfig'" in str(err.value.__cause__)
    with pytest.raises(ConfigCompositionException, match="run.batch_size=many"):
        _compose("run.batch_size=many")
    with pytest.raises(ConfigCompositionException) as err:
        _compose("model.models.base.devce=cpu")
    assert "Key 'devce' not in 'ModelSpec'" in str(err.value.__cause__)


def test_bad_model_paths_fail_clearly(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_path(ModelSpec(path="./no/such/folder"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_path(ModelSpec(path=str(tmp_path)))
    with pytest.raises(ModelLoadError, match="tiny-random family 'bert' unknown"):
        resolve_path(ModelSpec(path="tiny-random:bert"))


def test_cli_runs_end_to_end_and_resumes(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNESHIFT_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "tuneshift.cli", "model=tiny_random", "data=builtin", "plugins=[residual_norm]",
           "data.limit=4",
           f"run.root={tmp_path}", "run.progress=false", "logger=wandb"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    out_dir = tmp_path / "tiny_random-builtin"
    assert f"results in {out_dir}" in first.stdout
    for path in ["config.yaml", "summary.json", "report.html", "residual_norm/base/norms.parquet",
                 "residual_norm/compare/base__tuned/summary.json"]:
        assert (out_dir / path).is_file(), path
    assert list((out_dir / "wandb").glob("offline-run-*"))
    stamp = (out_dir / "residual_norm/base/norms.parquet").stat().st_mtime_ns
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    assert (out_dir / "residual_norm/base/norms.parquet").stat().st_mtime_ns == stamp  # resumed, not redone


def test_cli_reports_a_typo_in_the_plugin_options(tmp_path):
    cmd = [sys.executable, "-m", "tuneshift.cli", "model=tiny_random", "data=builtin", "plugins=[residual_norm]",
           "+plugins.residual_norm.colour=red",
           f"run.root={tmp_path}"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "HYDRA_FULL_ERROR": "1"})
    assert result.returncode != 0
    assert "bad options for plugin 'residual_norm'" in result.stderr and "colour" in result.stderr
    assert not Path(tmp_path / "tiny_random-builtin" / "residual_norm").exists()
