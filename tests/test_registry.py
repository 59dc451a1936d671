"""One Registry for every string id, and third-party plugins found through entry points (pytest11-style)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuneshift.adapters import ARCHS
from tuneshift.data import DATASETS
from tuneshift.loggers import LOGGERS
from tuneshift.plugin import PLUGINS
from tuneshift.plugins.ffn_concepts.annotators import ANNOTATORS
from tuneshift.plugins.head_relations.similarity import BACKENDS
from tuneshift.registry import Registry, RegistryError

PLUGIN_FILE = '''
from dataclasses import dataclass
from tuneshift import Plugin, Probe


@dataclass
class LastNormOptions:
    layer: int = 0


class LastNorm(Plugin):
    """Norm of the residual stream at the last position."""

    name = "last_norm"
    Options = LastNormOptions

    def probes(self, model):
        return [Probe(f"layers.{self.options.layer}.resid_post", reduce="last")]

    def on_batch(self, ctx, model, batch, captures):
        ctx.store.save_json(self.name, model.key, f"batch{batch.index}",
                            {"norm": captures[f"layers.{self.options.layer}.resid_post:last"].norm(dim=-1).tolist()})
'''


@pytest.mark.parametrize("registry, known", [(PLUGINS, "saliency"), (DATASETS, "organism"), (LOGGERS, "wandb"),
                                             (ARCHS, "gemma3_text"), (ANNOTATORS, "offline"), (BACKENDS, "ppmi")])
def test_every_registry_is_one_kind_and_lists_its_ids_on_a_typo(registry, known):
    assert isinstance(registry, Registry) and known in registry.available()
    with pytest.raises(RegistryError, match=f"unknown {registry.kind} 'typo'; available: .*{known}"):
        registry.get("typo")


def test_register_by_decorator_call_and_name():
    reg: Registry = Registry("thing")

    @reg.register
    class A:
        name = "a"

    reg.register("b", 2)
    assert reg.get("a") is A and reg["b"] == 2 and list(reg) == ["a", "b"]


def _dist(site: Path, package: str, entry: str) -> None:
    """A minimal installed distribution (dist-info with entry points) on a path, as pip would leave it."""
    info = site / f"{package}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {package}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[tuneshift.plugins]\n{entry}\n")


def test_a_third_party_package_plugin_is_found_and_runs_without_touching_tuneshift(tmp_path):
    site = tmp_path / "site"
    (site / "my_pkg").mkdir(parents=True)
    (site / "my_pkg" / "__init__.py").write_text("")
    (site / "my_pkg" / "last_norm.py").write_text(PLUGIN_FILE)
    _dist(site, "my_pkg", "last_norm = my_pkg.last_norm:LastNorm")
    _dist(site / "broken", "broken_pkg", "broken = no_such_module:Nope")  # never stops an unrelated run
    env = {**os.environ, "PYTHONPATH": f"{site}{os.pathsep}{site / 'broken'}", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "tuneshift.cli", "model=tiny_random", "data=builtin", "data.limit=2",
                          "plugins=[last_norm]", "plugins.last_norm.layer=1", f"run.root={tmp_path / 'out'}",
                          "run.progress=false"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    (run_dir,) = (tmp_path / "out").glob("tiny_random-builtin-*")
    assert (run_dir / "last_norm" / "tuned" / "batch0.json").is_file()
    typo = subprocess.run([sys.executable, "-m", "tuneshift.cli", "model=tiny_random", "plugins=[last_norm]",
                           "plugins.last_norm.layr=1", f"run.root={tmp_path / 'out'}"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert typo.returncode != 0 and "plugins.last_norm.layr" in typo.stderr  # its options compose like built-ins
    asked = subprocess.run([sys.executable, "-c", "from tuneshift.plugin import plugin_class; plugin_class('broken')"],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert "entry point 'no_such_module:Nope' failed to load" in asked.stderr


def test_a_single_file_plugin_through_the_environment(tmp_path):
    (tmp_path / "last_norm.py").write_text(PLUGIN_FILE)
    env = {**os.environ, "TUNESHIFT_PLUGINS": str(tmp_path / "last_norm.py"), "HF_HUB_OFFLINE": "1"}
    code = textwrap.dedent("""
        from tuneshift.plugin import available_plugins, load_plugin_paths
        load_plugin_paths()
        print(available_plugins())
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "last_norm" in out.stdout, out.stderr
