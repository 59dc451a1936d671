"""Number formatting and result-file reading shared by the block renderers."""
from __future__ import annotations

import json
import math
import re
import subprocess
from pathlib import Path

from tools.readme import RESULTS_DIR, ReadmeError


def read_json(root: Path, name: str) -> dict:
    """``docs/results/<name>.json``, or an error naming the collector that writes it."""
    path = root / RESULTS_DIR / f"{name}.json"
    if not path.is_file():
        raise ReadmeError(f"{path} is missing: write it with `python -m tools.readme --collect {name} --source ...`")
    return json.loads(path.read_text(encoding="utf-8"))


def write_json(root: Path, name: str, payload: dict) -> Path:
    path = root / RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    return path


def commit_of(root: Path) -> str:
    """The repository's HEAD commit (short), or "" outside git; a '+' marks uncommitted changes."""
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return ""


def p_value(p: float | None) -> str:
    """A p-value as the README writes it: ``< 0.001``, else 2 significant digits (``0.038``, ``0.89``)."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    if p < 0.001:
        return "< 0.001"
    return f"{p:.2g}"


def sci(p: float) -> str:
    """``1.9e-05`` below 0.001, else 3 significant digits (the paper's p-values)."""
    return f"{p:.2g}" if p < 0.001 else f"{p:.3g}"


def markdown_rows(text: str, first_cell: str) -> list[list[str]]:
    """Rows (cells stripped) of every markdown table row in ``text`` whose first cell starts with ``first_cell``."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and line.strip("| ").startswith(first_cell):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    return rows


def number(cell: str) -> float:
    """The first number in a table cell (``≈ 80.12`` -> 80.12, ``**7.6x**`` -> 7.6, ``1,456`` -> 1456)."""
    match = re.search(r"-?\d[\d,]*\.?\d*(?:e[-+]?\d+)?", cell)
    if match is None:
        raise ReadmeError(f"no number in table cell {cell!r}")
    return float(match.group(0).replace(",", ""))
