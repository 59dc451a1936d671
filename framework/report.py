"""The run report: one self-contained HTML page (no network needed) gathering every plugin's results.

Each plugin's PNG plots are embedded as base64 images, its HTML views are linked, and its JSON summaries
and comparison tables are shown as tables. ``write_report(run_dir)`` is called at the end of each run.
"""
from __future__ import annotations

import base64
import html
import json
from pathlib import Path

from framework.results import atomic_write_bytes

_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;font-size:.9em}
th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee;margin:.3em 0}.muted{color:#777}"""


def _table(rows: dict) -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v) if isinstance(v, (dict, list)) else str(v))}</td></tr>"
                   for k, v in rows.items())
    return f"<table>{body}</table>"


def _section(run_dir: Path, plugin_dir: Path) -> str:
    parts = [f'<section id="plugin-{plugin_dir.name}"><h2>{html.escape(plugin_dir.name)}</h2>']
    for model_dir in sorted(p for p in plugin_dir.rglob("*") if p.is_dir() and (p / "_DONE").exists()):
        rel = model_dir.relative_to(plugin_dir)
        parts.append(f"<h3>{html.escape(str(rel))}</h3>")
        for summary in sorted(model_dir.glob("*.json")):
            data = json.loads(summary.read_text())
            if isinstance(data, dict) and len(json.dumps(data)) < 20000:
                parts.append(f"<p class=muted>{html.escape(summary.name)}</p>" + _table(data))
        for png in sorted(model_dir.glob("*.png")):
            b64 = base64.b64encode(png.read_bytes()).decode()
            parts.append(f'<figure><img alt="{html.escape(png.stem)}" src="data:image/png;base64,{b64}">'
                         f"<figcaption class=muted>{html.escape(png.name)}</figcaption></figure>")
        for view in sorted(model_dir.glob("*.html")):
            parts.append(f'<p><a href="{html.escape(str(view.relative_to(run_dir)))}">{html.escape(view.name)}</a></p>')
    return "".join(parts) + "</section>"


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.html`` into ``run_dir`` from what the plugins stored there."""
    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    sections = [_section(run_dir, d) for d in sorted(run_dir.iterdir())
                if d.is_dir() and d.name not in ("logs", "responses", "wandb", ".hydra")]
    page = (f"<!doctype html><html><head><meta charset=utf-8><title>tuneshift report</title><style>{_STYLE}</style>"
            f"</head><body><h1>tuneshift report: {html.escape(run_dir.name)}</h1>"
            f"<section id=models><h2>Models</h2>{_table(summary.get('models', {}))}</section>"
            + "".join(sections) + "</body></html>")
    out = run_dir / "report.html"
    atomic_write_bytes(out, page.encode())
    return out
