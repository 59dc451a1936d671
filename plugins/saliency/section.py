"""What the saliency plugin shows in the report: its sections, read from the files it wrote.

A comparison leads with the instruction score, base vs tuned (Welch one-sided, base < tuned: the paper's
Table 2), pooled and per split; a model's section with its mean score, Table 1 when ratings were given, its
labelled heatmaps, distribution and density profile. The precision check (:mod:`.precision`) gets one too.
"""
from __future__ import annotations

import math
from typing import Any

from tuneshift.results import ResultStore
from tuneshift.sections import Figure, Headline, Section, Table, View, format_number

TITLE = "Saliency: which prompt tokens the response depends on"
EXPLANATION = (
    "Gradient x input attribution of every response token to every prompt token (methods.md A), normalised "
    "per response token into integer scores S from 0 to 10. A prompt token's importance density is "
    "||S[n,:]||_1 / ||S[n,:]||_4 (at threshold b); the instruction score sums the normalised density over "
    "the instruction's tokens. Instruction tuning should raise the score (Welch one-sided test, base < tuned) "
    "and flatten the U-shaped density profile over the relative prompt position.")
WELCH = "Welch one-sided"


def _score_headline(label: str, row: dict[str, Any]) -> Headline:
    return Headline(label, base=row.get("base_mean"), tuned=row.get("tuned_mean"), test=WELCH, p=row.get("p"),
                    n=row.get("n"))


def compare_section(store: ResultStore, name: str, key: str, base: str, tuned: str) -> Section:
    summary = store.load_json(name, key, "summary")
    pooled, splits = summary.get("all") or {}, summary.get("by_split") or {}
    headlines = [_score_headline("instruction score", pooled)] if pooled else []
    if len(splits) > 1:
        headlines += [_score_headline(f"instruction score, split {split}", row) for split, row in splits.items()]
    notes = []
    if pooled and (pooled.get("p") is None or not math.isfinite(pooled["p"])):
        notes.append("Fewer than two scored prompts per model: no test.")
    for model in (base, tuned):
        own = store.load_json(name, model, "summary")
        if own.get("n_skipped_no_instruction"):
            notes.append(f"{model}: {own['n_skipped_no_instruction']} of {own['n_prompts']} prompts have no "
                         "instruction token and are left out of the scores.")
    return Section(
        TITLE, EXPLANATION, headlines,
        figures=[Figure("score_distribution.png", f"Instruction scores per prompt, {base} vs {tuned}, per split"),
                 Figure("density_profile.png", f"Importance density over the relative prompt position (deciles), "
                        f"{base} vs {tuned}: a flatter profile reads the whole prompt")],
        tables=[Table("welch_tests.parquet", f"Instruction score per split, {base} vs {tuned} (Welch one-sided, "
                      "base < tuned)"),
                Table("density_profile.parquet", "Mean normalised density per decile of the prompt")],
        notes=notes)


def model_section(store: ResultStore, name: str, key: str, options: Any) -> Section:
    summary = store.load_json(name, key, "summary")
    directory = store.dir(name, key)
    headlines = [Headline("mean instruction score", value=summary.get("mean_score"), n=summary.get("n_scored"))]
    splits = summary.get("by_split") or {}
    if len(splits) > 1:
        headlines += [Headline(f"mean instruction score, split {split}", value=row.get("mean_score"),
                               n=row.get("n")) for split, row in splits.items()]
    for split, row in (summary.get("follow_tests") or {}).items():
        headlines.append(Headline(
            f"instruction score of responses rated followed, split {split}", value=row.get("followed_mean"),
            test="Welch one-sided vs not followed", p=row.get("p"),
            n=f"{row.get('n_followed')} followed, {row.get('n_unfollowed')} not",
            note=f"not followed {format_number(row.get('unfollowed_mean'))}"))
    heatmaps = sorted(p.name for p in directory.glob("heatmap_*.png"))
    figures = [Figure(p, f"Scores S of example prompt {i + 1} of {key}: prompt tokens (rows, instruction "
                         "shaded) by response tokens (columns)") for i, p in enumerate(heatmaps)]
    figures += [Figure("score_distribution.png", f"Instruction scores per prompt of {key}, per split"),
                Figure("density_profile.png", f"Importance density of {key} over the relative prompt position")]
    tables = [Table("scores.parquet", "Instruction score per prompt (NaN: not scored, see skip_reason)",
                    columns=["id", "split", "score", "n_prompt_tokens", "n_instruction", "n_response", "path",
                             "skip_reason"])]
    if (directory / "follow_tests.json").is_file():
        tables.append(Table("follow_tests.json", "Table 1: followed vs not followed responses (Welch one-sided)"))
    views = [View("examples.html", f"Example prompts: tokens shaded by importance density, labelled score "
                                   f"heatmaps (b = {options.b}, p = {options.p}, target {options.target})")] \
        if (directory / "examples.html").is_file() else []
    notes = [f"{summary['n_skipped_no_instruction']} prompts have no instruction token and get no score."] \
        if summary.get("n_skipped_no_instruction") else []
    return Section(TITLE, EXPLANATION, headlines, [f for f in figures if (directory / f.path).is_file()], tables,
                   views, notes)


def build(store: ResultStore, name: str, key: str, options: Any) -> Section:
    """The section of ``key``: a model key or ``compare/<base>__<tuned>``."""
    if key.startswith("compare/"):
        base, tuned = key.split("/", 1)[1].split("__", 1)
        return compare_section(store, name, key, base, tuned)
    return model_section(store, name, key, options)


def precision_section(result: Any) -> Section:
    """The precision check's section (``result``: a :class:`.precision.PrecisionCheck`)."""
    verdict = "passed" if result.passed else "FAILED"
    return Section(
        f"Precision check: {result.dtype} saliency vs {result.reference_dtype}",
        ("The saliency attribution of a few prompts re-run in the reference precision and compared with the run's "
         "precision: the largest deviation of the attribution matrices relative to each matrix's largest "
         "magnitude, of the importance densities, and of the prompt scores."),
        [Headline("largest deviation of the attribution matrices (relative to their largest value)",
                  value=result.max_rel_dev, n=f"{result.n_prompts} prompts",
                  note=f"tolerance {format_number(result.tolerance)}: {verdict}"),
         Headline("largest deviation of the importance densities (relative)", value=result.density_max_rel_dev),
         Headline("largest change of a prompt score", value=result.score_max_abs_dev,
                  note=f"{result.score_changed} of {result.n_prompts} prompts' score matrices differ")],
        tables=[Table("prompts.parquet", "Per prompt")],
        notes=[] if result.passed else [f"The {result.dtype} attribution deviates by more than the tolerance: "
                                        f"run saliency in {result.reference_dtype}."])


__all__ = ["build", "compare_section", "model_section", "precision_section"]
