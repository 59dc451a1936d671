"""What the FFN-concepts plugin shows in the report: its sections, read from the files it wrote.

A comparison leads with the rotation (mean principal angle between the base and tuned subspaces, the best-match
|cos| of each base direction, the top-word overlap of matched directions; each beside its chance value when the
results carry one), then the explainable share, the task shares and the linguistic levels base -> tuned with
Student's t over annotation seeds. A model's section gives its explainable share and spectrum.
"""
from __future__ import annotations


from tuneshift.plugins.ffn_concepts import stats
from tuneshift.results import ResultStore
from tuneshift.sections import Figure, Headline, Section, Table, View, format_number

TITLE = "Feed-forward layers: principal directions and concepts"
EXPLANATION = (
    "Principal directions of each layer's FFN value vectors (the rows of W_down), their top words by cosine with "
    "the output embeddings and the concepts an annotator gives them (methods.md C): the share of explainable "
    "directions serving each assistant task and at each linguistic level, base vs tuned (Student t over "
    "annotation seeds), and the rotation of the directions themselves: principal angles between the base and "
    "tuned subspaces and each base direction's best-matching tuned direction.")
STUDENT = "Student t over annotation seeds"


def _chance(rotation: dict, field: str, unit: str = "") -> str:
    value = rotation.get(field)
    return f"random subspaces {format_number(value)}{unit}" if value is not None else ""


def rotation_headlines(rotation: dict) -> list[Headline]:
    """The rotation's findings (means over layers), each with its chance baseline when one is stored."""
    k, d = int(rotation.get("n_directions", 0)), int(rotation.get("d_model", 0))
    angle_note = _chance(rotation, "chance_mean_angle_deg", "°")
    if not angle_note and rotation.get("chance_cos2") is not None:
        angle_note = (f"mean cos² {format_number(rotation.get('mean_cos2'))}, random subspaces "
                      f"{format_number(rotation['chance_cos2'])}")
    return [Headline("mean principal angle between the base and tuned FFN subspaces",
                     value=rotation.get("mean_angle_deg"), unit="°", n=f"first {k} of {d} directions per layer",
                     note=angle_note),
            Headline("best-match |cos| of each base direction with a tuned direction",
                     value=rotation.get("mean_best_abs_cos"), note=_chance(rotation, "chance_best_abs_cos")),
            Headline("top-word overlap (Jaccard) of each base direction and its best tuned match",
                     value=rotation.get("mean_top_words_jaccard"))]


def share_headlines(records: list[dict], explainable: dict | None) -> list[Headline]:
    """Explainable share, then each task and level share base -> tuned (rows of ``ttests``, all layers)."""
    out = []
    if explainable is not None:
        out.append(Headline("explainable share of the annotated directions", base=explainable["base_mean"],
                            tuned=explainable["tuned_mean"], test=STUDENT, p=explainable["p"],
                            n=f"{explainable['n_seeds_base']} seeds"))
    for r in records:
        what = ("serving no assistant task" if r["category"] == "none" else f"serving {r['category']}") \
            if r["kind"] == "task" else f"at the {r['category']} level"
        out.append(Headline(f"share of explainable directions {what}", base=r.get("base_mean"),
                            tuned=r.get("tuned_mean"), test=STUDENT, p=r.get("p"), n=f"{r.get('n_seeds_base')} seeds"))
    return out


def compare_section(store: ResultStore, name: str, key: str, base: str, tuned: str) -> Section:
    summary = store.load_json(name, key, "summary")
    rotation = summary.get("rotation") or {}
    directory = store.dir(name, key)
    explainable = None
    if (directory / "shares.parquet").is_file():
        explainable = stats.explainable_ttest(store.load_table(name, key, "shares"), base, tuned)
    headlines = rotation_headlines(rotation) + share_headlines(summary.get("ttests_all_layers") or [], explainable)
    notes = []
    k, d = int(rotation.get("n_directions", 0)), int(rotation.get("d_model", 0))
    if d and 2 * k > d:
        notes.append(f"The rotation compares {k}-dimensional subspaces of R^{d}: any two share at least {2 * k - d} "
                     "dimensions by counting alone, so that many principal angles are 0 whatever tuning did"
                     + (" (here all of them: the angles say nothing)." if k >= d else "."))
    if explainable is None:
        notes.append("Annotation was off: directions and top words only, no concept shares.")
    figures = [Figure(f, c) for f, c in (
        ("task_shares.png", f"Task shares, {base} vs {tuned}, all layers: the explainable share (left) apart from "
                            "its split over assistant tasks (right), difference and Student's p on each pair"),
        ("principal_angles.png", f"Principal angles between the {base} and {tuned} subspaces, per layer"),
        ("level_shares.png", f"Linguistic levels of the explainable directions per layer group, {base} vs {tuned}"))
        if (directory / f).is_file()]
    tables = [Table("rotation_layers.parquet", "Rotation per layer (principal angles, best-match |cos|, top-word "
                                               "overlap)")]
    if (directory / "ttests.parquet").is_file():
        tables.insert(0, Table("ttests.parquet", "Task and level shares per layer group, base vs tuned (mean and "
                               "std over annotation seeds, Student t)", columns=[
                                   "kind", "group", "category", "base_mean", "base_std", "tuned_mean", "tuned_std",
                                   "t", "p"], max_rows=40))
    return Section(TITLE, EXPLANATION, headlines, figures, tables,
                   [View("view_layer*.html", f"Directions per layer: each {base} direction beside its best {tuned} "
                                             "match (top words, concepts)")], notes)


def model_section(store: ResultStore, name: str, key: str) -> Section:
    s = store.load_json(name, key, "summary")
    headlines = [Headline("variance the first directions capture (mean over layers)",
                          value=s.get("variance_captured_mean"), n=f"{s.get('n_directions')} directions x "
                                                                   f"{s.get('n_layers')} layers"),
                 Headline("variance along the first principal direction (mean over layers)",
                          value=s.get("first_direction_ratio_mean"))]
    if s.get("explainable_share") is not None:
        headlines.insert(0, Headline("explainable share of the annotated directions", value=s["explainable_share"],
                                     note="all layers and annotation seeds"))
    notes = [f"{s['failed_share']:.1%} of the annotations failed (see annotations.parquet)."] \
        if s.get("failed_share") else []
    directory = store.dir(name, key)
    figures = [Figure(f, c) for f, c in (
        ("concepts.png", f"Concepts of {key}'s FFN directions: explainable share, tasks, linguistic levels"),
        ("variance_spectrum.png", f"Variance of {key}'s FFN value vectors along each principal direction"))
        if (directory / f).is_file()]
    return Section(TITLE, EXPLANATION, headlines, figures,
                   [Table("directions.parquet", "Principal directions: variance share, top words, seed-0 concept",
                          columns=["layer", "rank", "variance_ratio", "top_words", "concept", "tasks", "level"])],
                   [View("view_layer*.html", f"Directions per layer of {key} (top words, concepts)")], notes)


def build(store: ResultStore, name: str, key: str) -> Section:
    """The section of ``key``: a model key or ``compare/<base>__<tuned>``."""
    if key.startswith("compare/"):
        base, tuned = key.split("/", 1)[1].split("__", 1)
        return compare_section(store, name, key, base, tuned)
    return model_section(store, name, key)


__all__ = ["build", "compare_section", "model_section", "rotation_headlines", "share_headlines"]
