"""Sweeps: one folder per sweep, one per job's settings; an interrupted sweep resumes only what is missing."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

FLAKY = """name: flaky_gpt2
models:
  base:
    name: tiny-random-gpt2-0
    path: tiny-random:gpt2:0
  tuned:
    name: tiny-random-gpt2-1
    path: tiny-random:gpt2:1
pairs: [[base, tuned]]
"""
CRASHER = '''
import os
from tuneshift import Plugin


class Crasher(Plugin):
    """Crashes on the model named in $CRASH_MODEL, like a killed job (its settings do not change)."""

    name = "crasher"

    def on_model_start(self, ctx, model):
        if model.spec.name == os.environ.get("CRASH_MODEL"):
            raise RuntimeError("simulated crash")
'''


def _tuneshift(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="0", **env)
    env.pop("TUNESHIFT_SWEEP_ID", None)
    return subprocess.run([sys.executable, "-m", "tuneshift.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _results(root: Path) -> dict[str, int]:
    """Every result file and done-marker of the sweep's plugin, with its modification time (ns)."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.glob("*/residual_norm/**/*")
            if p.is_file() and not p.name.startswith(".") and p.name != "section.json"}


def test_interrupted_sweep_resumes_only_what_is_missing(tmp_path):
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    (conf / "model" / "flaky_gpt2.yaml").write_text(FLAKY)
    (tmp_path / "crasher.py").write_text(CRASHER)
    args = ["-m", "model=flaky_gpt2,tiny_random", "plugins=[residual_norm,crasher]", "data=builtin", "data.limit=2",
            f"run.root={tmp_path / 'out'}", "run.progress=false", f"hydra.searchpath=[file://{conf}]"]
    plugin_env = {"TUNESHIFT_PLUGINS": str(tmp_path / "crasher.py")}

    first = _tuneshift(args, tmp_path, CRASH_MODEL="tiny-random-gpt2-1", **plugin_env)
    assert first.returncode != 0, "the crashed job should fail the multirun"
    assert "simulated crash" in first.stderr + first.stdout
    (sweep,) = (tmp_path / "out" / "sweeps").iterdir()  # one folder for this sweep
    (flaky_dir,) = sweep.glob("flaky_gpt2-builtin-*")
    (tiny_dir,) = sweep.glob("tiny_random-builtin-*")
    assert (flaky_dir / "residual_norm" / "base" / "_DONE").is_file()
    assert not (flaky_dir / "residual_norm" / "tuned" / "_DONE").exists()
    for key in ("base", "tuned", "compare/base__tuned"):  # the other job ran to the end regardless
        assert (tiny_dir / "residual_norm" / key / "_DONE").is_file()
    assert not (sweep / "sweep_report.html").exists()  # the sweep did not end

    (tiny_dir / "residual_norm" / "tuned" / "_DONE").unlink()  # and lose one finished result
    before = _results(sweep)
    second = _tuneshift(args, tmp_path, **plugin_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert [p.name for p in (tmp_path / "out" / "sweeps").iterdir()] == [sweep.name]  # the same sweep resumed
    after = _results(sweep)
    redone = sorted(k for k in after if before.get(k) != after[k])
    assert redone == sorted([
        f"{flaky_dir.name}/residual_norm/compare/base__tuned/_DONE",
        f"{flaky_dir.name}/residual_norm/compare/base__tuned/norms.parquet",
        f"{flaky_dir.name}/residual_norm/compare/base__tuned/norms.png",
        f"{flaky_dir.name}/residual_norm/compare/base__tuned/summary.json",
        f"{flaky_dir.name}/residual_norm/tuned/_DONE",
        f"{flaky_dir.name}/residual_norm/tuned/norms.parquet",
        f"{flaky_dir.name}/residual_norm/tuned/norms.png",
        f"{tiny_dir.name}/residual_norm/tuned/_DONE",
        f"{tiny_dir.name}/residual_norm/tuned/norms.parquet",
        f"{tiny_dir.name}/residual_norm/tuned/norms.png",
    ]), f"re-run redid {redone}"
    log = second.stdout + second.stderr
    assert log.count("every plugin already done") == 2  # flaky base, tiny base
    report = (sweep / "sweep_report.html").read_text()  # written by the Hydra callback when the multirun ended
    assert "flaky_gpt2" in report and "tiny_random" in report


@pytest.mark.slow
def test_sweep_with_parallel_processes(tmp_path):
    """The joblib launcher (conf/hydra/launcher/local_parallel.yaml): each job in its own loky process."""
    out = tmp_path / "out"
    args = ["-m", "hydra/launcher=local_parallel", "model=tiny_random,tiny_random_gpt2", "plugins=[residual_norm]",
            "data=builtin", "data.limit=2", f"run.root={out}", "run.progress=false"]
    result = _tuneshift(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (out / "sweeps").iterdir()  # the jobs in their processes agree on the sweep folder
    for job in ("tiny_random-builtin", "tiny_random_gpt2-builtin"):
        (job_dir,) = sweep.glob(f"{job}-*")
        assert (job_dir / "residual_norm" / "compare" / "base__tuned" / "_DONE").is_file()
        assert (job_dir / "report.html").is_file()
    assert "Joblib" in result.stdout + result.stderr


@pytest.mark.slow
def test_sweep_through_submitit_local_executor(tmp_path):
    """submitit's local executor: the pickling and job layout of the SLURM launcher, on this machine."""
    out = tmp_path / "out"
    args = ["-m", "hydra/launcher=submitit_local", "model=tiny_random,tiny_random_gpt2", "plugins=[residual_norm]",
            "data=builtin", "data.limit=2", f"run.root={out}", "run.progress=false"]
    result = _tuneshift(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (out / "sweeps").iterdir()
    assert (sweep / ".submitit").is_dir()  # the jobs went through submitit (pickled, run in their own processes)
    for job in ("tiny_random-builtin", "tiny_random_gpt2-builtin"):
        (job_dir,) = sweep.glob(f"{job}-*")
        assert (job_dir / "residual_norm" / "compare" / "base__tuned" / "_DONE").is_file()
    assert (sweep / "sweep_report.html").is_file()


def test_the_slurm_launcher_config_composes_with_the_settings_users_change():
    from hydra import compose, initialize_config_dir

    from tuneshift.config import register_configs
    from tuneshift.paths import CONF_DIR

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu",
                                           "hydra.launcher.gpus_per_node=2", "hydra.launcher.timeout_min=60"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher.partition == "gpu" and launcher.gpus_per_node == 2 and launcher.timeout_min == 60
    assert "SlurmLauncher" in launcher._target_
