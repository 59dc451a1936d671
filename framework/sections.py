"""What a plugin puts in the report: its section (title, explanation, headline findings, figures, tables, views).

What it is for
    Each plugin owns how its results are presented. After a plugin finishes a model (``on_model_end``) or a
    comparison (``on_compare``), the runner asks it for a :class:`Section` (:meth:`Plugin.section
    <tuneshift.plugin.Plugin.section>`) and stores it as ``section.json`` beside the results. The report
    (:mod:`tuneshift.report`) renders stored sections with Jinja2 templates and knows no plugin by name; the
    terminal and W&B show the :class:`Headline` findings.

Canonical pattern (in a plugin's ``section``)::

    Section(title="Saliency", explanation="Gradient x input ...",
            headlines=[Headline("instruction score", base=0.276, tuned=0.230, test="Welch one-sided",
                                p=0.89, n=80)],
            figures=[Figure("score_distribution.png", "Instruction scores, base vs tuned")],
            tables=[Table("welch_tests.parquet", "Welch tests per split")],
            views=[View("examples.html", "Prompts coloured by importance density")])

Paths are relative to the section's own result folder (``<run>/<plugin>/<key>/``).
``Headline.text()`` reads like a finding: ``instruction score: base 0.276 -> tuned 0.230, Welch one-sided
p = 0.89, n = 80``.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def format_number(value: Any, digits: int = 3) -> str:
    """``digits`` significant digits, no float noise: 0.2761 -> '0.276', 14745.0 -> '14745', 3.1e-05 -> '3.1e-05'."""
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "n/a"
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if value == 0:
        return "0"
    magnitude = math.floor(math.log10(abs(value)))
    if magnitude >= digits or magnitude < -3:
        if magnitude < -3:
            return f"{value:.{max(digits - 2, 1)}e}"
        return f"{value:.0f}"
    return f"{value:.{max(digits - 1 - magnitude, 0)}f}"


def format_p(p: float | None) -> str:
    """A p-value as people write it: 'p = 0.89', 'p = 0.038', 'p = 3.1e-05', 'p < 1e-300'."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "p = n/a"
    if p == 0:
        return "p < 1e-300"
    return f"p = {format_number(float(p), 2)}"


@dataclass
class Headline:
    """One finding in words: what was compared, the values, and the test behind it.

    A comparison gives ``base`` and ``tuned``; a single quantity gives ``value`` (e.g. a mean angle).
    ``note`` adds context such as a chance baseline ("chance 45°").
    """

    label: str
    base: float | None = None
    tuned: float | None = None
    value: float | None = None
    test: str = ""
    p: float | None = None
    n: Any = None
    unit: str = ""
    digits: int = 3
    note: str = ""

    def _num(self, x: Any) -> str:
        return f"{format_number(x, self.digits)}{self.unit}"

    def text(self, base_name: str = "base", tuned_name: str = "tuned") -> str:
        if self.base is not None or self.tuned is not None:
            body = f"{base_name} {self._num(self.base)} -> {tuned_name} {self._num(self.tuned)}"
        else:
            body = self._num(self.value)
        extras = []
        if self.test or self.p is not None:
            extras.append(" ".join(x for x in (self.test, format_p(self.p) if self.p is not None else "") if x))
        if self.n is not None:
            extras.append(f"n = {self.n}")
        if self.note:
            extras.append(self.note)
        return f"{self.label}: {body}" + (", " + ", ".join(extras) if extras else "")

    def metrics(self, prefix: str) -> dict[str, float]:
        """Numbers for W&B ``run.summary`` under ``prefix/label/...``."""
        slug = "_".join(self.label.lower().replace("/", " ").split())
        out = {f"{prefix}/{slug}/{k}": getattr(self, k) for k in ("base", "tuned", "value", "p")}
        return {k: float(v) for k, v in out.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@dataclass
class Figure:
    path: str          # a PNG beside the results
    caption: str


@dataclass
class Table:
    path: str          # a .parquet or .json (list of records) beside the results
    caption: str
    columns: list[str] | None = None   # shown columns (None: all)
    max_rows: int = 25


@dataclass
class View:
    path: str          # a self-contained HTML page beside the results
    caption: str


@dataclass
class Section:
    """One plugin's presentation of one model (``key`` = model key) or one comparison (``compare/<b>__<t>``)."""

    title: str
    explanation: str = ""
    headlines: list[Headline] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    views: list[View] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)     # warnings or caveats a reader must see

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Section":
        return cls(title=data.get("title", ""), explanation=data.get("explanation", ""),
                   headlines=[Headline(**h) for h in data.get("headlines", [])],
                   figures=[Figure(**f) for f in data.get("figures", [])],
                   tables=[Table(**t) for t in data.get("tables", [])],
                   views=[View(**v) for v in data.get("views", [])], notes=list(data.get("notes", [])))


def _caption(path: Path) -> str:
    return path.stem.replace("_", " ").capitalize()


def files_section(directory: Path, title: str, explanation: str = "") -> Section:
    """A section listing every figure, table and view in ``directory``, captioned by file name.

    The default for a plugin that declares nothing more: it still gets every picture and table it wrote.
    """
    directory = Path(directory)
    files = sorted(p for p in directory.glob("*") if p.is_file()) if directory.is_dir() else []
    return Section(title=title, explanation=explanation,
                   figures=[Figure(p.name, _caption(p)) for p in files if p.suffix == ".png"],
                   tables=[Table(p.name, _caption(p)) for p in files if p.suffix == ".parquet"],
                   views=[View(p.name, _caption(p)) for p in files if p.suffix == ".html"])


__all__ = ["Figure", "Headline", "Section", "Table", "View", "files_section", "format_number", "format_p"]
