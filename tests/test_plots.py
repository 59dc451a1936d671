"""Pictures a reader can read (issue 16): labelled saliency heatmaps, FFN task shares not swamped by "none".

Each figure is captured as matplotlib saves it (its tick labels, titles, texts), so what a reader sees is
checked, with the numbers written on a plot recomputed here with scipy.
"""
from __future__ import annotations

import json
import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from matplotlib.figure import Figure as MplFigure
from scipy import stats as sps

from tuneshift.plugins.ffn_concepts import stats as ffn_stats
from tuneshift.plugins.ffn_concepts import views as ffn_views
from tuneshift.plugins.saliency.heatmap import MAX_COLS, MAX_ROWS, heatmap_png, kept
from tuneshift.plugins.saliency.views import PromptView, examples_html


@pytest.fixture
def captured(monkeypatch):
    """Every figure saved while the test runs, before it is closed."""
    figures: list[MplFigure] = []
    original = MplFigure.savefig

    def spy(fig, *args, **kwargs):
        figures.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(MplFigure, "savefig", spy)
    return figures


def test_kept_keeps_both_ends_around_one_marker():
    assert kept(5, 10) == [0, 1, 2, 3, 4]
    assert kept(10, 4) == [0, 1, -1, 8, 9]
    assert kept(11, 5) == [0, 1, -1, 8, 9, 10]


def test_heatmap_png_labels_both_axes_marks_truncation_and_shades_the_instruction(tmp_path, captured):
    n, m = 150, 120
    prompt = [f" p{i}" for i in range(n)]
    prompt[3], prompt[4] = "\n", "  "
    response = [f" r{j}" for j in range(m)]
    instruction = np.zeros(n, bool)
    instruction[5:15] = True
    instruction[140:146] = True
    scores = np.random.default_rng(0).integers(0, 11, (n, m))
    heatmap_png(tmp_path / "h.png", scores, prompt, response, instruction, "saliency of model X, prompt 7")
    assert (tmp_path / "h.png").stat().st_size > 10_000
    (fig,) = captured
    ax = fig.axes[0]
    rows = [t.get_text() for t in ax.get_yticklabels()]
    cols = [t.get_text() for t in ax.get_xticklabels()]
    half = MAX_ROWS // 2
    assert len(rows) == MAX_ROWS + 1 and rows[half] == f"⋯ {n - MAX_ROWS} more prompt tokens ⋯"
    assert rows[:3] == [" p0", " p1", " p2"] and rows[3] == "↵" and rows[4] == "␣␣" and rows[-1] == " p149"
    assert len(cols) == MAX_COLS + 1 and cols[MAX_COLS // 2] == f"⋯ {m - MAX_COLS} more response tokens ⋯"
    shaded = [t.get_text() for t in ax.get_yticklabels() if t.get_bbox_patch() is not None]
    assert shaded == [f" p{i}" for i in list(range(5, 15)) + list(range(140, 146))]
    assert "prompt tokens" in ax.get_ylabel() and "response tokens" in ax.get_xlabel() and ax.get_title()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["instruction tokens", "tokens left out (⋯)"]
    assert "score S" in fig.axes[1].get_ylabel()  # the colour bar
    cells = ax.get_images()[0].get_array()
    assert cells[0, 0] == scores[0, 0] and cells[-1, -1] == scores[-1, -1] and cells.mask[half].all()


class _Heat(HTMLParser):
    def __init__(self):
        super().__init__()
        self.payloads, self.captions, self._cap = [], [], False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if "data-heat" in attrs:
            self.payloads.append(json.loads(attrs["data-heat"]))
        self._cap = tag == "figcaption"

    def handle_data(self, data):
        if self._cap:
            self.captions.append(data)
            self._cap = False


def test_the_html_heatmap_carries_labels_instruction_and_a_caption():
    instruction = np.array([False, True, True, False])
    view = PromptView("p1", "s", ["A", " b", " c", "\n"], instruction, np.ones(4), np.ones(4), [" x", " y"],
                      np.array([[0, 10], [3, 4], [5, 6], [7, 8]]), 0.5)
    parser = _Heat()
    parser.feed(examples_html("t", [view]))
    (payload,) = parser.payloads
    assert payload["rows"] == ["A", " b", " c", "\n"] and payload["cols"] == [" x", " y"]
    assert payload["instr"] == [0, 1, 1, 0] and payload["cells"] == "0a34567 8".replace(" ", "")
    assert payload["max_rows"] >= 100 and payload["max_cols"] >= 100
    assert any("rows are its 4 prompt tokens" in c and "instruction tokens shaded" in c for c in parser.captions)


def _annotations(rng: np.random.Generator) -> pd.DataFrame:
    """Two models x 4 seeds x 200 directions; 'none' dominates the tasks of explainable directions."""
    rows = []
    for model, writing in (("base", 0.02), ("tuned", 0.08)):
        for seed in range(4):
            for rank in range(200):
                ok = rng.random() < (0.3 if model == "base" else 0.4)
                task = "writing" if rng.random() < writing else "math" if rng.random() < 0.02 else "none"
                rows.append({"model": model, "layer": rank % 4, "rank": rank, "seed": seed,
                             "concept": "c" if ok else "cannot tell", "tasks": task, "status": "ok",
                             "level": "semantics" if rng.random() < 0.5 else "syntax"})
    return pd.DataFrame(rows)


def test_task_shares_plot_the_explainable_share_apart_with_p_on_every_pair(tmp_path, captured):
    ann = _annotations(np.random.default_rng(1))
    shares = ffn_stats.shares(ann, 2)
    ffn_views.plot_shares(shares, "task", "base", "tuned", tmp_path / "task.png")
    (fig,) = captured
    left, right = fig.axes
    assert [t.get_text() for t in left.get_xticklabels()] == ["explainable"]
    assert [t.get_text() for t in right.get_xticklabels()] == ["writing", "math", "coding", "translation"]
    ok = ann["concept"] != "cannot tell"
    per_seed = ann.assign(ok=ok).groupby(["model", "seed"])["ok"].mean()
    p_explainable = sps.ttest_ind(per_seed["tuned"], per_seed["base"]).pvalue
    assert f"p = {p_explainable:.2g}" in " ".join(t.get_text() for t in left.texts)
    explained = ann[ok]
    for category in ("writing", "none"):
        hit = explained.assign(hit=explained["tasks"] == category).groupby(["model", "seed"])["hit"].mean()
        p = sps.ttest_ind(hit["tuned"], hit["base"]).pvalue
        delta = hit["tuned"].mean() - hit["base"].mean()
        where = " ".join(t.get_text() for t in right.texts) if category == "writing" else right.get_title()
        assert f"p = {p:.2g}" in where, (category, where)
        if category == "writing":
            assert f"Δ {delta:+.3f}" in where
    assert right.get_ylim()[1] < 0.5  # the split's own scale: small shares show
    assert "base vs tuned" in fig._suptitle.get_text() and right.get_legend() is not None
    assert all(ax.get_xlabel() and ax.get_ylabel() for ax in fig.axes)


def test_level_shares_per_layer_group_write_p_on_each_pair(tmp_path, captured):
    shares = ffn_stats.shares(_annotations(np.random.default_rng(2)), 2)
    ffn_views.plot_shares(shares, "level", "base", "tuned", tmp_path / "levels.png", group=None)
    (fig,) = captured
    (ax,) = fig.axes
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels[:2] == ["0-1 phonology", "0-1 morphology"] and len(labels) == 2 * 4
    assert len([t for t in ax.texts if re.search(r"p = ", t.get_text())]) == len(labels)
