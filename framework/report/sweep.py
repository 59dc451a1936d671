"""The sweep report: ``sweep_report.html`` in a sweep folder (``<run.root>/sweeps/sweep-<hash>/<job>-<hash>/``).

One row per job (and pair): its models, the settings in which it differs from the other jobs (read from each
job's ``settings.json``, plus the data selection from ``config.yaml``), its status, time and a link to its own
report; then every plugin's headline findings across jobs, the differing settings in full, and a figure of the
headline numbers across jobs (``sweep_summary.png``/``.pdf``; the numbers also in ``sweep_summary.csv``).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import textwrap
from pathlib import Path
from typing import Any

from tuneshift.report.assets import MAX_EMBED_BYTES, Page, figure_item, flatten, guarded
from tuneshift.report.collect import SKIP_DIRS, RunInfo, is_run_dir, load_run, status, stored_section
from tuneshift.results import atomic_write_bytes
from tuneshift.sections import Headline, format_number, format_p

MAX_PANELS = 12  # headline series in the sweep figure


def find_runs(sweep_dir: str | Path, max_depth: int = 3) -> list[Path]:
    """Run folders under ``sweep_dir`` (each with settings.json, config.yaml or summary.json), in name order."""
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and p.name not in SKIP_DIRS
                          and not p.name.startswith(".")):
            if is_run_dir(sub):
                found.append(sub)
            elif depth < max_depth:
                walk(sub, depth + 1)

    if Path(sweep_dir).is_dir():
        walk(Path(sweep_dir), 1)
    return found


def job_settings(run: RunInfo) -> dict[str, str]:
    """A job's results-relevant settings as flat ``key: value`` strings (settings.json, the data selection)."""
    declared = run.settings.get("settings") or {}
    data = {k: v for k, v in (run.config.get("data") or {}).items()}
    flat = flatten({**declared, "data": data}) if data else flatten(declared)
    if run.settings.get("data_fingerprint"):
        flat["data.prompts_fingerprint"] = run.settings["data_fingerprint"]
    return {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in flat.items()}


def differing(settings: list[dict[str, str]]) -> list[str]:
    """Keys whose value is not the same in every job (a key missing from a job counts as different)."""
    keys: list[str] = []
    for s in settings:
        keys += [k for k in s if k not in keys]
    return [k for k in keys if len({s.get(k, "\0missing") for s in settings}) > 1] if len(settings) > 1 else []


def _cell(h: Headline) -> str:
    """A headline's numbers without its label: '0.414 -> 0.254 (p = 0.98)'."""
    num = lambda x: f"{format_number(x, h.digits)}{h.unit}"  # noqa: E731
    body = f"{num(h.base)} → {num(h.tuned)}" if h.base is not None or h.tuned is not None else num(h.value)
    return body + (f" ({format_p(h.p)})" if h.p is not None else "")


def sweep_rows(sweep_dir: str | Path) -> list[dict]:
    """One row per (job, pair) (per model for a job without pairs): identity, status, settings, findings."""
    page = Page(Path(sweep_dir))  # collects unreadable sections; the rows carry no embedded files
    rows = []
    for run_dir in find_runs(sweep_dir):
        run = load_run(run_dir)
        done = status(run)
        n_done, n_total = sum(v for s in done.values() for v in s.values()), sum(len(s) for s in done.values())
        for base, tuned in run.pairs or [(k, None) for k in run.keys]:
            key = f"compare/{base}__{tuned}" if tuned else base
            findings: dict[tuple[str, str], Headline] = {}
            titles: dict[str, str] = {}
            for plugin in run.plugins:
                if run.result_dir(plugin, key).is_dir():
                    section = stored_section(run, plugin, key, page)
                    titles[plugin] = section.title or plugin
                    findings.update({(plugin, h.label): h for h in section.headlines})
            rows.append({"job": run_dir.name, "dir": run_dir, "run": run, "base": run.model_name(base),
                         "tuned": run.model_name(tuned) if tuned else "", "findings": findings, "titles": titles,
                         "status": "done" if n_total and n_done == n_total else "partial" if n_done else "missing",
                         "done": f"{n_done}/{n_total}", "settings": job_settings(run),
                         "seconds": (run.summary.get("timing") or {}).get("seconds_total")})
    return rows


def _columns(rows: list[dict]) -> list[tuple[str, str]]:
    columns: list[tuple[str, str]] = []
    for row in rows:
        columns += [c for c in row["findings"] if c not in columns]
    return columns


def sweep_figure(rows: list[dict], out_dir: Path) -> list[Path]:
    """Small multiples: each headline across the jobs (base and tuned markers, or the value), PNG and PDF."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [c for c in _columns(rows) if any(_finite(r["findings"].get(c)) for r in rows)][:MAX_PANELS]
    if not series:
        return []
    ncols = min(3, len(series))
    nrows = math.ceil(len(series) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
    x = list(range(len(rows)))
    labels = [textwrap.shorten(r["job"], 28, placeholder="…") for r in rows]
    for ax, (plugin, label) in zip(axes.flat, series):
        got = [r["findings"].get((plugin, label)) for r in rows]
        unit = next((h.unit for h in got if h is not None and h.unit), "")
        if any(h is not None and (h.base is not None or h.tuned is not None) for h in got):
            for attr, marker, colour in (("base", "o", "#4c72b0"), ("tuned", "^", "#dd8452")):
                ax.plot(x, [_num(getattr(h, attr, None)) for h in got], marker, color=colour, ms=7, label=attr)
            for xi, h in zip(x, got):
                if h is not None:
                    ax.plot([xi, xi], [_num(h.base), _num(h.tuned)], color="#999", lw=1, zorder=0)
        else:
            ax.plot(x, [_num(getattr(h, "value", None)) for h in got], "s", color="#55a868", ms=7, label="value")
        title = next((r["titles"][plugin] for r in rows if plugin in r["titles"]), plugin)
        ax.set_title(textwrap.fill(f"{title}: {label}", 60), fontsize=8)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_xlim(-0.5, len(rows) - 0.5)
        ax.set_xlabel("sweep job")
        ax.set_ylabel(textwrap.shorten(f"{label}{f' ({unit})' if unit else ''}", 40, placeholder="…"), fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.suptitle("Headline findings across the sweep's jobs (base vs tuned)", fontsize=10)
    fig.tight_layout()
    paths = [out_dir / "sweep_summary.png", out_dir / "sweep_summary.pdf"]
    for path in paths:
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return paths


def _num(x: Any) -> float:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def _finite(h: Headline | None) -> bool:
    return h is not None and any(math.isfinite(_num(getattr(h, a))) for a in ("base", "tuned", "value"))


def _csv(rows: list[dict], keys: list[str], columns: list[tuple[str, str]], path: Path) -> None:
    import pandas as pd

    records = []
    for r in rows:
        record = {"job": r["job"], "base": r["base"], "tuned": r["tuned"], "status": r["status"],
                  "seconds": r["seconds"], **{k: r["settings"].get(k) for k in keys}}
        for plugin, label in columns:
            h = r["findings"].get((plugin, label))
            for attr in ("base", "tuned", "value", "p"):
                record[f"{plugin}: {label} [{attr}]"] = getattr(h, attr, None) if h is not None else None
        records.append(record)
    atomic_write_bytes(path, pd.DataFrame(records).to_csv(index=False).encode())


def write_sweep_report(sweep_dir: str | Path, refresh_runs: bool = True, logger: Any = None) -> Path:
    """Write ``sweep_report.html`` (and ``sweep_summary.{png,pdf,csv}``) into ``sweep_dir``; returns its path.

    ``refresh_runs``: (re)write each job's ``report.html`` first, so every link of the table works (also for a
    job that failed before its report was written).
    """
    from tuneshift.report.run_report import log_report, publish, render, write_report

    sweep_dir = Path(sweep_dir)
    page = Page(sweep_dir, budget=MAX_EMBED_BYTES)
    runs = find_runs(sweep_dir)
    for run_dir in runs if refresh_runs else []:
        guarded(page, f"{run_dir.name}/report.html", lambda d: {"path": write_report(d)}, run_dir)
    rows = sweep_rows(sweep_dir)
    keys = differing([r["settings"] for r in rows])
    columns = _columns(rows)
    if rows:
        _csv(rows, keys, columns, sweep_dir / "sweep_summary.csv")
    try:
        pngs = [p for p in sweep_figure(rows, sweep_dir) if p.suffix == ".png"]
    except Exception as err:  # noqa: BLE001
        pngs = []
        page.fail("sweep_summary.png", err)
    figures = [guarded(page, p.name, figure_item, page, p, "Each headline finding across the sweep's jobs "
                       "(circles: base, triangles: tuned)", "sweep") for p in pngs]
    for sid, title in (("sweep-jobs", "Jobs"), ("sweep-findings", "Findings across jobs"),
                       ("sweep-settings", "Settings that differ"), ("sweep-figures", "Figures")):
        page.anchor(sid, title, 2)
    table = [{"job": r["job"], "href": page.link(r["dir"] / "report.html"), "base": r["base"],
              "tuned": r["tuned"], "status": r["status"], "done": r["done"],
              "seconds": format_number(r["seconds"], 3) if r["seconds"] is not None else "",
              "settings": [(k, r["settings"].get(k, "(not set)")) for k in keys],
              "findings": [_cell(r["findings"][c]) if c in r["findings"] else "" for c in columns]} for r in rows]
    titles = {p: t for r in rows for p, t in r["titles"].items()}
    multirun = sweep_dir / "multirun.yaml"
    text = render("sweep.html.j2", title=f"tuneshift sweep: {sweep_dir.name}", page=page, rows=table, keys=keys,
                  columns=[(titles.get(p, p), label) for p, label in columns], figures=figures,
                  multirun=multirun.read_text() if multirun.is_file() else "",
                  generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                  subtitle=f"{len(runs)} job(s), {len(rows)} row(s) · {sweep_dir}")
    out = publish(sweep_dir / "sweep_report.html", text)
    if logger is not None:
        log_report(sweep_dir, logger, out)
    return out


__all__ = ["differing", "find_runs", "job_settings", "sweep_figure", "sweep_rows", "write_sweep_report"]
