"""Rows of the README benchmark table for the trace-based analyses: model diffing and interventions.

Parsed from what ``benchmarks/bench_diffing.py`` and ``benchmarks/bench_interventions.py`` print (through
``benchmarks/run_all.sh``); nothing here measures anything.
"""
from __future__ import annotations

from dataclasses import dataclass

from tools.blocks.common import markdown_rows, number
from tools.readme import ReadmeError


def _table_rows(text: str, cells: int) -> list[list[str]]:
    """Data rows (first cell a number) of the markdown tables in ``text`` with ``cells`` columns."""
    return [row for row in markdown_rows(text, "") if len(row) == cells and row[0].replace(",", "").isdigit()]


@dataclass
class DiffingCost:
    """One prompt count of bench_diffing.py: seconds, ratios to the plain forward, per-batch peak MiB."""

    prompts: int
    plain_s: float
    floor_x: float   # lens floor / plain
    first_x: float   # first model / plain
    second_x: float  # second model / plain
    batch_mb: tuple[float, float]  # largest per-batch peak, first / second model


def diffing_costs(text: str) -> list[DiffingCost]:
    rows = _table_rows(text, 10)
    if not rows:
        raise ReadmeError("a bench_diffing.py result has no measured rows")
    out = []
    for row in rows:
        floor, first, second = (row[i].split("(")[1] for i in (3, 4, 5))  # "0.482 (1.17x)" -> "1.17x)"
        first_mb, second_mb = (number(part) for part in row[9].split("/"))
        out.append(DiffingCost(int(row[0]), number(row[2]), number(floor), number(first), number(second),
                               (first_mb, second_mb)))
    return out


def lensed_layers(text: str) -> str:
    """'every layer' or the list given with ``--layers`` (the last layer is always lensed too)."""
    marker = "lensed layers "
    if marker not in text:
        raise ReadmeError("a bench_diffing.py result does not say which layers were lensed")
    value = text.split(marker, 1)[1].split(";", 1)[0].strip()
    return "every layer" if value == "all" else f"layers {value.strip('[]')} and the last"


def diffing_row(label: str, text: str) -> str:
    costs = diffing_costs(text)
    counts = " / ".join(str(c.prompts) for c in costs)
    worst = max(max(c.first_x, c.second_x) for c in costs)
    ratios = " / ".join(f"{c.first_x:.2f}x, {c.second_x:.2f}x" for c in costs)
    floors = " / ".join(f"{c.floor_x:.2f}x" for c in costs)
    return (f"| token_shift + layer_lens, {label}, {lensed_layers(text)}, {counts} prompts (first model, second) | "
            f"{' / '.join(f'{c.plain_s * max(c.first_x, c.second_x):.2f} s' for c in costs)} (slower model) | "
            f"plain forward {' / '.join(f'{c.plain_s:.2f} s' for c in costs)}; lens floor {floors} | {ratios} | "
            f"<= 1.3x: {'met' if worst <= 1.3 else '**not met**'} |")


def diffing_memory_row(label: str, text: str) -> str:
    costs = diffing_costs(text)
    peaks = [max(c.batch_mb) for c in costs]
    growth = max(peaks) / min(peaks) - 1 if min(peaks) > 0 else float("inf")
    return (f"| peak memory of one batch, token_shift + layer_lens, {label}, "
            f"{' / '.join(str(c.prompts) for c in costs)} prompts | "
            f"{' / '.join(f'{p:.0f} MiB' for p in peaks)} | the same batches at fewer prompts | "
            f"{100 * growth:+.0f} % | flat (within 10 %): {'met' if growth <= 0.10 else '**not met**'} |")


def intervention_costs(text: str) -> list[tuple[int, float, float, float]]:
    """``(rows, plain ms, writes ms, writes / plain)`` per row count of bench_interventions.py."""
    rows = _table_rows(text, 7)
    if not rows:
        raise ReadmeError("a bench_interventions.py result has no measured rows")
    return [(int(r[0]), number(r[2]), number(r[4]), number(r[5])) for r in rows]


def interventions_row(label: str, text: str) -> str:
    costs = intervention_costs(text)
    met = all(x <= 1.2 for *_, x in costs)
    return (f"| interventions, {label}: per-row head ablation, projection, steering and patching in every layer, "
            f"{' / '.join(str(c[0]) for c in costs)} rows | {' / '.join(f'{c[2]:.1f}' for c in costs)} ms | plain no-grad forward "
            f"{' / '.join(f'{c[1]:.1f}' for c in costs)} ms | {' / '.join(f'{c[3]:.2f}x' for c in costs)} | "
            f"<= 1.2x: {'met' if met else '**not met** at ' + ', '.join(f'{c[0]} rows' for c in costs if c[3] > 1.2)}"
            " |")
