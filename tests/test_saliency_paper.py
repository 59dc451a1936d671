"""plugins/saliency/paper.py: the restricted unpickler, the reference loader and tuneshift-paper-tables.

The real reference data is read by path from ../shared/reference (never copied into the repo); tests that
need it are skipped where it is absent.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from tuneshift.data import Prompt, load_final_dataset
from tuneshift.plugins.saliency.paper import (PaperDataError, UnsafePickleError, instruction_mask, load_attribution,
                                    load_ratings, main, paper_tables, pieces_to_text, restricted_load,
                                    score_reference)

REFERENCE = Path(os.environ.get("TUNESHIFT_REFERENCE", Path(__file__).resolve().parents[2] / "shared" / "reference"))
needs_reference = pytest.mark.skipif(not (REFERENCE / "attributions").is_dir(),
                                     reason=f"reference data not found at {REFERENCE}")


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))  # would create a folder if it ever ran


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(UnsafePickleError, match=r"refusing to load (posix|nt|os)\.mkdir"):
        restricted_load(pickle.dumps({"ID": "x", "Explain": _Evil(marker)}))
    assert not marker.exists()
    with pytest.raises(UnsafePickleError, match="builtins.eval"):
        restricted_load(pickle.dumps(eval))
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps(_Evil(marker)))
    with pytest.raises(UnsafePickleError, match="evil.pkl"):
        load_attribution(tmp_path / "evil.pkl")
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_restricted_unpickler_accepts_builtins_and_arrays(tmp_path, protocol):
    explain = np.arange(6, dtype=np.float32).reshape(3, 2)
    obj = {"ID": "p", "Input": ["\u2581Hi", ",", "\u2581you"], "Output": ["\u2581ok", "!"], "Reference": "r",
           "Explain": explain, "extra": (1, 2.5, True, None, {3}, b"x")}
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    assert restricted_load(path.read_bytes())["extra"] == obj["extra"]
    got = load_attribution(path)
    assert got.id == "p" and got.inputs == obj["Input"] and np.array_equal(got.explain, explain)
    obj["Explain"] = np.zeros((2, 2))
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    with pytest.raises(PaperDataError, match=r"shape \(2, 2\), expected .* \(3, 2\)"):
        load_attribution(path)


def test_pieces_to_text_and_offsets():
    pieces = ["\u2581Hello", ",", "\u2581wor", "ld", "<0x0A>", "<0xE2>", "<0x96>", "<0x81>", "\u2581x"]
    text, starts, ends = pieces_to_text(pieces)
    assert text == " Hello, world\n\u2581 x"
    assert [text[s:e] for s, e in zip(starts, ends)] == [" Hello", ",", " wor", "ld", "\n", "\u2581", "\u2581",
                                                          "\u2581", " x"]


def test_instruction_mask_on_character_offsets():
    text = "Summarize the text. Keep it short.\nInput: The cat sat."
    prompt = Prompt("t", text, ((0, 19), (20, 34)))  # the two instruction sentences
    pieces = ["\u2581Sum", "mar", "ize", "\u2581the", "\u2581text", ".", "\u2581Keep", "\u2581it", "\u2581short", ".",
              "<0x0A>", "Input", ":", "\u2581The", "\u2581cat", "\u2581sat", "."]
    mask = instruction_mask(prompt, pieces)
    assert mask.tolist() == [True] * 10 + [False] * 7


def test_rethresholding_a_pickle_does_not_normalise_twice(tmp_path):
    """A stored column peaking at 8 keeps its 8 at b = 7 (normalising again would make it 10)."""
    explain = np.array([[8, 0], [3, 10], [0, 9]], dtype=np.float32)
    path = tmp_path / "p.pkl"
    path.write_bytes(pickle.dumps({"ID": "p", "Input": ["\u2581Do", "\u2581it", "."], "Output": ["\u2581a", "\u2581b"],
                                   "Reference": "", "Explain": explain}))
    prompt = Prompt("p", "Do it.", ((0, 2),), "lima")
    row = score_reference(load_attribution(path), prompt, b=7)
    # thresholded: [[8, 0], [0, 10], [0, 9]]: densities 1, 1, 1 -> a~ = 1 each; instruction = token 0 only
    assert row["n_instruction"] == 1
    assert row["score"] == pytest.approx((1 / (1 + 1e-7)) / (1 / (1 + 1e-7) + 1e-9) / np.log2(3))


def test_ratings_layouts(tmp_path):
    annotated = tmp_path / "a.tsv"
    annotated.write_text("File\tModel\tPrompt\tRating\nx.pkl\tm1\tp\t4\nx.pkl\tm2\tp\t1\ny.pkl\tm1\tq\t-1\n")
    got = load_ratings(annotated, "m1")
    assert got.to_dict("list") == {"id": ["x", "y"], "rating": [4, -1]}
    plain = tmp_path / "r.csv"
    plain.write_text("id,rating\nx,2\n")
    assert load_ratings(plain, None).to_dict("list") == {"id": ["x"], "rating": [2]}
    with pytest.raises(PaperDataError, match="no ratings for model 'm3'"):
        load_ratings(annotated, "m3")


# ---- the real reference data ----------------------------------------------------------------------------------
@needs_reference
def test_one_real_prompt_scored_independently():
    """user_oriented_task_0 (Vicuna): mask by a plain character loop, density by the formula written out."""
    prompt = {p.id: p for p in load_final_dataset(REFERENCE / "datasets" / "FinalDataset.tsv")}["user_oriented_task_0"]
    attr = load_attribution(REFERENCE / "attributions" / "ifa_vicuna_7b" / "user_oriented_task_0.pkl")
    text = "".join("\n" if p == "<0x0A>" else p.replace("\u2581", " ") for p in attr.inputs)
    assert text == " " + prompt.text                      # SentencePiece's dummy prefix space
    in_instr = [any(s <= c - 1 < e for s, e in prompt.instruction_spans) for c in range(len(text))]
    mask, pos = [], 0
    for piece in attr.inputs:
        width = 1 if piece == "<0x0A>" else len(piece)
        mask.append(any(in_instr[pos:pos + width]))
        pos += width
    mask = np.array(mask)
    assert np.array_equal(instruction_mask(prompt, attr.inputs), mask)
    x = np.where(attr.explain <= 7, 0.0, attr.explain)
    dens = x.sum(1) / ((x ** 4).sum(1) ** 0.25 + 1e-7)
    want = (dens / (dens.max() + 1e-9))[mask].sum() / np.log2(2 + mask.sum())
    assert score_reference(attr, prompt)["score"] == pytest.approx(want, rel=1e-12)


@needs_reference
def test_paper_tables_cli_on_a_few_prompts(tmp_path, capsys):
    out = tmp_path / "tables.json"
    assert main(["--reference", str(REFERENCE), "--out", str(out), "--limit-per-split", "4",
                 "--plots", str(tmp_path)]) == 0
    for png in ("score_distribution.png", "density_profile.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    tables = json.loads(out.read_text())
    assert list(tables) == ["table1", "table2"]
    assert list(tables["table2"]) == ["self_instruct", "lima", "mtbench"]
    for split, row in tables["table2"].items():
        assert set(row) == {"base_mean", "tuned_mean", "n", "p"} and row["n"] == 4
        assert 0 < row["base_mean"] and 0 < row["tuned_mean"]
    for split, row in tables["table1"].items():
        assert set(row) == {"followed_mean", "unfollowed_mean", "n_followed", "n_unfollowed", "p"}
        assert row["n_followed"] + row["n_unfollowed"] <= 4
    assert "Table 2" in capsys.readouterr().out


def test_paper_tables_cli_reports_missing_data(tmp_path, capsys):
    assert main(["--reference", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


# The paper's published means (Wu et al. 2024, Tables 1 and 2), which the released attributions give to 4
# decimals with the A.5 rules; p-values of Table 2 as published.
PAPER_TABLE1 = {"self_instruct": (1.2283, 194, 0.8917, 44), "lima": (1.6173, 249, 1.2799, 50),
                "mtbench": (1.4584, 60, 0.9290, 19)}  # followed mean, n, not followed mean, n (Vicuna-7B)
PAPER_TABLE2 = {"self_instruct": (0.9394, 1.1302, 1.9e-5), "lima": (1.2683, 1.5579, 2.5e-14),
                "mtbench": (1.1777, 1.3440, 0.0382)}  # LLaMA-7B, Vicuna-7B, p (Welch, LLaMA < Vicuna)


@pytest.mark.slow
@needs_reference
def test_paper_tables_on_all_reference_data():
    tables, deciles = paper_tables(REFERENCE)
    t1, t2 = tables["table1"], tables["table2"]
    assert {s: r["n"] for s, r in t2.items()} == {"self_instruct": 252, "lima": 300, "mtbench": 80}
    # Vicuna's ratings: 629 rated, 13 outputs shorter than 5 tokens
    assert sum(r["n_followed"] + r["n_unfollowed"] for r in t1.values()) == 616
    for split, (followed, n_followed, unfollowed, n_unfollowed) in PAPER_TABLE1.items():
        row = t1[split]
        assert round(row["followed_mean"], 4) == followed and round(row["unfollowed_mean"], 4) == unfollowed
        assert (row["n_followed"], row["n_unfollowed"]) == (n_followed, n_unfollowed)
        assert row["p"] < 0.001
    for split, (base_mean, tuned_mean, p) in PAPER_TABLE2.items():
        row = t2[split]
        assert round(row["base_mean"], 4) == base_mean and round(row["tuned_mean"], 4) == tuned_mean
        assert float(f"{row['p']:.2g}" if p < 0.01 else f"{row['p']:.3g}") == p   # to the paper's digits
    assert len(deciles) == 10
