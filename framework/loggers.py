"""Loggers: a plain local logger (always on) and Weights & Biases (offline by default).

Plugins call ``ctx.logger.log_metrics / log_table / log_image / log_html``; a logger never raises into the
run. The local logger writes ``logs/metrics.jsonl`` and ``logs/media.jsonl`` in the run dir, so nothing
depends on W&B: a W&B failure is reported once as a warning and the run goes on with local results intact.

W&B runs are named ``<model pair>`` and grouped by ``logger.group`` (default: the pair name, or the sweep
name in a multirun), so the runs of a pair and of a sweep appear side by side. ``WANDB_MODE`` from the
environment wins; otherwise ``logger.mode`` (default ``offline``) applies. ``wandb sync <run dir>/wandb``
uploads an offline run later.
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from tuneshift.results import _to_jsonable

log = logging.getLogger("tuneshift")


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


class WandbLogger(Logger):
    """Logs to W&B; any W&B error disables it with one warning instead of failing the run."""

    def __init__(self, run_dir: str | Path, project: str, name: str, group: str | None, mode: str,
                 config: dict | None = None, tags: list[str] | None = None):
        self.run = None
        try:
            import wandb

            os.environ.setdefault("WANDB_MODE", mode)
            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb
            self.run = wandb.init(project=project, name=name, group=group, dir=str(run_dir), config=config,
                                  tags=tags or None, reinit="finish_previous")
        except Exception as err:  # noqa: BLE001  (W&B must never cost the local results)
            self._fail(err)

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
        def log() -> None:
            frame = table.copy()
            for col in frame.columns:  # W&B tables take scalars and strings
                if frame[col].dtype == object:
                    frame[col] = frame[col].map(lambda v: v if isinstance(v, (str, int, float)) else json.dumps(
                        _to_jsonable(v)))
            self.run.log({key: self.wandb.Table(dataframe=frame)})
        self._call(log)

    def log_image(self, key: str, path: str | Path) -> None:
        self._call(lambda: self.run.log({key: self.wandb.Image(str(path))}))

    def log_html(self, key: str, path: str | Path) -> None:
        self._call(lambda: self.run.log({key: self.wandb.Html(Path(path).read_text())}))

    def finish(self) -> None:
        self._call(lambda: self.run.finish())


class MultiLogger(Logger):
    """Fans every call out to several loggers."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log_metrics(self, metrics: dict[str, Any], prefix: str = "") -> None:
        for logger in self.loggers:
            logger.log_metrics(metrics, prefix)

    def log_table(self, key: str, table: Any) -> None:
        for logger in self.loggers:
            logger.log_table(key, table)

    def log_image(self, key: str, path: str | Path) -> None:
        for logger in self.loggers:
            logger.log_image(key, path)

    def log_html(self, key: str, path: str | Path) -> None:
        for logger in self.loggers:
            logger.log_html(key, path)

    def finish(self) -> None:
        for logger in self.loggers:
            logger.finish()


def build_logger(kind: str, run_dir: str | Path, project: str = "tuneshift", name: str = "run",
                 group: str | None = None, mode: str = "offline", config: dict | None = None,
                 tags: list[str] | None = None) -> Logger:
    """``local`` or ``wandb`` (which also logs locally) or ``none`` (local only)."""
    local = LocalLogger(run_dir)
    if kind in ("local", "none"):
        return local
    if kind == "wandb":
        return MultiLogger([local, WandbLogger(run_dir, project, name, group, mode, config, tags)])
    raise ValueError(f"unknown logger kind {kind!r}; use local, wandb or none")
