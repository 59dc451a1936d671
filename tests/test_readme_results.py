"""The README's result blocks equal what the committed results render to (tools/readme.py, tools/blocks/).

Also: the block mechanism on hand-made texts, the benchmark parsers against values read off the committed
files by hand, the organism collector and its "shows?" rules on a hand-made run, and (slow) that the
committed paper tables are what tuneshift-paper-tables computes from the reference data.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tools/ is a repository folder, not part of the installed package

from tools import readme  # noqa: E402
from tools.blocks import benchmarks, organism  # noqa: E402

REFERENCE = Path(os.environ.get("TUNESHIFT_REFERENCE", ROOT.parent / "shared" / "reference"))


def test_readme_blocks_equal_the_committed_results():
    current, rendered = readme.stale_blocks(ROOT)
    assert readme.block_names(current), "the README has no results blocks"
    assert current == rendered, "README.md is stale: run `python -m tools.readme` (see --check for the diff)"
    assert readme.main(["--check"]) == 0


def test_every_block_has_a_renderer_and_the_paper_and_organism_blocks_are_there():
    readme.load_blocks()
    names = readme.block_names((ROOT / "README.md").read_text(encoding="utf-8"))
    assert set(names) <= set(readme.RENDERERS)
    assert {"paper_tables", "organism_findings", "benchmarks"} <= set(names)


def test_block_mechanism(tmp_path, monkeypatch):
    monkeypatch.setitem(readme.RENDERERS, "demo", lambda root: "\n| a |\n|---|\n| 1 |\n")
    monkeypatch.setitem(readme.RENDERERS, "word", lambda root: " 42 s ")
    text = "x <!-- results:word -->old<!-- /results --> y\n<!-- results:demo -->\nstale\n<!-- /results -->\nz"
    assert readme.render_text(text, tmp_path) == (
        "x <!-- results:word -->42 s<!-- /results --> y\n<!-- results:demo -->\n| a |\n|---|\n| 1 |\n"
        "<!-- /results -->\nz")
    with pytest.raises(readme.ReadmeError, match="'nope' has no renderer"):
        readme.render_text("<!-- results:nope -->\n<!-- /results -->", tmp_path)
    with pytest.raises(readme.ReadmeError, match=r"\['demo'\] have no closing"):
        readme.render_text("<!-- results:demo -->\nno end", tmp_path)
    with pytest.raises(readme.ReadmeError, match="two renderers"):
        readme.renderer("demo")(lambda root: "")


def test_benchmark_parsers_read_the_committed_files():
    """Values read off benchmarks/results/*.md by eye."""
    text = (ROOT / "benchmarks/results/saliency_smollm2_64.md").read_text()
    case = benchmarks.saliency_cases(text)[0]
    assert case.wall == {"tuneshift": 10.54, "floor": 9.59, "reference": 80.12, "captum": 52.83, "inseq": 53.11}
    assert case.speedup == {"floor": 1.10, "reference": 7.6, "captum": 5.0, "inseq": 5.0}
    assert case.extrapolated == "8 of 64" and case.max_rel_diff == 2.4e-05
    tiny = benchmarks.saliency_cases((ROOT / "benchmarks/results/saliency_tiny.md").read_text())
    assert [c.wall["tuneshift"] for c in tiny] == [0.77, 4.44] and tiny[1].extrapolated == ""
    rows = benchmarks.capture_rows((ROOT / "benchmarks/results/capture_smollm2.md").read_text())
    assert rows == [(1, 60, 547.0, 559.1, 2.2), (8, 60, 3949.6, 4066.4, 3.0)]
    heads = benchmarks.head_relations_figures((ROOT / "benchmarks/results/head_relations.md").read_text())
    assert heads == {"seconds": 23.2, "loop_speedup": 5.0, "naive_speedup": 267.5, "peak_mb": 1262.0,
                     "heads": 270}
    ffn = benchmarks.ffn_figures((ROOT / "benchmarks/results/ffn_concepts.md").read_text())
    assert sorted(ffn) == [8, 300] and ffn[300]["eigh"]["cpu_vs_full"] == 0.66
    assert ffn[8]["svd_lowrank q=4 p=10"] == {"cpu_vs_full": 0.15, "ratio_err": 0.11, "angle": 22.347}


def _fake_run(folder: Path) -> Path:
    """A run folder whose summary.json holds only what the organism collector reads (hand-made numbers)."""
    rotation = {"n_directions": 64.0, "d_model": 256.0, "mean_angle_deg": 20.0, "chance_mean_angle_deg": 60.0,
                "max_angle_deg": 80.0, "chance_max_angle_deg": 89.0, "mean_best_abs_cos": 0.5,
                "chance_best_abs_cos": 0.16, "mean_top_words_jaccard": 0.03}
    ttests = [{"kind": "task", "category": "writing", "base_mean": 0.01, "tuned_mean": 0.02, "p": 0.03},
              {"kind": "level", "category": "syntax", "base_mean": 0.2, "tuned_mean": 0.1, "p": 0.0004},
              {"kind": "level", "category": "semantics", "base_mean": 0.5, "tuned_mean": 0.5, "p": 0.9}]
    summary = {
        "saliency": {"base__tuned": {"all": {"base_mean": 0.25, "tuned_mean": 0.31, "n": 80, "p": 0.012}}},
        "head_relations": {
            "base": {"knowledge_pairs": 1200}, "tuned": {"knowledge_pairs": 900},
            "base__tuned": {"verb_stats": [
                {"verb_set": "instruction", "mean": 0.2, "std": 0.1, "count": 9, "p_welch": 0.2},
                {"verb_set": "general", "mean": 0.5, "std": 0.3, "count": 300, "p_welch": 0.2}]}},
        "ffn_concepts": {"base": {"explainable_share": 0.171}, "tuned": {"explainable_share": 0.164},
                         "base__tuned": {"rotation": rotation, "ttests_all_layers": ttests}},
        "timing": {"seconds_total": 163.4},
    }
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_organism_collector_and_rules(tmp_path):
    written = organism.collect(tmp_path, _fake_run(tmp_path / "run"))
    results = json.loads(written.read_text())
    assert results["saliency"]["tuned_mean"] == 0.31 and results["head_relations"]["knowledge_pairs"]["tuned"] == 900
    row = organism.render_findings(tmp_path)
    assert "base 0.250, tuned 0.310, n = 80, Welch one-sided p = 0.012 | yes |" in row
    assert "0.20 ± 0.10 (n = 9) vs general verbs 0.50 ± 0.30 (n = 300), Welch p = 0.2 | **no** (if anything" in row
    assert "mean principal angle 20.0° (chance 60.0°)" in row and "writing share 0.010 → 0.020 (p = 0.03)" in row
    assert "but levels move too: syntax 0.200 → 0.100 (p < 0.001) |" in row
    assert row.endswith("**rotation yes, stable levels no** |")
    assert organism.render_run_time(tmp_path) == "2 min 43 s"
    assert organism.render_head_knowledge(tmp_path) == "1,200 → 900 pairs"
    assert organism.render_explainable(tmp_path) == "16-17 %"
    # rotation at or above chance is not a rotation of related directions; no level moved: stable
    results["ffn_concepts"]["rotation"]["mean_angle_deg"] = 61.0
    results["ffn_concepts"]["ttests"] = [r for r in results["ffn_concepts"]["ttests"] if r["p"] > 0.05]
    assert organism.verdicts(results)["ffn"] == "**rotation no, stable levels yes**"
    with pytest.raises(readme.ReadmeError, match="summary.json is missing"):
        organism.collect(tmp_path, tmp_path / "nowhere")


@pytest.mark.slow
@pytest.mark.skipif(not (REFERENCE / "attributions").is_dir(), reason=f"reference data not found at {REFERENCE}")
def test_committed_paper_tables_are_what_the_tool_computes():
    from tuneshift.plugins.saliency.paper import paper_tables

    committed = json.loads((ROOT / "docs/results/paper_tables.json").read_text())
    tables, _ = paper_tables(REFERENCE)
    assert committed.keys() == tables.keys()
    for name, table in tables.items():
        assert committed[name].keys() == table.keys()
        for split, row in table.items():
            assert committed[name][split] == pytest.approx(row, rel=1e-12), (name, split)
