"""From per-item scores to effects, tables, plots, W&B tables and the report section of the causal plugin."""
from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from tuneshift.plugins.causal import views
from tuneshift.plugins.causal.stats import control_test, recovery_test
from tuneshift.sections import Figure, Headline, Section, Table, format_number

CONTROL_TESTS = {  # test -> (x label, names of the selected units and of each control)
    "heads": ("k heads ablated", {"selected": "top-k heads by instruction-verb pair growth",
                                  "random": "random k heads (same layers)"}),
    "ffn": ("r directions projected out", {"selected": "r most rotated tuned directions",
                                           "random": "r random pool directions (same layers)",
                                           "random_rank": "r random directions of similar variance rank",
                                           "stable": "r least rotated directions"}),
    "tokens": ("n tokens corrupted per prompt", {"selected": "n most salient instruction tokens",
                                                 "random": "n random context tokens",
                                                 "random_instruction": "n random instruction tokens"}),
}


def _flat(result: dict) -> dict:
    out = {}
    for key, value in result.items():
        if isinstance(value, tuple):
            out[f"{key}_low"], out[f"{key}_high"] = value
        else:
            out[key] = value
    return out


def control_effects(name: str, test: Any, scores: dict[str, np.ndarray], strata: np.ndarray, n_boot: int,
                    seed: int, n_perm: int = 10000) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One row per (size, control, metric) of a control test, and one row per single random draw."""
    conds = test.conditions
    rows, draws = [], []
    for metric, s in scores.items():
        s0 = s[0]
        for size in sorted({c.size for c in conds if c.kind == "selected"}):
            sel = next(i for i, c in enumerate(conds) if c.kind == "selected" and c.size == size)
            for kind in ("random", "random_rank", "stable", "random_instruction"):
                idx = [i for i, c in enumerate(conds) if c.kind == kind and c.size == size]
                if not idx:
                    continue
                result = control_test(s0, s[sel], s[idx], strata, n_boot, seed, conds[idx[0]].exact, n_perm)
                rows.append({"test": name, "size": size, "control": kind, "metric": metric,
                             "selected_units": conds[sel].label, "control_units": conds[idx[0]].label,
                             "score_baseline": float(s0.mean()), **_flat(result)})
                if kind == "random":
                    draws += [{"size": size, "metric": metric, "drop": float((s0 - s[i]).mean())} for i in idx]
    return pd.DataFrame(rows), pd.DataFrame(draws, columns=["size", "metric", "drop"])


def patch_effects(scores: dict[str, dict[str, np.ndarray]], tests: dict[str, Any], strata: np.ndarray,
                  n_boot: int, seed: int, n_perm: int) -> pd.DataFrame:
    """Recovery (base <- tuned) and loss (tuned <- base) per depth, for patching and steering."""
    rows = []
    pairs = {"base_from_tuned": ("patching_base_from_tuned", "patching_tuned_from_base"),
             "tuned_from_base": ("patching_tuned_from_base", "patching_base_from_tuned")}
    for direction, (own, other) in pairs.items():
        if own not in scores or other not in scores:
            continue
        for metric in scores[own]:
            s_from, s_to = scores[own][metric][0], scores[other][metric][0]
            for i, cond in enumerate(tests[own].conditions):
                if cond.kind == "baseline":
                    continue
                result = recovery_test(s_from, s_to, scores[own][metric][i], strata, n_boot, seed, n_perm)
                rows.append({"direction": direction, "kind": cond.kind, "depth": cond.size, "site": cond.units,
                             "metric": metric, **_flat(result)})
    return pd.DataFrame(rows)


def condition_table(tests: dict[str, Any], scores: dict[str, dict[str, np.ndarray]]) -> pd.DataFrame:
    """Every scored condition with its mean scores."""
    rows = []
    for name, test in tests.items():
        for i, c in enumerate(test.conditions):
            rows.append({"test": name, "kind": c.kind, "size": c.size, "draw": c.draw, "units": c.label,
                         **{f"mean_{m}": float(s[i].mean()) for m, s in scores[name].items()}})
    return pd.DataFrame(rows)


def write(ctx: Any, plugin: Any, key: str, base: str, tuned: str, tests: dict, scores: dict, strata: np.ndarray,
          selection: dict, notes: list[str], seconds: float) -> None:
    """Effects, tables, plots, selection, summary and W&B tables of one pair."""
    o, store, name = plugin.options, ctx.store, plugin.name
    folder = store.dir(name, key)
    figures, summary = {}, {"notes": notes, "seconds": seconds, "n_items": int(len(strata)),
                            "scorer": o.scorer, "draws": o.draws, "bootstrap": o.bootstrap}
    effect_tables = []
    for test_name, (xlabel, names) in CONTROL_TESTS.items():
        if test_name not in scores:
            continue
        effects, draws = control_effects(test_name, tests[test_name], scores[test_name], strata, o.bootstrap, o.seed,
                                         o.permutations)
        effect_tables.append(effects)
        summary[test_name] = effects.to_dict(orient="records")
        verb = {"heads": f"heads {o.head_ablation}-ablated", "ffn": "FFN directions projected out",
                "tokens": "prompt tokens corrupted"}[test_name]
        figures[test_name] = views.effect_plot(effects, draws, names, xlabel,
                                               f"{test_name}: {tuned} with {verb}, selected vs matched controls "
                                               f"({len(strata)} prompts)", folder / f"{test_name}.png")
    effects = pd.concat(effect_tables, ignore_index=True) if effect_tables else pd.DataFrame()
    store.save_table(name, key, "effects", effects)
    patching = patch_effects(scores, tests, strata, o.bootstrap, o.seed, o.permutations)
    if len(patching):
        store.save_table(name, key, "patching", patching)
        summary["patching"] = patching.to_dict(orient="records")
        figures["patching"] = views.patching_plot(patching, f"patching the residual stream: {base} <-> {tuned}",
                                                  folder / "patching.png")
    conditions = condition_table(tests, scores)
    store.save_table(name, key, "conditions", conditions)
    store.save_json(name, key, "selection", selection)
    store.save_json(name, key, "summary", summary)
    for table_name, table in (("effects", effects), ("patching", patching), ("conditions", conditions)):
        if len(table):
            ctx.logger.log_table(f"{name}/{key}/{table_name}", table)
    for fig_name, path in figures.items():
        ctx.logger.log_image(f"{name}/{key}/{fig_name}", path)
    ctx.logger.log_metrics({f"{r['test']}_{r['control']}_{r['metric']}_k{r['size']}_p": r["p_permutation"]
                            for r in effects.to_dict(orient="records")}, prefix=f"{name}/{key}")


# ---- the section ----------------------------------------------------------------------------------------------
def _ci(low: float, high: float) -> str:
    return f"95% CI {format_number(low)} to {format_number(high)}"


def control_headline(row: dict, extra: list[dict]) -> Headline:
    """A selected-vs-random finding: the extra task-score drop of the selected units over random ones."""
    test, size = row["test"], row["size"]
    units = f" ({row['selected_units']})" if row["selected_units"] else ""
    what = {"heads": f"ablating the {size} heads whose instruction-verb pairs grew most{units}",
            "ffn": f"projecting out the {size} most rotated FFN directions{units}",
            "tokens": f"corrupting the {size} most salient instruction tokens of each prompt"}[test]
    count = f"{'all ' if row['exact'] else ''}{row['n_draws']}"
    control = {"heads": f"{count} random {size}-head sets of the same layers",
               "ffn": f"{count} random {size}-direction sets of the same layers",
               "tokens": f"{count} draws of {size} random context tokens per prompt"}[test]
    others = [f"{CONTROL_TESTS[test][1][e['control']]}: drop {format_number(e['drop_control'])}, "
              f"p = {format_number(e['p_permutation'], 2)}" for e in extra]
    note = (f"drop {format_number(row['drop_selected'])} ({_ci(row['drop_selected_ci_low'], row['drop_selected_ci_high'])})"
            f" vs {format_number(row['drop_control'])} ({_ci(row['drop_control_ci_low'], row['drop_control_ci_high'])})"
            f" from a task score of {format_number(row['score_baseline'])}"
            + (f"; smallest possible p {format_number(row['p_floor'], 2)}" if row["p_floor"] > 0.02 else "")
            + ("; " + "; ".join(others) if others else ""))
    return Headline(f"{test}: extra task-score drop from {what}, over random", value=row["difference"],
                    test=f"permutation vs {control}", p=row["p_permutation"], n=row["n_items"], note=note)


def patch_headline(rows: pd.DataFrame, direction: str) -> Headline | None:
    part = rows[(rows["direction"] == direction) & (rows["kind"] == "patch") & (rows["metric"] == "task")]
    if not len(part):
        return None
    if part["recovery"].isna().all():
        return Headline(f"patching ({direction.replace('_', ' ')}): no task-score gap between the models to recover",
                        value=float(part["gap"].iloc[0]), note="both models score alike on these prompts")
    best = part.loc[part["recovery"].idxmax()]
    per_depth = ", ".join(f"{s.replace('.resid_post', '')} {format_number(r)}" for s, r in
                          zip(part.sort_values("depth")["site"], part.sort_values("depth")["recovery"]))
    what = ("share of the tuned-vs-base task-score gap recovered by patching the tuned residual stream into the base"
            if direction == "base_from_tuned" else
            "share of the tuned model's task-score advantage lost by patching in the base residual stream")
    return Headline(f"patching: {what}, best depth {best['site']}", value=best["recovery"],
                    test="sign-flip permutation (vs no change)", p=best["p_permutation"], n=int(best["n_items"]),
                    note=f"{_ci(best['recovery_ci_low'], best['recovery_ci_high'])}; per depth: {per_depth}")


def section(ctx: Any, plugin: Any, key: str) -> Section:
    folder = ctx.store.dir(plugin.name, key)
    summary = json.loads((folder / "summary.json").read_text())
    headlines = []
    effects = pd.read_parquet(folder / "effects.parquet") if (folder / "effects.parquet").is_file() else pd.DataFrame()
    if len(effects):
        task = effects[effects["metric"] == "task"]
        for (test, size), rows in task.groupby(["test", "size"], sort=False):
            main = rows[rows["control"] == "random"].iloc[0].to_dict()
            headlines.append(control_headline(main, rows[rows["control"] != "random"].to_dict(orient="records")))
    if (folder / "patching.parquet").is_file():
        patching = pd.read_parquet(folder / "patching.parquet")
        headlines += [h for h in (patch_headline(patching, d) for d in ("base_from_tuned", "tuned_from_base")) if h]
    captions = {"heads": "Task-score drop vs number of ablated heads: the heads whose instruction-verb pair counts "
                         "grew most (red) against layer-matched random heads (grey; dots are single draws)",
                "ffn": "Drop vs number of projected-out FFN directions: most rotated (red), least rotated (blue), "
                       "random pool directions of the same layers (grey), random directions of similar variance rank "
                       "(purple)",
                "tokens": "Drop vs number of corrupted tokens per prompt: most salient instruction tokens (red), "
                          "random context tokens (grey), random instruction tokens (green)",
                "patching": "Share of the base-vs-tuned gap moved by patching the other model's residual stream at "
                            "each depth (solid) and by steering with the mean difference (dotted)"}
    return Section(
        title=plugin.title, explanation=plugin.explanation(), headlines=headlines,
        figures=[Figure(f"{n}.png", c) for n, c in captions.items() if (folder / f"{n}.png").is_file()],
        tables=[Table("effects.parquet", "Effects against matched controls (drops; 95% bootstrap CIs over items and "
                                         "draws; one-sided permutation p)",
                      columns=["test", "size", "control", "metric", "selected_units", "drop_selected",
                               "drop_control", "difference", "difference_ci_low", "difference_ci_high",
                               "p_permutation", "n_draws"], max_rows=40)]
        + ([Table("patching.parquet", "Patching and steering per depth",
                  columns=["direction", "kind", "site", "metric", "recovery", "recovery_ci_low", "recovery_ci_high",
                           "p_permutation"], max_rows=40)] if (folder / "patching.parquet").is_file() else []),
        notes=list(summary.get("notes", [])))


__all__ = ["condition_table", "control_effects", "patch_effects", "section", "write"]
