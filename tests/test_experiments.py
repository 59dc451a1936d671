"""Every experiment and model config composes with Hydra and validates against the schemas (no weights needed).

Checks the paper's settings (greedy, 300 new tokens, no chat template, fp32, FinalDataset by path, the three
analyses), the newer families (chat template on for the tuned model), the sweep experiments (every value of
their ``hydra.sweeper.params`` composes too, with distinct deterministic run dirs), and the precision /
placement option groups. Plugin options are validated against each plugin's own ``Options`` dataclass.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from tuneshift.paths import CONF_DIR
from tuneshift.config import TuneshiftConfig, register_configs
from tuneshift.loading import ModelSpec, torch_dtype

CONF = CONF_DIR
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
PAPER = {"llama7b_vicuna7b": ("huggyllama/llama-7b", "lmsys/vicuna-7b-v1.1"),
         "mistral7b_instruct": ("mistralai/Mistral-7B-v0.1", "mistralai/Mistral-7B-Instruct-v0.1")}
FAMILIES = {"llama2_7b_chat": ("meta-llama/Llama-2-7b-hf", "meta-llama/Llama-2-7b-chat-hf"),
            "llama3_8b_instruct": ("meta-llama/Meta-Llama-3-8B", "meta-llama/Meta-Llama-3-8B-Instruct"),
            "qwen25_7b_instruct": ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct"),
            "gemma_2b_it": ("google/gemma-2b", "google/gemma-2b-it")}
ANALYSES = ["saliency", "head_relations", "ffn_concepts"]


def _experiment_override(name: str) -> str:
    """``experiment=X`` when conf/config.yaml lists an experiment default, else ``+experiment=X``."""
    defaults = yaml.safe_load((CONF / "config.yaml").read_text()).get("defaults", [])
    listed = any(isinstance(d, dict) and any(str(k).split(" ")[-1] == "experiment" for k in d) for d in defaults)
    return f"{'' if listed else '+'}experiment={name}"


def _compose(overrides: list[str], hydra_config: bool = False):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=hydra_config)


def _plugins_of(name: str) -> list[str]:
    """Plugin names an experiment selects (read from its defaults list)."""
    raw = yaml.safe_load((CONF / "experiment" / f"{name}.yaml").read_text())
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict) and "override /plugins" in entry:
            return list(entry["override /plugins"])
    return []


def _skip_if_plugins_missing(plugins: list[str]) -> None:
    from tuneshift.plugin import available_plugins

    missing = [p for p in plugins if p not in available_plugins()]
    assert not missing, f"experiments name plugins that are not installed: {missing}"


def validate_full(cfg) -> TuneshiftConfig:
    """Resolve every interpolation, convert to the dataclasses (type-checks every field), build the plugins."""
    from tuneshift.plugin import build_plugins

    container = OmegaConf.to_container(cfg, resolve=True)
    typed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TuneshiftConfig), container))
    for key, spec in typed.model.models.items():
        assert isinstance(spec, ModelSpec)
        torch_dtype(spec.dtype)  # a known dtype
    for pair in typed.model.pairs:
        assert len(pair) == 2 and all(k in typed.model.models for k in pair), pair
    build_plugins(cfg.plugins)  # each plugin's options against its Options dataclass
    return typed


@pytest.mark.parametrize("name", MODELS)
def test_every_model_config_composes(name):
    cfg = _compose([f"model={name}"])
    assert cfg.model.name == name, "a model config's name should be its file name (run dirs, W&B groups)"
    typed = validate_full(cfg)
    assert typed.model.models


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_composes(name):
    _skip_if_plugins_missing(_plugins_of(name))
    cfg = _compose([_experiment_override(name)])
    typed = validate_full(cfg)
    assert typed.experiment == name
    assert typed.logger.group is None or typed.logger.group == typed.model.name
    full = _compose([_experiment_override(name)], hydra_config=True)
    params = OmegaConf.select(full, "hydra.sweeper.params") or {}
    # a sweep experiment: every value of its sweep composes, and the jobs get distinct deterministic dirs
    values = [v.strip() for v in str(params.get("model", "")).split(",") if v.strip()]
    names = set()
    for value in values:
        job = _compose([_experiment_override(name), f"model={value}"])
        job_typed = validate_full(job)
        names.add(job_typed.run.name)
        assert job_typed.experiment == name
    assert len(names) == len(values)


@pytest.mark.parametrize("name", sorted(PAPER))
def test_paper_experiments_use_the_paper_settings(name):
    _skip_if_plugins_missing(ANALYSES)
    typed = validate_full(_compose([_experiment_override(name)]))
    base, tuned = typed.model.pairs[0]
    assert (typed.model.models[base].path, typed.model.models[tuned].path) == PAPER[name]
    assert typed.generation.max_new_tokens == 300
    assert typed.generation.chat_template is False  # raw prompt for both models
    assert all(not s.chat_template for s in typed.model.models.values())
    assert all(s.dtype in ("float32", "fp32") for s in typed.model.models.values())
    assert typed.data.format == "final_dataset" and typed.data.path.endswith("FinalDataset.tsv")
    assert typed.data.limit is None
    assert list(typed.plugins) == ANALYSES
    assert typed.logger.kind == "wandb" and typed.logger.mode == "offline"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_experiments_template_the_tuned_model(name):
    _skip_if_plugins_missing(ANALYSES)
    typed = validate_full(_compose([_experiment_override(name)]))
    base, tuned = typed.model.pairs[0]
    assert (typed.model.models[base].path, typed.model.models[tuned].path) == FAMILIES[name]
    assert typed.generation.chat_template is None  # each model's own setting
    assert typed.model.models[base].chat_template is False and typed.model.models[tuned].chat_template is True
    assert typed.generation.max_new_tokens == 300 and list(typed.plugins) == ANALYSES


@pytest.mark.parametrize("precision,dtype", [("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")])
@pytest.mark.parametrize("model", sorted(PAPER) + sorted(FAMILIES))
def test_precision_and_placement_options(model, precision, dtype):
    cfg = _compose([f"model={model}", f"+precision={precision}", "+placement=multi_gpu"])
    typed = validate_full(cfg)
    assert set(typed.model.models) == {"base", "tuned"}  # the option groups add no stray model
    for spec in typed.model.models.values():
        assert spec.dtype == dtype and spec.device_map == "auto"
        assert spec.path.count("/") == 1  # a hub id


def test_placement_cpu_and_gpu():
    for placement, device in (("cpu", "cpu"), ("gpu", "cuda")):
        typed = validate_full(_compose(["model=qwen25_7b_instruct", f"+placement={placement}"]))
        assert all(s.device == device and s.device_map is None for s in typed.model.models.values())


def test_experiment_files_are_global_packages():
    for path in sorted((CONF / "experiment").glob("*.yaml")) + sorted((CONF / "precision").glob("*.yaml")) \
            + sorted((CONF / "placement").glob("*.yaml")):
        assert "# @package _global_" in path.read_text().splitlines()[0], path


def test_sweep_tiny_families_values_exist():
    """The tiny sweep experiment only names model configs that exist (it runs without any download)."""
    full = _compose([_experiment_override("tiny_families")], hydra_config=True)
    values = str(full.hydra.sweeper.params.model).split(",")
    assert all((CONF / "model" / f"{v}.yaml").is_file() for v in values)
    assert all(Path(CONF / "model" / f"{v}.yaml").read_text().count("tiny-random:") == 2 for v in values)
