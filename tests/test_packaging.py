"""The package as users install it: import name ``tuneshift``, one-way imports, a wheel that runs anywhere."""
from __future__ import annotations

import ast
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_core_never_imports_plugins_and_plugins_never_import_each_other():
    for path in (REPO / "framework").rglob("*.py"):
        bad = {n for n in _imports(path) if n == "plugins" or n.startswith(("plugins.", "tuneshift.plugins"))}
        assert not bad, f"core module {path.relative_to(REPO)} imports {bad}"
    for plugin_dir in [p for p in (REPO / "plugins").iterdir() if p.is_dir() and (p / "__init__.py").exists()]:
        own = f"tuneshift.plugins.{plugin_dir.name}"
        for path in plugin_dir.rglob("*.py"):
            others = {n for n in _imports(path) if n.startswith("tuneshift.plugins") and not n.startswith(own)}
            others |= {n for n in _imports(path) if n.startswith("tuneshift.models")}
            assert not others, f"{path.relative_to(REPO)} imports {others}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    source = tmp_path_factory.mktemp("src") / "tuneshift"  # a clean copy: no stale build/ of the checkout
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "outputs",
                                                               "multirun", "wandb", "__pycache__", ".cache"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out),
                    str(source)], check=True, capture_output=True, text=True, timeout=600)
    (path,) = out.glob("tuneshift-*.whl")
    return path


def test_the_wheel_installs_tuneshift_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert tops == {"tuneshift"}, tops
    for needed in ("tuneshift/conf/config.yaml", "tuneshift/conf/model/tiny_pair.yaml",
                   "tuneshift/models/tiny-pair/base/model.safetensors", "tuneshift/models/tiny-pair/heldout_prompts.jsonl",
                   "tuneshift/plugins/saliency/plugin.py", "tuneshift/builtin_prompts.jsonl",
                   "tuneshift/resources/words_en.tsv"):
        assert needed in names, needed
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "[tuneshift.plugins]" in text and "saliency = tuneshift.plugins.saliency:SaliencyPlugin" in text


def test_a_fresh_environment_runs_the_embedded_default_from_a_folder_with_its_own_plugins(wheel, tmp_path):
    """A venv holding only the wheel (dependencies reached through a path, not the editable install)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    purelib = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_deps.pth").write_text("\n".join(deps) + "\n")  # plain paths: the editable finder is not loaded
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(purelib), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    work = tmp_path / "work"
    (work / "plugins").mkdir(parents=True)
    (work / "plugins" / "__init__.py").write_text("raise ImportError('a user folder named plugins')\n")
    (work / "conf").mkdir()
    python = venv / "bin" / "python"
    where = subprocess.run([str(python), "-c", "import tuneshift, tuneshift.plugins; print(tuneshift.__file__);"
                            "print(tuneshift.available_plugins())"], cwd=work, capture_output=True, text=True,
                           timeout=120)
    assert where.returncode == 0, where.stderr
    assert str(purelib) in where.stdout and "saliency" in where.stdout
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONNOUSERSITE": "1"}
    run = subprocess.run([str(python), "-m", "tuneshift.cli", "data.limit=2", "plugins=[residual_norm]",
                          "run.progress=false", "run.root=out"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (run_dir,) = (work / "out").glob("tiny_pair-organism-*")
    assert (run_dir / "residual_norm" / "compare" / "base__tuned" / "_DONE").is_file()
    assert str(purelib / "tuneshift" / "models" / "tiny-pair") in (run_dir / "config.yaml").read_text()
