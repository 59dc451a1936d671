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
from tuneshift.plugin import available_plugins, build_plugins, plugin_class

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


@pytest.mark.parametrize("group", ["data", "logger"])
def test_every_group_option_composes(group):
    for option in sorted(p.stem for p in (CONF / group).glob("*.yaml")):
        _compose(f"{group}={option}")


@pytest.mark.parametrize("plugin", available_plugins())
def test_every_plugin_composes_from_its_options_dataclass(plugin):
    """Defaults live only in each plugin's Options; Hydra receives them through the ConfigStore."""
    cfg = _compose(f"plugins=[{plugin}]")
    assert OmegaConf.get_type(cfg.plugins[plugin]) is plugin_class(plugin).Options
    assert not (CONF / "plugins" / f"{plugin}.yaml").exists()
    build_plugins({plugin: cfg.plugins[plugin]})


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


def _cli(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", **env}
    return subprocess.run([sys.executable, "-m", "tuneshift.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


def _run_dirs(root: Path, prefix: str) -> list[Path]:
    return sorted(p for p in root.glob(f"{prefix}-*") if p.is_dir())


def _wandb_ids(run_dir: Path) -> set[str]:
    return {p.name.rsplit("-", 1)[-1] for p in (run_dir / "wandb").glob("offline-run-*")}


def test_cli_runs_end_to_end_resumes_and_never_overwrites_other_settings(tmp_path):
    args = ["model=tiny_random", "data=builtin", "plugins=[residual_norm]", "data.limit=4", f"run.root={tmp_path}",
            "run.progress=false", "logger=wandb"]
    first = _cli(args, tmp_path, TUNESHIFT_CACHE=str(tmp_path / "cache"))
    assert first.returncode == 0, first.stderr[-2000:]
    (out_dir,) = _run_dirs(tmp_path, "tiny_random-builtin")  # <experiment>-<settings hash>
    assert f"results in {out_dir}" in first.stdout
    for path in ["config.yaml", "settings.json", "summary.json", "report.html", "cli.log",
                 "residual_norm/base/norms.parquet", "residual_norm/base/section.json",
                 "residual_norm/compare/base__tuned/summary.json"]:
        assert (out_dir / path).is_file(), path
    assert len(_wandb_ids(out_dir)) == 1
    stamp = (out_dir / "residual_norm/base/norms.parquet").stat().st_mtime_ns

    second = _cli(args, tmp_path, TUNESHIFT_CACHE=str(tmp_path / "cache"))
    assert second.returncode == 0, second.stderr[-2000:]
    assert (out_dir / "residual_norm/base/norms.parquet").stat().st_mtime_ns == stamp  # resumed, not redone
    assert len(_wandb_ids(out_dir)) == 1  # the resumed job continued its W&B run

    changed = _cli(args + ["plugins.residual_norm.include_embeddings=false"], tmp_path,
                   TUNESHIFT_CACHE=str(tmp_path / "cache"))
    assert changed.returncode == 0, changed.stderr[-2000:]
    assert len(_run_dirs(tmp_path, "tiny_random-builtin")) == 2  # a changed setting gets its own folder
    assert (out_dir / "residual_norm/base/norms.parquet").stat().st_mtime_ns == stamp

    other = [d for d in _run_dirs(tmp_path, "tiny_random-builtin") if d != out_dir][0]
    refused = _cli(args + [f"hydra.run.dir={other}"], tmp_path, TUNESHIFT_CACHE=str(tmp_path / "cache"))
    assert refused.returncode == 2 and "holds results of other settings" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_cli_reports_a_typo_in_the_plugin_options(tmp_path):
    result = _cli(["model=tiny_random", "data=builtin", "plugins=[residual_norm]", "plugins.residual_norm.colour=red",
                   f"run.root={tmp_path}"], tmp_path)
    assert result.returncode != 0
    assert "plugins.residual_norm.colour" in result.stderr and "Traceback" not in result.stderr
    assert not list(tmp_path.glob("tiny_random-builtin*"))
