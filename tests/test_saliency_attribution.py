"""plugins/saliency/attribution.py: the fast exact gradient x input equals independent computations.

Equality to the naive loop (one full forward and backward per response token) is checked in float64, where
any algorithmic difference shows far above rounding; float32 differs from the loop by summation order only.
"""
from __future__ import annotations

import pytest
import torch

from tuneshift.testing import tiny_model
from tuneshift.attribution import (AttributionError, attribute, head_logits, make_item, model_body,
                                   naive_attribution, plan_modes, sliding_window, target_values)
from tuneshift.attribution.passes import chunk_size

# (prompt length, response length): a left-padded batch of unequal prompts and responses, one response of
# a single token, one prompt longer than its response and one shorter
SHAPES = [(7, 5), (12, 3), (4, 9), (9, 1), (6, 6)]


def _items(shapes=SHAPES, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    items = []
    for n_prompt, n_response in shapes:
        prompt = torch.randint(5, 500, (n_prompt,), generator=gen)
        rows = torch.ones(n_prompt, dtype=torch.bool)
        rows[0] = False  # position 0 plays BOS: not attributed
        items.append(make_item(prompt, torch.randint(5, 500, (n_response,), generator=gen), rows))
    return items


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to the matrix's largest magnitude."""
    assert got.shape == want.shape
    return float((got.detach().double() - want.detach().double()).abs().max() / want.detach().double().abs().max())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models spend their time in per-op overhead; on a busy 2-core machine two intra-op threads
    spin-wait for each other on every op (100x slower here), one thread does not."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models():
    return {family: tiny_model(family).double().requires_grad_(False) for family in ("llama", "qwen2", "gpt2")}


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])  # GQA + RoPE, GQA + biases, absolute positions
@pytest.mark.parametrize("mode", ["vjp", "jvp"])
def test_equals_naive_loop_on_left_padded_batches(models, family, mode):
    model = models[family]
    items = _items()
    want = [naive_attribution(model, it) for it in items]
    # a small budget forces several chunks per prompt (causal truncation, prefix caches) and one prompt a pass
    for budget, prompts in ((48, 5), (100_000, 1)):
        got = attribute(model, items, mode=mode, max_batch_tokens=budget, max_batch_prompts=prompts,
                        max_padding_waste=100.0)  # all five prompts share each pass
        for g, w in zip(got, want):
            assert _rel_err(g, w) < 1e-5


@pytest.mark.parametrize("target", ["logprob", "logit"])
def test_other_targets_equal_naive_loop(models, target):
    items = _items(seed=1)
    for mode in ("vjp", "jvp"):
        got = attribute(models["llama"], items, target=target, mode=mode)
        for g, it in zip(got, items):
            assert _rel_err(g, naive_attribution(models["llama"], it, target)) < 1e-5


def test_prefix_cache_is_exact(models):
    """Columns no direction touches run once into a key/value cache: a chat template's leading tokens (not
    attributed, so never differentiated by the VJPs) and, per JVP chunk, everything before its first row."""
    items = _items([(10, 6), (13, 4), (5, 7)])
    items = [make_item(it.prompt_ids, it.response_ids, torch.arange(it.n_prompt) >= 3) for it in items]
    want = [naive_attribution(models["llama"], it) for it in items]
    for mode in ("vjp", "jvp"):
        for cache in (True, False):
            got = attribute(models["llama"], items, mode=mode, prefix_cache=cache, max_batch_tokens=40,
                            max_padding_waste=100.0)
            assert all(_rel_err(g, w) < 1e-5 for g, w in zip(got, want))


def test_sliding_window_model_is_exact():
    model = tiny_model("gemma3").double().requires_grad_(False)  # sliding window 8 < sequence length
    assert sliding_window(model) == 8
    items = _items([(10, 6), (13, 4)])
    for mode in ("vjp", "jvp"):
        got = attribute(model, items, mode=mode, max_batch_tokens=40)
        assert all(_rel_err(g, naive_attribution(model, it)) < 1e-5 for g, it in zip(got, items))


def test_float32_matches_loop_to_rounding():
    model = tiny_model("llama").requires_grad_(False)
    items = _items()
    for mode in ("vjp", "jvp"):
        for g, it in zip(attribute(model, items, mode=mode), items):
            assert g.dtype == torch.float32
            assert _rel_err(g, naive_attribution(model, it)) < 1e-4


def test_equals_captum_input_x_gradient(models):
    """captum's InputXGradient on the embeddings, one forward function per response token m returning p(y_m)."""
    captum_attr = pytest.importorskip("captum.attr")
    model = models["llama"]
    item = _items([(8, 4)])[0]
    ids = torch.cat([item.prompt_ids, item.response_ids[:-1]])[None]
    emb = model.get_input_embeddings()(ids).detach()
    P = item.n_prompt
    cols = []
    for m in range(item.n_response):
        def prob(e, m=m):
            logits = model(inputs_embeds=e).logits[:, P - 1 + m]
            return torch.softmax(logits, -1)[:, int(item.response_ids[m])]
        attr = captum_attr.InputXGradient(prob).attribute(emb)        # [1, T, d]
        cols.append(attr[0, :P].sum(-1)[item.rows])
    want = torch.stack(cols, 1)
    for mode in ("vjp", "jvp"):
        assert _rel_err(attribute(model, [item], mode=mode)[0], want) < 1e-5


def test_auto_mode_picks_the_cheaper_path_and_agrees(models):
    long_prompt = make_item(torch.arange(5, 45), torch.arange(5, 8))     # N=40 >> M=3: 3 VJPs
    long_response = make_item(torch.arange(5, 8), torch.arange(5, 45))   # N=3 << M=40: 3 JVPs
    assert plan_modes([long_prompt, long_response]) == ["vjp", "jvp"]
    assert plan_modes([long_prompt], "jvp") == ["jvp"]
    got = attribute(models["llama"], [long_prompt, long_response])
    for g, it in zip(got, [long_prompt, long_response]):
        assert _rel_err(g, naive_attribution(models["llama"], it)) < 1e-5


def test_empty_response_and_no_rows_give_empty_matrices(models):
    empty = make_item(torch.arange(5, 10), torch.zeros(0, dtype=torch.long))
    no_rows = make_item(torch.arange(5, 10), torch.arange(5, 8), torch.zeros(5, dtype=torch.bool))
    got = attribute(models["llama"], [empty, no_rows])
    assert got[0].shape == (5, 0) and got[1].shape == (0, 3)


def test_model_state_untouched_and_no_parameter_gradients(models):
    model = tiny_model("llama")  # parameters require grad, as a freshly loaded model's do
    model.train()
    attribute(model, _items()[:2])
    assert model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_head_reproduces_the_models_logits():
    for family in ("gemma2", "gpt2", "llama"):  # gemma2 soft-caps its logits
        model = tiny_model(family).double()
        ids = torch.randint(5, 500, (2, 9))
        with torch.no_grad():
            hidden = model_body(model)(input_ids=ids).last_hidden_state
            assert torch.allclose(head_logits(model, hidden), model(input_ids=ids).logits, atol=1e-10)


def test_target_values_by_hand():
    logits = torch.tensor([[1.0, 2.0, 0.5]], dtype=torch.float64)
    target = torch.tensor([1])
    probs = torch.exp(logits) / torch.exp(logits).sum()
    assert torch.allclose(target_values(logits, target, "prob"), probs[:, 1])
    assert torch.allclose(target_values(logits, target, "logprob"), probs[:, 1].log())
    assert torch.allclose(target_values(logits, target, "logit"), torch.tensor([2.0], dtype=torch.float64))


def test_bad_inputs_fail_clearly(models):
    with pytest.raises(AttributionError, match="one flag per prompt token"):
        make_item(torch.arange(4), torch.arange(2), torch.ones(3, dtype=torch.bool))
    with pytest.raises(AttributionError, match="empty prompt"):
        make_item(torch.zeros(0, dtype=torch.long), torch.arange(2))
    with pytest.raises(AttributionError, match="unknown attribution target"):
        attribute(models["llama"], _items()[:1], target="probability")
    with pytest.raises(AttributionError, match="unknown attribution mode"):
        attribute(models["llama"], _items()[:1], mode="fast")


def test_prompts_share_passes_only_when_padding_is_cheap():
    from tuneshift.attribution.plan import prompt_groups as _groups

    same = [make_item(torch.arange(5, 15), torch.arange(5, 13)) for _ in range(3)]
    assert list(_groups("vjp", [0, 1, 2], same, 8, 10**6)) == [[0, 1, 2]]
    assert list(_groups("vjp", [0, 1, 2], same, 2, 10**6)) == [[0, 1], [2]]
    mixed = [make_item(torch.arange(5, 45), torch.arange(5, 13)), make_item(torch.arange(5, 8), torch.arange(5, 13))]
    assert list(_groups("vjp", [0, 1], mixed, 8, 10**6)) == [[1], [0]]          # 40 vs 3 prompt tokens
    assert list(_groups("vjp", [0, 1], mixed, 8, 10**6, max_waste=100)) == [[1, 0]]


def test_chunk_size_respects_memory_budget():
    assert chunk_size(batch=2, length=100, overhead_tokens=128, max_batch_tokens=1000) == 5   # 5 * 2 * 100
    assert chunk_size(batch=1, length=10, overhead_tokens=128, max_batch_tokens=10**6) == 16  # sqrt(2 * 128)
    assert chunk_size(batch=8, length=1000, overhead_tokens=128, max_batch_tokens=10) == 1


def _column_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max over response tokens of |got - want| relative to that column's own largest magnitude."""
    got, want = got.double(), want.double()
    return float(((got - want).abs().max(0).values / want.abs().max(0).values).max())


def test_confident_tokens_keep_their_precision_in_float32(monkeypatch):
    """p(y) near 1: the target's derivative holds 1 - p, which float32 rounds away; it is taken in float64.

    The final norm's gain is scaled so that greedy tokens have 1 - p from 1e-8 to 2e-5. A float32 model must
    then agree with its float64 copy to 1e-4 of each column's maximum; the float32 target it replaced is
    off by more than the column's maximum itself.
    """
    from tuneshift.attribution import passes

    m32 = tiny_model("llama")
    with torch.no_grad():
        m32.model.norm.weight.mul_(30.0)
    m64 = tiny_model("llama").double()
    m64.load_state_dict({k: v.double() for k, v in m32.state_dict().items()})
    prompt = torch.randint(5, 500, (12,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        response = m64.generate(prompt[None], max_new_tokens=16, do_sample=False, pad_token_id=0)[0, 12:]
        logits = m64(torch.cat([prompt, response])[None]).logits[0, 11:-1]
        p = logits.softmax(-1).gather(-1, response[:, None]).squeeze(-1)
    assert float((1 - p).max()) < 1e-4 and float((1 - p).min()) < 1e-7        # near one-hot, as intended
    item = make_item(prompt, response, torch.arange(12) > 0)
    want = attribute(m64, [item])[0]
    for mode in ("vjp", "jvp"):
        assert _column_error(attribute(m32, [item], mode=mode)[0], want) < 1e-4

    def float32_target(logits, targets, target):  # what target_values did before: softmax in float32
        return torch.log_softmax(logits.float(), -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).exp()

    monkeypatch.setattr(passes, "target_values", float32_target)
    assert _column_error(attribute(m32, [item], mode="vjp")[0], want) > 0.5
