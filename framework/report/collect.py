"""A run folder read back for the report: its models, pairs, plugins and each plugin's stored sections.

Nothing here knows a plugin by name. A plugin's results live in ``<run>/<plugin>/<key>/`` (``key``: a model key
or ``compare/<base>__<tuned>``) with a ``_DONE`` marker; what to show is the plugin's own
:class:`tuneshift.sections.Section`, stored there as ``section.json`` by the runner. A folder without one (an
older run, a tool that writes results by itself) falls back to :func:`tuneshift.sections.files_section`: its
figures, tables and views captioned by file name, numbered views (``view_layer0..31``) under one selector.
"""
from __future__ import annotations

import glob
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tuneshift.report.assets import (Page, figure_item, file_link, guarded, natural_key, table_item,
                                     view_item)
from tuneshift.sections import Section, Table, View, files_section

SKIP_DIRS = {"logs", "responses", "wandb", ".hydra", "figures", "__pycache__"}
HIDDEN_FILES = {"section.json", "_DONE"}


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _load_config(run_dir: Path) -> dict:
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    try:
        import yaml

        return yaml.safe_load(path.read_text()) or {}
    except Exception:  # noqa: BLE001 -- a broken config.yaml leaves the rest of the report intact
        return {}


@dataclass
class RunInfo:
    """What the report knows about one run folder."""

    dir: Path
    config: dict                      # config.yaml (the resolved config), {} when absent
    settings: dict                    # settings.json: {"hash", "settings", "data_fingerprint"}
    summary: dict                     # summary.json
    plugins: list[str]                # result folders, in the configured order
    models: dict[str, dict]           # key -> model spec
    pairs: list[tuple[str, str]]
    keys: list[str] = field(default_factory=list)  # model keys, in run order

    @property
    def name(self) -> str:
        return str((self.config.get("run") or {}).get("name") or self.dir.name)

    def model_name(self, key: str) -> str:
        return str(self.models.get(key, {}).get("name") or (self.summary.get("models") or {}).get(key, {})
                   .get("name") or key)

    def result_dir(self, plugin: str, key: str) -> Path:
        return self.dir / plugin / key

    def done(self, plugin: str, key: str) -> bool:
        return (self.dir / plugin / key / "_DONE").is_file()


def is_run_dir(path: Path) -> bool:
    return any((Path(path) / name).is_file() for name in ("settings.json", "config.yaml", "summary.json"))


def load_run(run_dir: str | Path) -> RunInfo:
    run_dir = Path(run_dir)
    config = _load_config(run_dir)
    settings = read_json(run_dir / "settings.json") or {}
    summary = read_json(run_dir / "summary.json") or {}
    declared = settings.get("settings") or {}  # in run order (config.yaml is written with sorted keys)
    model_cfg = config.get("model") or {}
    models = dict(declared.get("models") or model_cfg.get("models") or {})
    for key, spec in (model_cfg.get("models") or {}).items():  # names and paths as the user wrote them
        models[key] = {**models.get(key, {}), **spec}
    pairs = [tuple(p) for p in (declared.get("pairs") or model_cfg.get("pairs") or []) if len(p) == 2]
    found = [d.name for d in sorted(run_dir.iterdir()) if d.is_dir() and d.name not in SKIP_DIRS
             and not d.name.startswith(".") and any(d.rglob("_DONE"))] if run_dir.is_dir() else []
    for plugin in found:  # pairs on disk (a folder without its config still shows its comparisons)
        compare = run_dir / plugin / "compare"
        for c in sorted(compare.iterdir()) if compare.is_dir() else []:
            pair = tuple(c.name.split("__", 1))
            if len(pair) == 2 and pair not in pairs:
                pairs.append(pair)
    configured = list((declared.get("plugins") or config.get("plugins") or {}).keys())
    plugins = [p for p in configured if p in found] + [p for p in found if p not in configured]
    keys = list(models)
    for plugin in plugins:
        keys += [d.name for d in sorted((run_dir / plugin).iterdir())
                 if d.is_dir() and d.name != "compare" and d.name not in keys]
    return RunInfo(run_dir, config, settings, summary, plugins, models, pairs, keys)


def status(run: RunInfo) -> dict[str, dict[str, bool]]:
    """``{plugin: {model or compare key: done}}`` for every configured plugin (or result folder found)."""
    declared = (run.settings.get("settings") or {}).get("plugins") or run.config.get("plugins") or {}
    plugins = list(declared) or run.plugins
    keys = list(run.models) or run.keys
    return {p: {**{k: run.done(p, k) for k in keys},
                **{f"compare/{b}__{t}": run.done(p, f"compare/{b}__{t}") for b, t in run.pairs}} for p in plugins}


# ---- sections ------------------------------------------------------------------------------------------------
def _grouped_views(section: Section) -> Section:
    """Numbered views (``view_layer0.html`` ... ``view_layer31.html``, captions alike but for the number) as
    one view with a selector."""
    groups: dict[tuple[str, str], list[View]] = {}
    for view in section.views:
        groups.setdefault((re.sub(r"\d+", "*", view.path), re.sub(r"\d+", "", view.caption)), []).append(view)
    section.views = [View(pattern, re.sub(r"\s*\d+$", "", members[0].caption)) if len(members) > 1 else members[0]
                     for (pattern, _), members in groups.items()]
    return section


def stored_section(run: RunInfo, plugin: str, key: str, page: Page) -> Section:
    """The plugin's stored section of ``key``, or the files fallback (also when section.json is broken)."""
    directory = run.result_dir(plugin, key)
    path = directory / "section.json"
    if path.is_file():
        try:
            return _grouped_views(Section.from_dict(json.loads(path.read_text())))
        except Exception as err:  # noqa: BLE001
            page.fail(f"{plugin}/{key}/section.json", err)
    section = _grouped_views(files_section(directory, plugin))
    if (directory / "summary.json").is_file():
        section.tables.insert(0, Table("summary.json", "Summary numbers (summary.json)"))
    return section


def _expand(directory: Path, pattern: str) -> list[Path]:
    """The files ``pattern`` (relative to ``directory``, ``*`` allowed) names, in natural order."""
    if glob.has_magic(pattern):
        return sorted((p for p in directory.glob(pattern) if p.is_file()), key=natural_key)
    path = directory / pattern
    return [path] if path.is_file() else []


def _missing(page: Page, where: str, pattern: str) -> dict:
    return page.fail(f"{where}/{pattern}", "the section names this file but it does not exist")


def render_section(run: RunInfo, plugin: str, key: str, page: Page, names: tuple[str, str] = ("base", "tuned"),
                   section: Section | None = None) -> dict:
    """A stored section as the dict the templates render: headlines as finding text, files as page items."""
    directory = run.result_dir(plugin, key)
    where = f"{plugin}/{key}"
    section = section or stored_section(run, plugin, key, page)
    out: dict[str, Any] = {"title": section.title or plugin, "explanation": section.explanation,
                           "notes": list(section.notes), "plugin": plugin, "key": key,
                           "headlines": [], "figures": [], "tables": [], "views": [], "others": []}
    for headline in section.headlines:
        try:
            out["headlines"].append({"text": headline.text(*names),
                                     "strong": headline.p is not None and headline.p < 0.05})
        except Exception as err:  # noqa: BLE001
            out["headlines"].append(page.fail(f"{where}: headline {getattr(headline, 'label', '?')!r}", err))
    used: set[Path] = set()
    for fig in section.figures:
        paths = _expand(directory, fig.path)
        used.update(paths)
        out["figures"] += [guarded(page, f"{where}/{p.name}", figure_item, page, p,
                                   fig.caption if len(paths) == 1 else f"{fig.caption} ({p.stem})", where)
                           for p in paths] or [_missing(page, where, fig.path)]
    for tab in section.tables:
        paths = _expand(directory, tab.path)
        used.update(paths)
        out["tables"] += [guarded(page, f"{where}/{p.name}", table_item, page, p, tab.caption, tab.columns,
                                  tab.max_rows) for p in paths] or [_missing(page, where, tab.path)]
    for view in section.views:
        paths = _expand(directory, view.path)
        used.update(paths)
        out["views"].append(guarded(page, f"{where}/{view.path}", view_item, page, paths, view.caption)
                            if paths else _missing(page, where, view.path))
    if directory.is_dir():
        out["others"] = [file_link(page, p) for p in sorted(directory.iterdir(), key=natural_key)
                         if p.is_file() and p not in used and p.name not in HIDDEN_FILES
                         and not p.name.startswith(".")]
    return out


__all__ = ["RunInfo", "SKIP_DIRS", "is_run_dir", "load_run", "read_json", "render_section", "status",
           "stored_section"]
