"""The saliency plugin end to end through the runner (tiny random pair), its files, views and plots."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tuneshift.data import encode_prompt, load_prompts
from tuneshift.loading import ModelSpec, load_model
from tuneshift.plugin import PluginError, build_plugins
from tuneshift.results import ResultStore
from tuneshift.cli import run_config as run
from tuneshift.plugins.saliency import SaliencyPlugin
from tuneshift.attribution import make_item, naive_attribution
from tuneshift.plugins.saliency.density import density, normalise, prompt_score, threshold
from tuneshift.plugins.saliency.views import PromptView, examples_html
from conftest import tiny_pair_config


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: per-op overhead, and two threads spin-wait on a busy machine
    yield
    torch.set_num_threads(threads)


def _cfg(tmp_path, options=None, limit=4):
    return tiny_pair_config(tmp_path, {"saliency": options or {}}, limit=limit)


def test_end_to_end_files_and_numbers(tmp_path):
    run(_cfg(tmp_path, {"html_prompts": 2, "save_raw": True}))
    store = ResultStore(tmp_path / "job")
    for key in ("base", "tuned"):
        assert store.is_done("saliency", key)
        scores = store.load_table("saliency", key, "scores")
        assert len(scores) == 4 and set(scores["split"]) == {"builtin"}
        arrays = store.load_arrays("saliency", key, "matrices")
        assert list(arrays["ids"]) == list(scores["id"])
        summary = store.load_json("saliency", key, "summary")
        assert summary["n_prompts"] == 4 and summary["n_vjp"] + summary["n_jvp"] == 4
        html = (store.dir("saliency", key) / "examples.html").read_text()
        assert html.count("<section") == 2 and "http" not in html.split("<body>")[1]

    # recompute the first prompt of the tuned model independently: naive loop + the formulas by hand
    model, tok = load_model(ModelSpec(path="tiny-random:llama:1"))
    prompt = load_prompts("builtin", limit=1)[0]
    enc = encode_prompt(tok, prompt, chat_template=False)
    rows = [json.loads(line) for line in (tmp_path / "job" / "responses" / "tuned.jsonl").read_text().splitlines()]
    response = torch.tensor(rows[0]["response_ids"])
    raw = naive_attribution(model, make_item(enc.input_ids, response, enc.content_mask))
    arrays = store.load_arrays("saliency", "tuned", "matrices")
    assert np.allclose(arrays["I_0"], raw.numpy(), rtol=0, atol=1e-5 * float(raw.abs().max()))
    levels = normalise(raw.double().numpy())
    assert np.array_equal(arrays["S_0"], levels.astype(np.uint8))
    instr = enc.instruction_mask[enc.content_mask].numpy()
    want = prompt_score(density(threshold(levels, 7.0)), instr, len(response))
    got = store.load_table("saliency", "tuned", "scores").iloc[0]
    assert got["score"] == pytest.approx(want, rel=1e-9, nan_ok=True)
    assert got["n_instruction"] == instr.sum() and got["n_prompt_tokens"] == enc.content_mask.sum()
    dens_rows = store.load_table("saliency", "tuned", "densities")
    assert len(dens_rows[dens_rows["id"] == prompt.id]) == int(enc.content_mask.sum())

    # the comparison: Table 2 on the same prompts, plots
    cmp = store.compare_key("base", "tuned")
    tests = store.load_table("saliency", cmp, "welch_tests")
    assert list(tests.columns) == ["split", "base_mean", "tuned_mean", "n", "p"] and tests["n"].tolist() == [4]
    for png in ("score_distribution.png", "density_profile.png"):
        assert (store.dir("saliency", cmp) / png).read_bytes()[:4] == b"\x89PNG"
    assert store.load_json("saliency", cmp, "summary")["all"]["n"] == 4


def test_own_responses_when_chat_template_or_length_differ(tmp_path):
    """chat_template differing from the run's makes the plugin render prompts and generate its own responses;
    a shorter max_new_tokens truncates the run's greedy responses (a prefix of a longer greedy run)."""
    run(_cfg(tmp_path, {"chat_template": True, "max_new_tokens": 3, "html_prompts": 0}, limit=2))
    store = ResultStore(tmp_path / "job")
    model, tok = load_model(ModelSpec(path="tiny-random:llama:0"))
    prompt = load_prompts("builtin", limit=1)[0]
    enc = encode_prompt(tok, prompt, chat_template=True)
    scores = store.load_table("saliency", "base", "scores")
    assert scores.iloc[0]["n_prompt_tokens"] == int(enc.content_mask.sum())
    assert (scores["n_response"] <= 3).all()
    assert not (store.dir("saliency", "base") / "examples.html").exists()


def test_table1_from_a_ratings_file(tmp_path):
    prompts = load_prompts("builtin", limit=4)
    ratings = tmp_path / "ratings.csv"
    ratings.write_text("id,rating\n" + "\n".join(f"{p.id},{r}" for p, r in zip(prompts, [4, 1, 2, 1])) + "\n")
    run(_cfg(tmp_path, {"ratings": str(ratings), "min_output_tokens": 1, "html_prompts": 0}))
    follow = ResultStore(tmp_path / "job").load_json("saliency", "tuned", "follow_tests")
    scores = ResultStore(tmp_path / "job").load_table("saliency", "tuned", "scores")
    split = follow["builtin"]
    assert split["n_followed"] + split["n_unfollowed"] == int(scores["score"].notna().sum())
    assert not (tmp_path / "job" / "saliency" / "base" / "follow_tests.json").exists()


def test_options_are_validated():
    (plugin,) = build_plugins({"saliency": {"b": 5, "target": "logprob"}})
    assert isinstance(plugin, SaliencyPlugin) and plugin.options.b == 5.0
    with pytest.raises(PluginError, match="saliency"):
        build_plugins({"saliency": {"treshold": 7}})
    for bad in ({"target": "probability"}, {"mode": "fast"}, {"b": 10}, {"p": 1}):
        (plugin,) = build_plugins({"saliency": bad})
        with pytest.raises(PluginError, match=next(iter(bad))):
            plugin.setup(None)


def test_examples_html_is_self_contained_and_marks_instructions():
    view = PromptView("p<1>", "lima", ["Write", " a", " poem", "\n", "about cats"], np.array([1, 1, 1, 0, 0], bool),
                      np.array([2.0, 1.0, 0.0, 0.5, 4.0]), np.array([0.5, 0.25, 0.0, 0.125, 1.0]),
                      [" Roses", " are"], np.array([[10, 0], [3, 9], [0, 0], [1, 1], [10, 10]]), 0.42)
    page = examples_html("title", [view])
    assert page.count('class="tok instr"') == 3 and page.count('class="tok"') == 2
    assert "p&lt;1&gt;" in page and "0.4200" in page
    assert '"cells": "a0390011aa"' in page.replace("&quot;", '"')  # row-major, 10 as "a"
    assert "<script src" not in page and "<link" not in page


def test_token_strings_keep_spaces_and_split_characters():
    from tuneshift.testing import tiny_tokenizer
    from tuneshift.plugins.saliency.views import token_strings

    tok = tiny_tokenizer()
    text = "Write a poem,\n  about caf\u00e9 \u2603"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    shown = token_strings(tok, ids)
    assert len(shown) == len(ids) and "".join(shown) == text
    assert "\u2603" in shown  # a character of several byte tokens appears whole on one of them
