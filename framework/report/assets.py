"""Result files as pieces of a self-contained page: PNGs as base64, tables previewed, HTML views embedded.

Each ``*_item`` function turns one declared file (a :class:`tuneshift.sections.Figure`, ``Table`` or ``View``)
into a plain dict that the Jinja2 templates render. A file that cannot be read becomes ``{"error": ...}``
(an error box on the page, also listed at the top), so one broken file never breaks the report. Everything
embedded counts against one byte budget (:class:`Page`); past it, files are linked by relative path and the
page stays openable.
"""
from __future__ import annotations

import base64
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from tuneshift.sections import format_number

log = logging.getLogger("tuneshift")

MAX_EMBED_BYTES = 96_000_000  # images, views and CSV downloads embedded in one page
MAX_CSV_BYTES = 2_000_000     # a table up to this size (as CSV) is embedded whole as a download
MAX_CELL_CHARS = 160


@dataclass
class Page:
    """State while one page is built: where it is written, the bytes it may still embed, what went wrong."""

    root: Path                        # the folder the page is written into (relative links start here)
    budget: int = MAX_EMBED_BYTES     # bytes it may still embed
    errors: list[str] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)  # every figure shown (path, caption, where): export
    toc: list[tuple[str, str, int]] = field(default_factory=list)  # (id, title, level)
    _count: int = 0

    def take(self, n: int) -> bool:
        """Reserve ``n`` bytes of the budget; False (nothing reserved) when they do not fit."""
        if n > self.budget:
            return False
        self.budget -= n
        return True

    def link(self, path: Path) -> str:
        """``path`` relative to the page (a file:// URI when it lies outside the page's folder)."""
        try:
            return Path(path).resolve().relative_to(Path(self.root).resolve()).as_posix()
        except ValueError:
            return Path(path).resolve().as_uri()

    def uid(self, stem: str) -> str:
        self._count += 1
        return f"{slug(stem)}-{self._count}"

    def anchor(self, sid: str, title: str, level: int) -> str:
        """Register a heading for the table of contents; returns its id."""
        self.toc.append((sid, title, level))
        return sid

    def fail(self, what: str, err: BaseException | str) -> dict:
        """Record a failure; the returned item renders as an error box."""
        message = f"{what}: {err}" if isinstance(err, str) else f"{what}: {type(err).__name__}: {err}"
        self.errors.append(message)
        log.warning("report: %s", message)
        return {"error": message}


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", str(text)).strip("-") or "x"


def natural_key(path: Path) -> list:
    """Sort key that puts ``view_layer2`` before ``view_layer10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", Path(path).name)]


def guarded(page: Page, what: str, fn: Callable[..., dict], *args: Any) -> dict:
    """``fn(*args)``, or an error item naming ``what`` when it raises."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 -- a broken file must not break the report
        return page.fail(what, err)


def data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ---- cells ---------------------------------------------------------------------------------------------------
def cell(value: Any) -> str:
    """A table cell as text: numbers to 4 significant digits, lists shortened, long text cut."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        value = value.tolist()
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return format_number(value, 4)
    if isinstance(value, (list, tuple)):
        items = [cell(v) for v in list(value)[:12]]
        return ", ".join(items) + (" …" if len(value) > 12 else "")
    if isinstance(value, dict):
        value = json.dumps(value, default=str)
    text = str(value)
    return text if len(text) <= MAX_CELL_CHARS else text[:MAX_CELL_CHARS] + " …"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys (``generation.max_new_tokens``); other values kept as they are."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: data}


# ---- figures -------------------------------------------------------------------------------------------------
def figure_item(page: Page, path: Path, caption: str, where: str = "") -> dict:
    """A PNG (or SVG/JPEG) embedded as a data URI, or linked once the budget is spent."""
    path = Path(path)
    data = path.read_bytes()
    if not data:
        raise ValueError("empty file")
    if path.suffix.lower() != ".svg":  # a truncated or foreign file becomes an error box, not a broken image
        import io

        from PIL import Image

        Image.open(io.BytesIO(data)).verify()
    mime = {".svg": "image/svg+xml", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}.get(path.suffix.lower(),
                                                                                      "image/png")
    page.figures.append({"path": str(path), "caption": caption, "where": where})
    item = {"caption": caption, "name": path.name, "href": page.link(path)}
    if page.take(len(data) * 4 // 3 + 64):
        item["src"] = data_uri(data, mime)
    return item


# ---- tables --------------------------------------------------------------------------------------------------
def read_table(path: Path) -> Any:
    """A parquet file, or a JSON list of records / (nested) dict of values, as a pandas DataFrame."""
    import pandas as pd

    path = Path(path)
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    data = json.loads(path.read_text())
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return pd.DataFrame(data)
    if isinstance(data, dict):
        flat = flatten(data)
        return pd.DataFrame({"key": list(flat), "value": [cell(v) for v in flat.values()]})
    raise ValueError("a JSON table must be a list of records or an object")


def _csv(frame: Any) -> bytes:
    def scalar(v: Any) -> Any:
        if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
            v = v.tolist()
        return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else v

    return frame.map(scalar).to_csv(index=False).encode()


def table_item(page: Page, path: Path, caption: str, columns: Sequence[str] | None = None,
               max_rows: int = 25) -> dict:
    """The first ``max_rows`` rows (of ``columns``), with the whole table as an embedded CSV when small."""
    path = Path(path)
    frame = read_table(path)
    item: dict[str, Any] = {"caption": caption, "name": path.name, "href": page.link(path),
                            "n_rows": len(frame), "n_cols": len(frame.columns)}
    if columns:
        missing = [c for c in columns if c not in frame.columns]
        frame = frame[[c for c in columns if c in frame.columns]]
        if missing:
            item["note"] = f"columns not in the file: {', '.join(missing)}"
    shown = frame.head(max(0, int(max_rows)))
    item["header"] = [str(c) for c in frame.columns]
    item["rows"] = [[{"text": cell(v), "num": is_number(v)} for v in row]
                    for row in shown.itertuples(index=False, name=None)]
    item["more"] = max(0, len(frame) - len(shown))
    if int(frame.memory_usage(deep=True).sum()) <= 4 * MAX_CSV_BYTES:
        csv = _csv(frame)
        if len(csv) <= MAX_CSV_BYTES and page.take(len(csv) * 4 // 3 + 64):
            item["csv"] = data_uri(csv, "text/csv")
            item["csv_name"] = f"{path.stem}.csv"
    return item


# ---- views ---------------------------------------------------------------------------------------------------
_RELATIVE_SRC = re.compile(r"""\ssrc=["'](?!data:|https?:|blob:|about:|#)[^"']+["']""", re.I)


def _with_base(page: Page, path: Path, text: str) -> str:
    """A view that loads files by relative path gets a ``<base>`` so they resolve beside it, not the report."""
    if not _RELATIVE_SRC.search(text):
        return text
    base = f'<base href="{page.link(path.parent)}/">'
    match = re.search(r"<head[^>]*>", text, re.I)
    return text[:match.end()] + base + text[match.end():] if match else base + text


def view_item(page: Page, paths: Sequence[Path], caption: str) -> dict:
    """HTML views embedded as ``<iframe srcdoc>``; several share one frame and a selector."""
    paths = sorted((Path(p) for p in paths), key=natural_key)
    if not paths:
        raise FileNotFoundError("no such view")
    embedded, linked = [], []
    for path in paths:
        text = _with_base(page, path, path.read_text(errors="replace"))
        if page.take(len(text.encode()) * 6 // 5):
            embedded.append({"name": path.name, "label": path.stem, "srcdoc": text})
        else:
            linked.append({"name": path.name, "href": page.link(path)})
    return {"caption": caption, "uid": page.uid("views"), "views": embedded, "linked": linked,
            "count": len(paths), "payload": {v["name"]: v["srcdoc"] for v in embedded} if len(embedded) > 1 else {}}


def file_link(page: Page, path: Path) -> dict:
    path = Path(path)
    return {"name": path.name, "href": page.link(path), "size": path.stat().st_size}


__all__ = ["MAX_CSV_BYTES", "MAX_EMBED_BYTES", "Page", "cell", "data_uri", "figure_item", "file_link", "flatten",
           "guarded", "is_number", "natural_key", "read_table", "slug", "table_item", "view_item"]
