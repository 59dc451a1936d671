"""The run report: ``report.html``, one self-contained page per run folder (no network needed to open it).

Layout: the run (models, data, plugins); for each (base, tuned) pair an overview with every plugin's headline
findings and key figure, then one section per plugin (its comparison, then each model's own section side by
side) and example responses; a section per model outside any pair; the status of every result; timings; the
settings (``settings.json``, ``config.yaml``). Every piece comes from the plugins' stored sections
(:mod:`tuneshift.report.collect`), rendered by the templates in ``templates/``.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any, Sequence

from tuneshift.report.assets import MAX_EMBED_BYTES, Page, cell, flatten, slug
from tuneshift.report.collect import RunInfo, load_run, render_section, status
from tuneshift.results import atomic_write_bytes, atomic_write_json

log = logging.getLogger("tuneshift")
N_RESPONSES = 6  # example prompts shown with each model's response
CARD_FINDINGS = 6  # headline findings per plugin in a pair's overview (all of them in its section)
_ENV = None


def render(template: str, **context: Any) -> str:
    """Render one of the package's Jinja2 templates (HTML autoescaped)."""
    global _ENV
    if _ENV is None:
        from jinja2 import Environment, FileSystemLoader, StrictUndefined

        _ENV = Environment(loader=FileSystemLoader(str(Path(__file__).with_name("templates"))), autoescape=True,
                           trim_blocks=True, lstrip_blocks=True, undefined=StrictUndefined)
    return _ENV.get_template(template).render(**context)


def publish(path: Path, text: str) -> Path:
    """Write atomically, readable like any file the user creates."""
    atomic_write_bytes(path, text.encode())
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)
    return path


# ---- pieces of the page --------------------------------------------------------------------------------------
def _responses(run: RunInfo, keys: Sequence[str], page: Page) -> dict | None:
    """The first prompts with each model's own response (``responses/<model>.jsonl``)."""
    order: list[str] = []
    prompts: dict[str, str] = {}
    answers: dict[str, dict[str, str]] = {}
    for key in keys:
        path = run.dir / "responses" / f"{key}.jsonl"
        if not path.is_file():
            continue
        try:
            for line in path.read_text().splitlines()[:N_RESPONSES]:
                row = json.loads(line)
                pid = str(row.get("id"))
                order += [pid] if pid not in order else []
                prompts[pid] = str(row.get("prompt", ""))
                answers.setdefault(pid, {})[key] = str(row.get("response", ""))
        except Exception as err:  # noqa: BLE001
            page.fail(f"responses/{key}.jsonl", err)
    if not order:
        return None
    return {"names": [run.model_name(k) for k in keys],
            "rows": [{"id": p, "prompt": prompts[p], "answers": [answers[p].get(k, "") for k in keys]}
                     for p in order]}


def _models(run: RunInfo) -> list[dict]:
    described = run.summary.get("models") or {}
    rows = []
    for key in run.keys:
        spec = run.models.get(key, {})
        extra = ", ".join(f"{k}={cell(v)}" for k, v in (described.get(key) or {}).items() if k != "name")
        rows.append({"key": key, "name": run.model_name(key), "path": spec.get("path", ""),
                     "dtype": spec.get("dtype", ""), "device": spec.get("device_map") or spec.get("device", ""),
                     "chat": spec.get("chat_template", ""), "architecture": extra})
    return rows


def _overview(run: RunInfo) -> dict:
    cfg = run.config
    data, gen = cfg.get("data") or {}, cfg.get("generation") or (run.settings.get("settings") or {}).get(
        "generation") or {}
    rows = {"experiment": cfg.get("experiment"), "run folder": str(run.dir),
            "data": f"{data.get('name', '')} ({data.get('format', '')}"
                    + (f", first {data['limit']}" if data.get("limit") else "") + ")" if data else None,
            "prompts file": data.get("path"), "max new tokens": gen.get("max_new_tokens"),
            "settings hash": run.settings.get("hash"), "plugins": ", ".join(run.plugins)}
    return {"rows": {k: v for k, v in rows.items() if v not in (None, "")}, "models": _models(run)}


def _card(plugin: str, section: dict, sides: list[dict], anchor: str) -> dict:
    """One plugin in a pair's overview: its comparison's findings and key figure."""
    headlines = section["headlines"]
    if not headlines:  # a plugin without a comparison of its own: each model's findings
        headlines = [{**h, "text": f"{side['model']}: {h['text']}"} for side in sides
                     for h in side["section"]["headlines"] if "text" in h]
    figures = [f for f in section["figures"] if "error" not in f] or \
        [f for side in sides[-1:] for f in side["section"]["figures"] if "error" not in f]
    return {"title": section["title"], "href": f"#{anchor}", "headlines": headlines[:CARD_FINDINGS],
            "more": max(0, len(headlines) - CARD_FINDINGS), "figure": figures[0] if figures else None}


def _pair(run: RunInfo, base: str, tuned: str, page: Page) -> dict:
    pid = page.anchor(f"pair-{slug(base)}__{slug(tuned)}", f"{run.model_name(base)} → {run.model_name(tuned)}", 2)
    key = f"compare/{base}__{tuned}"
    plugins, cards = [], []
    status_of = status(run)  # the configured plugins, whose comparison is expected
    for plugin in run.plugins:
        if not any(run.result_dir(plugin, k).is_dir() for k in (key, base, tuned)):
            continue
        sides = [{"key": k, "model": run.model_name(k),
                  "section": render_section(run, plugin, k, page)} for k in (base, tuned)
                 if run.result_dir(plugin, k).is_dir()]
        if run.result_dir(plugin, key).is_dir():
            compare = render_section(run, plugin, key, page, (base, tuned))
        else:  # a tool that checks single models (or a comparison still to come): titled by its model sections
            first = sides[0]["section"]
            compare = {"title": first["title"], "explanation": first["explanation"], "notes": [],
                       "headlines": [], "figures": [], "tables": [], "views": [], "others": [], "absent": True}
        sid = page.anchor(f"{pid}-{slug(plugin)}", compare["title"], 3)
        plugins.append({"id": sid, "section": compare, "sides": sides, "done": run.done(plugin, key),
                        "expected": plugin in status_of})
        cards.append(_card(plugin, compare, sides, sid))
    responses = _responses(run, [base, tuned], page)
    rid = page.anchor(f"{pid}-responses", "Example responses", 3) if responses else ""
    return {"id": pid, "title": f"{run.model_name(base)} → {run.model_name(tuned)}", "base": base,
            "tuned": tuned, "cards": cards, "plugins": plugins, "responses": responses, "responses_id": rid}


def _single(run: RunInfo, key: str, page: Page) -> dict:
    mid = page.anchor(f"model-{slug(key)}", f"Model {run.model_name(key)}", 2)
    sections = [render_section(run, p, key, page) for p in run.plugins if run.result_dir(p, key).is_dir()]
    return {"id": mid, "title": f"Model {run.model_name(key)}", "key": key, "sections": sections,
            "responses": _responses(run, [key], page)}


def _timing(run: RunInfo) -> dict:
    timing = run.summary.get("timing") or {}
    by_hook = sorted((timing.get("seconds_by_hook") or {}).items(), key=lambda kv: -kv[1])[:20]
    return {"total": timing.get("seconds_total"), "rows": [(k, cell(float(v))) for k, v in by_hook]}


def _settings(run: RunInfo) -> dict:
    path = run.dir / "config.yaml"
    flat = flatten(run.settings.get("settings") or {})
    return {"hash": run.settings.get("hash"), "data": run.settings.get("data_fingerprint"),
            "rows": [(k, cell(v)) for k, v in flat.items()],
            "config": path.read_text(errors="replace") if path.is_file() else ""}


def build_report_html(run_dir: str | Path, root: Path | None = None,
                      max_embed_bytes: int = MAX_EMBED_BYTES) -> tuple[str, Page]:
    """The report page of ``run_dir`` and the page state (figures shown, errors); see :func:`write_report`."""
    run = load_run(run_dir)
    page = Page(root or run.dir, budget=max_embed_bytes)
    page.anchor("run", "Run", 2)
    overview = _overview(run)
    paired = {k for pair in run.pairs for k in pair}
    pairs = [_pair(run, b, t, page) for b, t in run.pairs]
    singles = [_single(run, k, page) for k in run.keys if k not in paired]
    for sid, title in (("status", "Status"), ("timing", "Timing"), ("settings", "Settings")):
        page.anchor(sid, title, 2)
    text = render("run.html.j2", title=f"tuneshift report: {run.name}", page=page, run=run, overview=overview,
                  pairs=pairs, singles=singles, status=status(run), timing=_timing(run), settings=_settings(run),
                  generated=_dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
                  subtitle=f"{len(run.pairs)} pair(s), {len(run.keys)} model(s), plugins: "
                           f"{', '.join(run.plugins) or 'none'}")
    return text, page


def write_report(run_dir: str | Path, logger: Any = None, export: bool = False,
                 max_embed_bytes: int = MAX_EMBED_BYTES) -> Path:
    """Write ``report.html`` into ``run_dir`` from what the plugins stored there; returns its path.

    Bad result files never raise (they show as error boxes). ``logger`` (a :class:`tuneshift.loggers.Logger`)
    also gets the page (``log_html``); ``export=True`` also writes ``figures/`` (:func:`export_figures`).
    """
    run_dir = Path(run_dir)
    text, page = build_report_html(run_dir, max_embed_bytes=max_embed_bytes)
    out = publish(run_dir / "report.html", text)
    if export:
        export_figures(run_dir, page=page)
    if logger is not None:
        log_report(run_dir, logger, out)
    return out


def export_figures(run_dir: str | Path, dest: str | Path | None = None, page: Page | None = None) -> Path:
    """Copy every figure the report shows into one flat folder (``<plugin>__<model or pair>__<name>.png``) with
    an ``index.json`` of captions: the static images for a paper."""
    run_dir = Path(run_dir)
    dest = Path(dest) if dest else run_dir / "figures"
    dest.mkdir(parents=True, exist_ok=True)
    if page is None:
        _, page = build_report_html(run_dir)
    index, seen = [], set()
    for fig in page.figures:
        src = Path(fig["path"])
        if src in seen:
            continue
        seen.add(src)
        rel = src.relative_to(run_dir)
        name = "__".join(slug(p) for p in rel.with_suffix("").parts if p != "compare") + src.suffix
        shutil.copyfile(src, dest / name)
        index.append({"file": name, "source": rel.as_posix(), "caption": fig["caption"]})
    atomic_write_json(dest / "index.json", index)
    return dest


def log_report(run_dir: str | Path, logger: Any, report: Path | None = None) -> None:
    """Log the report page (``log_html``) and a sweep's summary figures (``log_image``) to a tuneshift logger."""
    run_dir = Path(run_dir)
    try:
        logger.log_html("report", report or run_dir / "report.html")
        for png in sorted(run_dir.glob("sweep_summary*.png")):
            logger.log_image(f"report/{png.stem}", png)
    except Exception as err:  # noqa: BLE001 -- logging never breaks a run
        log.warning("report: logging failed: %s", err)


__all__ = ["build_report_html", "export_figures", "log_report", "publish", "render", "write_report"]
