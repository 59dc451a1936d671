"""The evaluation hook: greedy generation and scoring with interventions, against plain transformers."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from tuneshift.adapters import ModelAdapter
from tuneshift.data import Prompt, encode_prompt, left_pad
from tuneshift.evaluation import (EvaluationError, Rows, capture_sites, evaluate, greedy_generate, layout,
                                  reference_ids, site_means, task_score)
from tuneshift.interventions import AblateHeads, Patch, ProjectOut, Steer
from tuneshift.loading import ModelSpec
from tuneshift.runner import ModelRun
from tuneshift.scoring import ORGANISM_METRICS, SCORERS, exact_match, token_f1
from tuneshift.testing import tiny_model, tiny_tokenizer



pytestmark = pytest.mark.usefixtures("one_thread")


TEXTS = ["Write a poem about the sea.", "Explain the rule.", "the cat sat on the mat and the dog"]


def _run(family: str = "llama", seed: int = 0) -> ModelRun:
    model, tok = tiny_model(family, seed), tiny_tokenizer()
    return ModelRun("m", family, ModelSpec(), model, tok, ModelAdapter(model), False)


def _items(run: ModelRun, references=None, categories=None):
    prompts = [Prompt(f"p{i}", t, ((0, len(t)),), reference=None if references is None else references[i],
                      category="" if categories is None else categories[i]) for i, t in enumerate(TEXTS)]
    return [encode_prompt(run.tokenizer, p) for p in prompts]


def _batch(run, items):
    return left_pad([e.input_ids for e in items], run.tokenizer.pad_token_id)


@torch.no_grad()
def _naive_greedy(model, ids, mask, n: int) -> torch.Tensor:
    """Greedy tokens by recomputing the whole sequence every step (no KV cache, no stopping): ``[B, n]``."""
    out = []
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        nxt = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits[:, -1].argmax(-1)
        out.append(nxt)
        ids, mask = torch.cat([ids, nxt[:, None]], 1), torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1)


def _organism() -> ModelRun:
    from tuneshift.loading import load_model
    from tuneshift.paths import MODELS_DIR

    spec = ModelSpec(path=str(MODELS_DIR / "tiny-pair" / "instruct"), chat_template=True)
    model, tok = load_model(spec)
    return ModelRun("tuned", "organism", spec, model, tok, ModelAdapter(model), True)


def _organism_items(run: ModelRun, n: int = 6):
    from tuneshift.data import load_prompts

    prompts = load_prompts("organism")[::80 // n][:n]
    return [encode_prompt(run.tokenizer, p, True) for p in prompts]


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3"])
def test_greedy_generation_equals_hf_generate_and_stops_rows_independently(family):
    run = _run(family)
    ids, mask, pos = _batch(run, _items(run))
    ref = _naive_greedy(run.model, ids, mask, 8)
    stops = {int(ref[0, 3]), int(ref[2, 1])}  # rows stop at different steps: the loop drops finished rows

    def expected(row):
        cut = [j for j, t in enumerate(row.tolist()) if t in stops]
        return row[:cut[0] if cut else len(row)]

    got = greedy_generate(run, ids, mask, pos, max_new_tokens=8, stops=sorted(stops))
    for r in range(len(ref)):
        assert torch.equal(got[r], expected(ref[r])), r


def test_greedy_generation_of_the_organism_equals_its_evaluation():
    """The organism's own evaluation (model.generate, EOS stop) gives the same answers, of different lengths."""
    from tuneshift.models.organism.evaluate import generate_answers

    run = _organism()
    items = _organism_items(run)
    ids, mask, pos = _batch(run, items)
    got = [run.tokenizer.decode(r, skip_special_tokens=True)
           for r in greedy_generate(run, ids, mask, pos, max_new_tokens=64)]
    assert got == generate_answers(run.model, run.tokenizer, [e.prompt.text for e in items], 64)
    assert len({len(a) for a in got}) > 2


def test_per_row_interventions_in_one_batch_equal_each_row_alone():
    """Draws batched as rows (finishing at different steps, so rows are dropped) equal each draw by itself."""
    run = _organism()
    items = _organism_items(run, 4)
    ids, mask, pos = _batch(run, items)
    d = run.adapter.d_model
    gen = torch.Generator().manual_seed(0)
    heads = torch.tensor([[True, False, False, False], [False, True, True, False], [False, False, False, False],
                          [False, False, False, True]])
    basis = torch.stack([torch.linalg.qr(torch.randn(d, 2, generator=gen)).Q for _ in range(4)])
    source = 0.1 * torch.randn(ids.shape + (d,), generator=gen)
    vec = torch.randn(4, d, generator=gen)
    ivs = [AblateHeads(1, heads), ProjectOut("layers.0.mlp.output", basis),
           Patch("layers.0.resid_post", source, positions=mask.bool()), Steer("layers.1.resid_post", vec, scale=0.3)]
    batched = greedy_generate(run, ids, mask, pos, ivs, max_new_tokens=24)
    assert len({len(b) for b in batched}) > 1
    for r, e in enumerate(items):
        one_ids, one_mask, one_pos = left_pad([e.input_ids], run.tokenizer.pad_token_id)
        n = e.n_prompt
        alone = [AblateHeads(1, heads[r]), ProjectOut("layers.0.mlp.output", basis[r]),
                 Patch("layers.0.resid_post", source[r:r + 1, -n:]), Steer("layers.1.resid_post", vec[r], scale=0.3)]
        single = greedy_generate(run, one_ids, one_mask, one_pos, alone, max_new_tokens=24)[0]
        assert torch.equal(batched[r], single), r


def test_generation_with_interventions_equals_a_hooked_naive_greedy_loop():
    run = _run("qwen2")
    ids, mask, pos = _batch(run, _items(run))
    adapter = run.adapter
    heads = torch.tensor([True, False, True, False])

    def pre(module, args):
        z = args[0].clone()
        z.view(*z.shape[:-1], adapter.n_heads, adapter.d_head)[:, :, heads] = 0.0
        return (z,)

    handle = adapter.module(adapter.layer_path(0, "o")).register_forward_pre_hook(pre)
    try:
        want = _naive_greedy(run.model, ids, mask, 6)
    finally:
        handle.remove()
    got = greedy_generate(run, ids, mask, pos, [AblateHeads(0, heads)], max_new_tokens=6, stops=[])
    assert torch.equal(torch.stack(got), want)


def test_exact_scores_of_own_answers_are_one_and_conditions_batch_like_separate_calls():
    run = _run("llama")
    items = _items(run)
    own = [run.tokenizer.decode(r, skip_special_tokens=True)
           for r in greedy_generate(run, *_batch(run, items), max_new_tokens=6)]
    items = _items(run, references=own)
    heads = torch.tensor([[True, True, False, False], [False, False, True, True]])

    def build(rows: Rows):
        table = torch.cat([torch.zeros(1, 4, dtype=torch.bool), heads])  # condition 0: nothing ablated
        return [AblateHeads(1, table[rows.condition])]

    result = evaluate(run, items, 3, build, scorer="exact", max_new_tokens=6, max_rows=2, keep_answers=True)
    assert result.scores.shape == (3, 3)
    np.testing.assert_array_equal(result.scores[0], np.ones(3))
    assert result.answers[0] == own
    for c in (1, 2):
        alone = task_score(run, items, [AblateHeads(1, heads[c - 1])], scorer="exact", max_new_tokens=6)
        np.testing.assert_array_equal(result.scores[c], alone)
        expected = [exact_match(a, r) for a, r in zip(result.answers[c], own)]
        np.testing.assert_array_equal(result.scores[c], expected)


def test_logprob_scorer_equals_a_plain_teacher_forced_forward():
    run = _run("gpt_neox")
    refs = ["the sea is blue", "no", "a dog and a cat"]
    items = _items(run, references=refs)
    vec = torch.randn(run.adapter.d_model)
    got = evaluate(run, items, 2, lambda rows: [Steer("layers.0.resid_post", vec[None] * rows.condition[:, None])],
                   scorer="logprob", max_rows=2).scores
    ref_ids = reference_ids(run.tokenizer, items)
    for c in (0, 1):
        layer = run.adapter.module(run.adapter.layer_path(0))
        handle = layer.register_forward_hook(
            lambda m, a, o: (o[0] + c * vec, *o[1:]) if isinstance(o, tuple) else o + c * vec)
        try:
            for i, e in enumerate(items):
                seq = torch.cat([e.input_ids, ref_ids[i]])[None]
                with torch.no_grad():
                    logp = run.model(input_ids=seq).logits[0].double().log_softmax(-1)
                n = e.n_prompt
                want = logp[n - 1:-1].gather(-1, seq[0, n:, None]).mean()
                assert got[c, i] == pytest.approx(float(want), abs=1e-5)
        finally:
            handle.remove()
    assert ref_ids[0][-1] == run.tokenizer.eos_token_id
    assert not np.allclose(got[0], got[1])


def test_capture_and_means_equal_forward_hooks():
    run = _run("llama")
    items = _items(run)
    seqs = [e.input_ids for e in items]
    seen = []
    handle = run.adapter.module(run.adapter.layer_path(1, "mlp")).register_forward_hook(
        lambda m, a, o: seen.append(o[0].detach().clone()))
    try:
        with torch.no_grad():
            for s in seqs:
                run.model(input_ids=s[None])
    finally:
        handle.remove()
    captured = capture_sites(run, seqs, ["layers.1.mlp.output", "layers.0.attn.z"], max_rows=2)
    for i in range(len(seqs)):
        torch.testing.assert_close(captured["layers.1.mlp.output"][i], seen[i], atol=1e-5, rtol=1e-4)
    means = site_means(run, seqs, ["layers.1.mlp.output", "layers.0.attn.z"], max_rows=2)
    torch.testing.assert_close(means["layers.1.mlp.output"], torch.cat(seen).mean(0), atol=1e-5, rtol=1e-4)
    assert means["layers.0.attn.z"].shape == (run.adapter.n_heads, run.adapter.d_head)


def test_rows_place_values_and_token_masks_on_their_own_tokens():
    ids, mask, pos = left_pad([torch.tensor([5, 6, 7]), torch.tensor([8])], 0)
    rows = Rows(torch.tensor([0, 1]), torch.tensor([1, 0]), ids, mask, pos, torch.tensor([1, 3]), torch.tensor([1, 3]),
                torch.tensor([2, 0]))
    placed = rows.place([torch.tensor([1.0, 2.0, 3.0]), torch.tensor([9.0])])
    assert placed.tolist() == [[0.0, 0.0, 9.0], [1.0, 2.0, 3.0]]
    assert rows.token_mask([[0], [0, 2]]).tolist() == [[False, False, True], [True, False, True]]
    # prompts left-padded to end together, references right after them, right-padded
    ids, mask, pos, offsets = layout([torch.tensor([5, 6]), torch.tensor([7])], [torch.tensor([8]), torch.tensor([9, 9])],
                                     0)
    assert ids.tolist() == [[5, 6, 8, 0], [0, 7, 9, 9]] and mask.tolist() == [[1, 1, 1, 0], [0, 1, 1, 1]]
    assert pos.tolist()[1][1:] == [0, 1, 2] and offsets.tolist() == [0, 1]


def test_generation_and_reference_log_probs_share_one_first_forward():
    """Scoring the references in the prompt's forward changes no answer and equals a separate teacher-forced pass."""
    run = _organism()
    items = _organism_items(run, 8)
    heads = torch.tensor([[False] * 4, [True, False, False, True]])
    build = lambda rows: [AblateHeads(2, heads[rows.condition])]  # noqa: E731
    both = evaluate(run, items, 2, build, "organism", 24, logprob=True, max_rows=5, keep_answers=True)
    alone = evaluate(run, items, 2, build, "organism", 24, max_rows=7, keep_answers=True)
    teacher = evaluate(run, items, 2, build, "logprob", max_rows=3)
    assert both.answers == alone.answers
    np.testing.assert_array_equal(both.scores, alone.scores)
    np.testing.assert_allclose(both.logprob, teacher.scores, atol=1e-4)
    assert not np.allclose(both.logprob[0], both.logprob[1])


def test_scorers_and_missing_references():
    assert SCORERS.get("organism").score("a big port", "a big port city", "define") == pytest.approx(
        token_f1("a big port", "a big port city"))
    assert SCORERS.get("organism").score(" 3 ", "3", "count") == 1.0
    assert SCORERS.get("exact").score("a\n b", "a\nb") == 1.0
    with pytest.raises(Exception, match="available: exact, f1, logprob, organism"):
        SCORERS.get("bleu")
    run = _run("llama")
    with pytest.raises(EvaluationError, match="reference"):
        task_score(run, _items(run))


def test_the_organism_scorer_uses_each_tasks_own_metric():
    from tuneshift.models.organism.tasks import TASKS

    scorer = SCORERS.get("organism")
    assert {t.name: t.metric for t in TASKS} == {t.name: scorer.metric_of(t.name) for t in TASKS}
    assert set(ORGANISM_METRICS) == {t.name for t in TASKS if t.metric == "f1"}


@pytest.mark.parametrize("family", ["gemma3", "gpt2"])
def test_shared_first_forward_on_sliding_window_and_absolute_position_models(family):
    """Gemma-3's sliding-window cache (window 8 here, shorter than prompt + reference) is cut back correctly."""
    run = _run(family)
    items = _items(run, references=["the sea is blue and wide", "no", "a dog"])
    vec = torch.randn(run.adapter.d_model)
    build = lambda rows: [Steer("layers.0.resid_post", vec[None] * rows.condition[:, None])]  # noqa: E731
    both = evaluate(run, items, 2, build, "f1", 5, logprob=True, keep_answers=True)
    alone = evaluate(run, items, 2, build, "f1", 5, keep_answers=True)
    teacher = evaluate(run, items, 2, build, "logprob")
    assert both.answers == alone.answers
    np.testing.assert_allclose(both.logprob, teacher.scores, atol=1e-4)
