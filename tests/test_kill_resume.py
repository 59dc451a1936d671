"""``kill -9`` at several phases of a run, then a resume: the results equal an uninterrupted run's.

Each killed run is a real ``tuneshift`` process (forked by ``tests/cli_harness.py`` from one process that
imported everything once) that sends itself SIGKILL at a chosen atomic write: halfway through writing the
temporary file (a kill inside a write) or right after the file is in place (a kill between two steps). The
same command then resumes in the same folder. The resumed folder must hold exactly the files of an
uninterrupted run, equal apart from timings, and no half-written temporary file. One more run is killed
from outside (``SIGKILL`` from this test) while it works on the first model.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

HARNESS = Path(__file__).with_name("cli_harness.py")
ARGS = ["model=tiny_random", "data=builtin", "plugins=[saliency,residual_norm]", "data.limit=3",
        "generation.max_new_tokens=4", "run.progress=false"]
# (name, file whose atomic write is interrupted, occurrence, mid: inside the write | after: once it is in place)
PHASES = [
    ("claim", "settings.json", 1, "mid"),                                    # the run folder being claimed
    ("base_responses", "responses/base.jsonl", 1, "mid"),                    # generation of the first model done
    ("base_results", "saliency/base/matrices.npz", 1, "mid"),                # a plugin's results half written
    ("base_marker", "saliency/base/_DONE", 1, "mid"),                        # results written, not marked done
    ("between_models", "summary.json", 1, "after"),                          # first model done, second not begun
    ("tuned_responses", "responses/tuned.jsonl", 1, "after"),                # second model's responses cached
    ("compare", "saliency/compare/base__tuned/welch_tests.parquet", 1, "mid"),  # inside a comparison
    ("report", "report.html", 1, "mid"),                                     # every result done, report half written
]
FAST = {"base_results", "between_models", "compare"}  # in the default suite; the rest with -m slow
SKIP = ("logs/", "cli.log", "report.html", "wandb/")  # logs and the report page carry timestamps


def _harness(cases: list[dict], tmp: Path) -> dict[str, dict]:
    (tmp / "cases.json").write_text(json.dumps(cases))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "TUNESHIFT_CACHE": str(tmp / "cache")}
    env.pop("HYDRA_FULL_ERROR", None)
    subprocess.run([sys.executable, str(HARNESS), str(tmp / "cases.json"), str(tmp / "results.json")], env=env,
                   check=True, timeout=1500, cwd=tmp)
    return {r["id"]: r for r in json.loads((tmp / "results.json").read_text())}


def _without_timings(obj):
    if isinstance(obj, dict):
        return {k: _without_timings(v) for k, v in obj.items() if "seconds" not in k and k != "timing"}
    if isinstance(obj, list):
        return [_without_timings(v) for v in obj]
    return obj


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()
            and not str(p.relative_to(folder)).startswith(SKIP)}


def assert_same_results(clean: Path, resumed: Path) -> None:
    """Every result file of ``clean`` is in ``resumed`` with equal content (timings aside), and nothing else."""
    assert not [p for p in resumed.rglob("*.tmp")], "half-written temporary files left behind"
    assert _files(resumed) == _files(clean)
    for name in sorted(_files(clean)):
        a, b = clean / name, resumed / name
        if name.endswith(".json"):
            assert _without_timings(json.loads(a.read_text())) == _without_timings(json.loads(b.read_text())), name
        elif name.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b), obj=name)
        elif name.endswith(".npz"):
            with np.load(a) as x, np.load(b) as y:
                assert sorted(x.files) == sorted(y.files), name
                for key in x.files:
                    np.testing.assert_array_equal(x[key], y[key], err_msg=f"{name}:{key}")
        else:
            assert a.read_bytes() == b.read_bytes(), name


def _run_kills(tmp: Path, phases: list[tuple]) -> dict[str, dict]:
    cases = [{"id": "clean", "script": "tuneshift", "args": ARGS + [f"hydra.run.dir={tmp}/clean"], "cwd": str(tmp)}]
    for name, path, nth, when in phases:
        folder = f"hydra.run.dir={tmp}/{name}"
        cases.append({"id": f"{name}:kill", "script": "tuneshift", "args": ARGS + [folder], "cwd": str(tmp),
                      "kill": {"path": path, "nth": nth, "when": when}})
        cases.append({"id": f"{name}:resume", "script": "tuneshift", "args": ARGS + [folder], "cwd": str(tmp),
                      "after": f"{name}:kill"})
    return _harness(cases, tmp)


def _check(results: dict, tmp: Path, phases: list[tuple]) -> None:
    assert results["clean"]["code"] == 0, results["clean"]["stderr"][-3000:]
    for name, *_ in phases:
        killed, resumed = results[f"{name}:kill"], results[f"{name}:resume"]
        assert killed["code"] == -signal.SIGKILL, f"{name}: not killed ({killed['code']}) {killed['stderr'][-2000:]}"
        assert resumed["code"] == 0, f"{name}: resume failed\n{resumed['stderr'][-3000:]}"
        assert_same_results(tmp / "clean", tmp / name)


def test_kill_at_three_phases_then_resume(tmp_path):
    phases = [p for p in PHASES if p[0] in FAST]
    _check(_run_kills(tmp_path, phases), tmp_path, phases)


@pytest.mark.slow
def test_kill_at_every_phase_then_resume(tmp_path):
    phases = [p for p in PHASES if p[0] not in FAST]
    _check(_run_kills(tmp_path, phases), tmp_path, phases)


@pytest.mark.slow
def test_kill_from_outside_while_the_first_model_runs(tmp_path):
    """A real ``kill -9`` of the console script once the first model's responses are on disk."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TUNESHIFT_CACHE": str(tmp_path / "cache")}
    command = [str(Path(sys.executable).parent / "tuneshift"), *ARGS]
    clean = subprocess.run(command + [f"hydra.run.dir={tmp_path}/clean"], env=env, cwd=tmp_path, timeout=600,
                           capture_output=True, text=True)
    assert clean.returncode == 0, clean.stderr[-3000:]
    folder = tmp_path / "killed"
    proc = subprocess.Popen(command + [f"hydra.run.dir={folder}"], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while not (folder / "responses" / "base.jsonl").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (folder / "saliency" / "tuned" / "_DONE").exists()  # killed mid-run, not after it
    resumed = subprocess.run(command + [f"hydra.run.dir={folder}"], env=env, cwd=tmp_path, timeout=600,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_results(tmp_path / "clean", folder)
