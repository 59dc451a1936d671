"""The causal plugin: its sources (other plugins' files), its intervention builders, and a run through the runner."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from tuneshift.config import validate
from tuneshift.data import Prompt, encode_prompt, left_pad
from tuneshift.evaluation import Rows
from tuneshift.interventions import AblateHeads, CorruptPositions, Patch, ProjectOut, Steer
from tuneshift.results import ResultStore
from tuneshift.testing import tiny_tokenizer
from tuneshift.plugins.causal import experiments as ex
from tuneshift.plugins.causal.sources import (Directions, SourceMissing, TokenSets, head_growth, rotated_directions,
                                              salient_tokens)


pytestmark = pytest.mark.usefixtures("one_thread")


# ---- sources --------------------------------------------------------------------------------------------------
def _knowledge(rows):
    return pd.DataFrame(rows, columns=["layer", "head", "word_a", "word_b"]).assign(model="m", n_dims=2, max_sim=0.5)


def test_head_growth_counts_instruction_verb_incidences_per_head(tmp_path):
    store = ResultStore(tmp_path)
    base = _knowledge([(0, 0, "write", "poem"), (0, 0, "explain", "write"), (1, 1, "cat", "dog")])
    tuned = _knowledge([(0, 0, "poem", "write"), (0, 1, "explain", "why"), (0, 1, "tell", "story"),
                        (1, 1, "summarize", "text"), (1, 0, "cat", "dog")])
    for key, table in (("b", base), ("t", tuned)):
        store.save_table("head_relations", key, "knowledge", table)
        store.save_json("head_relations", key, "summary", {"layers": [0, 1], "n_heads": 2})
    growth = head_growth(store, "b", "t", ["write", "explain", "tell", "summarize"])
    naive = {}
    for key, table in (("b", base), ("t", tuned)):
        for layer, head, a, b in table[["layer", "head", "word_a", "word_b"]].itertuples(index=False):
            naive.setdefault((layer, head), {"b": 0, "t": 0})[key] += (a in {"write", "explain", "tell", "summarize"}) \
                + (b in {"write", "explain", "tell", "summarize"})
    got = {(r.layer, r.head): (r.base_count, r.tuned_count, r.growth) for r in growth.itertuples()}
    for head in [(0, 0), (0, 1), (1, 0), (1, 1)]:
        n = naive.get(head, {"b": 0, "t": 0})
        assert got[head] == (n["b"], n["t"], n["t"] - n["b"])
    assert list(zip(growth["layer"], growth["head"]))[:2] == [(0, 1), (1, 1)]  # +2, then +1
    with pytest.raises(SourceMissing, match="run ffn_concepts"):
        rotated_directions(store, "b", "t", 4)


def test_rotated_directions_rank_by_best_match_cosine(tmp_path):
    store = ResultStore(tmp_path)
    rng = np.random.default_rng(0)
    base = np.stack([np.linalg.qr(rng.standard_normal((6, 6)))[0].T for _ in range(2)])  # [L, R, d]
    tuned = base.copy()
    mix = np.linalg.qr(rng.standard_normal((2, 2)))[0]
    tuned[1, :2] = mix @ base[1, :2]  # layer 1: the first two directions rotate within their plane
    for key, vecs in (("b", base), ("t", tuned)):
        store.save_arrays("ffn_concepts", key, "directions", {"layers": np.array([0, 1]), "vectors": vecs,
                                                             "variance_ratio": np.full((2, 6), 1 / 6)})
    d = rotated_directions(store, "b", "t", pool=4)
    assert len(d.table) == 8 and set(d.vectors) == {0, 1}
    naive = {(layer, r): max(abs(float(tuned[layer, r] @ base[layer, j])) for j in range(6))
             for layer in range(2) for r in range(4)}
    for row in d.table.itertuples():
        assert row.best_cos == pytest.approx(naive[(row.layer, row.rank)])
    assert {tuple(x) for x in d.table[["layer", "rank"]].head(2).to_numpy()} == {(1, 0), (1, 1)}


def test_salient_tokens_rank_instruction_tokens_and_break_ties_by_score_sums(tmp_path):
    tok = tiny_tokenizer()
    text = "Write a poem. About the sea"
    item = encode_prompt(tok, Prompt("p0", text, ((0, 13),)))
    content = item.content_mask.nonzero().squeeze(1).tolist()
    instr = item.instruction_mask[item.content_mask].numpy()
    n = len(content)
    density = np.zeros(n)
    density[np.flatnonzero(instr)[-1]] = 2.0                  # the last instruction token is the most salient
    sums = np.arange(n)[:, None].repeat(3, 1).astype(np.uint8)  # ties among the rest: larger row sums first
    store = ResultStore(tmp_path)
    store.save_table("saliency", "t", "densities", pd.DataFrame(
        {"id": "p0", "position": range(n), "token": "x", "instruction": instr, "density": density}))
    store.save_arrays("saliency", "t", "matrices", {"S_0": sums, "ids": np.array(["p0"])})
    other = encode_prompt(tok, Prompt("p1", "Say hi", ((0, 3),)))
    sets = salient_tokens(store, "t", [item, other])
    instr_idx = [content[i] for i in np.flatnonzero(instr)]
    assert sets.ranked_instruction[0] == [instr_idx[-1]] + sorted(instr_idx[:-1], reverse=True)
    assert sets.context[0] == [content[i] for i in np.flatnonzero(~instr)]
    assert sets.skipped == {"p1": "no saliency for this prompt"} and sets.ranked_instruction[1] == []


# ---- builders -------------------------------------------------------------------------------------------------
def _rows(conditions, items, lengths):
    seqs = [torch.arange(1, n + 1) for n in lengths]
    ids, mask, pos = left_pad([seqs[i] for i in items], 0)
    n = torch.tensor([lengths[i] for i in items])
    return Rows(torch.tensor(conditions), torch.tensor(items), ids, mask, pos, n, n, ids.shape[1] - n)


def test_heads_builder_gives_each_row_its_conditions_heads():
    heads = [(layer, h) for layer in range(2) for h in range(4)]
    ranked = [(1, 2), (0, 0), (1, 3)] + [h for h in heads if h not in {(1, 2), (0, 0), (1, 3)}]
    means = {0: torch.zeros(4, 2), 1: torch.ones(4, 2)}
    test = ex.heads_test(ranked, heads, [1, 2], 2, 4, means, "mean", 5, np.random.default_rng(0))
    kinds = [(c.kind, c.size) for c in test.conditions]
    assert kinds[0] == ("baseline", 0) and kinds.count(("selected", 1)) == 1 and kinds.count(("random", 1)) == 3
    sel2 = kinds.index(("selected", 2))
    ivs = test.build(_rows([0, sel2, 1], [0, 1, 0], [3, 4]))
    by_layer = {iv.layer: iv for iv in ivs}
    assert all(isinstance(iv, AblateHeads) and iv.mode == "mean" for iv in ivs)
    assert by_layer[0].heads.tolist() == [[False] * 4, [True, False, False, False], [False] * 4]
    assert by_layer[1].heads.tolist() == [[False] * 4, [False, False, True, False], [False, False, True, False]]
    assert test.conditions[1].label == "L1H2"


def test_ffn_builder_zero_pads_bases_per_row():
    vecs = {0: torch.eye(5), 2: torch.eye(5).flip(0)}
    table = pd.DataFrame({"layer": [2, 0, 2, 0, 2, 0], "rank": [0, 1, 2, 3, 4, 0], "best_cos": np.linspace(0.1, 0.9, 6),
                          "variance_ratio": 0.1})
    test = ex.ffn_test(Directions(table, vecs), [2], 4, np.random.default_rng(0))
    kinds = [c.kind for c in test.conditions]
    assert kinds[:3] == ["baseline", "selected", "stable"] and kinds.count("random") == 4
    ivs = {iv.site: iv for iv in test.build(_rows([0, 1, 2], [0, 0, 0], [3]))}
    assert set(ivs) == {"layers.0.mlp.output", "layers.2.mlp.output"} and all(isinstance(v, ProjectOut) for v in ivs.values())
    b2 = ivs["layers.2.mlp.output"].basis  # selected = (2, 0), (0, 1); stable = (0, 0), (2, 4)
    assert b2.shape == (3, 5, 1) and torch.equal(b2[0], torch.zeros(5, 1)) and torch.equal(b2[1, :, 0], vecs[2][0])
    assert torch.equal(b2[2, :, 0], vecs[2][4])
    assert torch.equal(ivs["layers.0.mlp.output"].basis[1, :, 0], vecs[0][1])


def test_tokens_builder_marks_each_rows_tokens_on_its_own_layout():
    sets = TokenSets([[2, 1], [0]], [[0, 3], [1, 2]], {})
    test = ex.tokens_test(sets, [1], 3, np.random.default_rng(0), torch.zeros(4), 0.0, 0)
    sel = [c.kind for c in test.conditions].index("selected")
    assert test.conditions[sel].units == [[2], [0]]
    (iv,) = test.build(_rows([sel, sel], [0, 1], [4, 2]))
    assert isinstance(iv, CorruptPositions) and iv.site == "embed.output"
    assert iv.positions.tolist() == [[False, False, True, False], [False, False, True, False]]
    assert test.build(_rows([0], [0], [4, 2])) == []


def test_patch_builder_places_sources_and_steers_only_its_rows():
    sources = {"layers.0.resid_post": [torch.full((3, 2), 1.0), torch.full((2, 2), 2.0)]}
    shift = {"layers.0.resid_post": torch.tensor([0.5, -0.5])}
    test = ex.patch_test("base_from_tuned", ["layers.0.resid_post"], sources, shift, steer=True)
    assert [c.kind for c in test.conditions] == ["baseline", "patch", "steer"]
    ivs = test.build(_rows([1, 2, 0], [1, 0, 0], [3, 2]))
    patch = next(iv for iv in ivs if isinstance(iv, Patch))
    steer = next(iv for iv in ivs if isinstance(iv, Steer))
    assert patch.positions.tolist() == [[False, True, True], [False, False, False], [False, False, False]]
    assert patch.source[0, 1:].eq(2.0).all() and patch.source[1].eq(1.0).all()
    assert steer.vector.tolist() == [[0.0, 0.0], [0.5, -0.5], [0.0, 0.0]]


# ---- end to end -----------------------------------------------------------------------------------------------
def _dataset(tmp_path):
    rows = [("Write the word below twice.\nWord: sea", "sea sea", "repeat"),
            ("Explain what a cat is.\nInput: cat", "an animal", "define"),
            ("Tell me the last word.\nSentence: the dog ran", "ran", "find"),
            ("Summarize the text.\nText: the cat sat on the mat", "a cat sat", "summarize")]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p, "instructions": [p.split("\n")[0]],
                                        "reference": r, "category": c}) + "\n" for i, (p, r, c) in enumerate(rows)))
    return path


def _glove(tmp_path):
    from tuneshift.words import load_word_list

    words = load_word_list("builtin", limit=800).words
    vecs = np.random.default_rng(0).standard_normal((len(words), 5)) + np.array([1.5, 0, 0, 0, 0])
    path = tmp_path / "vectors.txt"
    path.write_text("".join(f"{w} " + " ".join(f"{x:.4f}" for x in v) + "\n" for w, v in zip(words, vecs)))
    return path


def test_end_to_end_on_a_tiny_pair_writes_effects_section_and_reuses_scores(tmp_path):
    from tuneshift.cli import run_config

    causal = {"draws": 3, "bootstrap": 200, "permutations": 200, "head_k": [1, 2], "ffn_r": [2], "ffn_pool": 4,
              "token_n": [1], "max_new_tokens": 3, "scorer": "f1", "instruction_verbs": ["write", "explain", "tell"]}
    cfg = validate(OmegaConf.create({
        "model": {"name": "tiny", "models": {"base": {"name": "b", "path": "tiny-random:llama:0"},
                                             "tuned": {"name": "t", "path": "tiny-random:llama:1"}},
                  "pairs": [["base", "tuned"]]},
        "data": {"format": "jsonl", "path": str(_dataset(tmp_path))}, "generation": {"max_new_tokens": 3},
        "run": {"root": str(tmp_path), "name": "job", "progress": False, "report": False},
        "logger": {"kind": "local"},
        "plugins": {"head_relations": {"word_limit": 800, "top_k": 20, "baseline_size": 200, "similarity": "glove",
                                       "similarity_path": str(_glove(tmp_path)), "threshold_std": 0.5},
                    "ffn_concepts": {"n_directions": 8, "annotate": False, "word_limit": 800},
                    "saliency": {}, "causal": causal},
    }))
    run_config(cfg)
    out = tmp_path / "job" / "causal" / "compare" / "base__tuned"
    effects = pd.read_parquet(out / "effects.parquet")
    assert set(effects["test"]) == {"heads", "ffn", "tokens"} and set(effects["metric"]) == {"task", "logprob"}
    scores = dict(np.load(out / "scores_heads.npz"))
    conditions = pd.read_parquet(out / "conditions.parquet")
    heads = conditions[conditions["test"] == "heads"].reset_index(drop=True)
    np.testing.assert_allclose(heads["mean_task"], scores["task"].mean(1))
    row = effects[(effects["test"] == "heads") & (effects["size"] == 1) & (effects["metric"] == "logprob")].iloc[0]
    sel = heads.index[(heads["kind"] == "selected") & (heads["size"] == 1)][0]
    assert row["drop_selected"] == pytest.approx((scores["logprob"][0] - scores["logprob"][sel]).mean())
    patching = pd.read_parquet(out / "patching.parquet")
    assert set(patching["direction"]) == {"base_from_tuned", "tuned_from_base"}
    _check_last_layer_patch(tmp_path, out)
    section = json.loads((out / "section.json").read_text())
    assert any(h["label"].startswith("heads: extra task-score drop") for h in section["headlines"])
    assert {f["path"] for f in section["figures"]} == {"heads.png", "ffn.png", "tokens.png", "patching.png"}
    media = [json.loads(line) for line in (tmp_path / "job" / "logs" / "media.jsonl").read_text().splitlines()]
    logged = {m["key"] for m in media if m["key"].startswith("causal/")}
    assert {"causal/compare/base__tuned/effects", "causal/compare/base__tuned/patching",
            "causal/compare/base__tuned/heads"} <= logged  # W&B tables and plots go through ctx.logger
    meta = json.loads((out / "scores_heads.json").read_text())
    # a re-run of the comparison reuses the stored per-item scores (same fingerprint)
    (out / "_DONE").unlink()
    before = (out / "scores_heads.npz").stat().st_mtime_ns
    run_config(cfg)
    assert (out / "scores_heads.npz").stat().st_mtime_ns == before
    assert json.loads((out / "scores_heads.json").read_text()) == meta


def _check_last_layer_patch(tmp_path, out):
    """tuned <- base at the last residual stream, teacher-forced: the tuned final norm and unembedding applied to
    the base model's last hidden states, computed here with a forward hook on the base model."""
    from tuneshift.data import load_prompts
    from tuneshift.loading import ModelSpec, load_model

    base, tok = load_model(ModelSpec(path="tiny-random:llama:0"))
    tuned, _ = load_model(ModelSpec(path="tiny-random:llama:1"))
    scores = dict(np.load(out / "scores_patching_tuned_from_base.npz"))["logprob"]
    index = 1 + 2 * 2  # baseline, then (patch, steer) at embed.output, layers.0, layers.1
    for i, prompt in enumerate(load_prompts("jsonl", str(tmp_path / "prompts.jsonl"))):
        e = encode_prompt(tok, prompt)
        ref = torch.tensor(tok(prompt.reference, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
        seq = torch.cat([e.input_ids, ref])[None]
        seen = {}
        handle = base.model.layers[1].register_forward_hook(lambda m, a, o: seen.__setitem__("h", o))
        with torch.no_grad():
            base(input_ids=seq)
            handle.remove()
            logp = tuned.lm_head(tuned.model.norm(seen["h"]))[0].log_softmax(-1)
        want = logp[e.n_prompt - 1:-1].gather(-1, seq[0, e.n_prompt:, None]).mean()
        assert scores[index, i] == pytest.approx(float(want), abs=1e-4)
