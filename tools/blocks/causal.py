"""Causal tests of the paper's three findings on the organism (README block ``organism_causal``).

Committed result: ``docs/results/causal_organism.json``, from a run of

    tuneshift 'plugins=[head_relations,ffn_concepts,saliency,causal]' run.root=/tmp/out
    python -m tools.readme --collect causal_organism --source /tmp/out/tiny_pair-organism-<hash>

The collector copies the causal plugin's comparison tables (``effects``, ``patching``) and summary; the
renderer prints the task-score effects against their matched controls and the patching recovery by depth.
Verdict rule, fixed: a finding "survives" a test when its selected units hurt more than every matched
control at permutation p < 0.05 on the task score.
"""
from __future__ import annotations

import json
from pathlib import Path

from tools.blocks.common import commit_of, p_value, read_json, write_json
from tools.readme import ReadmeError, collector, renderer

NAME = "causal_organism"
PAIR = "compare/base__tuned"
CONTROLS = {"random": "random units, same layers", "random_rank": "random directions of similar variance",
            "stable": "the least-rotated directions", "random_instruction": "random instruction tokens"}
CONTROLS_TOKENS = {"random": "random context tokens"}
TESTS = {"heads": ("heads gain instruction-verb pairs", "heads whose verb pairs grew most, ablated"),
         "ffn": ("FFN directions rotate", "most-rotated tuned directions, projected out"),
         "tokens": ("instruction words gain importance", "most salient instruction tokens, corrupted")}


@collector(NAME)
def collect(root: Path, source: Path) -> Path:
    import pandas as pd

    folder = source / "causal" / PAIR
    if not (folder / "effects.parquet").is_file():
        raise ReadmeError(f"{folder}/effects.parquet is missing: run the causal plugin (with head_relations, "
                          "ffn_concepts and saliency) and give --source that run's folder")
    timing = json.loads((source / "summary.json").read_text(encoding="utf-8")).get("timing", {})
    table = lambda name: json.loads(pd.read_parquet(folder / f"{name}.parquet").to_json(orient="records"))  # noqa: E731
    effects, patching = table("effects"), table("patching")
    base_row = next(p for p in patching if p["direction"] == "base_from_tuned" and p["metric"] == "task")
    baseline = {"tuned_task_score": next(e for e in effects if e["metric"] == "task")["score_baseline"],
                "base_task_score": base_row["score_from"]}
    return write_json(root, NAME, {
        "command": "tuneshift 'plugins=[head_relations,ffn_concepts,saliency,causal]'", "commit": commit_of(root),
        "timing": {"run_wall_s": timing.get("seconds_total"),
                   "causal_on_compare_wall_s": timing.get("seconds_by_hook", {}).get("causal.on_compare")},
        "baseline": baseline, "effects": effects, "patching": patching,
    })


def _control_name(test: str, control: str) -> str:
    return (CONTROLS_TOKENS if test == "tokens" else {}).get(control) or CONTROLS.get(control, control)


def _p(p: float) -> str:
    text = p_value(p)
    return f"p {text}" if text.startswith("<") else f"p = {text}"


def verdict(effects: list[dict], test: str) -> str:
    """Per size: does the selection hurt the task score more than every matched control at p < 0.05?"""
    rows = [e for e in effects if e["test"] == test and e["metric"] == "task"]
    sizes = sorted({e["size"] for e in rows})
    beaten = [all(e["difference"] > 0 and e["p_permutation"] < 0.05 for e in rows if e["size"] == k) for k in sizes]
    if all(beaten):
        return "**survives**"
    if any(beaten) or any(e["difference"] > 0 and e["p_permutation"] < 0.05 for e in rows):
        return "**partly** (beats some controls)"
    return "**does not survive**"


@renderer(NAME)
def render(root: Path) -> str:
    r = read_json(root, NAME)
    effects = r["effects"]
    lines = ["", "| paper's finding | intervention | k | drop in task score (95% CI) | matched control: drop, "
             "permutation p | survives? |", "|---|---|---|---|---|---|"]
    for test, (finding, what) in TESTS.items():
        rows = [e for e in effects if e["test"] == test and e["metric"] == "task"]
        first = True
        for size in sorted({e["size"] for e in rows}):
            group = [e for e in rows if e["size"] == size]
            sel = group[0]
            controls = "; ".join(f"{_control_name(test, e['control'])} {e['drop_control']:.3f}, {_p(e['p_permutation'])}"
                                 for e in group)
            lines.append(f"| {finding if first else ''} | {what if first else ''} | {size} | "
                         f"{sel['drop_selected']:.3f} ({sel['drop_selected_ci_low']:.3f} to "
                         f"{sel['drop_selected_ci_high']:.3f}) | {controls} | {verdict(effects, test) if first else ''} |")
            first = False
    patch = [p for p in r["patching"] if p["kind"] == "patch"]
    for direction, label in (("base_from_tuned", "tuned states patched into the base"),
                             ("tuned_from_base", "base states patched into the tuned model")):
        for metric, unit in (("task", "task-score gap"), ("logprob", "reference log-prob gap")):
            values = sorted((p for p in patch if p["direction"] == direction and p["metric"] == metric),
                            key=lambda p: p["depth"])
            if values:
                moved = ", ".join(f"{round(100 * p['recovery']) or 0} %" for p in values)
                lines.append(f"| patching, depth by depth | {label} | embeddings, then after each layer | "
                             f"share of the {unit} moved: {moved} | | |")
    base = r["baseline"]
    lines.append("")
    lines.append(f"Task score without intervention: tuned {base['tuned_task_score']:.3f}, base "
                 f"{base['base_task_score']:.3f} (80 held-out prompts).")
    return "\n".join(lines) + "\n"
