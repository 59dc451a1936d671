"""token_shift against a naive two-model loop on a tiny random pair, on the shared (tuned) response."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from tuneshift.attribution import make_item, naive_attribution
from tuneshift.cli import run_config as run
from tuneshift.config import validate
from tuneshift.data import encode_prompt, load_prompts
from tuneshift.errors import ConfigError
from tuneshift.loading import ModelSpec, load_model
from tuneshift.plugin import PluginError
from tuneshift.plugins.token_shift import stats
from tuneshift.results import ResultStore

N_PROMPTS, N_NEW = 5, 6


def _cfg(tmp_path, plugins, source="tuned", family="llama", **extra):
    return validate(OmegaConf.create({
        "model": {"name": "tiny", "models": {"base": {"name": "b", "path": f"tiny-random:{family}:0"},
                                             "tuned": {"name": "t", "path": f"tiny-random:{family}:1"}},
                  "pairs": [["base", "tuned"]]},
        "data": {"limit": N_PROMPTS}, "generation": {"max_new_tokens": N_NEW, "response_source": source},
        "run": {"root": str(tmp_path), "name": "job", "batch_size": 2, "progress": False, "report": False},
        "plugins": plugins, **extra,
    }))


def _naive_positions(base, tuned, tok, prompts, rows):
    """Per position of the tuned response: a plain forward of each model, float64 softmax, rank by counting."""
    out = []
    for prompt, row in zip(prompts, rows):
        enc = encode_prompt(tok, prompt, False)
        resp = row["response_ids"] + ([row["stop_id"]] if row["stop_id"] is not None else [])
        ids = torch.cat([enc.input_ids, torch.tensor(row["response_ids"], dtype=torch.long)])[None]
        with torch.no_grad():
            lb = base(ids).logits[0].double().log_softmax(-1)
            lt = tuned(ids).logits[0].double().log_softmax(-1)
        for m, y in enumerate(resp):
            c = enc.n_prompt - 1 + m
            rank = 1 + int((lb[c] > lb[c, y]).sum())
            kl_tb = float((lt[c].exp() * (lt[c] - lb[c])).sum())
            kl_bt = float((lb[c].exp() * (lb[c] - lt[c])).sum())
            out.append({"id": prompt.id, "m": m, "token_id": y, "rank_base": rank, "p_base": float(lb[c, y].exp()),
                        "p_tuned": float(lt[c, y].exp()), "kl_tb": kl_tb, "kl_bt": kl_bt})
    return pd.DataFrame(out)


@pytest.mark.parametrize("family", ["llama"])  # the other families: test_layer_lens.py (both plugins at once)
def test_token_shift_equals_a_naive_two_model_loop(tmp_path, family):
    run(_cfg(tmp_path, {"token_shift": {"html_prompts": 2}}, family=family))
    store = ResultStore(tmp_path / "job")
    table = store.load_table("token_shift", "compare/base__tuned", "positions")
    rows = [json.loads(line) for line in (tmp_path / "job" / "responses" / "tuned.jsonl").read_text().splitlines()]
    assert not (tmp_path / "job" / "responses" / "base.jsonl").exists()  # the base model scores tuned's response
    base, tok = load_model(ModelSpec(path=f"tiny-random:{family}:0"))
    tuned, _ = load_model(ModelSpec(path=f"tiny-random:{family}:1"))
    prompts = load_prompts("builtin", limit=N_PROMPTS)
    naive = _naive_positions(base, tuned, tok, prompts, rows)
    assert len(table) == len(naive) == sum(len(r["response_ids"]) + (r["stop_id"] is not None) for r in rows)
    merged = naive.merge(table, on=["id", "m"], suffixes=("", "_plugin"))
    assert len(merged) == len(naive)
    assert (merged["token_id"] == merged["token_id_plugin"]).all()
    assert (merged["rank_base"] == merged["rank_base_plugin"]).all()
    for col in ("p_base", "p_tuned", "kl_tb", "kl_bt"):
        np.testing.assert_allclose(merged[f"{col}_plugin"], merged[col], rtol=1e-4, atol=1e-7)
    rank = merged["rank_base"]
    expected = np.where(rank == 1, "unshifted", np.where(rank <= 3, "marginal", "shifted"))
    assert (merged["class"] == expected).all()
    # the paired cache is gone after the comparison, the summary is consistent with the table
    assert not (tmp_path / "job" / "token_shift" / "base" / "paired").exists()
    summary = store.load_json("token_shift", "compare/base__tuned", "summary")
    assert summary["share_shifted"] == pytest.approx((table["class"] == "shifted").mean())
    assert summary["mean_kl_tb"] == pytest.approx(naive["kl_tb"].mean(), rel=1e-4)

    # differential attribution: I_T - I_B of log p on identical ids, against the slow reference per model
    arrays = store.load_arrays("token_shift", "compare/base__tuned", "differential")
    for i, (prompt, row) in enumerate(zip(prompts[:2], rows[:2])):
        enc = encode_prompt(tok, prompt, False)
        item = make_item(enc.input_ids, torch.tensor(row["response_ids"]), enc.content_mask)
        D = naive_attribution(tuned, item, "logprob") - naive_attribution(base, item, "logprob")
        np.testing.assert_allclose(arrays[f"D_{i}"], D.numpy(), rtol=1e-3, atol=1e-5 * float(D.abs().max()))
    section = json.loads((tmp_path / "job" / "token_shift" / "compare" / "base__tuned" / "section.json").read_text())
    assert any(h["label"].startswith("shifted share") for h in section["headlines"])
    assert (tmp_path / "job" / "token_shift" / "compare" / "base__tuned" / "shift_by_position.png").is_file()


def test_token_shift_needs_a_shared_response(tmp_path):
    with pytest.raises(PluginError, match="response_source=tuned"):
        run(_cfg(tmp_path, {"token_shift": {}}, source="own"))


def test_response_source_errors(tmp_path):
    with pytest.raises(ConfigError, match="choose one of own, tuned, base, reference"):
        run(_cfg(tmp_path, {"token_shift": {}}, source="mine"))
    with pytest.raises(ConfigError, match="no 'reference' answer"):
        run(_cfg(tmp_path, {"token_shift": {}}, source="reference"))  # the builtin prompts have no reference


def test_classes_and_format_tokens():
    assert list(stats.classify(np.array([1, 2, 3, 4, 10]))) == ["unshifted", "marginal", "marginal", "shifted",
                                                                "shifted"]
    assert list(stats.classify(np.array([2, 3]), marginal_max_rank=2)) == ["marginal", "shifted"]
    assert stats.is_format_token("\n") and stats.is_format_token(" .") and stats.is_format_token("x", special=True)
    assert not stats.is_format_token(" the") and not stats.is_format_token("3.")


def test_statistics_on_a_hand_made_table():
    table = pd.DataFrame({
        "id": ["a"] * 4 + ["b"] * 2, "category": ["x"] * 4 + ["y"] * 2, "m": [0, 1, 2, 3, 0, 1],
        "n_response": [3, 3, 3, 3, 2, 2], "is_stop": [False, False, False, True, False, False],
        "token_id": [5, 6, 5, 1, 5, 7], "token": ["\n", "a", "\n", "<eos>", "\n", "b"],
        "is_format": [True, False, True, True, True, False], "rank_base": [9, 1, 2, 4, 5, 1],
        "kl_tb": [1.0, 0.0, 0.5, 2.0, 1.0, 0.1], "kl_bt": [0.5] * 6})
    table["class"] = stats.classify(table["rank_base"].to_numpy())
    s = stats.shares(table)
    assert s == {"unshifted": 2 / 6, "marginal": 1 / 6, "shifted": 3 / 6}
    top = stats.top_shifted_tokens(table)
    assert top.iloc[0]["token_id"] == 5 and top.iloc[0]["n_shifted"] == 2 and top.iloc[0]["n_total"] == 3
    fmt = stats.format_enrichment(table)
    assert fmt["format_share_of_shifted"] == 1.0 and fmt["format_share_of_other"] == pytest.approx(1 / 3)
    by_pos = stats.by_relative_position(table, bins=2)  # rel: 0, 1/3, 2/3, 1, 0, 1/2
    assert list(by_pos["n"]) == [3, 3] and by_pos["share_shifted"].tolist() == [pytest.approx(2 / 3),
                                                                                pytest.approx(1 / 3)]
    per = stats.per_prompt(table).set_index("id")
    assert per.loc["a", "share_shifted"] == 0.5 and per.loc["b", "mean_kl_tb"] == pytest.approx(0.55)


def test_saliency_scores_both_models_on_identical_tokens(tmp_path):
    run(_cfg(tmp_path, {"saliency": {"save_raw": True, "html_prompts": 0}}))
    store = ResultStore(tmp_path / "job")
    b, t = store.load_arrays("saliency", "base", "matrices"), store.load_arrays("saliency", "tuned", "matrices")
    rows = [json.loads(line) for line in (tmp_path / "job" / "responses" / "tuned.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        assert b[f"I_{i}"].shape == t[f"I_{i}"].shape == (b[f"I_{i}"].shape[0], len(row["response_ids"]))
    with pytest.raises(PluginError, match="conflicts with generation.response_source"):
        run(_cfg(tmp_path / "x", {"saliency": {"chat_template": True}}))


@pytest.mark.parametrize("source", ["base", "reference"])
def test_other_response_sources(tmp_path, source):
    extra = {"data": {"format": "organism", "limit": 3}} if source == "reference" else {}
    cfg = _cfg(tmp_path, {"token_shift": {"attribution": False}}, source=source, **extra)
    run(cfg)
    store = ResultStore(tmp_path / "job")
    table = store.load_table("token_shift", "compare/base__tuned", "positions")
    _, tok = load_model(ModelSpec(path="tiny-random:llama:0"))
    if source == "reference":
        prompts = load_prompts("organism", limit=3)
        expected = [tok(p.reference, add_special_tokens=False)["input_ids"] for p in prompts]
        assert not (tmp_path / "job" / "responses").exists()   # nothing generated
    else:
        rows = [json.loads(x) for x in (tmp_path / "job" / "responses" / "base.jsonl").read_text().splitlines()]
        expected = [r["response_ids"] + ([r["stop_id"]] if r["stop_id"] is not None else []) for r in rows]
        assert not (tmp_path / "job" / "responses" / "tuned.jsonl").exists()
    got = [g.sort_values("m")["token_id"].tolist() for _, g in table.groupby("id", sort=False)]
    assert got == expected


def test_a_model_in_two_pairs_with_two_sources_is_refused(tmp_path):
    cfg = _cfg(tmp_path, {"token_shift": {}})
    cfg.model.models["other"] = ModelSpec(name="o", path="tiny-random:llama:2")
    cfg.model.pairs = [["base", "tuned"], ["base", "other"]]
    with pytest.raises(ConfigError, match="sits in several pairs"):
        run(cfg)


def test_resume_recomputes_the_first_model_when_its_cache_is_gone(tmp_path, monkeypatch):
    import tuneshift.prompting as prompting_module
    import tuneshift.runner as runner_module

    loads = []
    real = runner_module.load_model
    for module in (runner_module, prompting_module):  # the runner's loads and the first pass's
        monkeypatch.setattr(module, "load_model", lambda spec, *a: loads.append(spec.name) or real(spec, *a))
    cfg = _cfg(tmp_path, {"token_shift": {"attribution": False}})
    run(cfg)
    assert loads == ["t", "b", "t"]  # a first pass generates the tuned responses the base model is scored on
    loads.clear()
    job = tmp_path / "job"
    first = ResultStore(job).load_table("token_shift", "compare/base__tuned", "positions")
    (job / "token_shift" / "tuned" / "_DONE").unlink()          # the second model must run again
    (job / "token_shift" / "compare" / "base__tuned" / "_DONE").unlink()
    assert not (job / "token_shift" / "base" / "paired").exists()  # released after the comparison
    marker = (job / "token_shift" / "base" / "_DONE").stat().st_mtime_ns
    run(cfg)
    assert loads == ["b", "t"]  # the tuned responses come from their cache: no first pass
    assert (job / "token_shift" / "base" / "_DONE").stat().st_mtime_ns != marker  # the first model was redone
    again = ResultStore(job).load_table("token_shift", "compare/base__tuned", "positions")
    pd.testing.assert_frame_equal(first, again)


def test_tail_probe_and_response_positions():
    from tuneshift.adapters import ModelAdapter
    from tuneshift.data import EncodedPrompt, Prompt
    from tuneshift.generation import make_batches, response_positions
    from tuneshift.probes import Probe, ProbeError, ProbeRegistry
    from tuneshift.testing import tiny_model, tiny_tokenizer
    from nnsight import TransformersModel

    model = tiny_model("llama", 0)
    lm = TransformersModel(model, tokenizer=tiny_tokenizer())
    items = []
    for i, (n_prompt, resp, stop) in enumerate([(4, [7, 8, 9], 1), (6, [10], None), (3, [], 1)]):
        e = EncodedPrompt(Prompt(str(i), "x", ()), torch.arange(20, 20 + n_prompt), torch.zeros(n_prompt, dtype=bool),
                          torch.ones(n_prompt, dtype=bool), [])
        e.response_ids, e.stop_id = torch.tensor(resp, dtype=torch.long), stop
        items.append(e)
    batch = next(make_batches(items, 3, 0))
    assert batch.response_tail == 4
    registry = ProbeRegistry(ModelAdapter(model), {"x": [Probe("logits", reduce="tail"), Probe("logits")]})
    got = registry.run(lm, batch.input_ids, batch.attention_mask, batch.position_ids, tail=batch.response_tail)["x"]
    torch.testing.assert_close(got["logits:tail"], got["logits"][:, -4:])
    with pytest.raises(ProbeError, match="tail=None"):
        registry.run(lm, batch.input_ids, batch.attention_mask, batch.position_ids)
    pos = response_positions(batch, 4)
    assert pos.rows.tolist() == [0, 0, 0, 0, 1, 2] and pos.m.tolist() == [0, 1, 2, 3, 0, 0]
    assert pos.targets.tolist() == [7, 8, 9, 1, 10, 1] and pos.is_stop.tolist() == [0, 0, 0, 1, 0, 1]
    # row 0: prompt ends at column T-4, so its logit there (tail index 0) predicts y_0 = 7
    assert pos.cols.tolist() == [0, 1, 2, 3, 2, 3]
    T = batch.input_ids.shape[1]
    assert batch.input_ids[0, T - 3:].tolist() == [7, 8, 9] and batch.input_ids[1, T - 1] == 10
