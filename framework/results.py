"""The results store: every file a run writes, written atomically, with done-markers for resume.

Layout under the run's output dir::

    config.yaml                          resolved config
    summary.json                         per-plugin, per-model headline numbers and timings
    responses/<model>.jsonl              each model's own responses (reused on resume)
    <plugin>/<model>/<name>.json|.parquet|.npz
    <plugin>/<model>/_DONE               written last: the plugin finished this model
    <plugin>/compare/<base>__<tuned>/... comparisons

Every write goes to a temporary file in the same directory, then ``os.replace`` moves it in place: a
crash never leaves a half-written file, and a file that exists is complete.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tuneshift.sections import Section


_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; results are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _to_jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if hasattr(obj, "tolist") and hasattr(obj, "dim"):  # torch tensor
        return obj.tolist()
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None  # JSON has no NaN/inf
    return obj


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, json.dumps(_to_jsonable(obj), indent=2, allow_nan=False).encode())


class ResultStore:
    """Reads and writes one run's results (see the module docstring for the layout)."""

    def __init__(self, root: str | Path, create: bool = True):
        self.root = Path(root)
        if create:
            self.root.mkdir(parents=True, exist_ok=True)

    def dir(self, plugin: str, model: str) -> Path:
        """Directory of ``plugin``'s results for ``model`` (a model key, or ``compare/<base>__<tuned>``)."""
        return self.root / plugin / model

    @staticmethod
    def compare_key(base: str, tuned: str) -> str:
        return f"compare/{base}__{tuned}"

    # ---- writes -------------------------------------------------------------------------------------------
    def save_json(self, plugin: str, model: str, name: str, obj: Any) -> Path:
        path = self.dir(plugin, model) / f"{name}.json"
        atomic_write_json(path, obj)
        return path

    def save_table(self, plugin: str, model: str, name: str, table: "Any") -> Path:
        """Save a pandas DataFrame as Parquet."""
        path = self.dir(plugin, model) / f"{name}.parquet"
        buffer = io.BytesIO()
        table.to_parquet(buffer, index=False)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def save_arrays(self, plugin: str, model: str, name: str, arrays: dict[str, np.ndarray]) -> Path:
        path = self.dir(plugin, model) / f"{name}.npz"
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{k: np.asarray(v) for k, v in arrays.items()})
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def save_text(self, plugin: str, model: str, name: str, text: str) -> Path:
        """Save text (HTML views, markdown) under its own file name, e.g. ``name="view.html"``."""
        path = self.dir(plugin, model) / name
        atomic_write_bytes(path, text.encode())
        return path

    def mark_done(self, plugin: str, model: str, fingerprint: str = "") -> None:
        """Written last: ``plugin`` finished ``model`` with settings whose hash is ``fingerprint``."""
        atomic_write_bytes(self.dir(plugin, model) / "_DONE", fingerprint.encode())

    # ---- reads --------------------------------------------------------------------------------------------
    def is_done(self, plugin: str, model: str, fingerprint: str | None = None) -> bool:
        """Whether ``plugin`` finished ``model`` (with the same settings, when ``fingerprint`` is given)."""
        marker = self.dir(plugin, model) / "_DONE"
        return marker.is_file() and (fingerprint is None or marker.read_text() == fingerprint)

    def load_json(self, plugin: str, model: str, name: str) -> Any:
        return json.loads((self.dir(plugin, model) / f"{name}.json").read_text())

    def load_table(self, plugin: str, model: str, name: str) -> "Any":
        import pandas as pd

        return pd.read_parquet(self.dir(plugin, model) / f"{name}.parquet")

    def load_section(self, plugin: str, model: str) -> "Section | None":
        """The report section a plugin stored for ``model`` (None when it stored none)."""
        from tuneshift.sections import Section

        path = self.dir(plugin, model) / "section.json"
        return Section.from_dict(json.loads(path.read_text())) if path.is_file() else None

    def load_arrays(self, plugin: str, model: str, name: str) -> dict[str, np.ndarray]:
        with np.load(self.dir(plugin, model) / f"{name}.npz", allow_pickle=False) as data:
            return {k: data[k] for k in data.files}

    # ---- crash recovery -----------------------------------------------------------------------------------
    def clean_partial_writes(self) -> int:
        """Remove half-written temporary files a killed run left behind (``.<name>.*.tmp``); returns how many."""
        removed = 0
        for tmp in self.root.rglob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed += 1
        return removed

    # ---- run-level files ----------------------------------------------------------------------------------
    def update_summary(self, section: str, values: dict) -> None:
        """Merge ``values`` into ``summary.json`` under ``section`` (read-modify-write, atomic)."""
        path = self.root / "summary.json"
        summary = json.loads(path.read_text()) if path.exists() else {}
        summary.setdefault(section, {}).update(_to_jsonable(values))
        atomic_write_json(path, summary)

    def summary(self) -> dict:
        path = self.root / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}
