"""Atomic writes, done markers, the local logger and W&B offline (including a W&B failure)."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tuneshift import results
from tuneshift.loggers import JobInfo, build_logger
from tuneshift.results import ResultStore


def test_store_round_trips_and_marks_done(tmp_path):
    store = ResultStore(tmp_path)
    store.save_json("p", "base", "summary", {"score": np.float32(0.5), "nan": float("nan"), "arr": np.arange(2)})
    store.save_table("p", "base", "table", pd.DataFrame({"a": [1, 2], "words": [["x"], ["y", "z"]]}))
    store.save_arrays("p", "base", "arrays", {"S": np.eye(2)})
    assert store.load_json("p", "base", "summary") == {"score": 0.5, "nan": None, "arr": [0, 1]}
    assert store.load_table("p", "base", "table")["words"].map(list).tolist() == [["x"], ["y", "z"]]
    np.testing.assert_array_equal(store.load_arrays("p", "base", "arrays")["S"], np.eye(2))
    assert not store.is_done("p", "base")
    store.mark_done("p", "base", "abc")
    assert store.is_done("p", "base") and store.is_done("p", "base", "abc") and not store.is_done("p", "base", "x")


def test_a_crash_mid_write_keeps_the_previous_file(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    store.save_json("p", "m", "r", {"v": 1})

    def crash(src, dst):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(results.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        store.save_json("p", "m", "r", {"v": 2})
    monkeypatch.undo()
    assert store.load_json("p", "m", "r") == {"v": 1}
    assert [f.name for f in (tmp_path / "p" / "m").iterdir()] == ["r.json"]  # no temporary left behind


def test_summary_merges_sections(tmp_path):
    store = ResultStore(tmp_path)
    store.update_summary("a", {"x": 1})
    store.update_summary("a", {"y": 2})
    store.update_summary("b", {"z": 3})
    assert store.summary() == {"a": {"x": 1, "y": 2}, "b": {"z": 3}}


def test_wandb_offline_writes_a_run_and_local_logs(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    job = JobInfo(name="pair", group="sweep-1", run_dir=tmp_path, project="tuneshift-test", mode="offline")
    logger = build_logger("wandb", tmp_path, job)
    logger.log_metrics({"score": 0.5, "label": "not a number"}, prefix="saliency")
    logger.log_table("table", pd.DataFrame({"a": [1], "pairs": [[("x", "y")]]}))
    logger.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("run-*.wandb"))
    metrics = [json.loads(line) for line in (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[0]["saliency/score"] == 0.5


def test_a_wandb_failure_never_loses_local_results(tmp_path, monkeypatch, caplog):
    import wandb

    def broken(*args, **kwargs):
        raise RuntimeError("wandb is down")

    monkeypatch.setattr(wandb, "init", broken)
    logger = build_logger("wandb", tmp_path, JobInfo(name="x", group="g", run_dir=tmp_path))
    logger.log_metrics({"score": 1.0})
    logger.finish()
    assert "W&B logging disabled" in caplog.text
    assert "score" in (tmp_path / "logs" / "metrics.jsonl").read_text()
