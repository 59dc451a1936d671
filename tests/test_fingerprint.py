"""Run-folder hashes: what changes results changes the hash, what only changes speed does not."""
from __future__ import annotations

import json

from hydra import compose, initialize_config_dir

from tuneshift.config import config_hash, register_configs
from tuneshift.data import load_prompts
from tuneshift.fingerprint import prompts_fingerprint
from tuneshift.paths import CONF_DIR


def _hash(*overrides: str) -> str:
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return config_hash(compose("config", overrides=list(overrides)))


def test_results_settings_change_the_hash_speed_settings_do_not():
    default = _hash()
    assert len(default) == 8 and default != "invalid"
    for neutral in ("run.batch_size=2", "run.progress=false", "generation.batch_size=3", "logger=wandb",
                    "run.threads=3", "run.root=/elsewhere"):
        assert _hash(neutral) == default, neutral
    changed = {_hash(o) for o in ("plugins.saliency.b=3", "generation.max_new_tokens=9", "data.limit=5",
                                  "run.seed=1", "plugins=[saliency]", "model=tiny_random")}
    assert default not in changed and len(changed) == 6


def test_a_data_file_edited_in_place_changes_the_hash_and_the_prompts_fingerprint(tmp_path):
    path = tmp_path / "p.jsonl"
    row = {"id": "a", "prompt": "Write a poem. About the sea.", "instructions": ["Write a poem."]}
    path.write_text(json.dumps(row) + "\n")
    first = (_hash("data=jsonl", f"data.path={path}"), prompts_fingerprint(load_prompts("jsonl", str(path))))
    path.write_text(json.dumps({**row, "prompt": "Write a poem. About the moon."}) + "\n")  # same path, same rows
    second = (_hash("data=jsonl", f"data.path={path}"), prompts_fingerprint(load_prompts("jsonl", str(path))))
    assert first[0] != second[0] and first[1] != second[1]
