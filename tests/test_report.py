"""The report (tuneshift.report): plugin-owned sections rendered from Jinja2 templates, self-contained pages.

Two kinds of runs are reported on, both real (through the runner):
- the default job (the embedded tiny pair, its held-out prompts, the three analyses) kept small, whose
  sections' headline numbers are checked against the files each plugin stored, recomputed independently, and
  whose page is rendered in headless Chromium (every image and canvas captioned and non-empty);
- tiny random pairs with plugins defined inside this file (registered nowhere), which must get full sections
  with no edit to the report, and sweeps of them.
The Chromium checks dump the DOM after load (the page's own script writes its counts in ``data-report-check``)
and take a screenshot, kept under ``$TUNESHIFT_REPORT_SHOTS`` when set.
"""
from __future__ import annotations

import ast
import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

import tuneshift.report
from tuneshift.config import GenerationConfig, RunConfig
from tuneshift.data import load_prompts
from tuneshift.loading import ModelSpec
from tuneshift.plugin import Plugin, available_plugins
from tuneshift.plugins.residual_norm import ResidualNorm
from tuneshift.report import (SweepReportCallback, build_report_html, export_figures, main, write_report,
                              write_sweep_report)
from tuneshift.results import ResultStore
from tuneshift.runner import Runner
from tuneshift.sections import Figure, Headline, Section, Table, View

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)),
                None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="Chromium is not installed (Debian: "
                                    "apt-get install -y chromium); the render check needs a headless browser")


# ---- the default job, small ------------------------------------------------------------------------------------
def _glove(path: Path, n_words: int = 1500, dim: int = 6) -> Path:
    """Random word vectors (with a shared component, as real ones have) in GloVe's text format."""
    from tuneshift.words import load_word_list

    words = load_word_list("builtin", limit=n_words).words
    vecs = np.random.default_rng(0).standard_normal((len(words), dim))
    vecs[:, 0] += 1.5
    path.write_text("".join(f"{w} " + " ".join(f"{x:.5f}" for x in v) + "\n" for w, v in zip(words, vecs)))
    return path


def _figure_record(fig, target) -> dict:
    """What a saved matplotlib figure says about itself: titles, axis labels, legends, colour bars."""
    axes = [ax for ax in fig.axes if ax.get_label() != "<colorbar>" and ax.axison]
    return {"path": target if isinstance(target, (str, Path)) else None, "suptitle": fig._suptitle.get_text() if fig._suptitle else "",
            "colorbar": any(ax.get_label() == "<colorbar>" for ax in fig.axes),
            "axes": [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                      "legend": ax.get_legend() is not None} for ax in axes]}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """``tuneshift`` with no arguments (model tiny_pair, data organism, the three analyses), on 4 prompts with
    fast plugin settings; every figure the plugins save is recorded on the way."""
    from hydra import compose, initialize_config_dir
    from matplotlib.figure import Figure as MplFigure

    from tuneshift.cli import run_config
    from tuneshift.config import register_configs
    from tuneshift.paths import CONF_DIR

    root = tmp_path_factory.mktemp("default")
    overrides = ["data.limit=4", "generation.max_new_tokens=20", f"run.root={root}", "run.progress=false",
                 "plugins.saliency.html_prompts=2",
                 "plugins.head_relations.similarity=glove", f"plugins.head_relations.similarity_path="
                 f"{_glove(root / 'vectors.txt')}", "plugins.head_relations.word_limit=1500",
                 "plugins.head_relations.top_k=25", "plugins.head_relations.baseline_size=300",
                 "plugins.head_relations.threshold_std=1.0", "plugins.head_relations.layer_group_size=2",
                 "plugins.ffn_concepts.n_directions=16", "plugins.ffn_concepts.word_limit=2000",
                 "plugins.ffn_concepts.seeds=3", "plugins.ffn_concepts.layer_group_size=2",
                 f"plugins.ffn_concepts.cache_dir={root / 'annotations'}"]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    assert list(cfg.plugins) == ["saliency", "head_relations", "ffn_concepts"] and cfg.model.name == "tiny_pair"
    saved: list[dict] = []
    original = MplFigure.savefig

    def spy(fig, fname, *args, **kwargs):
        saved.append(_figure_record(fig, fname))
        return original(fig, fname, *args, **kwargs)

    import tuneshift.plugins.head_relations.views as head_views

    atomic = head_views.atomic_write_bytes

    def named(path, data):  # a figure saved to a buffer first, then written atomically: name its record
        if saved and not isinstance(saved[-1]["path"], (str, Path)):
            saved[-1]["path"] = str(path)
        return atomic(path, data)

    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(MplFigure, "savefig", spy)
        mp.setattr(head_views, "atomic_write_bytes", named)
        run_config(cfg, root / "run")
    torch.set_num_threads(threads)
    run_dir = root / "run"
    return SimpleNamespace(dir=run_dir, store=ResultStore(run_dir, create=False), figures=saved,
                           report=run_dir / "report.html")


def _section(store: ResultStore, plugin: str, key: str) -> Section:
    return store.load_section(plugin, key)


def _headline(section: Section, label: str) -> Headline:
    (found,) = [h for h in section.headlines if h.label == label]
    return found


class _Findings(HTMLParser):
    """Text of every ``<li>`` of a ``<ul class="findings">``, in page order."""

    def __init__(self) -> None:
        super().__init__()
        self.items: list[str] = []
        self._depth = 0
        self._li = None

    def handle_starttag(self, tag, attrs):
        if tag == "ul" and ("class", "findings") in attrs:
            self._depth += 1
        elif tag == "li" and self._depth:
            self._li = ""

    def handle_endtag(self, tag):
        if tag == "li" and self._li is not None:
            self.items.append(self._li.strip())
            self._li = None
        elif tag == "ul" and self._depth:
            self._depth -= 1

    def handle_data(self, data):
        if self._li is not None:
            self._li += data


def _findings(page: Path) -> list[str]:
    parser = _Findings()
    parser.feed(page.read_text())
    return parser.items


def test_saliency_section_numbers_are_the_stored_scores(default_run):
    store = default_run.store
    b, t = (store.load_table("saliency", k, "scores") for k in ("base", "tuned"))
    both = b[["id", "score"]].merge(t[["id", "score"]], on="id", suffixes=("_b", "_t")).dropna()
    head = _headline(_section(store, "saliency", "compare/base__tuned"), "instruction score")
    assert head.base == pytest.approx(both["score_b"].mean()) and head.tuned == pytest.approx(both["score_t"].mean())
    expected_p = sps.ttest_ind(both["score_b"], both["score_t"], equal_var=False, alternative="less").pvalue
    assert head.p == pytest.approx(expected_p) and head.n == len(both) and head.test == "Welch one-sided"
    for key, scores in (("base", b), ("tuned", t)):
        own = _headline(_section(store, "saliency", key), "mean instruction score")
        assert own.value == pytest.approx(scores["score"].mean()) and own.n == scores["score"].notna().sum()
    section = _section(store, "saliency", "base")
    assert [f.path for f in section.figures][:2] == ["heatmap_0.png", "heatmap_1.png"]  # the key plot first


def test_head_relations_section_numbers_are_the_stored_pairs(default_run):
    store = default_run.store
    section = _section(store, "head_relations", "compare/base__tuned")
    shares = store.load_table("head_relations", "compare/base__tuned", "verb_shares")
    verb_findings = [h for h in section.headlines if h.label.startswith("share of heads where the tuned model")]
    assert verb_findings, "no instruction-verb finding"
    for head in verb_findings:
        layers = head.label.rsplit("layers ", 1)[1]
        first, last = (int(x) for x in layers.split("-"))
        group = shares[shares["group"] == first // 2]
        instr = group.loc[group["verb_set"] == "instruction", "share"].to_numpy()
        general = group.loc[group["verb_set"] == "general", "share"].to_numpy()
        assert head.value == pytest.approx(instr.mean())
        assert head.p == pytest.approx(sps.ttest_ind(instr, general, equal_var=False).pvalue, nan_ok=True)
        assert f"{len(instr)} instruction and {len(general)} general verbs" == head.n
    know = {k: store.load_table("head_relations", k, "knowledge") for k in ("base", "tuned")}
    pairs = _headline(section, "head-knowledge pairs (word pairs a head holds in more than one dimension)")
    assert (pairs.base, pairs.tuned) == (len(know["base"]), len(know["tuned"]))
    keys = ["layer", "head", "pair"]
    kept = len(know["base"][keys].merge(know["tuned"][keys], on=keys))
    assert _headline(section, "share of the base heads' pairs the tuned heads keep").value == \
        pytest.approx(kept / len(know["base"]))
    added = store.load_table("head_relations", "compare/base__tuned", "added_pairs")
    assert added["heads"].sum() == len(know["tuned"]) - kept


def test_ffn_section_numbers_are_the_stored_directions(default_run):
    store = default_run.store
    section = _section(store, "ffn_concepts", "compare/base__tuned")
    layers = store.load_table("ffn_concepts", "compare/base__tuned", "rotation_layers")
    assert _headline(section, "mean principal angle between the base and tuned FFN subspaces").value == \
        pytest.approx(layers["mean_angle_deg"].mean())
    assert _headline(section, "best-match |cos| of each base direction with a tuned direction").value == \
        pytest.approx(layers["mean_best_abs_cos"].mean())
    assert _headline(section, "top-word overlap (Jaccard) of each base direction and its best tuned match").value \
        == pytest.approx(layers["mean_top_words_jaccard"].mean())
    ann = pd.concat([store.load_table("ffn_concepts", k, "annotations") for k in ("base", "tuned")])
    ok = (ann["status"] == "ok") & (ann["concept"] != "cannot tell")
    per_seed = ann.assign(ok=ok).groupby(["model", "seed"])["ok"].mean()
    b, t = per_seed["base"].to_numpy(), per_seed["tuned"].to_numpy()
    head = _headline(section, "explainable share of the annotated directions")
    assert (head.base, head.tuned) == (pytest.approx(b.mean()), pytest.approx(t.mean()))
    assert head.p == pytest.approx(sps.ttest_ind(t, b).pvalue, nan_ok=True)
    explained = ann[ok]
    for category in ("writing", "none"):
        hit = explained.assign(hit=explained["tasks"].str.contains(category, regex=False))
        shares = hit.groupby(["model", "seed"])["hit"].mean()
        label = "serving no assistant task" if category == "none" else f"serving {category}"
        head = _headline(section, f"share of explainable directions {label}")
        assert head.base == pytest.approx(shares["base"].mean()) and head.tuned == pytest.approx(shares["tuned"].mean())
        assert head.p == pytest.approx(sps.ttest_ind(shares["tuned"], shares["base"]).pvalue, nan_ok=True)
    own = _headline(_section(store, "ffn_concepts", "base"), "explainable share of the annotated directions")
    assert own.value == pytest.approx(b.mean())


def test_headlines_read_like_findings_in_the_report(default_run):
    assert Headline("instruction score", base=0.276, tuned=0.230, test="Welch one-sided", p=0.89, n=80).text() == \
        "instruction score: base 0.276 -> tuned 0.230, Welch one-sided p = 0.89, n = 80"
    shown = _findings(default_run.report)
    for plugin in ("saliency", "head_relations", "ffn_concepts"):
        section = _section(default_run.store, plugin, "compare/base__tuned")
        assert section.headlines and section.explanation and section.title != plugin
        for headline in section.headlines:
            assert headline.text("base", "tuned") in shown
    assert not [s for s in shown if re.search(r"\w+\.\w+\.\w+|_mean|p_welch|by_split", s)], "a raw key leaked"
    summary = json.loads((default_run.dir / "summary.json").read_text())
    assert "[saliency] instruction score: base" in " ".join(summary["headlines"]["findings"])


def test_every_figure_has_a_title_axis_labels_and_a_legend(default_run):
    assert len(default_run.figures) >= 15
    for fig in default_run.figures:
        name = Path(fig["path"]).relative_to(default_run.dir).as_posix()
        titles = " ".join([fig["suptitle"]] + [a["title"] for a in fig["axes"]])
        assert all(a["title"] for a in fig["axes"]) or fig["suptitle"], f"{name}: no title"
        assert all(a["xlabel"] and a["ylabel"] for a in fig["axes"]), f"{name}: an axis without a label"
        assert fig["colorbar"] or any(a["legend"] for a in fig["axes"]), f"{name}: no legend"
        if "/compare/" in name:
            assert "vs" in titles, f"{name}: the title does not say what is compared ({titles!r})"
        else:
            assert "tiny-pair" in titles, f"{name}: the title does not name the model ({titles!r})"


def test_default_report_layout(default_run):
    text = default_run.report.read_text()
    order = [text.index(f'id="pair-base__tuned-{p}"') for p in ("saliency", "head_relations", "ffn_concepts")]
    assert order == sorted(order) and 'id="pair-base__tuned-responses"' in text
    assert "could not show" not in text and not re.search(r"""(src|href)=["'](https?:)?//""", text)
    assert text.count('<div class="side">') == 6  # each model's own section beside the other, per plugin
    assert 'class="viewer"' in text and "view_layer" in text  # one frame with a selector for many layer pages
    assert "settings.json" in text and "config.yaml" in text and 'id="timing"' in text


# ---- Chromium --------------------------------------------------------------------------------------------------
_CONSOLE_ERROR = re.compile(r"Uncaught|tuneshift-report: (broken|blank|image without|canvas without)|Failed to "
                            r"load|net::ERR|Refused to|SyntaxError|TypeError|ReferenceError", re.I)


def render_in_chromium(page: Path, workdir: Path, shot_name: str | None = None) -> tuple[str, list[str]]:
    """``(dumped DOM after load, console lines)`` of ``page`` in headless Chromium; optionally a screenshot."""
    base = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
            "--disable-dev-shm-usage", f"--user-data-dir={workdir / 'chromium-profile'}"]
    url = page.resolve().as_uri()
    dom = subprocess.run(base + ["--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom",
                                 url], capture_output=True, text=True, timeout=180)
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    if shot_name:
        shots = Path(os.environ.get("TUNESHIFT_REPORT_SHOTS", workdir))
        shots.mkdir(parents=True, exist_ok=True)
        subprocess.run(base + ["--window-size=1440,3200", "--virtual-time-budget=5000",
                               f"--screenshot={shots / shot_name}", url], capture_output=True, timeout=180)
        assert (shots / shot_name).is_file()
    return dom.stdout, console


def check_rendered(dom: str, console: list[str], expected: list[str]) -> dict[str, int]:
    """The page's load check: no broken or blank image or canvas, each captioned; the sections present."""
    assert "<body" in dom, "Chromium dumped no DOM"
    match = re.search(r'data-report-check="([^"]+)"', dom)
    assert match, "the report's load check did not run (a script error?)"
    counts = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", match.group(1))}
    for what in ("broken", "blank", "uncaptioned", "unreadable"):
        assert counts[what] == 0, f"{counts[what]} {what} (see the console: {console})"
    errors = [line for line in console if _CONSOLE_ERROR.search(line)]
    assert not errors, f"console errors: {errors}"
    ids = set(re.findall(r'<section id="([^"]+)"', dom))
    assert not [sid for sid in expected if sid not in ids], f"sections missing: {set(expected) - ids}"
    return counts


@needs_chromium
def test_default_report_renders_in_chromium(default_run, tmp_path):
    dom, console = render_in_chromium(default_run.report, tmp_path, "report_default.png")
    counts = check_rendered(dom, console, ["run", "pair-base__tuned", "pair-base__tuned-saliency",
                                           "pair-base__tuned-head_relations", "pair-base__tuned-ffn_concepts",
                                           "pair-base__tuned-responses", "status", "timing", "settings"])
    assert counts["images"] >= 20 and counts["canvases"] >= 4 and counts["frames"] >= 6  # saliency heatmaps drawn


# ---- plugins defined here (registered nowhere) -------------------------------------------------------------------
def _line_png(path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 2.6))
    ax.plot([0, 1, 2], [1, 3, 2], label="tokens")
    ax.set(title=title, xlabel="x", ylabel="y")
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=50)
    plt.close(fig)
    return path


class TokenCount(Plugin):
    """Counts the prompt tokens each model reads (a plugin only this test file knows)."""

    name = "token_count"

    def on_model_start(self, ctx, model):
        self.tokens = 0

    def on_batch(self, ctx, model, batch, captures):
        self.tokens += int(batch.attention_mask.sum())

    def on_model_end(self, ctx, model):
        ctx.store.save_json(self.name, model.key, "summary", {"tokens": self.tokens})
        _line_png(ctx.store.dir(self.name, model.key) / "tokens.png", f"tokens of {model.key}")

    def on_compare(self, ctx, base, tuned):
        key = ctx.store.compare_key(base, tuned)
        counts = {k: ctx.store.load_json(self.name, k, "summary")["tokens"] for k in (base, tuned)}
        ctx.store.save_table(self.name, key, "counts", pd.DataFrame({"model": list(counts), "tokens": list(counts.values())}))
        _line_png(ctx.store.dir(self.name, key) / "counts.png", f"tokens, {base} vs {tuned}")
        for i in (0, 1, 10):
            ctx.store.save_text(self.name, key, f"page_{i}.html", f"<html><body><h1>page {i}</h1></body></html>")

    def section(self, ctx, key):
        if not key.startswith("compare/"):
            tokens = ctx.store.load_json(self.name, key, "summary")["tokens"]
            return Section("Token counts", "How many prompt tokens a model reads.",
                           [Headline("prompt tokens read", value=tokens)], [Figure("tokens.png", "Tokens read")])
        table = ctx.store.load_table(self.name, key, "counts")
        return Section("Token counts", "How many prompt tokens each model reads, base vs tuned.",
                       [Headline("prompt tokens read", base=int(table["tokens"][0]), tuned=int(table["tokens"][1]),
                                 n=len(ctx.prompts))],
                       figures=[Figure("counts.png", "Tokens read by each model")],
                       tables=[Table("counts.parquet", "Token counts per model")],
                       views=[View("page_*.html", "One page per thing")], notes=["Counts include padding? No."])


class Bare(Plugin):
    """Writes a plot and a table and declares nothing: the report lists them by file name."""

    name = "bare_probe"
    weight_only = True

    def on_model_end(self, ctx, model):
        ctx.store.save_table(self.name, model.key, "layer_sizes", pd.DataFrame({"layer": [0, 1], "size": [3, 4]}))
        _line_png(ctx.store.dir(self.name, model.key) / "layer_sizes.png", f"sizes of {model.key}")


def _tiny_run(run_dir: Path, plugins: list[Plugin], max_new_tokens: int = 2, pairs=(("base", "tuned"),)) -> Path:
    models = {"base": ModelSpec(name="tiny-base", path="tiny-random:llama:0"),
              "tuned": ModelSpec(name="tiny-tuned", path="tiny-random:llama:1")}
    if not pairs:
        models = {"base": models["base"]}
    Runner(plugins, models, load_prompts("builtin", limit=2), store=ResultStore(run_dir), pairs=list(pairs),
           generation=GenerationConfig(max_new_tokens=max_new_tokens),
           settings=RunConfig(progress=False, threads=1)).run()
    return run_dir


@pytest.fixture(scope="module")
def test_plugin_run(tmp_path_factory):
    return _tiny_run(tmp_path_factory.mktemp("own") / "run", [TokenCount(), Bare(), ResidualNorm()])


def test_a_plugin_defined_in_a_test_gets_a_full_section(test_plugin_run):
    assert "token_count" not in available_plugins()
    text = (test_plugin_run / "report.html").read_text()
    assert 'id="pair-base__tuned-token_count"' in text
    section = text[text.index('id="pair-base__tuned-token_count"'):text.index('id="pair-base__tuned-bare_probe"')]
    for piece in ("Token counts", "How many prompt tokens each model reads, base vs tuned.",
                  "Tokens read by each model", "Token counts per model", "One page per thing",
                  "Counts include padding? No.", "data:image/png;base64,", "data:text/csv;base64,", "srcdoc="):
        assert html.escape(piece, quote=False) in section, piece
    counts = pd.read_parquet(test_plugin_run / "token_count/compare/base__tuned/counts.parquet")
    assert f"prompt tokens read: base {counts['tokens'][0]} -&gt; tuned {counts['tokens'][1]}, n = 2" in section
    assert section.index('value="page_1.html"') < section.index('value="page_10.html"')  # natural order
    assert "Tokens read" in section and "tiny-base" in section  # each model's own section beside the other
    bare = text[text.index('id="pair-base__tuned-bare_probe"'):]
    assert "Layer sizes" in bare and "layer_sizes.png" in bare  # a plugin declaring nothing: its files


def test_residual_norm_section_numbers(test_plugin_run):
    store = ResultStore(test_plugin_run, create=False)
    section = store.load_section("residual_norm", "compare/base__tuned")
    b, t = (store.load_table("residual_norm", k, "norms")["mean_norm"] for k in ("base", "tuned"))
    head = _headline(section, "mean residual-stream norm (mean over layers)")
    assert (head.base, head.tuned) == (pytest.approx(b.mean()), pytest.approx(t.mean()))
    assert _headline(section, "tuned / base norm ratio (mean over layers)").value == \
        pytest.approx((t.to_numpy() / b.to_numpy()).mean())


def test_the_report_core_imports_no_plugin_and_names_none():
    root = Path(tuneshift.report.__file__).parent
    names = set(available_plugins()) | {"precision_check"}
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".py", ".j2", ".css", ".js"):
            continue
        text = path.read_text()
        assert not [n for n in names if n in text], f"{path.name} names a plugin"
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(text)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                assert not [m for m in modules if m.startswith(("tuneshift.plugins", "plugins"))], path.name
    loaded = subprocess.run([sys.executable, "-c", "import sys, tuneshift.report; print(sorted(m for m in "
                             "sys.modules if m.startswith('tuneshift.plugins')))"], capture_output=True, text=True)
    assert loaded.stdout.strip() == "[]", loaded.stdout + loaded.stderr


def test_broken_files_never_break_the_report(test_plugin_run, tmp_path):
    run = Path(shutil.copytree(test_plugin_run, tmp_path / "run"))
    cmp = run / "token_count" / "compare" / "base__tuned"
    (cmp / "counts.parquet").write_bytes(b"not parquet")
    (cmp / "counts.png").write_bytes(b"")
    for page in cmp.glob("page_*.html"):
        page.unlink()
    (run / "residual_norm" / "base" / "section.json").write_text("{nope")
    (run / "bare_probe" / "tuned" / "layer_sizes.png").write_bytes(b"\x89PNG broken")
    text = write_report(run).read_text()
    assert text.count('class="error-box"') >= 4 and "counts.parquet" in text and "page_*.html" in text
    assert "Some results could not be shown" in text
    for sid in ("pair-base__tuned-token_count", "pair-base__tuned-residual_norm", "status", "settings"):
        assert f'id="{sid}"' in text


def test_budget_links_instead_of_embedding(test_plugin_run, tmp_path):
    run = Path(shutil.copytree(test_plugin_run, tmp_path / "run"))
    text = write_report(run, max_embed_bytes=2000).read_text()
    assert "data:image/png" not in text and "linked, not embedded" in text
    assert 'href="token_count/compare/base__tuned/counts.png"' in text


def test_export_figures_and_log_report(test_plugin_run, tmp_path):
    run = Path(shutil.copytree(test_plugin_run, tmp_path / "run"))
    out = export_figures(run)
    index = json.loads((out / "index.json").read_text())
    names = {row["file"]: row["caption"] for row in index}
    assert names["token_count__base__tuned__counts.png"] == "Tokens read by each model"
    assert all((out / n).is_file() for n in names)

    class Recorder:
        def __init__(self):
            self.calls = []

        def log_html(self, key, path):
            self.calls.append((key, Path(path).name))

        def log_image(self, key, path):
            self.calls.append((key, Path(path).name))

    logger = Recorder()
    write_report(run, logger=logger)
    assert logger.calls == [("report", "report.html")]


def test_a_single_model_run_writes_every_plugins_figures(tmp_path):
    """No pair: each built-in plugin's per-model figures exist and the model's section shows them."""
    from tuneshift.plugins.ffn_concepts import FFNConceptsPlugin
    from tuneshift.plugins.head_relations import HeadRelationsPlugin
    from tuneshift.plugins.saliency import SaliencyPlugin

    plugins = [SaliencyPlugin({"html_prompts": 1}),
               HeadRelationsPlugin({"similarity": "glove", "similarity_path": str(_glove(tmp_path / "v.txt")),
                                    "word_limit": 1500, "top_k": 25, "baseline_size": 300, "threshold_std": 1.0}),
               FFNConceptsPlugin({"n_directions": 8, "word_limit": 2000, "seeds": 2,
                                  "cache_dir": str(tmp_path / "cache")}), ResidualNorm()]
    run = _tiny_run(tmp_path / "single", plugins, max_new_tokens=4, pairs=())
    expected = {"saliency": {"heatmap_0.png", "score_distribution.png", "density_profile.png"},
                "head_relations": {"knowledge_by_head.png"}, "ffn_concepts": {"concepts.png", "variance_spectrum.png"},
                "residual_norm": {"norms.png"}}
    for plugin, pngs in expected.items():
        assert pngs <= {p.name for p in (run / plugin / "base").glob("*.png")}, plugin
    text = (run / "report.html").read_text()
    section = text[text.index('id="model-base"'):text.index('id="status"')]
    assert section.count("<img ") >= 7 and "could not show" not in text


# ---- sweeps ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A sweep folder of two jobs that differ in one plugin option and the generation length."""
    folder = tmp_path_factory.mktemp("sweeps") / "sweep-1234abcd"
    _tiny_run(folder / "tiny-aaaa1111", [ResidualNorm(include_embeddings=True), TokenCount()], max_new_tokens=2)
    _tiny_run(folder / "tiny-bbbb2222", [ResidualNorm(include_embeddings=False), TokenCount()], max_new_tokens=3)
    return folder


def test_sweep_report_shows_differing_settings_and_findings(sweep):
    assert main([str(sweep)]) == 0
    text = (sweep / "sweep_report.html").read_text()
    table = text[text.index('id="sweep-jobs"'):text.index('id="sweep-findings"')]
    assert "plugins.residual_norm.include_embeddings" in table and "generation.max_new_tokens" in table
    assert "models.base.path" not in table  # shared settings are not listed
    assert 'href="tiny-aaaa1111/report.html"' in table and (sweep / "tiny-bbbb2222" / "report.html").is_file()
    findings = text[text.index('id="sweep-findings"'):text.index('id="sweep-settings"')]
    store = ResultStore(sweep / "tiny-aaaa1111", create=False)
    ratio = store.load_section("residual_norm", "compare/base__tuned").headlines[1].value
    assert "tuned / base norm ratio (mean over layers)" in findings and f"{ratio:.3f}"[:4] in findings
    csv = pd.read_csv(sweep / "sweep_summary.csv")
    assert list(csv["job"]) == ["tiny-aaaa1111", "tiny-bbbb2222"]
    assert csv["plugins.residual_norm.include_embeddings"].tolist() == [True, False]
    assert csv["residual_norm: tuned / base norm ratio (mean over layers) [value]"][0] == pytest.approx(ratio)
    assert (sweep / "sweep_summary.png").is_file() and "data:image/png;base64," in text


def test_sweep_callback_and_cli_errors(sweep, tmp_path, capsys):
    from omegaconf import OmegaConf

    (sweep / "sweep_report.html").unlink(missing_ok=True)
    SweepReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert (sweep / "sweep_report.html").is_file() and "sweep report" in capsys.readouterr().out
    assert main([str(tmp_path / "missing")]) == 2
    assert main([str(tmp_path)]) == 2  # an empty folder holds no run
    (sweep / "sweep_report.html").unlink()
    assert main([str(sweep.parent), "--no-refresh"]) == 0  # <run.root>/sweeps: a report per sweep folder in it
    assert (sweep / "sweep_report.html").is_file() and not (sweep.parent / "sweep_report.html").exists()


@needs_chromium
def test_sweep_report_renders_in_chromium(sweep, tmp_path):
    report = write_sweep_report(sweep, refresh_runs=False)
    dom, console = render_in_chromium(report, tmp_path, "report_sweep.png")
    assert check_rendered(dom, console, ["sweep-jobs", "sweep-findings", "sweep-settings",
                                         "sweep-figures"])["images"] == 1


@needs_chromium
def test_own_plugin_report_renders_in_chromium(test_plugin_run, tmp_path):
    dom, console = render_in_chromium(test_plugin_run / "report.html", tmp_path)
    check_rendered(dom, console, ["run", "pair-base__tuned-token_count", "pair-base__tuned-bare_probe"])


def test_report_of_a_folder_without_config_or_settings(test_plugin_run, tmp_path):
    run = Path(shutil.copytree(test_plugin_run, tmp_path / "run"))
    (run / "settings.json").unlink()
    text, page = build_report_html(run)
    assert 'id="pair-base__tuned-token_count"' in text and not page.errors


def test_rotation_findings_show_a_chance_baseline_when_the_results_carry_one():
    from tuneshift.plugins.ffn_concepts.section import rotation_headlines

    plain = {"n_directions": 64.0, "d_model": 256.0, "mean_angle_deg": 41.2, "mean_cos2": 0.5, "chance_cos2": 0.25,
             "mean_best_abs_cos": 0.7, "mean_top_words_jaccard": 0.1}
    angle, best, words = rotation_headlines(plain)
    assert angle.text() == ("mean principal angle between the base and tuned FFN subspaces: 41.2°, n = first 64 of "
                            "256 directions per layer, mean cos² 0.500, random subspaces 0.250")
    assert best.text() == "best-match |cos| of each base direction with a tuned direction: 0.700"
    with_chance = {**plain, "chance_mean_angle_deg": 70.1, "chance_best_abs_cos": 0.21}
    angle, best, _ = rotation_headlines(with_chance)
    assert angle.note == "random subspaces 70.1°" and best.note == "random subspaces 0.210"
