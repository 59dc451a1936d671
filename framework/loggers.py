"""Loggers: a plain local logger (always on) and Weights & Biases (offline by default).

Plugins call ``ctx.logger.log_metrics / log_table / log_image / log_html``; the runner adds the headline
findings with ``log_summary``. A logger never raises into the run. The local logger writes
``logs/metrics.jsonl``, ``logs/media.jsonl`` and ``logs/summary.json`` in the run folder, so nothing depends
on W&B: a W&B failure is reported once as a warning and the run goes on with local results intact.

W&B: one run per job, named after the job (``<experiment>-<settings hash>``), grouped per sweep in a multirun
and per model pair otherwise, with the headline numbers in ``run.summary``. Its id is derived from the run
folder, so a resumed job continues its W&B run instead of starting an empty one. ``WANDB_MODE`` from the
environment wins over ``logger.mode`` (default ``offline``); an online start that does not answer within
``logger.init_timeout`` seconds falls back to offline with a one-line warning. ``wandb sync <run>/wandb``
uploads an offline run later.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneshift.registry import Registry
from tuneshift.results import _to_jsonable, atomic_write_json

log = logging.getLogger("tuneshift")


@dataclass
class JobInfo:
    """Who a logger logs for: the job's name, its group (sweep or pair), a stable id, the resolved config."""

    name: str
    group: str
    run_dir: Path
    config: dict = field(default_factory=dict)
    project: str = "tuneshift"
    mode: str = "offline"
    tags: list[str] = field(default_factory=list)
    init_timeout: float = 20.0

    @property
    def run_id(self) -> str:
        """Stable per run folder: a resumed job logs into the same W&B run."""
        return hashlib.sha1(str(Path(self.run_dir).resolve()).encode()).hexdigest()[:16]


class Logger:
    """Interface and no-op base."""

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        """Scalars (numbers) under ``prefix/`` names."""

    def log_table(self, key: str, table: Any) -> None:
        """A pandas DataFrame."""

    def log_image(self, key: str, path: str | Path) -> None:
        """A PNG file."""

    def log_html(self, key: str, path: str | Path) -> None:
        """An HTML file."""

    def log_summary(self, values: dict[str, float]) -> None:
        """Headline numbers of the whole job (W&B ``run.summary``)."""

    def finish(self) -> None:
        """Flush and close."""


class LocalLogger(Logger):
    """Appends JSON lines under ``<run dir>/logs``; tables and media stay where plugins wrote them."""

    def __init__(self, run_dir: str | Path):
        self.dir = Path(run_dir) / "logs"
        self.dir.mkdir(parents=True, exist_ok=True)

    def _append(self, name: str, record: dict) -> None:
        with open(self.dir / name, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(_to_jsonable({"time": time.time(), **record})) + "\n")

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        self._append("metrics.jsonl", {f"{prefix}/{k}" if prefix else k: v for k, v in metrics.items()})

    def log_table(self, key: str, table: Any) -> None:
        self._append("media.jsonl", {"kind": "table", "key": key, "rows": len(table), "columns": list(table.columns)})

    def log_image(self, key: str, path: str | Path) -> None:
        self._append("media.jsonl", {"kind": "image", "key": key, "path": str(path)})

    def log_html(self, key: str, path: str | Path) -> None:
        self._append("media.jsonl", {"kind": "html", "key": key, "path": str(path)})

    def log_summary(self, values: dict[str, float]) -> None:
        atomic_write_json(self.dir / "summary.json", values)


class WandbLogger(Logger):
    """Logs to W&B; any W&B error disables it with one warning instead of failing the run."""

    def __init__(self, job: JobInfo):
        self.run = None
        try:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb
            mode = os.environ.get("WANDB_MODE", job.mode)
            try:
                self.run = self._init(job, mode)
            except Exception as err:  # noqa: BLE001 -- no network, a bad key, a timeout: go offline
                if mode == "offline":
                    raise
                log.warning("W&B could not start online (%s); logging offline instead (wandb sync %s/wandb "
                            "uploads it later)", str(err).splitlines()[0][:200], job.run_dir)
                self.wandb.teardown()  # the failed start still holds the run id in W&B's service process
                self.run = self._init(job, "offline")
        except Exception as err:  # noqa: BLE001  (W&B must never cost the local results)
            self._fail(err)

    def _init(self, job: JobInfo, mode: str):
        settings = self.wandb.Settings(init_timeout=job.init_timeout, silent=True)
        return self.wandb.init(project=job.project, name=job.name, group=job.group, id=job.run_id, resume="allow",
                               dir=str(job.run_dir), config=job.config, tags=job.tags or None, mode=mode,
                               settings=settings, reinit="finish_previous")

    def _fail(self, err: Exception) -> None:
        log.warning("W&B logging disabled (%s: %s); local results are unaffected", type(err).__name__, err)
        self.run = None

    def _call(self, fn, *args) -> None:
        if self.run is None:
            return
        try:
            fn(*args)
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        scalars = {f"{prefix}/{k}" if prefix else k: v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._call(lambda: self.run.log(scalars))

    def log_table(self, key: str, table: Any) -> None:
        def log_it() -> None:
            frame = table.copy()
            for col in frame.columns:  # W&B tables take scalars and strings
                if frame[col].dtype == object:
                    frame[col] = frame[col].map(lambda v: v if isinstance(v, (str, int, float)) else json.dumps(
                        _to_jsonable(v)))
            self.run.log({key: self.wandb.Table(dataframe=frame)})
        self._call(log_it)

    def log_image(self, key: str, path: str | Path) -> None:
        self._call(lambda: self.run.log({key: self.wandb.Image(str(path))}))

    def log_html(self, key: str, path: str | Path) -> None:
        self._call(lambda: self.run.log({key: self.wandb.Html(Path(path).read_text())}))

    def log_summary(self, values: dict[str, float]) -> None:
        self._call(lambda: self.run.summary.update(values))

    def finish(self) -> None:
        self._call(lambda: self.run.finish())


class MultiLogger(Logger):
    """Fans every call out to several loggers."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def _each(self, method: str, *args: Any) -> None:
        for logger in self.loggers:
            getattr(logger, method)(*args)

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        self._each("log_metrics", metrics, prefix)

    def log_table(self, key: str, table: Any) -> None:
        self._each("log_table", key, table)

    def log_image(self, key: str, path: str | Path) -> None:
        self._each("log_image", key, path)

    def log_html(self, key: str, path: str | Path) -> None:
        self._each("log_html", key, path)

    def log_summary(self, values: dict[str, float]) -> None:
        self._each("log_summary", values)

    def finish(self) -> None:
        self._each("finish")


LOGGERS: Registry = Registry("logger", group="tuneshift.loggers",
                             how_to_add="Register a factory (run_dir, job) -> Logger in tuneshift.loggers.LOGGERS.")
LOGGERS.register("local", lambda run_dir, job: LocalLogger(run_dir))
LOGGERS.register("none", lambda run_dir, job: LocalLogger(run_dir))
LOGGERS.register("wandb", lambda run_dir, job: MultiLogger([LocalLogger(run_dir), WandbLogger(job)]))


def build_logger(kind: str, run_dir: str | Path, job: JobInfo | None = None) -> Logger:
    """``local`` or ``wandb`` (which also logs locally) or ``none`` (local only), or a registered one."""
    job = job or JobInfo(name=Path(run_dir).name, group=Path(run_dir).name, run_dir=Path(run_dir))
    return LOGGERS.get(kind)(Path(run_dir), job)


__all__ = ["JobInfo", "LOGGERS", "LocalLogger", "Logger", "MultiLogger", "WandbLogger", "build_logger"]
