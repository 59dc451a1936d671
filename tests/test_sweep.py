"""Sweeps: ``tuneshift -m`` over model pairs, an interrupted sweep, and a re-run that redoes only what is missing.

The sweep runs two jobs of tiny random pairs with the cheap example plugin. The first job's pair has a tuned
model that cannot load (a broken config, as an out-of-memory kill or a wrong path would leave it): its base
model finishes, its tuned model and comparison do not, and the multirun fails; the other job completes. Then
the config is fixed, one ``_DONE`` marker of the complete job is deleted (as if that result were lost), and the
same command runs again: exactly the missing results are computed, every other file is left untouched
(same modification time), and the sweep report is written at the end (Hydra callback).
"""
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
    path: {tuned}
pairs: [[base, tuned]]
"""


def _tuneshift(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    return subprocess.run([sys.executable, "-m", "tuneshift.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _results(root: Path) -> dict[str, int]:
    """Every result file and done-marker of the sweep's plugin, with its modification time (ns)."""
    return {p.relative_to(root).as_posix(): p.stat().st_mtime_ns for p in root.glob("*/residual_norm/**/*")
            if p.is_file() and not p.name.startswith(".")}


def _sweep_args(tmp_path: Path, conf: Path, *extra: str) -> list[str]:
    return ["-m", "model=flaky_gpt2,tiny_random", "plugins=[residual_norm]", "data=builtin", "data.limit=2",
            f"run.root={tmp_path / 'out'}", "run.progress=false", f"hydra.searchpath=[file://{conf}]",
            *extra]  # conf/config.yaml registers the sweep-report callback


def test_interrupted_sweep_resumes_only_what_is_missing(tmp_path):
    conf = tmp_path / "conf"
    (conf / "model").mkdir(parents=True)
    flaky = conf / "model" / "flaky_gpt2.yaml"
    flaky.write_text(FLAKY.format(tuned="tiny-random:nosuchfamily:1"))
    sweeps = tmp_path / "out" / "sweeps"

    first = _tuneshift(_sweep_args(tmp_path, conf), tmp_path)
    assert first.returncode != 0, "the broken job should fail the multirun"
    assert "nosuchfamily" in first.stderr + first.stdout
    flaky_dir, tiny_dir = sweeps / "flaky_gpt2-builtin", sweeps / "tiny_random-builtin"
    # deterministic job dirs: <run.root>/sweeps/<run.name>
    assert (flaky_dir / "residual_norm" / "base" / "_DONE").is_file()
    assert not (flaky_dir / "residual_norm" / "tuned" / "_DONE").exists()
    assert not (flaky_dir / "residual_norm" / "compare" / "base__tuned" / "_DONE").exists()
    for key in ("base", "tuned", "compare/base__tuned"):  # the other job ran to the end regardless
        assert (tiny_dir / "residual_norm" / key / "_DONE").is_file()
    assert not (sweeps / "sweep_report.html").exists()  # the sweep did not end

    flaky.write_text(FLAKY.format(tuned="tiny-random:gpt2:1"))  # fix the config
    (tiny_dir / "residual_norm" / "tuned" / "_DONE").unlink()  # and lose one finished result
    before = _results(sweeps)

    second = _tuneshift(_sweep_args(tmp_path, conf), tmp_path)
    assert second.returncode == 0, second.stderr[-3000:]
    after = _results(sweeps)
    redone = sorted(k for k in after if before.get(k) != after[k])
    assert redone == sorted([
        "flaky_gpt2-builtin/residual_norm/compare/base__tuned/_DONE",
        "flaky_gpt2-builtin/residual_norm/compare/base__tuned/norms.parquet",
        "flaky_gpt2-builtin/residual_norm/compare/base__tuned/summary.json",
        "flaky_gpt2-builtin/residual_norm/tuned/_DONE",
        "flaky_gpt2-builtin/residual_norm/tuned/norms.parquet",
        "tiny_random-builtin/residual_norm/tuned/_DONE",
        "tiny_random-builtin/residual_norm/tuned/norms.parquet",
    ]), f"re-run redid {redone}"
    log = second.stdout + second.stderr
    assert log.count("every plugin already done, skipped") == 2  # flaky base, tiny base
    # the sweep report, written by the Hydra callback when the multirun ended
    report = (sweeps / "sweep_report.html").read_text()
    assert "flaky_gpt2" in report and "tiny_random" in report and report.count("done 3/3") == 2


@pytest.mark.slow
def test_sweep_with_parallel_processes(tmp_path):
    """The joblib launcher (conf/hydra/launcher/local_parallel.yaml): each job in its own loky process."""
    out = tmp_path / "out"
    args = ["-m", "hydra/launcher=local_parallel", "model=tiny_random,tiny_random_gpt2", "plugins=[residual_norm]",
            "data=builtin", "data.limit=2", f"run.root={out}", "run.progress=false"]
    result = _tuneshift(args, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    for job in ("tiny_random-builtin", "tiny_random_gpt2-builtin"):
        assert (out / "sweeps" / job / "residual_norm" / "compare" / "base__tuned" / "_DONE").is_file()
        assert (out / "sweeps" / job / "report.html").is_file()
    assert "Joblib" in result.stdout + result.stderr
