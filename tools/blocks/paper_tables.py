"""The paper's Tables 1 and 2 from the authors' released attributions (README block ``paper_tables``).

Committed result: ``docs/results/paper_tables.json``, exactly what
``tuneshift-paper-tables --reference DIR --out docs/results/paper_tables.json`` writes; the collector runs
that command. Means to 4 decimals (as the paper prints them), p-values to 2-3 significant digits.
"""
from __future__ import annotations

from pathlib import Path

from tools.blocks.common import read_json, sci
from tools.readme import RESULTS_DIR, ReadmeError, collector, renderer

NAME = "paper_tables"


@collector(NAME)
def collect(root: Path, source: Path) -> Path:
    """Run ``tuneshift-paper-tables --reference source --out docs/results/paper_tables.json``."""
    from tuneshift.plugins.saliency.paper import main

    out = root / RESULTS_DIR / f"{NAME}.json"
    if main(["--reference", str(source), "--out", str(out)]) != 0:
        raise ReadmeError(f"tuneshift-paper-tables failed on {source}")
    return out


@renderer(NAME)
def render(root: Path) -> str:
    tables = read_json(root, NAME)
    lines = ["| Table 1 (Vicuna-7B; Welch, not followed < followed) | followed | n | not followed | n | p |",
             "|---|---|---|---|---|---|"]
    for split, r in tables["table1"].items():
        lines.append(f"| {split} | {r['followed_mean']:.4f} | {r['n_followed']} | {r['unfollowed_mean']:.4f} | "
                     f"{r['n_unfollowed']} | {sci(r['p'])} |")
    lines += ["", "| Table 2 (Welch, LLaMA-7B < Vicuna-7B) | LLaMA-7B | Vicuna-7B | n | p |", "|---|---|---|---|---|"]
    for split, r in tables["table2"].items():
        lines.append(f"| {split} | {r['base_mean']:.4f} | {r['tuned_mean']:.4f} | {r['n']} | {sci(r['p'])} |")
    return "\n".join(lines)
