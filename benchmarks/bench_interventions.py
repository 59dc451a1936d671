"""Intervention cost: a forward with writes (per-row draws) vs a plain forward of the same batch; batched draws.

Same left-padded batch (the organism's held-out prompts with their reference answers, teacher-forced), timings
are medians of interleaved repeats. Rows compared:

- ``plain``: the model's own forward under ``torch.no_grad()`` (the baseline of the target);
- ``trace``: the probe registry's one nnsight trace reading the logits, no writes;
- ``interventions``: the same trace with per-row writes at every layer: mean-ablation of a random head set per
  row (``AblateHeads``), a 16-direction ``ProjectOut`` of each MLP output (a basis per row), a ``Steer`` of the
  residual stream and a ``Patch`` of one layer's residual stream, plus corrupted embeddings (``CorruptPositions``);
- generation: ``greedy_generate`` with those writes at every step vs without, and vs transformers' ``generate``;
- draws: D random head sets as rows of one batch (what the causal plugin does) vs D separate forwards.

Target: ``interventions / plain <= 1.2``.

    python benchmarks/bench_interventions.py --model models/tiny-pair/instruct --rows 32 128 --repeats 15
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tuneshift.adapters import ModelAdapter  # noqa: E402
from tuneshift.data import encode_prompt, left_pad, load_prompts  # noqa: E402
from tuneshift.evaluation import greedy_generate, reference_ids  # noqa: E402
from tuneshift.interventions import AblateHeads, CorruptPositions, Patch, ProjectOut, Steer  # noqa: E402
from tuneshift.loading import ModelSpec, load_model  # noqa: E402
from tuneshift.probes import Probe, ProbeRegistry  # noqa: E402
from tuneshift.runner import ModelRun  # noqa: E402


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _interleaved(fns: dict, repeats: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def writes(adapter: ModelAdapter, ids: torch.Tensor, mask: torch.Tensor, seed: int = 0) -> list:
    """Per-row interventions at every layer (a different draw in every row)."""
    gen = torch.Generator().manual_seed(seed)
    rows, d, H = ids.shape[0], adapter.d_model, adapter.n_heads
    out = [CorruptPositions("embed.output", torch.rand(ids.shape, generator=gen) < 0.1,
                            torch.zeros(d), noise_std=0.0)]
    for layer in range(adapter.n_layers):
        heads = torch.rand(rows, H, generator=gen) < 0.25
        basis = torch.linalg.qr(torch.randn(rows, d, 16, generator=gen)).Q
        out += [AblateHeads(layer, heads, mode="mean", mean=torch.zeros(H, adapter.d_head)),
                ProjectOut(f"layers.{layer}.mlp.output", basis),
                Steer(f"layers.{layer}.resid_post", torch.randn(rows, d, generator=gen), scale=0.1)]
    out.append(Patch(f"layers.{adapter.n_layers // 2}.resid_post", torch.randn(*ids.shape, d, generator=gen),
                     positions=mask.bool()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/tiny-pair/instruct")
    parser.add_argument("--rows", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--gen-rows", type=int, default=64)
    parser.add_argument("--draws", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = ModelSpec(path=args.model, chat_template=True)
    model, tok = load_model(spec)
    run = ModelRun("m", args.model, spec, model, tok, ModelAdapter(model), True)
    items = [encode_prompt(tok, p, True) for p in load_prompts("organism")]
    refs = reference_ids(tok, items)
    seqs = [torch.cat([e.input_ids, r]) for e, r in zip(items, refs)]
    registry = ProbeRegistry(run.adapter, {"b": [Probe("logits")]})
    print(f"model {args.model}, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.2f}")
    print("\n| rows | tokens (padded) | plain no_grad (ms) | trace, no writes (ms) | trace + per-row writes (ms) | "
          "writes / plain | writes / trace |")
    print("|---|---|---|---|---|---|---|")
    for rows in args.rows:
        ids, mask, pos = left_pad([seqs[i % len(seqs)] for i in range(rows)], tok.pad_token_id)
        ivs = writes(run.adapter, ids, mask)

        def plain():
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask, position_ids=pos)

        t = _interleaved({"plain": plain, "trace": lambda: registry.run(run.nnsight, ids, mask, pos),
                          "writes": lambda: registry.run(run.nnsight, ids, mask, pos, ivs)}, args.repeats)
        print(f"| {rows} | {ids.numel()} | {1e3 * t['plain']:.1f} | {1e3 * t['trace']:.1f} | {1e3 * t['writes']:.1f} | "
              f"{t['writes'] / t['plain']:.2f}x | {t['writes'] / t['trace']:.2f}x |")

    ids, mask, pos = left_pad([items[i % len(items)].input_ids for i in range(args.gen_rows)], tok.pad_token_id)
    ivs = writes(run.adapter, ids, mask)

    def hf_generate():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=64,
                           pad_token_id=tok.pad_token_id, top_p=None, top_k=None, temperature=None)

    heads_only = [iv for iv in ivs if isinstance(iv, AblateHeads)]
    g = _interleaved({"hf": hf_generate, "plain": lambda: greedy_generate(run, ids, mask, pos, [], 64),
                      "heads": lambda: greedy_generate(run, ids, mask, pos, heads_only, 64),
                      "writes": lambda: greedy_generate(run, ids, mask, pos, ivs, 64)}, max(3, args.repeats // 5))
    print(f"\n| generation, {args.gen_rows} prompts, <= 64 tokens | seconds | / no writes |\n|---|---|---|")
    print(f"| transformers generate (greedy, no row dropping) | {g['hf']:.2f} | {g['hf'] / g['plain']:.2f}x |")
    print(f"| greedy_generate, no writes | {g['plain']:.2f} | 1.00x |")
    print(f"| greedy_generate, per-row head ablation in every layer (a heads-test step) | {g['heads']:.2f} | "
          f"{g['heads'] / g['plain']:.2f}x |")
    print(f"| greedy_generate, all {len(ivs)} writes above at every step | {g['writes']:.2f} | "
          f"{g['writes'] / g['plain']:.2f}x |")

    one_ids, one_mask, one_pos = left_pad(seqs[:8], tok.pad_token_id)
    draws = torch.rand(args.draws, run.adapter.n_heads, generator=torch.Generator().manual_seed(1)) < 0.25
    rep = lambda x: x.repeat(args.draws, 1)  # noqa: E731
    batched_ivs = [AblateHeads(1, draws.repeat_interleave(8, 0))]

    def separate():
        for d in range(args.draws):
            registry.run(run.nnsight, one_ids, one_mask, one_pos, [AblateHeads(1, draws[d])])

    d = {"separate": _median(separate, 3),
         "batched": _median(lambda: registry.run(run.nnsight, rep(one_ids), rep(one_mask), rep(one_pos),
                                                 batched_ivs), 3)}
    print(f"\n| {args.draws} head-ablation draws x 8 prompts | seconds |\n|---|---|")
    print(f"| one forward per draw | {d['separate']:.3f} |\n| all draws as rows of one forward | {d['batched']:.3f} |")
    print(f"| speed-up | {d['separate'] / d['batched']:.1f}x |")


if __name__ == "__main__":
    main()
