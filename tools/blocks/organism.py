"""The paper's three findings on the model organism (README blocks ``organism_findings`` and inline numbers).

Committed result: ``docs/results/organism.json``, the numbers of a default run (``tuneshift``, the embedded
default: the tiny-pair organism, all three analyses), taken from the run's ``summary.json`` by the collector:

    tuneshift run.root=/tmp/out && python -m tools.readme --collect organism --source /tmp/out/tiny_pair-organism

Verdicts ("shows?") follow fixed rules, not judgement:

- saliency: yes when the tuned model's mean instruction score is higher and Welch's one-sided p < 0.05;
- heads: yes when instruction verbs' mean share is higher than general verbs' and Welch's p < 0.05
  ("if anything the reverse" when it is lower);
- FFN: rotation yes when the mean principal angle lies between 1 degree and its chance value (the tuned
  directions moved but stay related); stable levels yes when no linguistic-level share differs between
  base and tuned at p < 0.05 (Student, over annotation seeds).
"""
from __future__ import annotations

import json
from pathlib import Path

from tools.blocks.common import commit_of, p_value, read_json, write_json
from tools.readme import ReadmeError, collector, renderer

NAME = "organism"
LEVELS = ("phonology", "morphology", "syntax", "semantics")
TASKS_SHOWN = ("writing", "coding")   # the paper: writing and coding shares rise after tuning


@collector(NAME)
def collect(root: Path, source: Path) -> Path:
    """Read ``source/summary.json`` (a finished run of the embedded default) into ``docs/results/organism.json``."""
    summary_path = source / "summary.json"
    if not summary_path.is_file():
        raise ReadmeError(f"{summary_path} is missing: give --source the run folder that `tuneshift` printed")
    summary = json.loads(summary_path.read_text(encoding="utf-8"))
    missing = {"saliency", "head_relations", "ffn_concepts"} - set(summary)
    if missing:
        raise ReadmeError(f"{summary_path} has no results of {sorted(missing)}: run all three analyses")
    pair = next((k for k in summary["saliency"] if "__" in k), None)
    if pair is None:
        raise ReadmeError(f"{summary_path}: no base__tuned comparison in the saliency results")
    base, tuned = pair.split("__")
    heads = summary["head_relations"][pair]
    verbs = {row["verb_set"]: row for row in heads["verb_stats"]}
    ffn = summary["ffn_concepts"]
    payload = {
        "source": {"run": source.name, "commit_at_collection": commit_of(root),  # the run records none
                   "seconds_total": summary.get("timing", {}).get("seconds_total")},
        "saliency": summary["saliency"][pair]["all"],
        "head_relations": {
            "instruction": {k: verbs["instruction"][k] for k in ("mean", "std", "count")},
            "general": {k: verbs["general"][k] for k in ("mean", "std", "count")},
            "p_welch": verbs["instruction"]["p_welch"],
            "knowledge_pairs": {"base": summary["head_relations"][base]["knowledge_pairs"],
                                "tuned": summary["head_relations"][tuned]["knowledge_pairs"]},
        },
        "ffn_concepts": {
            "rotation": ffn[pair]["rotation"],
            "ttests": [{k: r[k] for k in ("kind", "category", "base_mean", "tuned_mean", "p")}
                       for r in ffn[pair].get("ttests_all_layers", [])],
            "explainable_share": {"base": ffn[base].get("explainable_share"),
                                  "tuned": ffn[tuned].get("explainable_share")},
        },
    }
    return write_json(root, NAME, payload)


# ---- rendering --------------------------------------------------------------------------------------------------
def _share(row: dict) -> str:
    return f"{row['base_mean']:.3f} → {row['tuned_mean']:.3f} (p = {p_value(row['p'])})".replace("p = <", "p <")


def verdicts(results: dict) -> dict[str, str]:
    """The "shows?" cell of each finding, by the rules of the module docstring."""
    sal, heads, ffn = results["saliency"], results["head_relations"], results["ffn_concepts"]
    out = {"saliency": "yes" if sal["tuned_mean"] > sal["base_mean"] and sal["p"] < 0.05 else "**no**"}
    inst, gen = heads["instruction"]["mean"], heads["general"]["mean"]
    out["heads"] = "yes" if inst > gen and heads["p_welch"] < 0.05 else (
        "**no**" + (" (if anything the reverse)" if inst < gen else ""))
    rot = ffn["rotation"]
    rotates = 1.0 < rot["mean_angle_deg"] < rot["chance_mean_angle_deg"]
    moved = [r for r in ffn["ttests"] if r["kind"] == "level" and r["p"] is not None and r["p"] < 0.05]
    out["ffn"] = f"**rotation {'yes' if rotates else 'no'}, stable levels {'no' if moved else 'yes'}**"
    return out


@renderer("organism_findings")
def render_findings(root: Path) -> str:
    results = read_json(root, NAME)
    sal, heads, ffn = results["saliency"], results["head_relations"], results["ffn_concepts"]
    rot, v = ffn["rotation"], verdicts(results)
    inst, gen = heads["instruction"], heads["general"]
    tasks = {r["category"]: r for r in ffn["ttests"] if r["kind"] == "task"}
    moved = [r for r in ffn["ttests"] if r["kind"] == "level" and r["p"] is not None and r["p"] < 0.05]
    levels = ("but levels move too: " + ", ".join(f"{r['category']} {_share(r)}" for r in moved) if moved
              else "levels stay (no level share differs at p < 0.05)")
    ffn_cell = (f"top-{rot['n_directions']:.0f} subspaces (of {rot['d_model']:.0f} dims): mean principal angle "
                f"{rot['mean_angle_deg']:.1f}° (chance {rot['chance_mean_angle_deg']:.1f}°), max "
                f"{rot['max_angle_deg']:.1f}° (chance {rot['chance_max_angle_deg']:.1f}°), mean best-match cosine "
                f"{rot['mean_best_abs_cos']:.2f} (chance {rot['chance_best_abs_cos']:.2f}), top-word overlap "
                f"{100 * rot['mean_top_words_jaccard']:.0f} %; "
                + "; ".join(f"{t} share {_share(tasks[t])}" for t in TASKS_SHOWN if t in tasks) + f"; {levels}")
    return "\n".join([
        "| paper's finding | on the organism | shows? |",
        "|---|---|---|",
        f"| instruction words gain importance density after tuning | instruction score base {sal['base_mean']:.3f}, "
        f"tuned {sal['tuned_mean']:.3f}, n = {sal['n']}, Welch one-sided p = {p_value(sal['p'])} | {v['saliency']} |",
        f"| heads gain instruction-verb pairs | share of heads where the tuned model has more pairs with the verb: "
        f"instruction verbs {inst['mean']:.2f} ± {inst['std']:.2f} (n = {inst['count']}) vs general verbs "
        f"{gen['mean']:.2f} ± {gen['std']:.2f} (n = {gen['count']}), Welch p = {p_value(heads['p_welch'])} "
        f"| {v['heads']} |",
        f"| FFN directions rotate while linguistic levels stay | {ffn_cell} | {v['ffn']} |",
    ])


@renderer("organism_run_time")
def render_run_time(root: Path) -> str:
    seconds = read_json(root, NAME)["source"]["seconds_total"]
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


@renderer("organism_head_knowledge")
def render_head_knowledge(root: Path) -> str:
    pairs = read_json(root, NAME)["head_relations"]["knowledge_pairs"]
    return f"{pairs['base']:,} → {pairs['tuned']:,} pairs"


@renderer("organism_explainable")
def render_explainable(root: Path) -> str:
    shares = sorted(100 * s for s in read_json(root, NAME)["ffn_concepts"]["explainable_share"].values())
    low, high = round(shares[0]), round(shares[-1])
    return f"{low} %" if low == high else f"{low}-{high} %"
