"""Scaling: time and peak memory of the three analyses as the input and the model grow.

For each axis the table gives, per point, the median wall and CPU seconds of ``--repeats`` runs and the peak
memory above what the process held before the call (RSS on CPU, allocated memory on a GPU), then the fitted
exponent ``b`` of ``time ~ size^b`` (least squares on log-log; 1 = linear, < 1 = fixed costs still visible).

* **saliency vs response length M** (``--lengths``, default 16/32/64) and **vs number of prompts**
  (``--prompts``, 1/2/4, M = ``--prompts-m`` = 16) on ``--saliency-model`` (default SmolLM2-135M-Instruct): tuneshift's exact
  gradient x input (:func:`tuneshift.attribution.attribute`, mode auto) on fixed token ids: a prompt of
  ``--prompt-len`` random ids (BOS position excluded from the attributed rows) and a response of M ids.
  Exact attribution needs min(N, M) passes over N + M tokens, so at fixed N the time can grow at most about
  linearly in M; it grows linearly in the number of prompts.
* **head relations vs word-list size** (``--words``, 2k/5k/10k/20k builtin words): static embeddings +
  :func:`tuneshift.plugins.head_relations.mining.mine_model` (K = 100, every dim of every head) on ``--hr-layers``
  evenly spaced layers of SmolLM2 (every layer costs the same; ppmi word vectors, tau set up outside the timing).
  Top-K selection is linear in the list; the K x K pair tests per dim do not depend on it.
* **FFN concepts vs word-list size**: :func:`tuneshift.plugins.ffn_concepts.directions.top_words` of R = 300 principal
  directions of every layer of SmolLM2 over the same word lists (linear in the list; the SVD does not depend
  on it and is reported once).
* **model size** (parameters): tiny-random:llama (2 layers, d 64), random Llamas of 4 layers/d 256 and
  8 layers/d 384 (the tiny-pair shapes; the tiny tokenizer), ``models/tiny-pair/instruct`` when it exists, and
  SmolLM2-135M: saliency (1 prompt, P = ``--prompt-len``, M = 32), head relations (all layers, 5k words) and
  FFN concepts (eigh SVD, R = min(300, d), top words of every layer over 5k words).

    python benchmarks/bench_scaling.py --axes saliency       # README figures, part 1 (~6 min, 1 thread)
    python benchmarks/bench_scaling.py --axes words model    # part 2 (~4 min)
    python benchmarks/bench_scaling.py --quick         # smoke test on tiny models (~1 min)
    python benchmarks/bench_scaling.py --device cuda   # peak allocated GPU memory instead of RSS
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchutil import (SMOLLM2, TINY_PAIR, Timing, fmt_mb, load_average, loglog_slope, machine_line,  # noqa: E402
                       timed)
from tuneshift.adapters import ModelAdapter  # noqa: E402
from tuneshift.loading import ModelSpec, load_model  # noqa: E402
from tuneshift.words import load_word_list, static_embeddings  # noqa: E402

HEADER = "| {x} | wall s | CPU s | {per} | peak memory MiB above before (abs.) | notes |\n|---|---|---|---|---|---|"


def row(x, t: Timing, per: str, note: str = "") -> str:
    return f"| {x} | {t.wall_s:.3f} | {t.cpu_s:.3f} | {per} | {fmt_mb(t.peak)} | {note} |"


def fit_line(name: str, sizes, timings: list[Timing]) -> str:
    b = loglog_slope(sizes, [t.wall_s for t in timings])
    b_cpu = loglog_slope(sizes, [t.cpu_s for t in timings])
    return f"\nfitted exponent of {name}: wall time ~ size^{b:.2f} (CPU time ~ size^{b_cpu:.2f})"


# ---- models ---------------------------------------------------------------------------------------------------
def random_llama(layers: int, d: int, d_ff: int, heads: int, device: str, seed: int = 0):
    """A random Llama with the tiny tokenizer (vocab 512): the tiny-pair shapes without training."""
    import transformers
    from tuneshift.testing import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=d, intermediate_size=d_ff,
                                   num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                   max_position_embeddings=1024, tie_word_embeddings=True,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).to(device).eval().requires_grad_(False)
    return model, tok


def model_zoo(args) -> list[tuple[str, callable]]:
    zoo = [("tiny-random:llama (2L, d 64)", lambda: load_model(ModelSpec(path="tiny-random:llama",
                                                                          device=args.device)))]
    if not args.quick:
        zoo.append(("random Llama 4L, d 256", lambda: random_llama(4, 256, 688, 4, args.device)))
        zoo.append(("random Llama 8L, d 384", lambda: random_llama(8, 384, 1024, 6, args.device)))
        if (TINY_PAIR / "instruct" / "config.json").is_file():
            zoo.append(("models/tiny-pair/instruct", lambda: load_model(
                ModelSpec(path=str(TINY_PAIR / "instruct"), device=args.device))))
        zoo.append(("SmolLM2-135M-Instruct", lambda: load_model(ModelSpec(path=SMOLLM2, device=args.device))))
    else:
        zoo.append(("random Llama 2L, d 128", lambda: random_llama(2, 128, 344, 4, args.device)))
        zoo.append(("random Llama 4L, d 256", lambda: random_llama(4, 256, 688, 4, args.device)))
    return zoo


# ---- saliency -------------------------------------------------------------------------------------------------
def saliency_items(n_prompts: int, prompt_len: int, m: int, vocab: int, seed: int = 0):
    from tuneshift.attribution import make_item

    gen = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n_prompts):
        prompt = torch.randint(10, min(vocab, 500), (prompt_len,), generator=gen)
        rows = torch.ones(prompt_len, dtype=torch.bool)
        rows[0] = False  # the BOS position is not attributed
        items.append(make_item(prompt, torch.randint(10, min(vocab, 500), (m,), generator=gen), rows))
    return items


def time_saliency(model, items, args) -> Timing:
    from tuneshift.attribution import attribute

    t = Timing()
    attribute(model, [items[0]], target="prob")  # warm-up
    for _ in range(args.repeats):
        timed(lambda: attribute(model, items, target="prob", mode="auto"), args.device, t)
    return t


def saliency_axes(args) -> None:
    from tuneshift.attribution import plan_modes

    path = "tiny-random:llama" if args.quick else args.saliency_model
    model, tok = load_model(ModelSpec(path=path, device=args.device))
    vocab = model.config.vocab_size
    print(f"\n## Saliency (tuneshift `attribute`, target p, mode auto) on {path}\n")
    print(f"### vs response length M: 1 prompt of {args.prompt_len} tokens ({args.prompt_len - 1} attributed)\n")
    print(HEADER.format(x="M", per="ms / response token"))
    timings = []
    for m in args.lengths:
        items = saliency_items(1, args.prompt_len, m, vocab)
        t = time_saliency(model, items, args)
        timings.append(t)
        print(row(m, t, f"{1e3 * t.wall_s / m:.1f}", f"path {plan_modes(items)[0]}"), flush=True)
    print(fit_line("saliency vs M", args.lengths, timings))

    m = args.prompts_m
    print(f"\n### vs number of prompts: M = {m}, prompts of {args.prompt_len} tokens\n")
    print(HEADER.format(x="prompts", per="ms / prompt"))
    timings = []
    for n in args.prompts:
        items = saliency_items(n, args.prompt_len, m, vocab, seed=1)
        t = time_saliency(model, items, args)
        timings.append(t)
        print(row(n, t, f"{1e3 * t.wall_s / n:.0f}", f"paths {sorted(set(plan_modes(items)))}"), flush=True)
    print(fit_line("saliency vs prompts", args.prompts, timings))
    del model


# ---- weight analyses ------------------------------------------------------------------------------------------
def word_vectors(words):
    from tuneshift.plugins.head_relations.similarity import make_backend, thresholds

    vecs = make_backend("ppmi").lookup(words)
    vectors = torch.from_numpy(vecs.vectors).double()
    tau = thresholds(vectors, torch.from_numpy(vecs.present), 3000, 1.96)
    return vectors, tau


def time_mining(adapter, tok, words, vectors, tau, layers, args) -> Timing:
    from tuneshift.plugins.head_relations.mining import MiningSettings, mine_model

    dev = args.device
    vectors, tau = vectors.to(dev), tau.to(dev)

    def run():
        with torch.no_grad():
            e_w = static_embeddings(tok, adapter.embedding_matrix().to(dev), words)
            return sum(len(r.sim) for r in mine_model(adapter, e_w, vectors, tau, MiningSettings(), layers=layers))

    t = Timing()
    for _ in range(args.repeats):
        t.pairs = timed(run, dev, t)
    return t


def time_top_words(adapter, tok, words, directions, args) -> Timing:
    from tuneshift.plugins.ffn_concepts.directions import normalize_rows, top_words

    dev = args.device

    def run():
        with torch.no_grad():
            e_out = normalize_rows(static_embeddings(tok, adapter.unembedding_matrix().to(dev), words))
            return [top_words(e_out, d.vectors, 15) for d in directions]

    t = Timing()
    for _ in range(args.repeats):
        timed(run, dev, t)
    return t


def ffn_directions(adapter, rank: int, device: str):
    from tuneshift.plugins.ffn_concepts.directions import principal_directions

    with torch.no_grad():
        return [principal_directions(adapter.W_down(i).to(device), rank, "eigh") for i in range(adapter.n_layers)]


def word_axes(args) -> None:
    path = "tiny-random:llama" if args.quick else SMOLLM2
    model, tok = load_model(ModelSpec(path=path, device=args.device))
    adapter = ModelAdapter(model)
    full = load_word_list("builtin", tok, max(args.words))
    layers = sorted(set(np.linspace(0, adapter.n_layers - 1, min(args.hr_layers, adapter.n_layers))
                        .round().astype(int).tolist()))
    print(f"\n## Head relations vs word-list size: {path}, layers {layers} of {adapter.n_layers} "
          f"({adapter.n_heads} heads x d_head {adapter.d_head} each), K = 100, builtin words\n")
    print(HEADER.format(x="words", per="kept pairs"))
    timings = []
    for n in args.words:
        words = full.words[:n]
        vectors, tau = word_vectors(words)
        t = time_mining(adapter, tok, words, vectors, tau, layers, args)
        timings.append(t)
        print(row(n, t, f"{t.pairs}", f"all {adapter.n_layers} layers ≈ {t.wall_s * adapter.n_layers / len(layers):.1f} s"),
              flush=True)
    print(fit_line("head relations vs words", args.words, timings))

    rank = min(300, adapter.d_model)
    t_svd = Timing()
    for _ in range(args.repeats):
        directions = timed(lambda: ffn_directions(adapter, rank, args.device), args.device, t_svd)
    print(f"\n## FFN concepts vs word-list size: {path}, top-15 words of R = {rank} directions in each of "
          f"{adapter.n_layers} layers (the eigh SVD of all layers, independent of the list: {t_svd.wall_s:.2f} s)\n")
    print(HEADER.format(x="words", per="µs / (word x direction)"))
    timings = []
    for n in args.words:
        t = time_top_words(adapter, tok, full.words[:n], directions, args)
        timings.append(t)
        print(row(n, t, f"{1e6 * t.wall_s / (n * rank * adapter.n_layers):.3f}"), flush=True)
    print(fit_line("FFN top words vs words", args.words, timings))
    del model


def model_axis(args) -> None:
    print(f"\n## Model size: saliency (1 prompt, P = {args.prompt_len}, M = 32), head relations (all layers, "
          f"{args.model_words} words), FFN concepts (eigh, R = min(300, d), top-15 over {args.model_words} words)\n")
    print("| model | params (M) | saliency s | saliency peak MiB | head relations s | head rel. peak MiB "
          "| FFN s | FFN peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    sizes, sal, hr, ffn = [], [], [], []
    for name, loader in model_zoo(args):
        model, tok = loader()
        adapter = ModelAdapter(model)
        n_params = sum(p.numel() for p in model.parameters())
        items = saliency_items(1, args.prompt_len, 32, model.config.vocab_size, seed=2)
        t_sal = time_saliency(model, items, args)
        words = load_word_list("builtin", tok, args.model_words).words
        vectors, tau = word_vectors(words)
        t_hr = time_mining(adapter, tok, words, vectors, tau, None, args)
        rank = min(300, adapter.d_model)

        def ffn_run(adapter=adapter):  # bound now: the loop deletes it after each model
            return time_top_words(adapter, tok, words, ffn_directions(adapter, rank, args.device),
                                  argparse.Namespace(repeats=1, device=args.device))

        t_ffn = Timing()
        for _ in range(args.repeats):
            timed(ffn_run, args.device, t_ffn)
        sizes.append(n_params)
        sal.append(t_sal), hr.append(t_hr), ffn.append(t_ffn)
        print(f"| {name} | {n_params / 1e6:.2f} | {t_sal.wall_s:.3f} | {fmt_mb(t_sal.peak)} | {t_hr.wall_s:.3f} | "
              f"{fmt_mb(t_hr.peak)} | {t_ffn.wall_s:.3f} | {fmt_mb(t_ffn.peak)} |", flush=True)
        del model, adapter
    for label, ts in (("saliency", sal), ("head relations", hr), ("FFN concepts", ffn)):
        print(fit_line(f"{label} vs parameters", sizes, ts).strip())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny models and few points (smoke test)")
    parser.add_argument("--axes", nargs="+", default=["saliency", "words", "model"],
                        choices=["saliency", "words", "model"])
    parser.add_argument("--saliency-model", default=SMOLLM2)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--prompts", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--prompts-m", type=int, default=16, help="response length on the prompts axis")
    parser.add_argument("--prompt-len", type=int, default=24)
    parser.add_argument("--words", type=int, nargs="+", default=[2000, 5000, 10000, 20000])
    parser.add_argument("--hr-layers", type=int, default=6, help="layers mined on the word-list axis")
    parser.add_argument("--model-words", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine a second thread can make it 5-25x slower)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import transformers

    transformers.logging.set_verbosity_error()
    print("# Scaling (bench_scaling.py)\n")
    print(machine_line(args.device))
    print(f"\nsettings: {' '.join(sys.argv[1:]) or '(defaults)'}; medians of {args.repeats} repeats")
    if "saliency" in args.axes:
        saliency_axes(args)
    if "words" in args.axes:
        word_axes(args)
    if "model" in args.axes:
        model_axis(args)
    print(f"\nfinished; load average {load_average()}")


if __name__ == "__main__":
    main()
