"""The comparison report (framework/report.py): self-contained, every section present, renders in Chromium.

Two kinds of run dirs are reported on:
- a synthetic one whose files mimic the three analyses (plots, summaries, tables, HTML views), so the
  dedicated sections are checked independently of the plugins' own speed;
- a real small run (tiny random pair, 4 prompts) through the runner, which writes the report itself.
The Chromium checks dump the DOM after load (the page's own script marks it ``data-report-check``), scan the
console log for errors, and take a screenshot (kept under ``$TUNESHIFT_REPORT_SHOTS`` when set).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tuneshift.report import (build_report_html, export_figures, flatten, headline_metrics, main,
                              write_report, write_sweep_report)
from tuneshift.results import ResultStore

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: "
                                    "apt-get install -y chromium); the render check needs a headless browser")


# ---- a synthetic run dir ------------------------------------------------------------------------------------------
def _png(path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.6))
    x = np.linspace(0, 1, 20)
    ax.plot(x, x ** 2, label="base")
    ax.plot(x, np.sqrt(x), label="tuned")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=60)
    plt.close(fig)


_VIEW = ("<!doctype html><html><head><meta charset='utf-8'><style>span.t{{background:rgba(220,38,38,{a})}}"
         "</style></head><body><h1>{title}</h1><p>{tokens}</p><script>document.body.dataset.ok='1'</script>"
         "</body></html>")


def _view(title: str) -> str:
    tokens = "".join(f'<span class="t" style="background:rgba(37,99,235,{w:.2f})">{t} </span>'
                     for t, w in zip("Write a short poem about the sea .".split(), [0.9, .2, .4, .6, .1, .1, .5, .1]))
    return _VIEW.format(a=0.3, title=title, tokens=tokens)


def make_synthetic_run(run_dir: Path, pairs=(("base", "tuned"),)) -> Path:
    """A run dir laid out like the runner's, with files like those the three analyses write."""
    store = ResultStore(run_dir)
    keys = sorted({k for p in pairs for k in p})
    models = {k: {"name": f"Model-{k}", "path": f"org/{k}", "dtype": "float32", "device": "cpu",
                  "chat_template": k != "base"} for k in keys}
    config = {"experiment": "synthetic", "model": {"name": "synthetic_pair", "models": models,
                                                    "pairs": [list(p) for p in pairs]},
              "data": {"name": "builtin", "format": "builtin", "limit": 3},
              "generation": {"max_new_tokens": 8, "chat_template": None},
              "run": {"name": run_dir.name},
              "plugins": {"saliency": {}, "head_relations": {}, "ffn_concepts": {}}}
    import yaml

    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    store.update_summary("models", {k: {"name": models[k]["name"], "n_layers": 2} for k in keys})
    store.update_summary("timing", {"seconds_total": 1.5, "seconds_by_hook": {"saliency.on_batch": 1.0}})
    for key in keys:
        rows = [json.dumps({"fingerprint": "x", "id": f"p{i}", "prompt": f"Write a poem number {i}.",
                            "response": f"{key} says {i}", "response_ids": [1, 2]}) for i in range(3)]
        (run_dir / "responses").mkdir(exist_ok=True)
        (run_dir / "responses" / f"{key}.jsonl").write_text("\n".join(rows) + "\n")
        # saliency, per model
        store.save_json("saliency", key, "summary", {"mean_score": 0.4, "n_prompts": 3,
                                                    "by_split": {"lima": {"mean_score": 0.3, "n": 2}}})
        store.save_table("saliency", key, "scores", pd.DataFrame({"id": ["p0", "p1", "p2"],
                                                                  "score": [0.1, 0.5, 0.6]}))
        _png(store.dir("saliency", key) / "density_profile.png", f"density {key}")
        store.save_text("saliency", key, "examples.html", _view(f"examples {key}"))
        store.mark_done("saliency", key)
        # head relations, per model (the plugin's file names)
        store.save_json("head_relations", key, "summary", {"n_heads": 8, "pairs_total": 120})
        known = ["poem=write", "ocean=sea"] + (["essay=write", "code=python"] if key != "base" else [])
        store.save_table("head_relations", key, "knowledge", pd.DataFrame(
            {"layer": [0, 1] * (len(known) // 2), "head": [0, 3] * (len(known) // 2), "pair": known,
             "word_a": [p.split("=")[0] for p in known], "word_b": [p.split("=")[1] for p in known]}))
        store.save_text("head_relations", key, "view.html", _view(f"heads {key}"))
        store.mark_done("head_relations", key)
        # ffn concepts, per model: one view per layer
        store.save_json("ffn_concepts", key, "summary", {"model": models[key]["name"], "explainable_share": 0.6})
        store.save_arrays("ffn_concepts", key, "directions", {"variance_ratio": np.ones((2, 3))})
        for layer in (0, 1, 10):
            store.save_text("ffn_concepts", key, f"view_layer{layer}.html", _view(f"{key} layer {layer}"))
        store.mark_done("ffn_concepts", key)
    for base, tuned in pairs:
        cmp = ResultStore.compare_key(base, tuned)
        store.save_json("saliency", cmp, "summary", {
            "base_mean_score": 0.31, "tuned_mean_score": 0.52, "welch_t": -3.2, "p_value": 0.0012,
            "tests": [{"split": "lima", "base_mean": 0.3, "tuned_mean": 0.5, "p_value": 0.01},
                      {"split": "mtbench", "base_mean": 0.2, "tuned_mean": 0.4, "p_value": 0.04}]})
        store.save_table("saliency", cmp, "tests", pd.DataFrame(
            {"split": ["lima", "mtbench"], "t": [-2.1, -1.9], "p": [0.01, 0.04]}))
        _png(store.dir("saliency", cmp) / "score_distributions.png", "score distributions")
        _png(store.dir("saliency", cmp) / "density_profile.png", "density profile")
        store.save_text("saliency", cmp, "examples.html", _view("examples compared"))
        store.mark_done("saliency", cmp)
        verb_stats = pd.DataFrame({"group": [0, 0], "layers": ["0-7", "0-7"], "verb_set": ["instruction", "general"],
                                   "mean": [0.62, 0.48], "std": [0.1, 0.1], "count": [30, 900], "t": [2.2, 2.2],
                                   "p_welch": [0.03, 0.03]})
        store.save_json("head_relations", cmp, "summary", {"jaccard_pooled_by_layer": [0.2, 0.1],
                                                          "verb_stats": verb_stats.to_dict(orient="records")})
        store.save_table("head_relations", cmp, "verb_stats", verb_stats)
        store.save_table("head_relations", cmp, "verb_shares", pd.DataFrame(
            {"group": [0, 0, 0], "word": ["write", "explain", "walk"], "share": [0.8, 0.3, 0.5],
             "n_heads": [5, 3, 2], "verb_set": ["instruction", "instruction", "general"]}))
        store.save_table("head_relations", cmp, "overlap", pd.DataFrame({"layer": [0, 1], "jaccard": [0.2, 0.1]}))
        _png(store.dir("head_relations", cmp) / "verb_shares.png", "verb shares")
        _png(store.dir("head_relations", cmp) / "overlap.png", "overlap")
        store.save_text("head_relations", cmp, "view.html", _view("heads compared"))
        store.mark_done("head_relations", cmp)
        store.save_json("ffn_concepts", cmp, "summary", {
            "rotation": {"mean_angle_deg": 41.0, "mean_best_abs_cos": 0.7},
            "ttests_all_layers": [{"kind": "task", "category": "writing", "base_mean": 0.2, "tuned_mean": 0.3,
                                   "p": 0.02}]})
        store.save_table("ffn_concepts", cmp, "ttests", pd.DataFrame(
            {"kind": ["task", "task", "level"], "group": ["all", "all", "all"],
             "category": ["writing", "coding", "syntax"], "base_mean": [0.2, 0.1, 0.3], "base_std": [0.01] * 3,
             "tuned_mean": [0.3, 0.15, 0.3], "tuned_std": [0.02] * 3, "t": [3.0, 1.0, 0.0],
             "p": [0.02, 0.3, 1.0]}))
        _png(store.dir("ffn_concepts", cmp) / "task_shares.png", "task shares")
        _png(store.dir("ffn_concepts", cmp) / "principal_angles.png", "principal angles")
        for layer in (0, 1, 10):
            store.save_text("ffn_concepts", cmp, f"view_layer{layer}.html", _view(f"compare layer {layer}"))
        store.mark_done("ffn_concepts", cmp)
    return run_dir


# ---- static checks -------------------------------------------------------------------------------------------------
class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.ids: list[str] = []
        self.urls: list[str] = []
        self.meta: dict[str, str] = {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "id" in attrs:
            self.ids.append(attrs["id"])
        for name in ("src", "href"):
            if attrs.get(name):
                self.urls.append(attrs[name])
        if tag == "meta" and attrs.get("name"):
            self.meta[attrs["name"]] = attrs.get("content", "")


def _parse(text: str) -> _Collector:
    c = _Collector()
    c.feed(text)
    return c


EXPECTED = ["overview", "pair-base__tuned", "pair-base__tuned-saliency", "pair-base__tuned-head_relations",
            "pair-base__tuned-ffn_concepts", "pair-base__tuned-responses", "status", "timing", "config"]


def test_synthetic_report_is_self_contained_and_complete(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    path = write_report(run)
    text = path.read_text()
    page = _parse(text)
    for sid in EXPECTED:
        assert sid in page.ids, f"section {sid} missing"
    assert set(page.meta["tuneshift-sections"].split()) <= set(page.ids)
    # self-contained: images and downloads are data: URIs, links are in-page or relative, nothing remote
    assert not [u for u in page.urls if re.match(r"(https?:)?//", u)]
    assert text.count("data:image/png;base64,") >= 8
    assert 'srcdoc="' in text and "examples compared" in text
    # the analyses in the paper's order, with their captions and the analysis' key figure first
    assert text.index('id="pair-base__tuned-saliency"') < text.index('id="pair-base__tuned-head_relations"') \
        < text.index('id="pair-base__tuned-ffn_concepts"')
    assert "Score distributions, base vs tuned" in text and "Task shares of explainable directions" in text
    # dedicated views: the instruction-verb table, the pairs tuning added, the task-share table
    assert "Instruction-verb table" in text and "essay=write" in text and "code=python" in text
    assert "Head pairs added by tuning" in text and "Task shares of explainable directions, all layers" in text
    assert "verb_stats[0-7/instruction].mean" in text  # headline numbers of head relations
    assert "could not be shown" not in text
    # views of many layers share one frame, in natural order (layer 10 last)
    assert text.index('value="view_layer1.html"') < text.index('value="view_layer10.html"')
    # side by side: both models of the pair in the per-model block
    assert "Model-base" in text and "Model-tuned" in text


def test_report_survives_broken_files(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    (run / "saliency" / "base" / "scores.parquet").write_bytes(b"not parquet")
    (run / "saliency" / "base" / "broken.json").write_text("{nope")
    text = write_report(run).read_text()
    assert "not readable" in text and 'id="pair-base__tuned-saliency"' in text


def test_flatten_and_headline():
    summary = {"rotation": {"mean_angle_deg": 41.0, "mean_best_abs_cos": 0.7},
               "ttests_all_layers": [{"kind": "task", "category": "writing", "base_mean": 0.2,
                                      "tuned_mean": 0.3}]}
    flat = flatten(summary)
    assert flat["rotation.mean_angle_deg"] == 41.0
    assert flat["ttests_all_layers[task/writing].tuned_mean"] == 0.3
    head = headline_metrics("ffn_concepts", summary)
    assert list(head)[:2] == ["rotation.mean_angle_deg", "rotation.mean_best_abs_cos"]
    assert "ttests_all_layers[task/writing].tuned_mean" in head
    assert headline_metrics("unknown_plugin", {"a": 1, "b": "x", "c": {"d": 2.5}}) == {"a": 1.0, "c.d": 2.5}


def test_sweep_report_table_and_cli(tmp_path):
    sweep = tmp_path / "sweeps"
    make_synthetic_run(sweep / "family_a-builtin")
    make_synthetic_run(sweep / "family_b-builtin")
    shutil.rmtree(sweep / "family_b-builtin" / "ffn_concepts" / "compare")  # an interrupted job
    assert main([str(sweep)]) == 0
    text = (sweep / "sweep_report.html").read_text()
    page = _parse(text)
    assert {"sweep-table", "sweep-figures", "sweep-jobs"} <= set(page.ids)
    assert "family_a-builtin/report.html" in text and (sweep / "family_b-builtin" / "report.html").is_file()
    assert "partial" in text and "rotation.mean_angle_deg" in text
    csv = pd.read_csv(sweep / "sweep_summary.csv")
    assert len(csv) == 2 and "ffn_concepts:rotation.mean_angle_deg" in csv.columns
    assert (sweep / "sweep_summary.png").is_file() and (sweep / "sweep_summary.pdf").is_file()
    assert not [u for u in page.urls if re.match(r"(https?:)?//", u)]


def test_export_figures(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    out = export_figures(run)
    index = json.loads((out / "index.json").read_text())
    names = {row["file"] for row in index}
    assert "ffn_concepts__base__tuned__task_shares.png" in names
    assert all((out / n).is_file() for n in names)


# ---- Chromium ------------------------------------------------------------------------------------------------------
_CONSOLE_ERROR = re.compile(r"Uncaught|broken image|Failed to load|net::ERR|Refused to|SyntaxError|TypeError|"
                            r"ReferenceError", re.I)


def render_in_chromium(page: Path, workdir: Path, shot_name: str | None = None) -> tuple[str, list[str]]:
    """``(dumped DOM after load, console lines)`` of ``page`` in headless Chromium; optionally a screenshot."""
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            "--disable-dev-shm-usage", f"--user-data-dir={workdir / 'chromium-profile'}"]
    url = page.resolve().as_uri()
    dom = subprocess.run(base + ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                                 url], capture_output=True, text=True, timeout=120)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    if shot_name:
        shots = Path(os.environ.get("TUNESHIFT_REPORT_SHOTS", workdir))
        shots.mkdir(parents=True, exist_ok=True)
        subprocess.run(base + ["--window-size=1440,2600", f"--screenshot={shots / shot_name}", url],
                       capture_output=True, timeout=120)
        assert (shots / shot_name).is_file()
    return dom.stdout, console


def _check_rendered(dom: str, console: list[str], expected: list[str]) -> None:
    assert "<body" in dom, "Chromium dumped no DOM"
    match = re.search(r'data-report-check="loaded images=(\d+) broken=(\d+)', dom)
    assert match, "the report's load check did not run (a script error?)"
    assert int(match.group(2)) == 0, "some embedded images did not decode"
    errors = [line for line in console if _CONSOLE_ERROR.search(line)]
    assert not errors, f"console errors: {errors}"
    ids = set(_parse(dom).ids)
    missing = [sid for sid in expected if sid not in ids]
    assert not missing, f"sections missing after rendering: {missing}"


@needs_chromium
def test_synthetic_report_renders_in_chromium(tmp_path):
    run = make_synthetic_run(tmp_path / "run")
    report = write_report(run)
    dom, console = render_in_chromium(report, tmp_path, "report_synthetic.png")
    _check_rendered(dom, console, EXPECTED)
    assert int(re.search(r"loaded images=(\d+)", dom).group(1)) >= 7


def _small_run(tmp_path: Path, plugins: dict) -> Path:
    from tuneshift.config import validate
    from tuneshift.cli import run_config as run

    cfg = validate({"model": {"name": "tiny_random", "models": {
        "base": {"name": "tiny-base", "path": "tiny-random:llama:0"},
        "tuned": {"name": "tiny-tuned", "path": "tiny-random:llama:1"}}, "pairs": [["base", "tuned"]]},
        "data": {"limit": 4}, "generation": {"max_new_tokens": 4},
        "run": {"name": "small", "root": str(tmp_path), "progress": False}, "plugins": plugins})
    run(cfg)
    report = tmp_path / "small" / "report.html"
    assert report.is_file()
    return report


@pytest.mark.slow
@needs_chromium
def test_real_small_run_report_renders_in_chromium(tmp_path):
    """A real run through the runner (tiny random pair, 4 prompts, the example plugin): its report loads.
    (Slow: ~15 s on 2 cores; the synthetic report above covers the same page in the default suite.)"""
    report = _small_run(tmp_path, {"residual_norm": {}})
    dom, console = render_in_chromium(report, tmp_path, "report_small_run.png")
    _check_rendered(dom, console, ["overview", "pair-base__tuned", "pair-base__tuned-residual_norm", "status",
                                   "timing", "config"])


@pytest.mark.slow
@needs_chromium
def test_real_run_with_the_analyses_renders_in_chromium(tmp_path):
    """The same with every one of the three analyses that is available: a section each, no broken piece."""
    from tuneshift.plugin import available_plugins

    from tuneshift.paths import CONF_DIR

    names = [p for p in ("saliency", "head_relations", "ffn_concepts")
             if p in available_plugins() and (CONF_DIR / "plugins" / f"{p}.yaml").is_file()]
    if not names:
        pytest.skip("none of the three analysis plugins is registered yet")
    report = _small_run(tmp_path, {name: {} for name in names})
    text = report.read_text()
    assert "could not be shown" not in text
    dom, console = render_in_chromium(report, tmp_path, "report_analyses.png")
    _check_rendered(dom, console, ["overview", "pair-base__tuned", "status", "timing", "config"]
                    + [f"pair-base__tuned-{name}" for name in names])


@needs_chromium
def test_sweep_report_renders_in_chromium(tmp_path):
    sweep = tmp_path / "sweeps"
    make_synthetic_run(sweep / "family_a-builtin")
    make_synthetic_run(sweep / "family_b-builtin")
    report = write_sweep_report(sweep)
    dom, console = render_in_chromium(report, tmp_path, "report_sweep.png")
    _check_rendered(dom, console, ["sweep-table", "sweep-figures", "sweep-jobs"])


def test_build_report_html_without_config(tmp_path):
    """A results dir without config.yaml (e.g. copied by hand) still gets its pairs from the compare dirs."""
    run = make_synthetic_run(tmp_path / "run")
    (run / "config.yaml").unlink()
    text, _ = build_report_html(run)
    assert 'id="pair-base__tuned-ffn_concepts"' in text
