"""Fingerprints: short hashes of the settings that change results, so resume never reuses stale work.

What it is for
    * ``settings_dict(obj)``: a dataclass (or config node) as plain data without the fields that only change
      speed or presentation (marked ``field(metadata={"affects_results": False})``, e.g. batch sizes, progress
      bars, devices). Two runs whose settings dicts are equal compute the same numbers.
    * ``fingerprint(*parts)``: a 16-hex-digit hash of JSON-able parts (sorted keys).
    * ``prompts_fingerprint(prompts)``: the prompts *as loaded* (ids, texts, instruction spans, splits), so an
      edited data file is noticed even when its path and row count are unchanged.
    * ``config_hash(cfg)``: the short hash in a run folder's name (``<experiment>-<hash>``): the model specs and
      pairs, the data selection and content, generation, the plugins and their results-relevant options.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf

NEUTRAL = {"affects_results": False}  # metadata of fields that do not change results


def neutral(default: Any = dataclasses.MISSING, **kwargs: Any) -> Any:
    """``dataclasses.field`` for a setting that changes speed or presentation only (left out of fingerprints)."""
    return dataclasses.field(default=default, metadata=NEUTRAL, **kwargs)


def _neutral_fields(kind: Any) -> set[str]:
    if kind is None or not dataclasses.is_dataclass(kind):
        return set()
    return {f.name for f in dataclasses.fields(kind) if not f.metadata.get("affects_results", True)}


def settings_dict(obj: Any) -> Any:
    """Plain data of ``obj`` (dataclass, DictConfig, dict, list, scalar) without results-neutral fields."""
    if isinstance(obj, (DictConfig, ListConfig)):
        if obj._is_none():
            return None
        if isinstance(obj, ListConfig):
            return [_config_value(obj, i) for i in range(len(obj))]
        drop = _neutral_fields(OmegaConf.get_type(obj))
        return {str(k): _config_value(obj, k) for k in obj.keys() if k not in drop}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        drop = _neutral_fields(type(obj))
        return {f.name: settings_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name not in drop}
    if isinstance(obj, dict):
        return {str(k): settings_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [settings_dict(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _config_value(parent: DictConfig | ListConfig, key: Any) -> Any:
    node = parent._get_node(key)
    if isinstance(node, (DictConfig, ListConfig)):
        return settings_dict(node)
    return parent[key]  # a value, interpolations resolved


def fingerprint(*parts: Any, length: int = 16) -> str:
    blob = json.dumps([settings_dict(p) for p in parts], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:length]


def prompts_fingerprint(prompts: Iterable[Any]) -> str:
    """Hash of the prompts as loaded: id, text, instruction spans, split and reference of each, in order."""
    digest = hashlib.sha1()
    for p in prompts:
        record = [p.id, p.text, [list(s) for s in p.instruction_spans], p.split, getattr(p, "reference", None)]
        digest.update(json.dumps(record, default=str).encode())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def file_fingerprint(path: str | Path | None) -> str:
    """Hash of a file's bytes ('' when there is none, 'missing' when the path does not exist)."""
    if path is None:
        return ""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        return "missing"
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


__all__ = ["NEUTRAL", "file_fingerprint", "fingerprint", "neutral", "prompts_fingerprint", "settings_dict"]
