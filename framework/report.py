"""The comparison report: one self-contained HTML page per run, and one per sweep (no network needed to open).

Run report (``write_report(run_dir)``, called by the runner at the end of each run)
    For each (base, tuned) pair: an overview with the analyses side by side (headline numbers and the key plot
    of each), then one section per analysis: the comparison's plots, tests and tables, its HTML views
    (embedded: ``<iframe srcdoc>``, with a selector when there are many, e.g. one page per layer), and each
    model's own results beside each other. Models outside any pair get a section each. Then example responses,
    the precision check (``tuneshift.plugins.saliency.precision``) when present, the timings and the resolved config.

    It is generic over plugins: every ``<run_dir>/<plugin>/<model>/`` (and ``<plugin>/compare/<b>__<t>/``)
    holding a ``_DONE`` marker is shown from its files: ``*.png`` (embedded as base64), ``*.html`` (embedded
    views), ``*.json`` (key/value tables, lists of records as tables), ``*.parquet`` (previews, with the whole
    table as an embedded CSV download when small). The paper's three analyses (``saliency``,
    ``head_relations``, ``ffn_concepts``) get dedicated titles, an explanation, and their plots and tables in a
    meaningful order with captions (:data:`ANALYSES`); files not named there are still shown, after them.

Sweep report (``write_sweep_report(sweep_dir)``)
    A table across model families (one row per job and pair): models, dtype, status (which results are done),
    the headline numbers of each analysis, and a link to each job's own report; plus a figure of the same
    numbers across families (``sweep_summary.png`` and, for papers, ``sweep_summary.pdf``).

Static images: every plot the plugins wrote is a PNG already (and logged to W&B by the plugins);
``export_figures(run_dir)`` copies them into ``<run_dir>/figures/`` under flat descriptive names with an
index of captions, for papers. ``log_report(run_dir, logger)`` logs the report and figures to a logger.

Command line (console script ``tuneshift-report`` = :func:`main`)::

    tuneshift-report outputs/tiny_random-builtin          # a run dir: its report.html
    tuneshift-report outputs/sweeps                       # a sweep dir: sweep_report.html (+ each job's report)
    tuneshift-report outputs/tiny_random-builtin --figures   # also export figures/
"""
from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import json
import logging
import math
import os
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tuneshift.results import atomic_write_bytes, atomic_write_json

log = logging.getLogger("tuneshift")

SKIP_DIRS = {"logs", "responses", "wandb", ".hydra", "figures", "__pycache__"}
MAX_TABLE_ROWS = 25  # preview rows of a parquet table
MAX_CSV_BYTES = 2_000_000  # tables up to this size (as CSV) are embedded whole as a download link
MAX_EMBED_BYTES = 96_000_000  # total budget of embedded images and views; beyond it files are linked
MAX_JSON_CHARS = 60_000  # bigger JSON files are shown collapsed and truncated


# ---- what the paper's analyses are called and which of their files matter most ---------------------------------
@dataclass(frozen=True)
class Analysis:
    """How the report presents one plugin's results (every pattern is a wildcard, ``*`` only, on the file's stem)."""

    title: str
    blurb: str
    figures: tuple[tuple[str, str], ...] = ()  # (pattern, caption), in display order; the first is the key plot
    tables: tuple[tuple[str, str], ...] = ()  # (pattern, caption) for parquet tables
    views: tuple[tuple[str, str], ...] = ()  # (pattern, caption) for HTML views
    headline: tuple[str, ...] = ()  # patterns over flattened summary.json keys shown in overviews and sweeps
    hidden_tables: tuple[str, ...] = ()  # big tables shown only as a download / row count
    headline_limit: int = 8  # numbers per comparison in overviews and the sweep table


ANALYSES: dict[str, Analysis] = {
    "saliency": Analysis(
        title="Saliency: which prompt tokens the response depends on",
        blurb=("Gradient x input attribution of every response token to every prompt token (methods.md A), "
               "normalised per response token into integer scores 0..10; a prompt token's importance density "
               "is ||S[n,:]||_1 / ||S[n,:]||_4, and the prompt score sums the normalised density over the "
               "instruction tokens. Instruction tuning should raise the score (Welch one-sided test, base < "
               "tuned) and flatten the U-shaped density profile over relative prompt position."),
        figures=(("*score*distribution*", "Score distributions, base vs tuned"),
                 ("*distribution*", "Score distributions"), ("*score*", "Prompt scores"),
                 ("*density*profile*", "Importance density over relative prompt position (deciles)"),
                 ("*profile*", "Density profile"), ("*density*", "Importance density"),
                 ("*follow*", "Followed vs not-followed prompts (tuned model)"),
                 ("*example*", "Example prompts")),
        tables=(("*test*", "Statistical tests (Welch, one-sided)"), ("*split*", "Per dataset split"),
                ("*profile*", "Density profile"), ("*score*", "Prompt scores")),
        views=(("*example*", "Example prompts with tokens shaded by importance density"),
               ("*prompt*", "Prompts with shaded tokens"), ("*view*", "View")),
        headline=("*score*mean*", "*mean*score*", "*p_value*", "*pvalue*", "*.p", "*_p", "*welch*", "*t_stat*",
                  "*n_prompts*", "*mean_*"),
        hidden_tables=("*matri*", "*attribution*", "*pairwise*")),
    "head_relations": Analysis(
        title="Self-attention heads: word-pair relations",
        blurb=("Each head dimension's top query and key words over a word list; word pairs that co-occur and "
               "raise the attention logit form the head's knowledge (methods.md B). Per group of layers, r_v is "
               "the share of heads, among those whose count of pairs with verb v changed, where tuning raised "
               "it: instruction verbs vs general verbs (Welch two-sided). Below: the instruction-verb table, "
               "the word pairs tuning added to heads, and the overlap of pairs by depth."),
        figures=(("verb_shares*", "Instruction vs general verbs: share of heads where tuning adds pairs, per "
                  "layer group"),
                 ("overlap*", "Word pairs shared by base and tuned heads, per layer"), ("*verb*", "Verbs"),
                 ("*added*", "Head pairs added by tuning"), ("*pair*", "Word pairs")),
        tables=(("verb_stats*", "Instruction vs general verbs per layer group (Welch two-sided)"),
                ("overlap*", "Pair overlap per layer (pooled and per-head Jaccard, retained share)"),
                ("verb_shares*", "r_v per verb and layer group"), ("knowledge*", "Head knowledge (pairs)"),
                ("dims*", "Mined dimensions")),
        views=(("view*", "Top pairs per layer and head, base beside tuned (pairs added by tuning highlighted)"),),
        headline=("verb_stats[*/instruction].mean", "verb_stats[*/general].mean", "verb_stats[*/instruction].p_welch",
                  "jaccard_pooled_by_layer.mean", "n_pairs*", "*pairs_total*", "*mean*"),
        headline_limit=14,
        hidden_tables=("dims*", "knowledge*", "verb_shares*")),
    "ffn_concepts": Analysis(
        title="Feed-forward layers: principal directions and concepts",
        blurb=("Principal directions of each layer's FFN value vectors, their top words and annotated concepts "
               "(methods.md C): the share of explainable directions serving each assistant task, base vs tuned "
               "(Student t over annotation seeds), linguistic levels per layer group, and the rotation of the "
               "directions themselves: principal angles between the base and tuned subspaces and best-match "
               "cosines."),
        figures=(("task_shares*", "Task shares of explainable directions (all layers)"),
                 ("principal_angles*", "Principal angles between base and tuned subspaces, per layer"),
                 ("level_shares*", "Linguistic levels per layer group"), ("*share*", "Shares"),
                 ("*angle*", "Angles")),
        tables=(("ttests*", "Task and level shares: t-tests (tuned vs base)"),
                ("rotation_layers*", "Rotation per layer"), ("shares*", "Shares per model, seed and layer group")),
        views=(("view_layer*", "Directions per layer (base beside tuned)"),),
        headline=("rotation.mean_angle_deg", "rotation.median_angle_deg", "rotation.mean_best_abs_cos",
                  "ttests_all_layers[task/writing].*_mean", "ttests_all_layers[task/coding].*_mean",
                  "ttests_all_layers[task/math].*_mean", "ttests_all_layers[task/translation].*_mean",
                  "explainable_share", "variance_captured_mean"),
        hidden_tables=("directions*", "annotations*", "rotation")),
    "residual_norm": Analysis(
        title="Residual-stream norm per layer (example plugin)",
        blurb="Mean L2 norm of the residual stream after each layer, and the tuned/base ratio.",
        tables=(("norms*", "Mean norm per layer"),),
        headline=("mean_ratio",)),
    "precision_check": Analysis(
        title="Precision check: low-precision saliency vs fp32",
        blurb=("tuneshift.plugins.saliency.precision re-ran the saliency attribution of a few prompts in fp32 and compared it "
               "with the run's precision: the maximum relative deviation of the attribution matrices "
               "(relative to each matrix's largest magnitude), of the importance densities and prompt scores."),
        tables=(("prompts*", "Per prompt"),),
        headline=("max_rel_dev*", "score_max_abs_dev", "passed")),
}
ANALYSIS_ORDER = ("saliency", "head_relations", "ffn_concepts")


# ---- small helpers ------------------------------------------------------------------------------------------------
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _natural_key(path: Path) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name)]


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    if hasattr(value, "tolist"):
        return _fmt(value.tolist())
    if isinstance(value, (list, tuple)):
        items = [_fmt(v) for v in list(value)[:20]]
        return ", ".join(items) + (" …" if len(value) > 20 else "")
    if isinstance(value, dict):
        return json.dumps(value, default=str)[:300]
    text = str(value)
    return text if len(text) <= 400 else text[:400] + " …"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _record_label(record: dict) -> str:
    parts = [str(v) for k, v in record.items() if isinstance(v, str)]
    return "/".join(parts)


def flatten(data: Any, prefix: str = "", depth: int = 4) -> dict[str, Any]:
    """Nested dicts as dotted keys; lists of records as ``key[label]`` (label: the record's string fields)."""
    out: dict[str, Any] = {}
    if isinstance(data, dict) and depth > 0:
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k), depth - 1))
    elif (isinstance(data, list) and depth > 0 and data and all(isinstance(r, dict) for r in data)
          and len(data) <= 200):
        for i, record in enumerate(data):
            label = _record_label(record) or str(i)
            out.update(flatten({k: v for k, v in record.items() if not isinstance(v, str)},
                               f"{prefix}[{label}]", depth - 1))
    else:
        out[prefix] = data
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_items(data: Any) -> dict[str, float]:
    """The numeric scalars of a (nested) summary, flattened; a list of numbers adds its mean as ``key.mean``."""
    out: dict[str, float] = {}
    for key, value in flatten(data).items():
        if _number(value):
            out[key] = float(value)
        elif isinstance(value, list) and value and all(_number(v) or v is None for v in value):
            finite = [float(v) for v in value if v is not None and not math.isnan(float(v))]
            if finite:
                out[f"{key}.mean"] = sum(finite) / len(finite)
    return out


def headline_metrics(plugin: str, summary: Any, limit: int | None = None) -> dict[str, float]:
    """The headline numbers of a comparison summary: the analysis' patterns in order, else the first scalars."""
    values = numeric_items(summary)
    spec = ANALYSES.get(plugin)
    limit = limit or (spec.headline_limit if spec else 8)
    chosen: dict[str, float] = {}
    for pattern in spec.headline if spec else ():
        for key, value in values.items():
            if key not in chosen and wildcard(pattern, key):
                chosen[key] = value
    if not chosen:
        chosen = dict(list(values.items())[:limit])
    return dict(list(chosen.items())[:limit])


class _Budget:
    """Bytes left for embedded files; beyond it, files are linked (the report stays openable)."""

    def __init__(self, limit: int):
        self.left = limit

    def take(self, n: int) -> bool:
        if n > self.left:
            return False
        self.left -= n
        return True


@dataclass
class _Page:
    """State while building one report page."""

    root: Path  # the directory the report is written into (relative links start here)
    budget: _Budget
    sections: list[tuple[str, str, int]] = field(default_factory=list)  # (id, title, level) for the TOC
    figures: list[dict] = field(default_factory=list)  # every embedded figure (for export / logging)
    errors: list[str] = field(default_factory=list)
    counter: int = 0

    def uid(self, stem: str) -> str:
        self.counter += 1
        return f"{_slug(stem)}-{self.counter}"

    def section(self, sid: str, title: str, body: str, level: int = 2, cls: str = "") -> str:
        self.sections.append((sid, title, level))
        tag = f"h{min(level, 4)}"
        return (f'<section id="{_e(sid)}" class="{_e(cls)}" data-title="{_e(title)}"><{tag}>{_e(title)}'
                f'<a class="anchor" href="#{_e(sid)}">#</a></{tag}>{body}</section>')

    def link(self, path: Path) -> str:
        try:
            return path.resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            return path.resolve().as_uri()


# ---- file renderers ---------------------------------------------------------------------------------------------
def _kv_table(rows: dict[str, Any], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{_e(k)}</th><td>{_e(_fmt(v))}</td></tr>" for k, v in rows.items())
    return f'<table class="{cls}">{body}</table>' if body else '<p class="muted">(empty)</p>'


def _records_table(records: Sequence[dict], max_rows: int = MAX_TABLE_ROWS) -> str:
    columns: list[str] = []
    for r in records:
        columns += [c for c in r if c not in columns]
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    rows = []
    for r in list(records)[:max_rows]:
        cells = "".join(f'<td class="{"num" if isinstance(r.get(c), (int, float)) else ""}">{_e(_fmt(r.get(c)))}</td>'
                        for c in columns)
        rows.append(f"<tr>{cells}</tr>")
    more = (f'<p class="muted">{len(records) - max_rows} more rows not shown.</p>'
            if len(records) > max_rows else "")
    return f'<div class="scroll"><table class="data"><tr>{head}</tr>{"".join(rows)}</table></div>{more}'


def render_json(path: Path, page: _Page, caption: str | None = None) -> str:
    """A JSON summary as key/value rows; lists of records as tables (unless a parquet table of the same
    name sits beside it, which is shown anyway)."""
    data = _read_json(path)
    title = f'<p class="file">{_e(caption or path.name)}</p>'
    if data is None:
        return title + '<p class="warn">not readable as JSON</p>'
    text = json.dumps(data, indent=1, default=str)
    if len(text) > MAX_JSON_CHARS:
        return (title + f"<details><summary>{_e(path.name)}: {len(text):,} characters (first "
                f"{MAX_JSON_CHARS:,} shown)</summary><pre>{_e(text[:MAX_JSON_CHARS])}</pre></details>")
    if isinstance(data, list) and data and all(isinstance(r, dict) for r in data):
        return title + _records_table(data)
    if not isinstance(data, dict):
        return title + f"<pre>{_e(text)}</pre>"
    scalars = {k: v for k, v in data.items() if not isinstance(v, (dict, list))}
    parts = [title]
    flat = {k: v for k, v in flatten(scalars).items()}
    nested = {k: v for k, v in data.items() if isinstance(v, (dict, list))}
    for key, value in nested.items():
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            continue
        if isinstance(value, dict) and any(isinstance(v, list) and v and all(isinstance(r, dict) for r in v)
                                           for v in value.values()):
            continue
        flat.update(flatten(value, key, depth=3))
    parts.append(_kv_table(flat))
    for key, value in nested.items():  # lists of records (e.g. tests) as real tables
        if (path.parent / f"{key}.parquet").is_file():
            parts.append(f'<p class="muted">{_e(key)}: see the {_e(key)}.parquet table below.</p>')
            continue
        if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
            parts.append(f'<p class="sub">{_e(key)}</p>' + _records_table(value))
        elif isinstance(value, dict):
            for sub, records in value.items():
                if isinstance(records, list) and records and all(isinstance(r, dict) for r in records):
                    parts.append(f'<p class="sub">{_e(key)}.{_e(sub)}</p>' + _records_table(records))
    return "".join(parts)


def _cell(value: Any) -> str:
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return _fmt(value)


def render_parquet(path: Path, page: _Page, caption: str | None = None, preview: bool = True) -> str:
    import pandas as pd

    title = f'<p class="file">{_e(caption or path.stem)} <span class="muted">({_e(path.name)}'
    try:
        table = pd.read_parquet(path)
    except Exception as err:  # noqa: BLE001 - a broken file must not break the report
        return title + f')</span></p><p class="warn">not readable: {_e(err)}</p>'
    title += f", {len(table):,} rows x {len(table.columns)} columns)</span>"
    download = ""
    if preview and len(table) <= 100_000:  # hidden (big) tables stay in their parquet files
        try:
            csv = table.map(lambda v: " ".join(map(str, v)) if hasattr(v, "__len__") and not isinstance(v, str)
                            else v).to_csv(index=False).encode()
        except Exception:  # noqa: BLE001
            csv = b""
        if csv and len(csv) <= MAX_CSV_BYTES and page.budget.take(len(csv) * 4 // 3):
            download = (f' <a class="dl" download="{_e(path.stem)}.csv" href="data:text/csv;base64,'
                        f'{base64.b64encode(csv).decode()}">CSV</a>')
    head = title + download + "</p>"
    if not preview:
        return head
    columns = [str(c) for c in table.columns]
    rows = []
    for _, row in table.head(MAX_TABLE_ROWS).iterrows():
        cells = []
        for c in table.columns:
            v = row[c]
            num = isinstance(v, (int, float)) and not isinstance(v, bool)
            cells.append(f'<td class="{"num" if num else ""}">{_e(_cell(v))}</td>')
        rows.append("<tr>" + "".join(cells) + "</tr>")
    more = (f'<p class="muted">{len(table) - MAX_TABLE_ROWS:,} more rows (see the CSV or the parquet file).</p>'
            if len(table) > MAX_TABLE_ROWS else "")
    header = "".join(f"<th>{_e(c)}</th>" for c in columns)
    return head + f'<div class="scroll"><table class="data"><tr>{header}</tr>{"".join(rows)}</table></div>{more}'


def render_png(path: Path, page: _Page, caption: str | None = None, context: str = "") -> str:
    data = path.read_bytes()
    label = caption or path.stem.replace("_", " ")
    page.figures.append({"path": str(path), "caption": label, "context": context})
    if not page.budget.take(len(data) * 4 // 3):
        return (f'<figure><a href="{_e(page.link(path))}">{_e(path.name)}</a> (not embedded: the report reached '
                f'its size budget)<figcaption>{_e(label)}</figcaption></figure>')
    b64 = base64.b64encode(data).decode()
    return (f'<figure><img loading="lazy" alt="{_e(label)}" src="data:image/png;base64,{b64}">'
            f'<figcaption>{_e(label)} <span class="muted">{_e(path.name)}</span></figcaption></figure>')


_RELATIVE_SRC = re.compile(r"""\ssrc=["'](?!data:|https?:|blob:|about:|#)[^"']+["']""", re.I)


def _with_base(path: Path, page: _Page, text: str) -> str:
    """A view that loads files by relative path gets a ``<base>`` so they resolve next to it, not the report."""
    if not _RELATIVE_SRC.search(text):
        return text
    base = f'<base href="{_e(page.link(path.parent))}/">'
    match = re.search(r"<head[^>]*>", text, re.I)
    return text[:match.end()] + base + text[match.end():] if match else base + text


def render_views(paths: Sequence[Path], page: _Page, caption: str) -> str:
    """HTML views embedded as ``<iframe srcdoc>``; several views share one frame and a selector."""
    paths = sorted(paths, key=_natural_key)
    texts: list[tuple[Path, str]] = []
    linked: list[Path] = []
    for path in paths:
        text = _with_base(path, page, path.read_text(errors="replace"))
        (texts.append((path, text)) if page.budget.take(len(text.encode())) else linked.append(path))
    out = [f'<p class="file">{_e(caption)} <span class="muted">({len(paths)} view'
           f'{"s" if len(paths) != 1 else ""})</span></p>']
    if len(texts) == 1:
        path, text = texts[0]
        out.append(f'<iframe class="view" title="{_e(path.name)}" srcdoc="{_e(text)}"></iframe>')
    elif texts:
        uid = page.uid("views")
        payload = json.dumps({p.name: t for p, t in texts}).replace("</", "<\\/")
        options = "".join(f'<option value="{_e(p.name)}">{_e(p.stem)}</option>' for p, _ in texts)
        out.append(f'<div class="viewer" data-views="{uid}"><label>view <select>{options}</select></label> '
                   f'<button type="button" data-step="-1">&#9664;</button><button type="button" data-step="1">'
                   f'&#9654;</button><iframe class="view" title="{_e(caption)}" srcdoc="{_e(texts[0][1])}"></iframe>'
                   f'<script type="application/json" id="{uid}">{payload}</script></div>')
    for path in linked:
        out.append(f'<p><a href="{_e(page.link(path))}">{_e(path.name)}</a> (linked, not embedded: size budget)</p>')
    return "".join(out)


def wildcard(pattern: str, text: str) -> bool:
    """Case-insensitive match where only ``*`` is special (keys hold brackets, e.g. ``tests[task/writing].p``)."""
    regex = ".*".join(re.escape(part) for part in pattern.lower().split("*"))
    return re.fullmatch(regex, text.lower()) is not None


def _match(stem: str, patterns: Iterable[tuple[str, str]]) -> tuple[int, str] | None:
    for index, (pattern, caption) in enumerate(patterns):
        if wildcard(pattern, stem):
            return index, caption
    return None


def render_results(directory: Path, plugin: str, page: _Page, context: str = "",
                   with_views: bool = True) -> str:
    """Every result file of one ``<plugin>/<model or compare>`` directory, the analysis' files first."""
    spec = ANALYSES.get(plugin, Analysis(title=plugin, blurb=""))
    files = sorted((p for p in directory.iterdir() if p.is_file() and not p.name.startswith((".", "_"))),
                   key=_natural_key)
    parts: list[str] = []

    def ordered(suffix: str, patterns: Sequence[tuple[str, str]]) -> list[tuple[Path, str | None]]:
        chosen = [p for p in files if p.suffix == suffix]
        keyed = []
        for p in chosen:
            hit = _match(p.stem, patterns)
            keyed.append(((hit[0] if hit else len(patterns)), p, hit[1] if hit else None))
        keyed.sort(key=lambda t: (t[0], _natural_key(t[1])))
        return [(p, cap) for _, p, cap in keyed]

    pngs = ordered(".png", spec.figures)
    if pngs:
        parts.append('<div class="figs">' + "".join(_safe(render_png, p, page, cap, context) for p, cap in pngs)
                     + "</div>")
    for p in [p for p in files if p.suffix == ".json"]:
        parts.append(_safe(render_json, p, page, None if p.stem == "summary" else p.stem))
    for p, cap in ordered(".parquet", spec.tables):
        hidden = any(wildcard(h, p.stem) for h in spec.hidden_tables)
        parts.append(_safe(render_parquet, p, page, cap, not hidden))
    views = [p for p in files if p.suffix in (".html", ".htm")]
    if views and with_views:
        groups: dict[str, list[Path]] = {}
        for p in views:  # view_layer0..31 form one group; unrelated views get a frame each
            groups.setdefault(re.sub(r"\d+", "#", p.stem), []).append(p)
        for stem_group, members in groups.items():
            hit = _match(members[0].stem, spec.views)
            parts.append(_safe(render_views, members, page, hit[1] if hit else stem_group.replace("#", "N")))
    others = [p for p in files if p.suffix not in (".png", ".json", ".parquet", ".html", ".htm")]
    if others:
        items = "".join(f'<li><a href="{_e(page.link(p))}">{_e(p.name)}</a> <span class="muted">'
                        f'{p.stat().st_size:,} bytes</span></li>' for p in others)
        parts.append(f'<details class="files"><summary>other files ({len(others)})</summary><ul>{items}</ul>'
                     "</details>")
    return "".join(parts) or '<p class="muted">no result files</p>'


def _safe(fn: Callable[..., str], *args: Any) -> str:
    """Render one piece; an unreadable file becomes a note instead of a failed report."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001
        page = next((a for a in args if isinstance(a, _Page)), None)
        what = args[0].name if args and isinstance(args[0], Path) else fn.__name__.strip("_")
        message = f"{what}: {type(err).__name__}: {err}"
        if page is not None:
            page.errors.append(message)
        log.warning("report: %s", message)
        return f'<p class="warn">could not show {_e(message)}</p>'


# ---- run layout -------------------------------------------------------------------------------------------------
@dataclass
class RunInfo:
    """What the report needs to know about one run dir."""

    dir: Path
    config: dict
    summary: dict
    plugins: list[str]  # result dirs, analyses first
    models: dict[str, dict]  # key -> model spec (from the resolved config)
    pairs: list[tuple[str, str]]

    @property
    def name(self) -> str:
        return str(self.config.get("run", {}).get("name") or self.dir.name)

    def model_name(self, key: str) -> str:
        return str(self.models.get(key, {}).get("name") or self.summary.get("models", {}).get(key, {}).get("name")
                   or key)

    def result_dir(self, plugin: str, key: str) -> Path:
        return self.dir / plugin / key

    def done(self, plugin: str, key: str) -> bool:
        return (self.dir / plugin / key / "_DONE").is_file()


def _load_config(run_dir: Path) -> dict:
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            try:
                from omegaconf import OmegaConf

                cfg = OmegaConf.load(path)
                return OmegaConf.to_container(cfg, resolve=False) or {}
            except Exception:  # noqa: BLE001
                continue
    return {}


def load_run(run_dir: str | Path) -> RunInfo:
    run_dir = Path(run_dir)
    config = _load_config(run_dir)
    summary = _read_json(run_dir / "summary.json") or {}
    models = (config.get("model") or {}).get("models") or {}
    pairs = [tuple(p) for p in (config.get("model") or {}).get("pairs") or [] if len(p) == 2]
    plugin_dirs = [d.name for d in sorted(run_dir.iterdir()) if d.is_dir() and d.name not in SKIP_DIRS
                   and not d.name.startswith(".") and any(d.rglob("_DONE"))] if run_dir.is_dir() else []
    for d in plugin_dirs:  # pairs found on disk (a config-less run dir still shows its comparisons)
        compare = run_dir / d / "compare"
        for c in sorted(compare.iterdir()) if compare.is_dir() else []:
            if "__" in c.name and tuple(c.name.split("__", 1)) not in pairs:
                pairs.append(tuple(c.name.split("__", 1)))
    configured = list((config.get("plugins") or {}).keys())
    order = [p for p in ANALYSIS_ORDER if p in plugin_dirs]
    order += [p for p in configured if p in plugin_dirs and p not in order]
    order += [p for p in plugin_dirs if p not in order]
    return RunInfo(run_dir, config, summary, order, dict(models), pairs)


def _model_keys(run: RunInfo) -> list[str]:
    keys = list(run.models)
    for plugin in run.plugins:
        for d in sorted((run.dir / plugin).iterdir()):
            if d.is_dir() and d.name != "compare" and d.name not in keys:
                keys.append(d.name)
    return keys


# ---- page pieces ------------------------------------------------------------------------------------------------
_STYLE = """
:root{--fg:#1f2328;--muted:#6b7280;--line:#d9dde3;--bg2:#f6f8fa;--accent:#2563eb;--warn:#b42318}
*{box-sizing:border-box}
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:var(--fg)}
header.top{background:#111827;color:#fff;padding:18px 28px}header.top h1{margin:0;font-size:22px}
header.top .meta{color:#cbd5e1;font-size:13px;margin-top:4px}
nav.toc{position:sticky;top:0;z-index:5;background:#fff;border-bottom:1px solid var(--line);padding:6px 28px;
 display:flex;flex-wrap:wrap;gap:4px 14px;font-size:13px}
nav.toc a{color:var(--accent);text-decoration:none}nav.toc a.l3{color:var(--muted)}
main{padding:8px 28px 40px;max-width:1680px}
section{margin-top:18px}h2{font-size:20px;border-bottom:2px solid var(--line);padding-bottom:4px;margin:28px 0 10px}
h3{font-size:17px;margin:22px 0 8px}h4{font-size:15px;margin:16px 0 6px}
a.anchor{margin-left:6px;color:var(--line);text-decoration:none;font-weight:400}a.anchor:hover{color:var(--accent)}
.blurb{color:#374151;max-width:1000px;margin:4px 0 10px}
.muted{color:var(--muted)}.warn{color:var(--warn)}.file{font-weight:600;margin:12px 0 4px}
.sub{margin:8px 0 2px;font-style:italic}
table{border-collapse:collapse;margin:4px 0 10px;font-size:13px}
td,th{border:1px solid var(--line);padding:3px 7px;text-align:left;vertical-align:top}
th{background:var(--bg2);font-weight:600}td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.kv th{white-space:nowrap}.scroll{overflow-x:auto;max-width:100%}
.overview{display:grid;grid-template-columns:repeat(auto-fit,minmax(380px,1fr));gap:14px;align-items:start}
.card{border:1px solid var(--line);border-radius:8px;padding:10px 14px;background:#fff;min-width:0}
.card h4{margin-top:2px}.card img{max-height:320px;object-fit:contain}
.sides{display:grid;grid-template-columns:repeat(auto-fit,minmax(460px,1fr));gap:18px;align-items:start}
.side{min-width:0;border-left:3px solid var(--line);padding-left:12px}
.figs{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:6px 0;max-width:100%}figure img{max-width:100%;border:1px solid #eef0f3;display:block}
.figs figure{flex:0 1 auto;max-width:min(100%,760px)}.figs figure img{width:auto;max-height:460px}
figcaption{font-size:12px;color:#374151}
iframe.view{width:100%;height:520px;border:1px solid var(--line);border-radius:4px;resize:vertical;display:block;
 background:#fff}
.viewer label{font-size:13px}.viewer button{margin-left:4px}.viewer select{max-width:300px}
details{margin:8px 0}summary{cursor:pointer;color:#374151;font-weight:600}
pre{background:var(--bg2);padding:8px;overflow:auto;max-height:480px;font-size:12px}
.badge{display:inline-block;border-radius:10px;padding:0 8px;font-size:12px;background:#e5e7eb}
.badge.ok{background:#dcfce7;color:#166534}.badge.partial{background:#fef3c7;color:#92400e}
.badge.missing{background:#fee2e2;color:#991b1b}
a.dl{font-weight:400;font-size:12px;margin-left:6px}
.resp td{max-width:520px;white-space:pre-wrap;font-size:12px}.nowrap{white-space:nowrap}
table.metrics th[rowspan]{vertical-align:top;max-width:160px}
@media print{nav.toc{display:none}iframe.view{display:none}}
"""

_SCRIPT = """
(function(){
  function sel(v){return Array.prototype.slice.call(document.querySelectorAll(v));}
  sel('.viewer').forEach(function(box){
    var data=JSON.parse(document.getElementById(box.getAttribute('data-views')).textContent);
    var select=box.querySelector('select'), frame=box.querySelector('iframe');
    function show(){frame.srcdoc=data[select.value];}
    select.addEventListener('change',show);
    Array.prototype.forEach.call(box.querySelectorAll('button'),function(b){
      b.addEventListener('click',function(){
        var i=select.selectedIndex+parseInt(b.getAttribute('data-step'),10);
        if(i>=0&&i<select.options.length){select.selectedIndex=i;show();}
      });
    });
  });
  function fit(f){try{var d=f.contentDocument;if(!d||!d.documentElement)return;
    var h=d.documentElement.scrollHeight;if(h>0)f.style.height=Math.min(Math.max(h+24,140),900)+'px';}catch(e){}}
  sel('iframe.view').forEach(function(f){f.addEventListener('load',function(){fit(f);});fit(f);});
  window.addEventListener('load',function(){
    var imgs=sel('img'), broken=imgs.filter(function(i){return !(i.complete&&i.naturalWidth>0);});
    broken.forEach(function(i){console.error('tuneshift-report: broken image '+i.alt);});
    var ids=sel('section[id]').map(function(s){return s.id;});
    document.body.setAttribute('data-report-check','loaded images='+imgs.length+' broken='+broken.length+
      ' frames='+sel('iframe').length+' sections='+ids.length);
    console.log('tuneshift-report: loaded, '+imgs.length+' images, '+broken.length+' broken, '+ids.length+' sections');
  });
})();
"""


def _page_html(title: str, subtitle: str, page: _Page, body: str) -> str:
    toc = "".join(f'<a class="l{lvl}" href="#{_e(sid)}">{_e(t)}</a>' for sid, t, lvl in page.sections if lvl <= 3)
    manifest = " ".join(sid for sid, _, _ in page.sections)
    generated = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    errors = ""
    if page.errors:
        errors = ('<div class="warn"><b>Some results could not be shown:</b><ul>'
                  + "".join(f"<li>{_e(e)}</li>" for e in page.errors) + "</ul></div>")
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width,initial-scale=1">'
            f'<meta name="tuneshift-sections" content="{_e(manifest)}"><title>{_e(title)}</title>'
            f"<style>{_STYLE}</style></head><body><header class=\"top\"><h1>{_e(title)}</h1>"
            f'<div class="meta">{subtitle} · generated {generated}</div></header>'
            f'<nav class="toc">{toc}</nav><main>{errors}{body}</main><script>{_SCRIPT}</script></body></html>')


def _models_table(run: RunInfo) -> str:
    rows = []
    described = run.summary.get("models", {})
    for key in _model_keys(run):
        spec = run.models.get(key, {})
        info = described.get(key, {})
        extra = ", ".join(f"{k}={_fmt(v)}" for k, v in info.items() if k != "name")
        rows.append(f"<tr><td>{_e(key)}</td><td>{_e(run.model_name(key))}</td><td>{_e(spec.get('path', ''))}</td>"
                    f"<td>{_e(spec.get('dtype', ''))}</td><td>{_e(spec.get('device_map') or spec.get('device', ''))}"
                    f"</td><td>{_e(spec.get('chat_template', ''))}</td><td class=muted>{_e(extra)}</td></tr>")
    head = ("<tr><th>key</th><th>name</th><th>path / hub id</th><th>dtype</th><th>device</th>"
            "<th>chat template</th><th>architecture</th></tr>")
    return f'<div class="scroll"><table class="data">{head}{"".join(rows)}</table></div>'


def _settings(run: RunInfo) -> str:
    cfg = run.config
    data, gen = cfg.get("data") or {}, cfg.get("generation") or {}
    rows = {"experiment": cfg.get("experiment"), "data": f"{data.get('name', '')} ({data.get('format', '')}"
            + (f", limit {data['limit']}" if data.get("limit") else "") + ")",
            "prompts path": data.get("path"), "max new tokens": gen.get("max_new_tokens"),
            "chat template (run override)": gen.get("chat_template"),
            "plugins": ", ".join((cfg.get("plugins") or {}).keys())}
    return _kv_table({k: v for k, v in rows.items() if v not in (None, "")})


def _status(run: RunInfo) -> dict[str, dict[str, bool]]:
    """``{plugin: {model key or compare key: done}}`` for every configured plugin (or found result dir)."""
    plugins = list((run.config.get("plugins") or {}).keys()) or run.plugins
    keys = list(run.models) or _model_keys(run)
    out = {}
    for plugin in plugins:
        out[plugin] = {k: run.done(plugin, k) for k in keys}
        for b, t in run.pairs:
            out[plugin][f"compare/{b}__{t}"] = run.done(plugin, f"compare/{b}__{t}")
    return out


def _overview_card(run: RunInfo, plugin: str, base: str, tuned: str, page: _Page) -> str:
    spec = ANALYSES.get(plugin, Analysis(title=plugin, blurb=""))
    cmp = run.result_dir(plugin, f"compare/{base}__{tuned}")
    title = f'<h4><a href="#{_e(_pair_id(base, tuned))}-{_e(plugin)}">{_e(spec.title)}</a></h4>'
    if not cmp.is_dir():
        return f'<div class="card">{title}<p class="muted">no comparison results</p></div>'
    summary = _read_json(cmp / "summary.json") or {}
    metrics = headline_metrics(plugin, summary)
    body = _kv_table(metrics) if metrics else ""
    pngs = sorted(cmp.glob("*.png"), key=_natural_key)
    if pngs:
        ranked = sorted(pngs, key=lambda p: (_match(p.stem, spec.figures) or (99, ""))[0])
        hit = _match(ranked[0].stem, spec.figures)
        body += _safe(render_png, ranked[0], page, hit[1] if hit else None, f"{plugin} {base}__{tuned} overview")
    return f'<div class="card">{title}{body or "<p class=muted>no headline numbers</p>"}</div>'


def _pair_id(base: str, tuned: str) -> str:
    return f"pair-{_slug(base)}__{_slug(tuned)}"


def _responses(run: RunInfo, keys: Sequence[str], n: int = 6) -> str:
    table: dict[str, dict[str, str]] = {}
    order: list[str] = []
    prompts: dict[str, str] = {}
    for key in keys:
        path = run.dir / "responses" / f"{key}.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines()[:n]:
            row = json.loads(line)
            pid = str(row.get("id"))
            if pid not in order:
                order.append(pid)
            prompts[pid] = str(row.get("prompt", ""))
            table.setdefault(pid, {})[key] = str(row.get("response", ""))
    if not order:
        return ""
    short = lambda t: t if len(t) <= 600 else t[:600] + " …"  # noqa: E731
    head = "<tr><th>prompt</th>" + "".join(f"<th>{_e(run.model_name(k))}</th>" for k in keys) + "</tr>"
    rows = "".join(f"<tr><td>{_e(short(prompts[p]))}</td>"
                   + "".join(f"<td>{_e(short(table[p].get(k, '')))}</td>" for k in keys) + "</tr>" for p in order)
    return f'<div class="scroll"><table class="data resp">{head}{rows}</table></div>'


# ---- dedicated views of the analyses' comparison tables ------------------------------------------------------------
INSTRUCTION_VERBS = (  # methods.md B.6 (the head_relations plugin's default; its options may change the list)
    "act", "analyze", "clarify", "classify", "compose", "correct", "create", "demonstrate", "describe", "design",
    "detect", "develop", "edit", "estimate", "evaluate", "explain", "find", "follow", "format", "generate",
    "give", "have", "help", "identify", "interpret", "make", "output", "predict", "recommend", "repeat",
    "retrieve", "revise", "say", "solve", "summarize", "tell", "translate", "write")


def _share_cell(share: float, n: Any = None) -> str:
    """A share in [0, 1] shaded green above 1/2 (tuning adds) and red below (tuning removes)."""
    if share is None or (isinstance(share, float) and math.isnan(share)):
        return '<td class="num muted">–</td>'
    alpha = min(1.0, abs(share - 0.5) * 2) * 0.55
    color = f"rgba(22,163,74,{alpha:.2f})" if share >= 0.5 else f"rgba(220,38,38,{alpha:.2f})"
    count = "" if n is None or (isinstance(n, float) and math.isnan(n)) else f' <span class="muted">({int(n)})</span>'
    return f'<td class="num" style="background:{color}">{share:.2f}{count}</td>'


def _extra_head_relations(run: RunInfo, base: str, tuned: str, page: _Page) -> str:
    import pandas as pd

    cmp = run.result_dir("head_relations", f"compare/{base}__{tuned}")
    options = (run.config.get("plugins") or {}).get("head_relations") or {}
    verbs = list(options.get("instruction_verbs") or INSTRUCTION_VERBS) if isinstance(options, dict) \
        else list(INSTRUCTION_VERBS)
    parts = []
    if (cmp / "verb_shares.parquet").is_file():
        shares = pd.read_parquet(cmp / "verb_shares.parquet")
        mine = shares[shares["verb_set"] == "instruction"] if "verb_set" in shares else \
            shares[shares["word"].isin(verbs)]
        labels: dict[Any, str] = {}
        if (cmp / "verb_stats.parquet").is_file():
            stats = pd.read_parquet(cmp / "verb_stats.parquet")
            if "layers" in stats:
                labels = dict(zip(stats["group"], stats["layers"]))
        groups = sorted(mine["group"].unique().tolist())
        head = "<tr><th>instruction verb</th>" + "".join(
            f"<th>layers {_e(labels.get(g, g))}</th>" for g in groups) + "<th>mean</th></tr>"
        rows = []
        for word, sub in sorted(mine.groupby("word"), key=lambda kv: -kv[1]["share"].mean()):
            by_group = {int(r["group"]): r for _, r in sub.iterrows()}
            cells = "".join(_share_cell(float(by_group[g]["share"]), by_group[g].get("n_heads")) if g in by_group
                            else '<td class="num muted">–</td>' for g in groups)
            rows.append(f"<tr><td>{_e(word)}</td>{cells}{_share_cell(float(sub['share'].mean()))}</tr>")
        missing = sorted(set(verbs) - set(mine["word"]))
        note = (f'<p class="muted">No head changed its count for: {_e(", ".join(missing))}.</p>' if missing else "")
        parts.append('<p class="file">Instruction-verb table: r_v per layer group <span class="muted">(share of '
                     "heads, among those whose count of pairs with the verb changed, where the tuned count is "
                     "larger; in brackets the number of such heads; green: tuning adds)</span></p>"
                     f'<div class="scroll"><table class="data">{head}{"".join(rows)}</table></div>{note}')
    kb, kt = (run.result_dir("head_relations", k) / "knowledge.parquet" for k in (base, tuned))
    if kb.is_file() and kt.is_file():
        cols = ["layer", "head", "pair"]
        b, t = pd.read_parquet(kb), pd.read_parquet(kt)
        merged = t[[c for c in t.columns if c in cols + ["word_a", "word_b", "max_sim"]]].merge(
            b[cols], on=cols, how="left", indicator=True)
        added = merged[merged["_merge"] == "left_only"]
        removed = len(b) - (len(merged) - len(added))
        parts.append(f'<p class="file">Head pairs added by tuning <span class="muted">({len(added):,} (layer, head, '
                     f"pair) entries added, {removed:,} removed; base {len(b):,}, tuned {len(t):,})</span></p>")
        if len(added):
            top = (added.groupby("pair").agg(heads=("head", "size"), layers=("layer", lambda x: sorted(set(x))))
                   .sort_values("heads", ascending=False))
            words = added["pair"].str.split("=")
            with_verb = added[words.map(lambda ws: any(w in verbs for w in ws))]
            top_verb = (with_verb.groupby("pair").agg(heads=("head", "size"),
                                                      layers=("layer", lambda x: sorted(set(x))))
                        .sort_values("heads", ascending=False))

            def table(frame: Any, title: str) -> str:
                rows = "".join(f"<tr><td>{_e(pair)}</td><td class=num>{int(r['heads'])}</td>"
                               f"<td>{_e(_fmt(r['layers']))}</td></tr>" for pair, r in frame.head(15).iterrows())
                return (f'<div><p class="sub">{_e(title)}</p><table class="data"><tr><th>pair</th><th>heads</th>'
                        f"<th>layers</th></tr>{rows}</table></div>")

            parts.append('<div class="sides">' + table(top, "most added pairs (by number of heads)")
                         + table(top_verb, f"added pairs with an instruction verb ({len(with_verb):,} entries)")
                         + "</div>")
    return "".join(parts)


def _extra_ffn_concepts(run: RunInfo, base: str, tuned: str, page: _Page) -> str:
    import pandas as pd

    path = run.result_dir("ffn_concepts", f"compare/{base}__{tuned}") / "ttests.parquet"
    if not path.is_file():
        return ""
    tests = pd.read_parquet(path)
    parts = []
    for kind, title in (("task", "Task shares of explainable directions, all layers"),
                        ("level", "Linguistic levels, all layers")):
        sub = tests[(tests["kind"] == kind) & (tests["group"].astype(str) == "all")] if "group" in tests else \
            tests[tests["kind"] == kind]
        if sub.empty:
            continue
        rows = []
        for _, r in sub.iterrows():
            p = r.get("p", float("nan"))
            delta = r["tuned_mean"] - r["base_mean"]
            arrow = "▲" if delta > 0 else "▼" if delta < 0 else ""
            strong = ' style="font-weight:700"' if isinstance(p, float) and p < 0.05 else ""
            rows.append(f"<tr><td>{_e(r['category'])}</td><td class=num>{_fmt(r['base_mean'])} ± "
                        f"{_fmt(r.get('base_std'))}</td><td class=num>{_fmt(r['tuned_mean'])} ± "
                        f"{_fmt(r.get('tuned_std'))}</td><td class=num>{arrow} {_fmt(delta)}</td>"
                        f"<td class=num{strong}>{_fmt(p)}</td></tr>")
        parts.append(f'<div><p class="sub">{_e(title)} (mean ± std over annotation seeds; Student t, p &lt; 0.05 '
                     f'bold)</p><table class="data"><tr><th>category</th><th>{_e(run.model_name(base))}</th>'
                     f"<th>{_e(run.model_name(tuned))}</th><th>change</th><th>p</th></tr>{''.join(rows)}</table>"
                     "</div>")
    return f'<div class="sides">{"".join(parts)}</div>' if parts else ""


EXTRAS: dict[str, Callable[[RunInfo, str, str, _Page], str]] = {
    "head_relations": _extra_head_relations, "ffn_concepts": _extra_ffn_concepts}


def _pair_section(run: RunInfo, base: str, tuned: str, page: _Page) -> str:
    pid = _pair_id(base, tuned)
    title = f"{run.model_name(base)} → {run.model_name(tuned)}"
    parts = [f'<p class="muted">base <b>{_e(base)}</b> vs tuned <b>{_e(tuned)}</b>; the analyses side by side, '
             "then each in detail.</p>"]
    plugins = [p for p in run.plugins if (run.dir / p / f"compare/{base}__{tuned}").is_dir()
               or run.done(p, base) or run.done(p, tuned)]
    parts.append('<div class="overview">' + "".join(_overview_card(run, p, base, tuned, page) for p in plugins)
                 + "</div>")
    body = "".join(parts)
    sub_html = []
    for plugin in plugins:
        spec = ANALYSES.get(plugin, Analysis(title=plugin, blurb=""))
        bits = [f'<p class="blurb">{_e(spec.blurb)}</p>' if spec.blurb else ""]
        cmp = run.result_dir(plugin, f"compare/{base}__{tuned}")
        if plugin in EXTRAS and cmp.is_dir():
            bits.append(_safe(EXTRAS[plugin], run, base, tuned, page))
        if cmp.is_dir():
            bits.append(f"<h4>Comparison</h4>{render_results(cmp, plugin, page, f'{plugin} {base}__{tuned}')}")
        else:
            bits.append('<p class="muted">no comparison yet (the pair is not done: see the status table).</p>')
        sides = []
        for key in (base, tuned):
            d = run.result_dir(plugin, key)
            inner = render_results(d, plugin, page, f"{plugin} {key}") if d.is_dir() else \
                '<p class="muted">no results</p>'
            sides.append(f'<div class="side"><h4>{_e(run.model_name(key))} <span class="muted">({_e(key)})'
                         f"</span></h4>{inner}</div>")
        bits.append(f'<details class="per-model"><summary>Per model: {_e(run.model_name(base))} | '
                    f'{_e(run.model_name(tuned))}</summary><div class="sides">{"".join(sides)}</div></details>')
        sub_html.append(page.section(f"{pid}-{plugin}", spec.title, "".join(bits), level=3, cls="analysis"))
    responses = _responses(run, [base, tuned])
    if responses:
        sub_html.append(page.section(f"{pid}-responses", "Example responses (each model's own, greedy)",
                                     responses, level=3))
    # the pair's own heading must precede its subsections in the TOC
    index = len(page.sections) - len(sub_html)
    page.sections.insert(index, (pid, title, 2))
    return (f'<section id="{_e(pid)}" class="pair" data-title="{_e(title)}"><h2>{_e(title)}'
            f'<a class="anchor" href="#{_e(pid)}">#</a></h2>{body}{"".join(sub_html)}</section>')


def _model_section(run: RunInfo, key: str, page: _Page) -> str:
    bits = []
    for plugin in run.plugins:
        d = run.result_dir(plugin, key)
        if d.is_dir():
            spec = ANALYSES.get(plugin, Analysis(title=plugin, blurb=""))
            bits.append(f"<h3>{_e(spec.title)}</h3>" + render_results(d, plugin, page, f"{plugin} {key}"))
    responses = _responses(run, [key])
    if responses:
        bits.append("<h3>Example responses</h3>" + responses)
    return page.section(f"model-{_slug(key)}", f"Model {run.model_name(key)}",
                        "".join(bits) or '<p class="muted">no results</p>')


def _status_table(run: RunInfo) -> str:
    status = _status(run)
    if not status:
        return '<p class="muted">no plugins configured</p>'
    cols = sorted({k for v in status.values() for k in v}, key=lambda k: (k.startswith("compare/"), k))
    head = "<tr><th>plugin</th>" + "".join(f"<th>{_e(c)}</th>" for c in cols) + "</tr>"
    rows = "".join(
        f"<tr><td>{_e(p)}</td>" + "".join(
            ('<td><span class="badge ok">done</span></td>' if v.get(c) else
             '<td><span class="badge missing">missing</span></td>') if c in v else "<td></td>" for c in cols)
        + "</tr>" for p, v in status.items())
    return f'<div class="scroll"><table class="data">{head}{rows}</table></div>'


def _timing(run: RunInfo) -> str:
    timing = run.summary.get("timing") or {}
    if not timing:
        return '<p class="muted">no timings</p>'
    by_hook = sorted((timing.get("seconds_by_hook") or {}).items(), key=lambda kv: -kv[1])
    rows = {"total (s)": timing.get("seconds_total")} | {k: v for k, v in by_hook[:20]}
    return _kv_table(rows)


def _config_block(run: RunInfo) -> str:
    path = run.dir / "config.yaml"
    text = path.read_text() if path.is_file() else json.dumps(run.config, indent=1)
    return f"<details><summary>resolved config.yaml</summary><pre>{_e(text)}</pre></details>"


def build_report_html(run_dir: str | Path, root: Path | None = None,
                      budget: _Budget | None = None) -> tuple[str, _Page]:
    """The report page of ``run_dir`` (as a string) and its page state; see :func:`write_report`."""
    run = load_run(run_dir)
    page = _Page(root or run.dir, budget or _Budget(MAX_EMBED_BYTES))
    body = [page.section("overview", "Run", _settings(run) + _models_table(run))]
    paired = {k for pair in run.pairs for k in pair}
    for base, tuned in run.pairs:
        body.append(_pair_section(run, base, tuned, page))
    for key in _model_keys(run):
        if key not in paired:
            body.append(_model_section(run, key, page))
    body.append(page.section("status", "Status (results marked done)", _status_table(run)))
    body.append(page.section("timing", "Timing", _timing(run)))
    body.append(page.section("config", "Config", _config_block(run)))
    subtitle = _e(f"{len(run.pairs)} pair(s), {len(_model_keys(run))} model(s), plugins: "
                  f"{', '.join(run.plugins) or 'none'}") + f' · <span>{_e(run.dir)}</span>'
    return _page_html(f"tuneshift report: {run.name}", subtitle, page, "".join(body)), page


def _publish(path: Path, data: bytes) -> None:
    """Write atomically, readable like any file the user creates (the store's temp files are private, 0600)."""
    atomic_write_bytes(path, data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_report(run_dir: str | Path, logger: Any = None, export: bool = False) -> Path:
    """Write ``report.html`` into ``run_dir`` from what the plugins stored there; returns its path.

    Never raises for bad result files (they show as notes). ``logger`` (a :class:`tuneshift.loggers.Logger`)
    also gets the report (``log_html``); ``export=True`` also writes ``figures/`` (:func:`export_figures`).
    """
    run_dir = Path(run_dir)
    text, page = build_report_html(run_dir)
    out = run_dir / "report.html"
    _publish(out, text.encode())
    if export:
        export_figures(run_dir, page=page)
    if logger is not None:
        log_report(run_dir, logger, out)
    return out


def export_figures(run_dir: str | Path, dest: str | Path | None = None, page: _Page | None = None) -> Path:
    """Copy every plot of the run into one flat folder (``<plugin>__<model or pair>__<name>.png``) with an
    ``index.json`` of captions: the static images for papers (W&B gets them from the plugins' loggers)."""
    run_dir = Path(run_dir)
    dest = Path(dest) if dest else run_dir / "figures"
    dest.mkdir(parents=True, exist_ok=True)
    if page is None:
        _, page = build_report_html(run_dir)
    index = []
    seen = set()
    for fig in page.figures:
        src = Path(fig["path"])
        if src in seen:
            continue
        seen.add(src)
        rel = src.relative_to(run_dir)
        name = "__".join(_slug(p) for p in rel.with_suffix("").parts if p != "compare") + ".png"
        shutil.copyfile(src, dest / name)
        index.append({"file": name, "source": rel.as_posix(), "caption": fig["caption"]})
    atomic_write_json(dest / "index.json", index)
    return dest


def log_report(run_dir: str | Path, logger: Any, report: Path | None = None) -> None:
    """Log the report page and the sweep/summary figures to a tuneshift logger (W&B or local)."""
    run_dir = Path(run_dir)
    report = report or run_dir / "report.html"
    try:
        logger.log_html("report", report)
        for png in sorted(run_dir.glob("sweep_summary*.png")):
            logger.log_image(f"report/{png.stem}", png)
    except Exception as err:  # noqa: BLE001 - logging never breaks a run
        log.warning("report: logging failed: %s", err)


# ---- sweep report -----------------------------------------------------------------------------------------------
def find_runs(sweep_dir: str | Path, max_depth: int = 3) -> list[Path]:
    """Run dirs under ``sweep_dir`` (each holding ``config.yaml`` or ``summary.json``), in name order."""
    sweep_dir = Path(sweep_dir)
    found: list[Path] = []

    def walk(d: Path, depth: int) -> None:
        if (d / "config.yaml").is_file() or (d / "summary.json").is_file():
            found.append(d)
            return
        if depth >= max_depth:
            return
        for sub in sorted(p for p in d.iterdir() if p.is_dir() and p.name not in SKIP_DIRS
                          and not p.name.startswith(".")):
            walk(sub, depth + 1)

    if sweep_dir.is_dir():
        for sub in sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name not in SKIP_DIRS
                          and not p.name.startswith(".")):
            walk(sub, 1)
    return found


def sweep_rows(sweep_dir: str | Path) -> list[dict]:
    """One row per (job, pair) of the sweep: identity, status and every analysis' headline numbers."""
    rows = []
    for run_dir in find_runs(sweep_dir):
        run = load_run(run_dir)
        status = _status(run)
        done = sum(v for s in status.values() for v in s.values())
        total = sum(len(s) for s in status.values())
        pairs = run.pairs or [(k, None) for k in run.models]
        for base, tuned in pairs:
            spec_b = run.models.get(base, {})
            row: dict[str, Any] = {
                "run": run.name, "run_dir": run_dir, "family": (run.config.get("model") or {}).get("name", run.name),
                "experiment": run.config.get("experiment"), "base": run.model_name(base),
                "tuned": run.model_name(tuned) if tuned else "", "dtype": spec_b.get("dtype", ""),
                "status": "done" if total and done == total else "partial" if done else "missing",
                "done": f"{done}/{total}", "seconds": (run.summary.get("timing") or {}).get("seconds_total"),
                "metrics": {}}
            for plugin in run.plugins:
                if tuned is None:
                    break
                summary = _read_json(run.result_dir(plugin, f"compare/{base}__{tuned}") / "summary.json")
                if summary is not None:
                    for key, value in headline_metrics(plugin, summary).items():
                        row["metrics"][(plugin, key)] = value
            rows.append(row)
    return rows


def _sweep_figure(rows: list[dict], out_dir: Path) -> list[Path]:
    """Small multiples: one bar chart per headline metric across the sweep's pairs (PNG and PDF)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = []
    for row in rows:
        metrics += [m for m in row["metrics"] if m not in metrics]
    metrics = metrics[:12]
    if not metrics or not rows:
        return []
    ncols = min(3, len(metrics))
    nrows = math.ceil(len(metrics) / ncols)
    labels = [str(r["family"]) for r in rows]
    if len(set(labels)) < len(labels):
        labels = [f"{r['family']} ({r['run']})" for r in rows]
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 0.35 * len(rows) * nrows + 1.6 * nrows),
                             squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        values = [r["metrics"].get(metric, float("nan")) for r in rows]
        ax.barh(range(len(rows)), values, color="#4c72b0")
        ax.set_yticks(range(len(rows)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(textwrap.fill(f"{metric[0]}: {metric[1]}", 48), fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(axis="x", alpha=0.3)
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    fig.tight_layout()
    paths = [out_dir / "sweep_summary.png", out_dir / "sweep_summary.pdf"]
    fig.savefig(paths[0], dpi=130)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def write_sweep_report(sweep_dir: str | Path, refresh_runs: bool = True, logger: Any = None) -> Path:
    """Write ``sweep_report.html`` (and ``sweep_summary.{png,pdf,csv}``) into ``sweep_dir``; returns its path.

    ``refresh_runs``: (re)write each job's ``report.html`` first, so every link of the table works (also for a
    job that failed before its report was written).
    """
    sweep_dir = Path(sweep_dir)
    runs = find_runs(sweep_dir)
    if refresh_runs:
        for run_dir in runs:
            _safe(lambda d: str(write_report(d)), run_dir)
    rows = sweep_rows(sweep_dir)
    page = _Page(sweep_dir, _Budget(MAX_EMBED_BYTES))
    metrics: list[tuple[str, str]] = []
    for row in rows:
        metrics += [m for m in row["metrics"] if m not in metrics]
    plugins = []
    for m in metrics:
        if m[0] not in plugins:
            plugins.append(m[0])
    labels = [str(r["family"]) for r in rows]
    if len(set(labels)) < len(labels):  # the same pair twice (e.g. a dtype sweep): name the job too
        labels = [f"{r['family']} ({r['run']})" for r in rows]
    head = ("<tr><th>family</th><th>experiment</th><th>base</th><th>tuned</th><th>dtype</th><th>status</th>"
            "<th>time (s)</th><th>report</th></tr>")
    body_rows = []
    for label, row in zip(labels, rows):
        link = row["run_dir"] / "report.html"
        badge = (f'<span class="badge {row["status"] if row["status"] != "done" else "ok"}">'
                 f'{_e(row["status"])} {_e(row["done"])}</span>')
        body_rows.append(
            f"<tr><td><b>{_e(label)}</b></td><td>{_e(row['experiment'] or '')}</td><td>{_e(row['base'])}</td>"
            f"<td>{_e(row['tuned'])}</td><td>{_e(row['dtype'])}</td><td class=nowrap>{badge}</td>"
            f'<td class="num">{_e(_fmt(row["seconds"]))}</td><td><a href="{_e(page.link(link))}">report</a></td></tr>')
    table = (f'<div class="scroll"><table class="data sweep">{head}{"".join(body_rows)}</table></div>'
             if rows else '<p class="muted">no runs found under this directory</p>')
    if metrics:  # the numbers: one row per (analysis, metric), one column per family
        mhead = "<tr><th>analysis</th><th>metric</th>" + "".join(f"<th>{_e(l)}</th>" for l in labels) + "</tr>"
        mrows = []
        for plugin in plugins:
            mine = [m for m in metrics if m[0] == plugin]
            title = ANALYSES[plugin].title.split(":")[0] if plugin in ANALYSES else plugin
            for i, metric in enumerate(mine):
                lead = f'<th rowspan="{len(mine)}">{_e(title)}</th>' if i == 0 else ""
                cells = "".join(f'<td class="num">{_e(_fmt(r["metrics"].get(metric)))}</td>' for r in rows)
                mrows.append(f"<tr>{lead}<td>{_e(metric[1])}</td>{cells}</tr>")
        table += ('<h3>Headline numbers (base vs tuned comparisons)</h3><div class="scroll"><table class="data '
                  f'metrics">{mhead}{"".join(mrows)}</table></div>')
    csv_rows = [{"family": r["family"], "experiment": r["experiment"], "base": r["base"], "tuned": r["tuned"],
                 "dtype": r["dtype"], "status": r["status"], "done": r["done"], "seconds": r["seconds"],
                 **{f"{p}:{k}": r["metrics"].get((p, k)) for p, k in metrics}} for r in rows]
    if csv_rows:
        import pandas as pd

        atomic_write_bytes(sweep_dir / "sweep_summary.csv", pd.DataFrame(csv_rows).to_csv(index=False).encode())
    body = [page.section("sweep-table", "Across families", '<p class="blurb">One row per job and pair, then the '
                         "headline numbers of each analysis' comparison (base vs tuned). Status counts the "
                         "(plugin, model) results marked done: re-run the same sweep to complete a partial job. "
                         'Also in <a href="sweep_summary.csv">sweep_summary.csv</a>.</p>' + table)]
    figure_html = ""
    for path in _safe_list(_sweep_figure, rows, sweep_dir):
        if path.suffix == ".png":
            figure_html += render_png(path, page, "Headline numbers across families", "sweep")
    body.append(page.section("sweep-figures", "Figures", figure_html or '<p class="muted">no numbers yet</p>'))
    jobs = "".join(f'<li><a href="{_e(page.link(r / "report.html"))}">{_e(r.relative_to(sweep_dir))}</a></li>'
                   for r in runs)
    multirun = sweep_dir / "multirun.yaml"
    extra = (f"<details><summary>multirun.yaml</summary><pre>{_e(multirun.read_text())}</pre></details>"
             if multirun.is_file() else "")
    body.append(page.section("sweep-jobs", "Jobs", f"<ul>{jobs}</ul>{extra}"))
    subtitle = _e(f"{len(runs)} job(s), {len(rows)} pair(s)") + f" · <span>{_e(sweep_dir)}</span>"
    out = sweep_dir / "sweep_report.html"
    _publish(out, _page_html(f"tuneshift sweep: {sweep_dir.name}", subtitle, page, "".join(body)).encode())
    if logger is not None:
        log_report(sweep_dir, logger, out)
    return out


def _safe_list(fn: Callable[..., list], *args: Any) -> list:
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001
        log.warning("report: %s failed: %s", fn.__name__, err)
        return []


try:  # a Hydra callback that writes the sweep report when a multirun ends (conf: hydra.callbacks)
    from hydra.experimental.callback import Callback as _HydraCallback
except Exception:  # noqa: BLE001
    _HydraCallback = object  # type: ignore[misc,assignment]


class SweepReportCallback(_HydraCallback):  # type: ignore[misc,valid-type]
    """``hydra.callbacks.sweep_report._target_: tuneshift.report.SweepReportCallback``: after ``tuneshift -m``,
    write ``<hydra.sweep.dir>/sweep_report.html``. With a launcher that submits and returns (SLURM), run
    ``tuneshift-report <sweep dir>`` once the jobs are done instead."""

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        try:
            path = write_sweep_report(config.hydra.sweep.dir)
            print(f"tuneshift: sweep report {path}")
        except Exception as err:  # noqa: BLE001
            log.warning("sweep report failed: %s", err)


# ---- command line -----------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    """``tuneshift-report DIR...``: a run dir gets ``report.html``, a sweep dir ``sweep_report.html``."""
    parser = argparse.ArgumentParser(prog="tuneshift-report", description=main.__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="run dirs or sweep dirs")
    parser.add_argument("--figures", action="store_true", help="also copy every plot into <run_dir>/figures/")
    parser.add_argument("--no-refresh", action="store_true", help="sweep: do not rewrite each job's report")
    args = parser.parse_args(argv)
    status = 0
    for d in args.dirs:
        if not d.is_dir():
            print(f"tuneshift-report: {d} is not a directory", file=sys.stderr)
            status = 2
            continue
        if (d / "config.yaml").is_file() or (d / "summary.json").is_file():
            print(write_report(d, export=args.figures))
        elif find_runs(d):
            print(write_sweep_report(d, refresh_runs=not args.no_refresh))
            if args.figures:
                for run_dir in find_runs(d):
                    export_figures(run_dir)
        else:
            print(f"tuneshift-report: no run (config.yaml / summary.json) under {d}", file=sys.stderr)
            status = 2
    return status


sweep_main = main  # the console-script entry point may name either


if __name__ == "__main__":
    raise SystemExit(main())
