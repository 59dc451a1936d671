"""What the head-relations plugin shows in the report: its sections, read from the files it wrote.

A comparison leads with the instruction-verb finding of the paper (per layer group: the share of heads where
the tuned model has more pairs with a verb, instruction verbs against general verbs, Welch two-sided), then
the head-knowledge pair counts base -> tuned and how many pairs tuning kept. A model's section gives its
knowledge size and the heads that hold it.
"""
from __future__ import annotations

import math
from typing import Any

from tuneshift.results import ResultStore
from tuneshift.sections import Figure, Headline, Section, Table, View, format_number

TITLE = "Self-attention heads: word-pair relations"
EXPLANATION = (
    "Each head dimension's top query and key words over a word list; word pairs that co-occur (word-vector "
    "similarity above a threshold) and raise the attention logit form the head's knowledge, a pair counting "
    "once it sits in more than one dimension (methods.md B). Per group of layers, r_v is the share of heads, "
    "among those whose count of pairs with verb v changed, where tuning raised it; instruction verbs are "
    "compared with general verbs (Welch two-sided).")
VERB_FINDING = "share of heads where the tuned model has more pairs with the verb, instruction verbs"


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def verb_headlines(stats: Any) -> list[Headline]:
    """One finding per layer group from ``verb_stats`` (rows group, layers, verb_set, mean, count, p_welch)."""
    out = []
    for group, rows in stats.groupby("group", sort=True):
        by_set = rows.set_index("verb_set")
        if not {"instruction", "general"} <= set(by_set.index):
            continue
        instr, general = by_set.loc["instruction"], by_set.loc["general"]
        layers = instr["layers"] if "layers" in by_set.columns else group
        out.append(Headline(f"{VERB_FINDING}, layers {layers}", value=float(instr["mean"]),
                            test="Welch two-sided vs general verbs", p=float(instr["p_welch"]),
                            n=f"{int(instr['count'])} instruction and {int(general['count'])} general verbs",
                            note=f"general verbs {format_number(float(general['mean']))}"))
    return out


def compare_section(store: ResultStore, name: str, key: str, base: str, tuned: str) -> Section:
    stats = store.load_table(name, key, "verb_stats")
    overlap = store.load_table(name, key, "overlap")
    verb_findings = verb_headlines(stats)
    headlines = list(verb_findings)
    n_base, n_tuned, kept = (int(overlap[c].sum()) for c in ("n_base", "n_tuned", "n_common"))
    heads = store.load_json(name, tuned, "summary")
    headlines.append(Headline("head-knowledge pairs (word pairs a head holds in more than one dimension)",
                              base=n_base, tuned=n_tuned, n=f"{len(overlap)} layers x {heads['n_heads']} heads",
                              note=f"{n_tuned - kept} added and {n_base - kept} lost by tuning"))
    headlines.append(Headline("share of the base heads' pairs the tuned heads keep",
                              value=kept / n_base if n_base else None, n=f"{n_base} pairs"))
    notes = []
    if not any(_finite(h.p) for h in verb_findings):
        notes.append("Too few instruction verbs changed in any head for a test (at least two per side needed).")
    summary = store.load_json(name, key, "summary")
    if summary.get("instruction_verbs_in_word_list") is not None:
        notes.append(f"{summary['instruction_verbs_in_word_list']} of the instruction verbs are in the mined word "
                     "list; the others cannot appear in any pair.")
    if summary.get("same_word_list") is False:
        notes.append("Base and tuned were mined over different word lists: the pair counts are not comparable.")
    directory = store.dir(name, key)
    extra = [Table(f, c) for f, c in (
        ("instruction_verbs.parquet", "Each instruction verb's r_v per layer group (share of the heads whose count "
                                      "changed where tuning raised it; heads_changed: how many changed)"),
        ("added_pairs.parquet", f"Word pairs {tuned} heads hold and the same {base} heads do not (added by "
                                "tuning), by the number of heads that gained them")) if (directory / f).is_file()]
    return Section(
        TITLE, EXPLANATION, headlines,
        figures=[Figure("verb_shares.png", "Share of heads where tuning adds pairs with the verb, instruction vs "
                        f"general verbs, per layer group ({base} vs {tuned}; Welch p above each group)"),
                 Figure("overlap.png", f"Head-knowledge pairs {base} and {tuned} heads share, per layer")],
        tables=[Table("verb_stats.parquet", "Instruction vs general verbs per layer group (mean r_v, Welch "
                      "two-sided)")] + extra +
               [Table("overlap.parquet", "Pair overlap per layer (pooled and per-head Jaccard, share kept)")],
        views=[View("view.html", f"Top pairs per layer and head, {base} beside {tuned} (pairs added by tuning "
                                 "highlighted, lost ones struck through)")],
        notes=notes)


def model_section(store: ResultStore, name: str, key: str) -> Section:
    s = store.load_json(name, key, "summary")
    n_heads = len(s.get("layers", [])) * int(s.get("n_heads", 0))
    headlines = [Headline("head-knowledge pairs (word pairs a head holds in more than one dimension)",
                          value=s.get("knowledge_pairs"), n=f"{n_heads} heads",
                          note=f"{format_number(s.get('knowledge_per_head'))} per head"),
                 Headline("word pairs per mined head dimension", value=s.get("pairs_per_mined_dim"),
                          n=f"top {s.get('top_k')} words per side")]
    notes = []
    if _finite(s.get("word_coverage")) and s["word_coverage"] < 0.5:
        notes.append(f"Only {s['word_coverage']:.0%} of the {s.get('n_words')} words have similarity vectors: "
                     "pairs of the others are never kept.")
    return Section(
        TITLE, EXPLANATION, headlines,
        figures=[Figure("knowledge_by_head.png", f"Word pairs each head of {key} holds (head knowledge)")],
        tables=[Table("knowledge.parquet", "Head knowledge: one row per (layer, head, pair), most dimensions first",
                      columns=["layer", "head", "pair", "n_dims", "max_sim"])],
        views=[View("view.html", f"Top pairs per layer and head of {key}")], notes=notes)


def build(store: ResultStore, name: str, key: str) -> Section:
    """The section of ``key``: a model key or ``compare/<base>__<tuned>``."""
    if key.startswith("compare/"):
        base, tuned = key.split("/", 1)[1].split("__", 1)
        return compare_section(store, name, key, base, tuned)
    return model_section(store, name, key)


__all__ = ["build", "compare_section", "model_section", "verb_headlines"]
