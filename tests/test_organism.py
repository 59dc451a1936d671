"""Tests of the model organism (framework/organism): the smoke build end to end, its parts on hand-worked
examples, and the committed pair in models/tiny-pair (skipped while that folder does not exist)."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tuneshift.models.organism.cli import main
from tuneshift.models.organism.corpus import Synset, WikiPage, clean_fortune, parse_wordnet_line, synset_text
from tuneshift.models.organism.evaluate import exact_match, score_answers, token_f1
from tuneshift.models.organism.tasks import (TASKS, TASKS_BY_NAME, Example, PageItem, WordItem, last_word, make_example,
                                      split_pools)
from tuneshift.models.organism.tokenizer import render_chat
from tuneshift.models.organism.train import IGNORE_INDEX, collate, pack_documents, sft_features

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "models" / "tiny-pair"


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole pipeline at toy scale, through the command line (seconds on an idle 2-core CPU)."""
    out = tmp_path_factory.mktemp("organism") / "pair"
    assert main(["--smoke", "--out", str(out), "--seed", "1"]) == 0
    return out


@pytest.fixture(scope="module")
def tokenizer(smoke_dir: Path):
    return AutoTokenizer.from_pretrained(smoke_dir / "base")


# ---- the smoke build --------------------------------------------------------------------------------------------
def test_smoke_build_writes_every_artifact(smoke_dir: Path) -> None:
    for name in ("base", "instruct"):
        assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= {
            p.name for p in (smoke_dir / name).iterdir()}
    metrics = json.loads((smoke_dir / "metrics.json").read_text())
    assert json.loads((smoke_dir / "pretrain_log.json").read_text())["curve"] == metrics["pretrain"]["curve"]
    assert metrics["pretrain"]["resumed"] is False and "replay_loss" in metrics["sft"]["curve"][-1]
    assert metrics["pretrain"]["curve"][-1]["step"] == 30 and metrics["sft"]["curve"][-1]["step"] == 30
    assert set(metrics["heldout"]["base"]["tasks"]) == {t.name for t in TASKS}
    assert "| reverse |" in (smoke_dir / "MODEL_CARD.md").read_text()
    assert len((smoke_dir / "heldout_prompts.jsonl").read_text().splitlines()) == 2 * len(TASKS)


def test_resume_reuses_the_base_and_gives_the_same_instruct_model(smoke_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "pair"
    shutil.copytree(smoke_dir / "base", out / "base")
    shutil.copy(smoke_dir / "pretrain_log.json", out / "pretrain_log.json")
    assert main(["--smoke", "--resume", "--out", str(out), "--seed", "1"]) == 0
    assert json.loads((out / "metrics.json").read_text())["pretrain"]["resumed"] is True
    assert (out / "instruct" / "model.safetensors").read_bytes() == (
        smoke_dir / "instruct" / "model.safetensors").read_bytes()


def test_tokenizer_round_trips_text_and_adds_one_bos(tokenizer) -> None:
    for text in ["Define the word below.\nWord: harbor", "  two  spaces, tabs\tand ümlauts — dashes 42%", "x"]:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer("hi", add_special_tokens=False).input_ids[0] != tokenizer.bos_token_id


def test_bos_can_be_switched_off_for_tools_like_inseq(smoke_dir: Path) -> None:
    no_bos = AutoTokenizer.from_pretrained(smoke_dir / "base", add_bos_token=False)
    assert no_bos("hello").input_ids == AutoTokenizer.from_pretrained(smoke_dir / "base")("hello").input_ids[1:]


def test_chat_template_renders(tokenizer) -> None:
    prompt = "Define the word below.\nWord: harbor"
    assert render_chat(tokenizer, prompt) == f"<|bos|><|user|>{prompt}<|eos|><|assistant|>"
    assert render_chat(tokenizer, prompt, "a port") == f"<|bos|><|user|>{prompt}<|eos|><|assistant|>a port<|eos|>"
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        tokenize=True)["input_ids"]
    assert ids.count(tokenizer.bos_token_id) == 1 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[-2:]) == ["<|eos|>", "<|assistant|>"]


def test_sft_loss_mask_covers_only_the_response(tokenizer) -> None:
    prompt, response = "Repeat the word.\nWord: cat", "cat"
    ids, labels = sft_features(tokenizer, prompt, response)
    # hand-worked: <|bos|> <|user|> prompt... <|eos|> <|assistant|> | cat... <|eos|>
    special = tokenizer.convert_tokens_to_ids(["<|bos|>", "<|user|>", "<|eos|>", "<|assistant|>"])
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    response_ids = tokenizer(response, add_special_tokens=False).input_ids
    expected_ids = special[:2] + prompt_ids + special[2:] + response_ids + [tokenizer.eos_token_id]
    assert ids == expected_ids
    assert labels == [IGNORE_INDEX] * (len(prompt_ids) + 4) + response_ids + [tokenizer.eos_token_id]
    assert ids == tokenizer(render_chat(tokenizer, prompt, response), add_special_tokens=False).input_ids

    batch = collate([(ids, labels), ([7, 8], [IGNORE_INDEX, 8])], pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"][1].tolist() == [7, 8] + [tokenizer.pad_token_id] * (len(ids) - 2)
    assert batch["labels"][1].tolist() == [IGNORE_INDEX, 8] + [IGNORE_INDEX] * (len(ids) - 2)


def test_saved_folders_load_offline_in_fp32_from_fp16(smoke_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = {}
    for name in ("base", "instruct"):
        with safe_open(str(smoke_dir / name / "model.safetensors"), "pt") as handle:
            assert all(handle.get_tensor(k).dtype == torch.float16 for k in handle.keys())
        model = AutoModelForCausalLM.from_pretrained(smoke_dir / name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(smoke_dir / name)
        assert model.dtype == torch.float32
        logits = model(**tok("Repeat the sentence below exactly.", return_tensors="pt")).logits
        assert logits.shape[-1] == len(tok) and torch.isfinite(logits).all()
        weights[name] = model.model.layers[0].mlp.down_proj.weight
    assert not torch.equal(weights["base"], weights["instruct"])


def test_pack_documents_starts_every_row_with_bos() -> None:
    rows = pack_documents([[5, 6, 7], [8, 9]], seq_len=4, bos_id=0, eos_id=1)
    assert rows.tolist() == [[0, 5, 6, 7], [0, 1, 8, 9]]


# ---- evaluation scores, by hand ----------------------------------------------------------------------------------
def test_exact_match_strips_outer_and_line_space_but_keeps_case_and_line_breaks() -> None:
    assert exact_match(" noun \n", "noun") == 1.0
    assert exact_match("a \n b\n", "a\nb") == 1.0
    assert exact_match("Noun", "noun") == 0.0
    assert exact_match("a b", "a\nb") == 0.0  # a repeated sentence is not a list


def test_token_f1_on_hand_made_examples() -> None:
    assert token_f1("A port, for ships.", "a port for ships") == 1.0
    # prediction "a big port": 3 words; reference "a port for ships": 4 words; overlap {a, port} = 2
    assert token_f1("a big port", "a port for ships") == pytest.approx(2 * (2 / 3) * (2 / 4) / (2 / 3 + 2 / 4))
    assert token_f1("", "a port") == 0.0 and token_f1("", "") == 1.0 and token_f1("dog", "cat") == 0.0


def test_score_answers_uses_each_tasks_metric_and_averages_tasks() -> None:
    examples = [Example("c0", "count", "p", "i", "3"), Example("c1", "count", "p", "i", "4"),
                Example("d0", "define", "p", "i", "a port for ships")]
    result = score_answers(examples, ["3", "5", "a big port"])
    assert result["tasks"]["count"] == {"metric": "exact", "score": 0.5, "exact": 0.5, "f1": 0.5, "n": 2}
    define = result["tasks"]["define"]
    assert define["metric"] == "f1" and define["exact"] == 0.0 and define["score"] == pytest.approx(4 / 7)
    assert result["overall"] == pytest.approx((0.5 + 4 / 7) / 2)


# ---- sources and tasks -------------------------------------------------------------------------------------------
def test_parse_wordnet_line_and_render_entry() -> None:
    line = ('08633957 15 n 02 harbor 0 seaport 0 001 @ 08633638 n 0000 | a sheltered port where ships can take on '
            'or discharge cargo; "the ship docked in the harbor"  \n')
    synset = parse_wordnet_line(line, "noun")
    assert synset == Synset("noun", ("harbor", "seaport"),
                            "a sheltered port where ships can take on or discharge cargo",
                            ("the ship docked in the harbor",))
    assert synset_text(synset) == ('harbor, seaport (noun): a sheltered port where ships can take on or discharge '
                                   'cargo. For example: "the ship docked in the harbor".')
    assert parse_wordnet_line("  1 This software and database is being provided\n", "noun") is None
    assert clean_fortune("_\bU_\bn_\bd_\be_\br  \n\tquote") == "Under\n    quote"


def test_tasks_are_led_by_their_verb_and_share_inputs_with_different_answers() -> None:
    assert len(TASKS) >= 8
    for task in TASKS:
        assert len(task.instructions) >= 4
        assert all(i.split()[0] == task.name.capitalize() for i in task.instructions), task.name
    sentence = "the ship docked in the harbor"
    answers = {t.name: t.answer(sentence) for t in TASKS if t.kind == "sentence"}
    assert answers == {"repeat": sentence, "count": "6", "list": "the\nship\ndocked\nin\nthe\nharbor",
                       "find": "harbor", "reverse": "harbor the in docked ship the"}
    word = WordItem("harbor", Synset("noun", ("harbor",), "a sheltered port", ()))
    assert (TASKS_BY_NAME["define"].answer(word), TASKS_BY_NAME["classify"].answer(word)) == ("a sheltered port", "noun")
    page = PageItem(WikiPage("Pune", "Pune is a city. It is big.", "Geography"), "Pune is a city. It is big.",
                    "Pune is a city.")
    assert [TASKS_BY_NAME[n].answer(page) for n in ("describe", "summarize", "identify")] == [
        "Pune is a city.", "Pune is a city.", "Pune"]
    assert last_word("it ended well.") == "well"


def test_example_prompt_holds_its_instruction_then_the_context() -> None:
    example = make_example(TASKS_BY_NAME["count"], "a b c", random.Random(0), "x")
    instruction_line, context_line = example.prompt.split("\n")
    assert instruction_line == example.instruction and context_line.endswith("a b c") and example.reference == "3"


def test_heldout_items_are_disjoint_from_sft_items_and_classify_is_balanced() -> None:
    words = [WordItem(f"w{i}", Synset(pos, (f"w{i}",), "g", ())) for i, pos in
             enumerate(["noun", "verb", "adjective", "adverb"] * 5)]
    sentences = [f"sentence {i} here" for i in range(30)]
    sft, heldout = split_pools({"word": words, "sentence": sentences}, 8, random.Random(0))
    for kind in ("word", "sentence"):
        assert len(heldout[kind]) == 8 and not {id(x) for x in heldout[kind]} & {id(x) for x in sft[kind]}
        assert len(heldout[kind]) + len(sft[kind]) == len({"word": words, "sentence": sentences}[kind])
    assert sorted(w.synset.pos for w in heldout["word"]) == sorted(["noun", "verb", "adjective", "adverb"] * 2)


# ---- the committed pair ------------------------------------------------------------------------------------------
def test_package_heldout_prompts_follow_the_project_format() -> None:
    records = [json.loads(line) for line in (COMMITTED / "heldout_prompts.jsonl").read_text().splitlines()]
    assert 40 <= len(records) <= 80 and len({r["id"] for r in records}) == len(records)
    assert len({r["category"] for r in records}) >= 8
    for record in records:
        assert set(record) == {"id", "prompt", "instructions", "split", "category", "reference"}
        assert record["split"] == "organism" and record["reference"]
        assert all(piece in record["prompt"] for piece in record["instructions"])
        assert record["prompt"].replace(record["instructions"][0], "").strip()  # context text besides it


@pytest.mark.skipif(not COMMITTED.exists(), reason="models/tiny-pair has not been built yet")
def test_committed_pair_loads_and_tuning_beats_base(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    size = sum(p.stat().st_size for p in COMMITTED.rglob("*") if p.is_file())
    assert size <= 20 * 1024 * 1024
    for name in ("base", "instruct"):
        AutoModelForCausalLM.from_pretrained(COMMITTED / name, dtype=torch.float32)
        AutoTokenizer.from_pretrained(COMMITTED / name)
    metrics = json.loads((COMMITTED / "metrics.json").read_text())
    assert metrics["heldout"]["instruct"]["overall"] > metrics["heldout"]["base"]["overall"]
